"""The baseline distillers (KD, hint, RKD, PKT, NCE, CCL, CRD) against direct float64 computations written
out here with explicit loops, plus CRD's memory: its update, its noise, and a save/restore round trip."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch

from ega_ray.losses import CCLLoss, CRDLoss, HintLoss, KDLoss, LogitKD, NCELoss, PKTLoss, RKDLoss


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def _pair(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, d, generator=g, dtype=torch.float64)
    return t, t + 0.7 * torch.randn(b, d, generator=g, dtype=torch.float64)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(np.linalg.norm(v), 1e-12)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def test_hint_is_the_mean_squared_difference() -> None:
    t, s = _pair(5, 4, 0)
    expected = sum((a - b) ** 2 for a, b in zip(_np(s).ravel(), _np(t).ravel(), strict=True)) / 20
    assert HintLoss()(t, s).item() == pytest.approx(expected, rel=1e-5)


def test_logit_kd_is_kd_on_the_heads_logits() -> None:
    t, s = _pair(6, 5, 1)
    zt, zs = _pair(6, 10, 2)
    assert LogitKD(3.0)(t, s, teacher_logits=zt, student_logits=zs).item() == pytest.approx(KDLoss(3.0)(zt, zs).item())
    with pytest.raises(ValueError, match="kd needs teacher_logits"):
        LogitKD()(t, s)


def _direct_rkd(t: torch.Tensor, s: torch.Tensor, wd: float, wa: float) -> torch.Tensor:
    """RKD as CRD's repository (RepDistiller) defines it, written out with loops in float64 torch (for autograd):
    distances ÷ their mean over the pairs i ≠ j, smooth-L1 averaged over all B² entries (the diagonal is 0 on
    both sides), angles at every x_j over all B³ triples (0 where a difference vector is 0), teacher side constant."""
    b = len(t)

    def unit(v: torch.Tensor) -> torch.Tensor:
        n = torch.sqrt((v * v).sum())
        return v / n if n.item() > 0 else v * 0

    def dist(x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        d = {(i, j): torch.sqrt(((x[i] - x[j]) ** 2).sum()) for i in range(b) for j in range(b) if i != j}
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}

    def huber(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * x if abs(x.item()) < 1 else abs(x) - 0.5

    t = t.detach()
    d_t, d_s = dist(t), dist(s)
    l_d = sum(huber(d_s[k] - d_t[k]) for k in d_t) / (b * b)
    l_a = 0
    for i, j, k in product(range(b), repeat=3):
        a_s = (unit(s[i] - s[j]) * unit(s[k] - s[j])).sum()
        a_t = (unit(t[i] - t[j]) * unit(t[k] - t[j])).sum()
        l_a = l_a + huber(a_s - a_t)
    return wd * l_d + wa * l_a / b**3


@pytest.mark.parametrize(("b", "wd", "wa"), [(3, 25.0, 50.0), (5, 1.0, 0.0), (6, 0.0, 2.0), (4, 25.0, 50.0)])
def test_rkd_matches_direct_loops_with_gradients(b: int, wd: float, wa: float) -> None:
    t, s = _pair(b, 4, b)
    s = s.requires_grad_()
    expected = _direct_rkd(t, s, wd, wa)
    (want,) = torch.autograd.grad(expected, s)
    got = RKDLoss(wd, wa)(t, s)
    (have,) = torch.autograd.grad(got, s)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(have, want, rtol=1e-7, atol=1e-12)


def test_rkd_distance_term_averages_over_all_entries() -> None:
    """The distance term is RepDistiller's mean over the whole B × B matrix: (B − 1)/B of the mean over the
    B(B − 1) pairs (our former reading, 1.6% larger at B = 64)."""
    b = 8
    t, s = _pair(b, 4, 11)
    d_t, d_s = torch.cdist(t, t), torch.cdist(s, s)
    off = ~torch.eye(b, dtype=torch.bool)
    diff = d_s[off] / d_s[off].mean() - d_t[off] / d_t[off].mean()
    pair_mean = torch.where(diff.abs() < 1, 0.5 * diff**2, diff.abs() - 0.5).mean().item()
    assert RKDLoss(1.0, 0.0)(t, s).item() == pytest.approx(pair_mean * (b - 1) / b, rel=1e-9)


def test_pkt_matches_direct_loops() -> None:
    t, s = _pair(5, 3, 7)

    def cond(x: np.ndarray) -> np.ndarray:
        u = np.stack([_unit(r) for r in x])
        k = np.array([[(u[i] @ u[j] + 1) / 2 for j in range(len(x))] for i in range(len(x))])
        return k / k.sum(1, keepdims=True)

    p, q = cond(_np(t)), cond(_np(s))
    eps = 1e-7
    expected = sum(p[i, j] * math.log((p[i, j] + eps) / (q[i, j] + eps)) for i in range(5) for j in range(5)) / 25
    assert PKTLoss()(t, s).item() == pytest.approx(expected, rel=1e-4)


def _direct_nce(t: np.ndarray, s: np.ndarray, labels: list[int], tau: float) -> float:
    zt, zs = np.stack([_unit(r) for r in t]), np.stack([_unit(r) for r in s])
    total = 0.0
    for i in range(len(t)):
        kept = [j for j in range(len(t)) if j == i or labels[i] < 0 or labels[j] != labels[i]]
        logits = {j: float(zs[i] @ zt[j]) / tau for j in kept}
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits.values()))
    return total / len(t)


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 0, 2], [0, -1, -1, 0, 1, 1]])
def test_nce_masks_same_class_negatives(labels: list[int]) -> None:
    t, s = _pair(6, 4, 3)
    y = torch.tensor(labels)
    expected = _direct_nce(_np(t), _np(s), labels, 0.1)
    assert NCELoss(0.1)(t, s, labels=y).item() == pytest.approx(expected, rel=1e-4)
    if len(set(labels)) < len(labels):  # the mask changes the loss
        assert abs(expected - _direct_nce(_np(t), _np(s), list(range(6)), 0.1)) > 1e-3


def test_ccl_is_nce_plus_the_symmetric_kl_of_the_logits() -> None:
    t, s = _pair(6, 4, 5)
    zt, zs = _pair(6, 7, 6)
    labels = [0, 0, 1, 2, 2, -1]
    tau = 3.0
    sym = 0.0
    for i in range(6):
        p_t, p_s = _softmax(_np(zt)[i] / tau), _softmax(_np(zs)[i] / tau)
        sym += 0.5 * tau * tau * (_kl(p_t, p_s) + _kl(p_s, p_t))
    expected = _direct_nce(_np(t), _np(s), labels, 0.1) + sym / 6
    got = CCLLoss(0.1, tau)(t, s, labels=torch.tensor(labels), teacher_logits=zt, student_logits=zs)
    assert got.item() == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------- CRD


def _direct_crd(crd: CRDLoss, t: torch.Tensor, s: torch.Tensor, index: list[int]) -> tuple[float, np.ndarray]:
    """The CRD loss written out with loops, from the memory as it is before the call; also the memory_s
    the update should leave."""
    n, size, k, tau, m = len(t), crd.bank_size, crd.negatives, crd.temperature, crd.momentum
    g = torch.Generator().manual_seed(crd.seed * 1_000_003 + int(crd.step))
    noise = torch.randint(0, size, (n, k), generator=g).numpy()  # the documented draw: uniform, seeded by step
    mem_s, mem_t = _np(crd.memory_s).copy(), _np(crd.memory_t).copy()
    zs, zt = np.stack([_unit(r) for r in _np(s)]), np.stack([_unit(r) for r in _np(t)])

    def scores(anchor: np.ndarray, memory: np.ndarray) -> np.ndarray:
        rows = [[math.exp(anchor[i] @ memory[j] / tau) for j in [index[i], *noise[i]]] for i in range(n)]
        return np.array(rows)

    def nce(h: np.ndarray) -> float:
        pn = k / size
        total = 0.0
        for i in range(n):
            total += math.log(h[i, 0] / (h[i, 0] + pn + 1e-7))
            total += sum(math.log(pn / (h[i, j] + pn + 1e-7)) for j in range(1, k + 1))
        return -total / n

    h_s, h_t = scores(zs, mem_t), scores(zt, mem_s)
    z_s, z_t = (h_s.mean() * size, h_t.mean() * size) if crd.z[0] < 0 else (float(crd.z[0]), float(crd.z[1]))
    loss = nce(h_s / z_s) + nce(h_t / z_t)
    for i, row in enumerate(index):
        mem_s[row] = _unit(m * mem_s[row] + (1 - m) * zs[i])
    return loss, mem_s


def test_crd_matches_direct_loops_and_updates_its_memory() -> None:
    crd = CRDLoss(embed_dim=4, bank_size=10, negatives=5, temperature=0.5, momentum=0.5, seed=3).double()
    for step, index in enumerate([[0, 3, 7], [1, 3, 9]]):
        t, s = _pair(3, 4, 10 + step)
        expected, memory_after = _direct_crd(crd, t, s, index)
        got = crd(t, s, index=torch.tensor(index))
        assert got.item() == pytest.approx(expected, rel=1e-5), step
        assert np.allclose(_np(crd.memory_s), memory_after, atol=1e-6), step
    assert int(crd.step) == 2 and float(crd.z[0]) > 0  # Z fixed at the first batch


def test_crd_memory_survives_a_save_and_restore() -> None:
    def run(crd: CRDLoss, steps: range) -> list[float]:
        out = []
        for k in steps:
            t, s = _pair(4, 6, 100 + k)
            out.append(crd(t, s, index=torch.tensor([k % 8, (k + 3) % 8, (k + 5) % 8, (k + 6) % 8])).item())
        return out

    straight = CRDLoss(6, 8, negatives=4, seed=1).double()
    reference = run(straight, range(6))
    first = CRDLoss(6, 8, negatives=4, seed=1).double()
    head = run(first, range(3))
    state = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = CRDLoss(6, 8, negatives=4, seed=1).double()
    resumed.load_state_dict(state)
    assert head + run(resumed, range(3, 6)) == pytest.approx(reference, rel=1e-12)
    fresh = CRDLoss(6, 8, negatives=4, seed=1).double()
    assert run(fresh, range(3, 6)) != pytest.approx(reference[3:], rel=1e-6)  # without the memory: different


def test_crd_queue_keeps_the_latest_embeddings() -> None:
    crd = CRDLoss(4, bank_size=5, negatives=3, bank="queue", seed=0).double()
    seen = []
    for k in range(3):
        t, s = _pair(2, 4, 200 + k)
        loss = crd(t, s, index=torch.tensor([k, k + 10]))  # any index: the queue does not use it
        assert math.isfinite(loss.item())
        seen += [_unit(r) for r in _np(s)]
    # 6 rows went into a 5-slot queue: slots hold rows 5, 1, 2, 3, 4 (the first was overwritten)
    expected = np.stack([seen[5], *seen[1:5]])
    assert np.allclose(_np(crd.memory_s), expected, atol=1e-6)
    assert int(crd.head) == 1


def test_crd_refuses_indices_outside_its_memory() -> None:
    t, s = _pair(2, 4, 0)
    with pytest.raises(ValueError, match=r"outside 0..9"):
        CRDLoss(4, 10).double()(t, s, index=torch.tensor([3, 10]))
