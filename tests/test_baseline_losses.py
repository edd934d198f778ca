"""The baseline distillers (KD, hint, RKD, PKT, NCE, CCL, CRD) against direct float64 computations written
out here with explicit loops, plus CRD's memory: its update, its noise, and a save/restore round trip."""

from __future__ import annotations

import math
from collections.abc import Callable
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


def _direct_nce(t: torch.Tensor, s: torch.Tensor, labels: list[int], tau: float) -> torch.Tensor:
    """The EGA code's NCE written out with loops (float64 torch, for autograd): p_ij = softmax over every j of
    z_s,i · z_t,j / τ; P_i = {j : y_j = y_i} ∪ {i}, and only {i} for an unlabeled row (y_i = −1);
    N_i = the rest; L = mean_i [ mean_{P_i} −log(p_ij + 1e−10) + mean_{N_i} −log(1 − p_ij + 1e−10) ]
    (a row without negatives contributes its positive term only)."""
    b = len(t)
    zt = [t[j] / torch.sqrt((t[j] ** 2).sum()) for j in range(b)]
    zs = [s[i] / torch.sqrt((s[i] ** 2).sum()) for i in range(b)]
    total = 0
    for i in range(b):
        e = [torch.exp((zs[i] * zt[j]).sum() / tau) for j in range(b)]
        p = [e_j / sum(e) for e_j in e]
        pos = [j for j in range(b) if j == i or (labels[i] >= 0 and labels[j] == labels[i])]
        neg = [j for j in range(b) if j not in pos]
        total = total + sum(-torch.log(p[j] + 1e-10) for j in pos) / len(pos)
        if neg:
            total = total + sum(-torch.log(1 - p[j] + 1e-10) for j in neg) / len(neg)
    return total / b


def _loss_and_grads(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> tuple[float, tuple[torch.Tensor, ...]]:
    """The loss and its gradient with respect to every input."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*leaves)
    return loss.item(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    "labels",
    [
        [0, 1, 2, 3, 4, 5],  # every class once: P_i = {i}
        [0, 0, 1, 1, 0, 2],
        [0, -1, -1, 0, 1, 1],  # unlabeled rows: themselves their only positive
        [2, 2, 2, 2, 2, 2],  # one class: no negatives, positive term only
        [-1, -1, -1, -1, -1, -1],
    ],
)
def test_nce_matches_direct_loops_with_gradients(labels: list[int]) -> None:
    t, s = _pair(6, 4, 3)
    y = torch.tensor(labels)
    want_loss, want = _loss_and_grads(lambda a, b: _direct_nce(a, b, labels, 0.1), t, s)
    got_loss, got = _loss_and_grads(lambda a, b: NCELoss()(a, b, labels=y), t, s)
    assert got_loss == pytest.approx(want_loss, rel=1e-9)
    for g, w in zip(got, want, strict=True):  # teacher and student sides
        assert torch.allclose(g, w, rtol=1e-7, atol=1e-12)


def test_nce_counts_same_class_rows_as_positives_and_others_as_negatives() -> None:
    """The class structure changes the loss both ways: with every row its own class, and with the same-class
    rows dropped from the softmax (our former loss) the values differ."""
    t, s = _pair(6, 4, 3)
    labels = [0, 0, 1, 1, 0, 2]
    got = NCELoss()(t, s, labels=torch.tensor(labels)).item()
    assert abs(got - _direct_nce(t, s, list(range(6)), 0.1).item()) > 1e-3
    zs, zt = torch.nn.functional.normalize(s, dim=1), torch.nn.functional.normalize(t, dim=1)
    masked = 0.0
    for i in range(6):
        kept = [j for j in range(6) if j == i or labels[j] != labels[i]]
        logits = [float(zs[i] @ zt[j]) / 0.1 for j in kept]
        masked += -logits[kept.index(i)] + math.log(sum(math.exp(v) for v in logits))
    assert abs(got - masked / 6) > 1e-2


def test_nce_unlabeled_row_is_a_class_of_its_own() -> None:
    """An unlabeled row (−1) is its own only positive and every other row's negative: the loss equals that of
    the same batch with each unlabeled row given a fresh class of its own."""
    t, s = _pair(8, 5, 21)
    with_unlabeled = torch.tensor([0, -1, 1, 0, -1, 1, -1, 2])
    fresh = torch.tensor([0, 10, 1, 0, 11, 1, 12, 2])
    assert NCELoss()(t, s, labels=with_unlabeled).item() == pytest.approx(
        NCELoss()(t, s, labels=fresh).item(), rel=1e-12
    )
    # not one class of unlabeled rows (the EGA code's reading of −1 as a label)
    assert NCELoss()(t, s, labels=with_unlabeled).item() != pytest.approx(
        NCELoss()(t, s, labels=torch.tensor([0, 9, 1, 0, 9, 1, 9, 2])).item(), rel=1e-6
    )


def test_nce_float32_and_autocast() -> None:
    t, s = _pair(6, 4, 8)
    y = torch.tensor([0, 0, 1, 1, 2, -1])
    want = _direct_nce(t, s, y.tolist(), 0.1).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = NCELoss()(t.bfloat16(), s.bfloat16(), labels=y)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=2e-2)  # bf16 inputs: their rounding only
    assert NCELoss()(t.float(), s.float(), labels=y).item() == pytest.approx(want, rel=1e-5)


def _direct_sym_kl(zs: torch.Tensor, zt: torch.Tensor, tau: float) -> torch.Tensor:
    """½ τ² [KL(p_t ‖ p_s) + KL(p_s ‖ p_t)], p = softmax(logits / τ), mean over rows, with loops."""
    total = 0
    for i in range(len(zs)):
        e_s = [torch.exp(v / tau) for v in zs[i]]
        e_t = [torch.exp(v / tau) for v in zt[i]]
        p_s = [v / sum(e_s) for v in e_s]
        p_t = [v / sum(e_t) for v in e_t]
        kl_ts = sum(a * torch.log(a / b) for a, b in zip(p_t, p_s, strict=True))
        kl_st = sum(b * torch.log(b / a) for a, b in zip(p_t, p_s, strict=True))
        total = total + 0.5 * tau * tau * (kl_ts + kl_st)
    return total / len(zs)


@pytest.mark.parametrize(("labels", "tau"), [([0, 0, 1, 2, 2, -1], None), ([0, 1, 0, 1, 0, 1], 3.0)])
def test_ccl_is_nce_plus_the_symmetric_kl_of_the_logits(labels: list[int], tau: float | None) -> None:
    t, s = _pair(6, 4, 5)
    zt, zs = _pair(6, 7, 6)
    y = torch.tensor(labels)
    ccl = CCLLoss() if tau is None else CCLLoss(logit_temperature=tau)
    tau = 1.0 if tau is None else tau  # the EGA code's T = 1 is the default

    def direct(a: torch.Tensor, b: torch.Tensor, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        return _direct_nce(a, b, labels, 0.1) + _direct_sym_kl(lb, la, tau)

    def ours(a: torch.Tensor, b: torch.Tensor, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        return ccl(a, b, labels=y, teacher_logits=la, student_logits=lb)

    want_loss, want = _loss_and_grads(direct, t, s, zt, zs)
    got_loss, got = _loss_and_grads(ours, t, s, zt, zs)
    assert got_loss == pytest.approx(want_loss, rel=1e-9)
    for g, w in zip(got, want, strict=True):  # embeddings and logits, both sides
        assert torch.allclose(g, w, rtol=1e-7, atol=1e-12)


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
