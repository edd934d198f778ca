"""NT-Xent, the contrastive loss of SimCLR, used to pretrain the self-supervised teacher.

Chen, Kornblith, Norouzi, Hinton. "A Simple Framework for Contrastive Learning of Visual
Representations." ICML 2020.

For two views a, b of a batch (B × d each), with z = normalize([a; b]) (2B × d) and the similarity
s_ij = z_i·z_j / τ, each sample's positive is its other view and every other sample is a negative:

    L = mean_i −log( exp(s_{i,p(i)}) / Σ_{j≠i} exp(s_ij) )

Under DDP the negatives span the global batch (same gather as EGA's global graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ega_ray.losses.distributed import gather_global


class NTXentLoss(nn.Module):
    def __init__(self, temperature: float = 0.5, global_batch: bool = True) -> None:
        """The loss as configured; a bad value is a ValueError naming it.

        Args:
            temperature: temperature of the cosine similarities between views (> 0).
            global_batch: gather every rank's rows first (all_gather with gradients), so the loss is the global
                batch's, as on one process.
        """
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NT-Xent temperature must be > 0, got {temperature}")
        self.temperature, self.global_batch = temperature, global_batch

    def forward(self, view_a: Tensor, view_b: Tensor) -> Tensor:
        if self.global_batch:
            view_a, view_b = gather_global(view_a), gather_global(view_b)
        b = view_a.shape[0]
        z = F.normalize(torch.cat([view_a, view_b], 0).float(), dim=1)
        sim = z @ z.T / self.temperature
        sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
        positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
        return F.cross_entropy(sim, positives)
