"""Gathering embeddings across DDP ranks so that batch-relational losses see the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks and returns this rank's slice.

    Every rank computes the same global loss L from the gathered tensor, so rank r's local
    backward only sees dL/dz_r from its own copy; summing over ranks gives W·dL/dz_r, which DDP's
    gradient *averaging* divides by W again. Net effect: the averaged parameter gradient equals that of
    one process holding the whole batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_global(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every rank, rank order, (W·B, ...). Gradients flow back to this rank's rows.

    Ranks must hold equal batch sizes (training shards are equal and batches drop their remainder).
    Identity when torch.distributed is not initialised or has one rank.
    """
    if world_size() == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)
    return _GatherWithGrad.apply(x)
