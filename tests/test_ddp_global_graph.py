"""Global-batch losses under DDP: 2 gloo ranks must reproduce one process holding the whole batch.

Each rank takes half of a fixed global batch, computes the loss through a DistributedDataParallel student and
backpropagates; its loss and DDP-averaged parameter gradients are compared with one process without DDP.
Covers EGA's graph, NT-Xent and the instance-relational baselines (RKD, PKT, NCE, CCL, CRD, whose memory
and its slots' classes must also come out identical on both ranks and equal to the single process's).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ega_ray.losses import CCLLoss, CRDLoss, EGALoss, NCELoss, NTXentLoss, PKTLoss, RKDLoss

WORLD = 2
B_GLOBAL = 12  # 6 rows per rank: graphs of 3 stay within a rank, graphs of 4 span ranks
TIMEOUT_S = 180.0

# name -> (loss, how it is fed); the EGA cases take (teacher rows, student(x rows)), NT-Xent two student views.
CASES: dict[str, tuple[str, dict]] = {
    "hard": ("ega", dict(temperature=None, global_graph=True)),
    "soft": ("ega", dict(temperature=0.5, global_graph=True)),
    "hard_local": ("ega", dict(temperature=None, global_graph=False)),
    "soft_local": ("ega", dict(temperature=0.5, global_graph=False)),
    "graphs_of_3": ("ega", dict(temperature=None, graph_size=3)),  # within ranks: nothing gathered
    "graphs_of_4": ("ega", dict(temperature=0.5, graph_size=4)),  # the middle graph spans both ranks
    "ntxent": ("ntxent", dict(temperature=0.5, global_batch=True)),
    "rkd": ("distiller", dict(cls=RKDLoss, distance_weight=1.0, angle_weight=2.0)),
    "pkt": ("distiller", dict(cls=PKTLoss)),
    "nce": ("distiller", dict(cls=NCELoss)),
    "ccl": ("distiller", dict(cls=CCLLoss)),
    # CRD takes a warm-up step first, so that its memory slots have classes and other_class draws matter
    "crd": ("distiller", dict(cls=CRDLoss, embed_dim=4, bank_size=12, negatives=5, temperature=0.5, seed=2)),
    "crd_queue": ("distiller", dict(cls=CRDLoss, embed_dim=4, bank_size=12, negatives=5, bank="queue", seed=3)),
}
LABELS = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0, 2, 2, -1, 0])  # one unlabeled row
INDEX = torch.tensor([5, 0, 11, 3, 7, 2, 9, 4, 1, 10, 6, 8])


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(B_GLOBAL, 8, generator=g, dtype=torch.float64)
    x2 = x + 0.3 * torch.randn(B_GLOBAL, 8, generator=g, dtype=torch.float64)  # second view for NT-Xent
    teacher = torch.randn(B_GLOBAL, 4, generator=g, dtype=torch.float64)
    return x, x2, teacher


def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()


def _step(
    model: nn.Module,
    params: list[nn.Parameter],
    case: str,
    x: torch.Tensor,
    x2: torch.Tensor,
    teacher: torch.Tensor,
    rows: slice,
) -> tuple[float, list[torch.Tensor]]:
    kind, kwargs = CASES[case]
    for p in params:
        p.grad = None
    extra = []
    if kind == "ega":
        loss = EGALoss(**kwargs)(teacher, model(x))
    elif kind == "ntxent":
        a, b = model(torch.cat([x, x2])).split(len(x))  # one forward for both views
        loss = NTXentLoss(**kwargs)(a, b)
    else:
        options = dict(kwargs)
        distiller = options.pop("cls")(**options).double()
        batch = dict(labels=LABELS[rows], index=INDEX[rows])
        if isinstance(distiller, CRDLoss):
            with torch.no_grad():
                distiller(teacher, x[:, :4], **batch)  # warm-up: writes every slot and its class
        emb = model(x)
        loss = distiller(teacher, emb, teacher_logits=teacher, student_logits=emb, **batch)  # logits: CCL's
        extra = [b.detach().double() for b in distiller.buffers()]  # CRD's memory, its classes, Z, step, head
    loss.backward()
    return loss.item(), [p.grad.detach().clone() for p in params] + extra


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on loopback whatever the hostname resolves to
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        x, x2, teacher = _data()
        rows = slice(rank * B_GLOBAL // WORLD, (rank + 1) * B_GLOBAL // WORLD)
        student = _student()
        ddp = nn.parallel.DistributedDataParallel(student)
        params = list(student.parameters())
        results = {case: _step(ddp, params, case, x[rows], x2[rows], teacher[rows], rows) for case in CASES}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path: Path) -> list[dict]:
    ctx = mp.spawn(_worker, args=(str(tmp_path / "dist_init"), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5.0):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-6) -> bool:
    return all(torch.allclose(u, v, rtol=0, atol=tol) for u, v in zip(a, b, strict=True))


@pytest.mark.heavy
def test_global_batch_losses_match_single_process(tmp_path: Path) -> None:
    ranks = _run_ranks(tmp_path)
    x, x2, teacher = _data()
    half = B_GLOBAL // WORLD

    def single(case: str, rows: slice = slice(None)) -> tuple[float, list[torch.Tensor]]:
        model = _student()
        return _step(model, list(model.parameters()), case, x[rows], x2[rows], teacher[rows], rows)

    # global graph / global negatives: every rank sees the loss and the gradients of the whole batch
    # (and, for CRD, ends with the same memory as one process)
    for case in ("hard", "soft", "ntxent", "rkd", "pkt", "nce", "crd", "crd_queue", "graphs_of_4"):
        loss, grads = single(case)
        for r, res in enumerate(ranks):
            r_loss, r_grads = res[case]
            assert r_loss == pytest.approx(loss, abs=1e-6), (case, r)
            assert _close(r_grads, grads), (case, r)

    # graphs within a rank: each rank's loss is the mean of its own graphs, the gradients those of all graphs;
    # CCL: the global NCE plus the logit term of the rank's own rows (per instance, not gathered)
    for case in ("graphs_of_3", "ccl"):
        loss, grads = single(case)
        assert sum(res[case][0] for res in ranks) / WORLD == pytest.approx(loss, abs=1e-6), case
        for r, res in enumerate(ranks):
            assert _close(res[case][1], grads), (case, r)

    # local graph: each rank's loss is that of its own half, DDP averages the two halves' gradients
    for case in ("hard_local", "soft_local"):
        per_half = [single(case, slice(r * half, (r + 1) * half)) for r in range(WORLD)]
        mean_grads = [sum(g) / WORLD for g in zip(*(h[1] for h in per_half), strict=True)]
        global_loss, global_grads = single(case.removesuffix("_local"))
        for r, res in enumerate(ranks):
            r_loss, r_grads = res[case]
            assert r_loss == pytest.approx(per_half[r][0], abs=1e-6), (case, r)
            assert abs(r_loss - global_loss) > 1e-3, (case, r)  # the local graph is a different loss
            assert _close(r_grads, mean_grads), (case, r)
            assert not _close(r_grads, global_grads, tol=1e-4), (case, r)
