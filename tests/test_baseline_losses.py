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


def _documented_draw(crd: CRDLoss, labels: list[int]) -> list[list[int]]:
    """CRD's noise slots as its docstring defines them, with loops: r_ik from a generator seeded by (seed, step);
    other_class: anchor i's allowed slots (class ≠ y_i; all for y_i = −1 or when none is left) in ascending
    (class, slot) order, n_ik = allowed[r_ik mod |allowed|]; any: uniform integers below the memory size."""
    g = torch.Generator().manual_seed(crd.seed * 1_000_003 + int(crd.step))
    size, k = crd.bank_size, crd.negatives
    if crd.negatives_from == "any":
        return torch.randint(0, size, (len(labels), k), generator=g).tolist()
    r = torch.randint(0, 1 << 62, (len(labels), k), generator=g).tolist()
    slot_class = crd.memory_labels.tolist()
    ordered = [j for _, j in sorted((slot_class[j], j) for j in range(size))]
    out = []
    for i, y in enumerate(labels):
        allowed = [j for j in ordered if y < 0 or slot_class[j] != y] or ordered
        out.append([allowed[v % len(allowed)] for v in r[i]])
    return out


def _direct_crd(
    crd: CRDLoss, t: torch.Tensor, s: torch.Tensor, index: list[int], labels: list[int]
) -> tuple[torch.Tensor, np.ndarray, list[int]]:
    """The CRD loss written out with loops (float64 torch, for autograd), from the memory as it is before the
    call; also the memory_s and the slots' classes the update should leave."""
    n, size, k, tau, m = len(t), crd.bank_size, crd.negatives, crd.temperature, crd.momentum
    noise = _documented_draw(crd, labels)
    mem_s, mem_t = crd.memory_s.detach().clone(), crd.memory_t.detach().clone()
    zs = [s[i] / torch.sqrt((s[i] ** 2).sum()) for i in range(n)]
    zt = [t[i] / torch.sqrt((t[i] ** 2).sum()) for i in range(n)]

    def scores(anchor: list[torch.Tensor], memory: torch.Tensor) -> list[list[torch.Tensor]]:
        return [[torch.exp((anchor[i] * memory[j]).sum() / tau) for j in [index[i], *noise[i]]] for i in range(n)]

    def nce(h: list[list[torch.Tensor]], z: float) -> torch.Tensor:
        pn = k / size
        total = 0
        for row in h:
            total = total + torch.log(row[0] / z / (row[0] / z + pn + 1e-7))
            total = total + sum(torch.log(pn / (v / z + pn + 1e-7)) for v in row[1:])
        return -total / n

    h_s, h_t = scores(zs, mem_t), scores(zt, mem_s)

    def mean(h: list[list[torch.Tensor]]) -> float:
        return sum(v.item() for row in h for v in row) / (n * (k + 1))

    z_s, z_t = (mean(h_s) * size, mean(h_t) * size) if crd.z[0] < 0 else (float(crd.z[0]), float(crd.z[1]))
    loss = nce(h_s, z_s) + nce(h_t, z_t)
    mem_after, classes_after = _np(mem_s).copy(), crd.memory_labels.tolist()
    for i, row in enumerate(index):
        mem_after[row] = _unit(m * mem_after[row] + (1 - m) * _np(zs[i]))
        classes_after[row] = labels[i]
    return loss, mem_after, classes_after


@pytest.mark.parametrize("negatives_from", ["other_class", "any"])
def test_crd_matches_direct_loops_and_updates_its_memory(negatives_from: str) -> None:
    crd = CRDLoss(4, bank_size=10, negatives=5, temperature=0.5, momentum=0.5, seed=3, negatives_from=negatives_from)
    crd = crd.double()
    batches = [([0, 3, 7], [1, 0, 1]), ([1, 3, 9], [0, 0, -1]), ([2, 7, 8], [1, -1, 0])]
    for step, (index, labels) in enumerate(batches):
        t, s = _pair(3, 4, 10 + step)
        leaves = [t.clone().requires_grad_(), s.clone().requires_grad_()]
        expected, memory_after, classes_after = _direct_crd(crd, *leaves, index, labels)
        want = torch.autograd.grad(expected, leaves)
        got = crd(*leaves, index=torch.tensor(index), labels=torch.tensor(labels))
        have = torch.autograd.grad(got, leaves)
        assert got.item() == pytest.approx(expected.item(), rel=1e-9), step
        for g, w in zip(have, want, strict=True):
            assert torch.allclose(g, w, rtol=1e-7, atol=1e-12), step
        assert np.allclose(_np(crd.memory_s), memory_after, atol=1e-12), step
        assert crd.memory_labels.tolist() == classes_after, step
    assert int(crd.step) == 3 and float(crd.z[0]) > 0  # Z fixed at the first batch


@pytest.mark.parametrize("bank", ["dataset", "queue"])
def test_crd_negatives_never_share_the_anchors_class(bank: str) -> None:
    size, classes = 40, 4
    crd = CRDLoss(4, bank_size=size, negatives=39, bank=bank, seed=7).double()
    slot_class = [j % classes if j % 10 else -1 for j in range(size)]  # every 10th row unlabeled
    for start in range(0, size, 8):  # one pass over the data: every slot receives its row and class
        rows = list(range(start, start + 8))
        t, s = _pair(8, 4, start)
        crd(t, s, index=torch.tensor(rows), labels=torch.tensor([slot_class[j] for j in rows]))
    # (the queue's slot j holds the j-th row written, here row j)
    assert crd.memory_labels.tolist() == slot_class
    anchors = [0, 1, 2, 3, -1] * 16
    noise = crd.draw_noise(torch.tensor(anchors))
    assert noise.tolist() == _documented_draw(crd, anchors)
    for y, row in zip(anchors, noise.tolist(), strict=True):
        assert y < 0 or all(slot_class[j] != y for j in row), (y, row)
    for y in range(-1, classes):  # together, a class's anchors reach every slot they may draw
        drawn = {j for a, row in zip(anchors, noise.tolist(), strict=True) if a == y for j in row}
        assert drawn == {j for j in range(size) if y < 0 or slot_class[j] != y}, y  # unlabeled slots included
    # the "any" draw does give same-class negatives: the check above is not vacuous
    crd.negatives_from = "any"
    assert any(slot_class[j] == 0 for j in crd.draw_noise(torch.tensor([0] * 4)).flatten().tolist())


def test_crd_anchor_whose_class_fills_the_memory_draws_from_any_slot() -> None:
    crd = CRDLoss(4, bank_size=6, negatives=5, seed=0).double()
    t, s = _pair(6, 4, 1)
    crd(t, s, index=torch.arange(6), labels=torch.full((6,), 2))
    noise = crd.draw_noise(torch.tensor([2, 2]))
    assert noise.tolist() == _documented_draw(crd, [2, 2]) and 0 <= int(noise.min()) and int(noise.max()) < 6


def test_crd_memory_survives_a_save_and_restore() -> None:
    def run(crd: CRDLoss, steps: range) -> list[float]:
        out = []
        for k in steps:
            t, s = _pair(4, 6, 100 + k)
            index = torch.tensor([k % 8, (k + 3) % 8, (k + 5) % 8, (k + 6) % 8])
            out.append(crd(t, s, index=index, labels=index % 3).item())
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
    # the slots' classes are part of the memory: restored with it
    no_classes = CRDLoss(6, 8, negatives=4, seed=1).double()
    no_classes.load_state_dict({k: v for k, v in state.items() if k != "memory_labels"})  # an older checkpoint
    assert (no_classes.memory_labels == -1).all()
    assert run(no_classes, range(3, 6)) != pytest.approx(reference[3:], rel=1e-6)


def test_crd_queue_keeps_the_latest_embeddings() -> None:
    crd = CRDLoss(4, bank_size=5, negatives=3, bank="queue", seed=0).double()
    seen = []
    for k in range(3):
        t, s = _pair(2, 4, 200 + k)
        loss = crd(t, s, index=torch.tensor([k, k + 10]), labels=torch.tensor([k, -1]))  # the queue uses no index
        assert math.isfinite(loss.item())
        seen += [_unit(r) for r in _np(s)]
    # 6 rows went into a 5-slot queue: slots hold rows 5, 1, 2, 3, 4 (the first was overwritten)
    expected = np.stack([seen[5], *seen[1:5]])
    assert np.allclose(_np(crd.memory_s), expected, atol=1e-6)
    assert crd.memory_labels.tolist() == [-1, -1, 1, -1, 2]  # and their classes (rows 5, 1, 2, 3, 4)
    assert int(crd.head) == 1


def test_crd_refuses_indices_outside_its_memory() -> None:
    t, s = _pair(2, 4, 0)
    with pytest.raises(ValueError, match=r"outside 0..9"):
        CRDLoss(4, 10).double()(t, s, index=torch.tensor([3, 10]))
