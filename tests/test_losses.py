"""Distillation losses checked against direct float64 computations written out here (numpy, explicit loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ega_ray.losses import DISTILLERS, Distiller, EGALoss, KDLoss, NTXentLoss

# --------------------------------------------------------------------------- direct references (numpy, float64)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def _blocks(t: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E_t, E_s, N from the Pearson correlation of the stacked [T; S] (rows are the variables)."""
    b = t.shape[0]
    c = np.corrcoef(np.concatenate([t, s], axis=0))
    return c[:b, :b], c[b:, b:], c[:b, b:]


def _frobenius(m: np.ndarray) -> float:
    return math.sqrt(sum(float(m[i, j]) ** 2 for i in range(m.shape[0]) for j in range(m.shape[1])))


def _direct_hard(t: np.ndarray, s: np.ndarray, nw: float, ew: float, blocks=None) -> float:
    e_t, e_s, n = blocks if blocks is not None else _blocks(t, s)
    return nw * _frobenius(n - np.eye(len(t))) + ew * _frobenius(e_t - e_s)


def _log_softmax(v: np.ndarray) -> np.ndarray:
    m = v.max()
    return v - m - math.log(np.exp(v - m).sum())


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p) ‖ softmax(q)) of one row."""
    log_p, log_q = _log_softmax(p_logits), _log_softmax(q_logits)
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def _direct_soft_terms(t: np.ndarray, s: np.ndarray, tau: float, blocks=None) -> tuple[float, float]:
    e_t, e_s, n = blocks if blocks is not None else _blocks(t, s)
    b = len(t)
    ce_rows = np.mean([-_log_softmax(n[i] / tau)[i] for i in range(b)])
    ce_cols = np.mean([-_log_softmax(n[:, j] / tau)[j] for j in range(b)])
    node = 0.5 * (ce_rows + ce_cols)
    kls = []
    for i in range(b):
        others = [j for j in range(b) if j != i]  # no self-loop
        kls.append(_kl(e_t[i, others] / tau, e_s[i, others] / tau))
    return float(node), float(np.mean(kls))


def _pair(b: int, d: int, dtype=torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, d, generator=g, dtype=torch.float64)
    s = 0.6 * t + torch.randn(b, d, generator=g, dtype=torch.float64)  # correlated, as after some training
    return t.to(dtype), s.to(dtype)


# --------------------------------------------------------------------------- hard EGA (the paper's loss)


@pytest.mark.parametrize(
    ("b", "d", "nw", "ew"),
    [(2, 3, 0.8, 0.24), (5, 7, 1.0, 0.0), (8, 16, 0.0, 1.0), (16, 4, 0.3, 2.5), (13, 64, 0.8, 0.24)],
)
def test_hard_ega_matches_direct(b: int, d: int, nw: float, ew: float) -> None:
    t, s = _pair(b, d, seed=b * 100 + d)
    got = EGALoss(node_weight=nw, edge_weight=ew, temperature=None)(t, s)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(_direct_hard(_np(t), _np(s), nw, ew), rel=1e-10, abs=1e-12)


def test_hard_ega_default_weights() -> None:
    loss = EGALoss()
    assert (loss.node_weight, loss.edge_weight, loss.temperature, loss.global_graph) == (0.8, 0.24, None, True)
    t, s = _pair(6, 10, seed=1)
    assert loss(t, s).item() == pytest.approx(_direct_hard(_np(t), _np(s), 0.8, 0.24), rel=1e-10)


def test_hard_ega_zero_only_for_perfect_alignment() -> None:
    # S = T with correlated rows: N = E_t is not the identity, so the node term stays > 0
    t, _ = _pair(6, 10, seed=2)
    assert EGALoss()(t, t).item() > 0.1
    # S = T with centred, mutually orthogonal rows: N = I and E_t = E_s, so the loss is 0
    u, _, _ = torch.linalg.svd(torch.eye(8, dtype=torch.float64) - 1.0 / 8)  # columns 0..6 are ⟂ to ones
    rows = u[:, :4].T
    assert EGALoss()(rows, rows).item() == pytest.approx(0.0, abs=1e-10)


def test_hard_ega_scale_and_shift_invariant() -> None:
    t, s = _pair(7, 9, seed=3)
    base = EGALoss()(t, s)
    shifted = EGALoss()(3.0 * t - 5.0, 0.25 * s + 11.0)  # Pearson ignores per-row affine maps with positive scale
    assert shifted.item() == pytest.approx(base.item(), rel=1e-9)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("temperature", [None, 0.5, 2.0])
def test_gradcheck(temperature: float | None) -> None:
    t, s = _pair(4, 5, seed=7)
    t.requires_grad_(True)
    s.requires_grad_(True)
    loss = EGALoss(node_weight=0.8, edge_weight=0.24, temperature=temperature)
    assert torch.autograd.gradcheck(loss, (t, s), eps=1e-6, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("temperature", [None, 0.3])
def test_float64_stays_float64(temperature: float | None) -> None:
    t, s = _pair(5, 6, seed=4)
    out = EGALoss(temperature=temperature)(t, s)
    assert out.dtype == torch.float64
    # and it is computed in float64: equal to the float64 reference far below float32 resolution
    if temperature is None:
        assert abs(out.item() - _direct_hard(_np(t), _np(s), 0.8, 0.24)) < 1e-12


@pytest.mark.parametrize("temperature", [None, 0.3])
def test_bf16_inputs_give_float32(temperature: float | None) -> None:
    t, s = _pair(8, 32, dtype=torch.float32, seed=5)
    loss = EGALoss(temperature=temperature)
    out = loss(t.bfloat16(), s.bfloat16())
    assert out.dtype == torch.float32
    # the graph of the bf16 values is computed in float32 (no further rounding) ...
    assert out.item() == pytest.approx(loss(t.bfloat16().float(), s.bfloat16().float()).item(), rel=1e-6)
    # ... and close to the float32 loss of the unrounded embeddings
    assert out.item() == pytest.approx(loss(t, s).item(), rel=5e-2)


@pytest.mark.parametrize("temperature", [None, 0.2])
def test_autocast_bf16_keeps_float32(temperature: float | None) -> None:
    t, s = _pair(16, 64, dtype=torch.float32, seed=6)
    loss = EGALoss(temperature=temperature)
    plain = loss(t, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = loss(t, s)
    assert amp.dtype == torch.float32
    assert amp.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-5)
    # and both are the float32 value, not a bf16 one: compare with the float64 reference
    if temperature is None:
        ref = _direct_hard(_np(t), _np(s), 0.8, 0.24)
    else:
        node, edge = _direct_soft_terms(_np(t), _np(s), temperature)
        ref = 0.8 * node + 0.24 * edge
    assert amp.item() == pytest.approx(ref, rel=1e-5)


# --------------------------------------------------------------------------- constant rows


@pytest.mark.parametrize("which", ["teacher", "student", "both"])
@pytest.mark.parametrize("temperature", [None, 0.5])
def test_constant_row_is_uncorrelated_and_finite(which: str, temperature: float | None) -> None:
    # float64 with a constant whose row mean is exact: the library must treat the row as correlation 0
    t, s = _pair(6, 8, seed=8)
    if which in ("teacher", "both"):
        t[1] = 0.5
    if which in ("student", "both"):
        s[3] = -2.0
    t.requires_grad_(True)
    s.requires_grad_(True)
    out = EGALoss(temperature=temperature)(t, s)
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(t.grad).all() and torch.isfinite(s.grad).all()
    with np.errstate(invalid="ignore", divide="ignore"):  # numpy: NaN correlations for the constant row -> 0
        blocks = tuple(np.nan_to_num(m, nan=0.0) for m in _blocks(_np(t), _np(s)))
    if temperature is None:
        expected = _direct_hard(_np(t), _np(s), 0.8, 0.24, blocks)
    else:
        node, edge = _direct_soft_terms(_np(t), _np(s), temperature, blocks)
        expected = 0.8 * node + 0.24 * edge
    assert out.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("temperature", [None, 0.5])
def test_constant_row_float32_finite(temperature: float | None) -> None:
    # float32, a constant whose row mean is not exact in float32: still finite, no NaN anywhere
    t, s = _pair(8, 16, dtype=torch.float32, seed=9)
    t[0] = 0.1
    s[0] = 3.7
    s[5] = 0.1
    s.requires_grad_(True)
    out = EGALoss(temperature=temperature)(t, s)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- soft graph


@pytest.mark.parametrize(
    ("b", "d", "tau", "nw", "ew"),
    [(4, 5, 1.0, 0.8, 0.24), (7, 12, 0.1, 1.0, 1.0), (12, 6, 0.5, 0.0, 3.0), (3, 9, 2.0, 2.0, 0.0)],
)
def test_soft_ega_matches_direct(b: int, d: int, tau: float, nw: float, ew: float) -> None:
    t, s = _pair(b, d, seed=b + 31 * d)
    node, edge = _direct_soft_terms(_np(t), _np(s), tau)
    got = EGALoss(node_weight=nw, edge_weight=ew, temperature=tau)(t, s)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(nw * node + ew * edge, rel=1e-10, abs=1e-12)


def test_soft_edge_excludes_self_loops() -> None:
    # with self-loops kept, the edge rows would differ from the reference: guard against them creeping back
    t, s = _pair(5, 8, seed=10)
    _, edge = _direct_soft_terms(_np(t), _np(s), 0.5)
    got = EGALoss(node_weight=0.0, edge_weight=1.0, temperature=0.5)(t, s).item()
    e_t, e_s, _ = _blocks(_np(t), _np(s))
    with_self = np.mean([_kl(e_t[i] / 0.5, e_s[i] / 0.5) for i in range(5)])
    assert got == pytest.approx(edge, rel=1e-10)
    assert abs(got - with_self) > 1e-6


def test_soft_identical_embeddings() -> None:
    t, _ = _pair(8, 12, seed=11)
    edge_only = [EGALoss(node_weight=0.0, edge_weight=1.0, temperature=tau)(t, t.clone()).item() for tau in (2, 0.5)]
    assert edge_only == pytest.approx([0.0, 0.0], abs=1e-12)
    node = [
        EGALoss(node_weight=1.0, edge_weight=0.0, temperature=tau)(t, t.clone()).item()
        for tau in (4.0, 1.0, 0.5, 0.2, 0.05)
    ]
    assert all(a > b for a, b in zip(node, node[1:], strict=False)), node
    assert node[-1] < 0.1 * node[0]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs",
    [dict(node_weight=-0.1), dict(edge_weight=-1.0), dict(temperature=0.0), dict(temperature=-0.5)],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EGALoss(**kwargs)


@pytest.mark.parametrize(("ts", "ss"), [((4, 5), (4, 6)), ((4, 5), (5, 5)), ((5,), (5,)), ((2, 3, 4), (2, 3, 4))])
def test_bad_shapes(ts: tuple[int, ...], ss: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        EGALoss()(torch.randn(*ts), torch.randn(*ss))
    with pytest.raises(ValueError):
        EGALoss(temperature=0.5)(torch.randn(*ts), torch.randn(*ss))


def test_zero_weights_allowed() -> None:
    t, s = _pair(4, 4, seed=12)
    assert EGALoss(node_weight=0.0, edge_weight=0.0)(t, s).item() == 0.0


# --------------------------------------------------------------------------- KD and NT-Xent


@pytest.mark.parametrize("tau", [1.0, 4.0, 0.5])
def test_kd_matches_direct(tau: float) -> None:
    g = torch.Generator().manual_seed(13)
    zt, zs = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g, dtype=torch.float64)
    t_np, s_np = _np(zt), _np(zs)
    total = 0.0
    for i in range(6):
        total += _kl(t_np[i] / tau, s_np[i] / tau)
    expected = tau * tau * total / 6
    assert KDLoss(tau)(zt, zs).item() == pytest.approx(expected, rel=1e-6)  # KDLoss computes in float32
    assert KDLoss(tau)(zt, zt).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_bad_temperature() -> None:
    with pytest.raises(ValueError):
        KDLoss(0.0)


@pytest.mark.parametrize(("b", "tau"), [(2, 0.5), (5, 0.2), (8, 1.0)])
def test_ntxent_matches_direct_loop(b: int, tau: float) -> None:
    g = torch.Generator().manual_seed(14 + b)
    a = torch.randn(b, 6, generator=g, dtype=torch.float64)
    v = a + 0.3 * torch.randn(b, 6, generator=g, dtype=torch.float64)
    z = np.concatenate([_np(a), _np(v)])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = 2 * b
    losses = []
    for i in range(n):
        pos = (i + b) % n
        sims = {j: float(z[i] @ z[j]) / tau for j in range(n) if j != i}
        losses.append(-sims[pos] + math.log(sum(math.exp(x) for x in sims.values())))
    expected = float(np.mean(losses))
    assert NTXentLoss(temperature=tau)(a, v).item() == pytest.approx(expected, rel=1e-5)  # computed in float32
    # swapping the views permutes the rows: same loss
    assert NTXentLoss(temperature=tau)(v, a).item() == pytest.approx(expected, rel=1e-5)


def test_ntxent_bad_temperature() -> None:
    with pytest.raises(ValueError):
        NTXentLoss(temperature=-1.0)


# --------------------------------------------------------------------------- graph size


@pytest.mark.parametrize("tau", [None, 0.3])
def test_graph_size_equal_to_the_batch_is_the_single_graph(tau: float | None) -> None:
    g = torch.Generator().manual_seed(5)
    t, s = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    single = EGALoss(temperature=tau)(t, s).item()
    assert EGALoss(temperature=tau, graph_size=8)(t, s).item() == pytest.approx(single, rel=1e-12)


@pytest.mark.parametrize(("tau", "size"), [(None, 4), (0.3, 3), (None, 2)])
def test_graphs_are_separate_computations_averaged(tau: float | None, size: int) -> None:
    g = torch.Generator().manual_seed(6)
    t, s = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, 5, generator=g, dtype=torch.float64)
    each = []
    for k in range(0, 12, size):
        rows = slice(k, k + size)
        if tau is None:
            each.append(_direct_hard(_np(t[rows]), _np(s[rows]), 0.8, 0.24))
        else:
            each.append(EGALoss(temperature=tau)(t[rows], s[rows]).item())
    grouped = EGALoss(temperature=tau, graph_size=size)(t, s).item()
    assert grouped == pytest.approx(sum(each) / len(each), rel=1e-9)
    assert abs(grouped - EGALoss(temperature=tau)(t, s).item()) > 1e-3  # smaller graphs: another loss
    with pytest.raises(ValueError, match="graph_size 5 does not divide"):
        EGALoss(graph_size=5)(t, s)


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", DISTILLERS.names())
def test_registry_builds_every_method_from_the_config(name: str) -> None:
    from ega_ray.config import DistillConfig
    from ega_ray.losses import build_distiller

    own = {"ega": {"node_weight": 0.5, "temperature": 0.3}, "nce": {"temperature": 0.2}, "ccl": {"temperature": 0.2}}
    d = DistillConfig(method=name, embed_dim=8, **{name: own.get(name, {})})
    loss = build_distiller(name, d, num_samples=20, seed=0)
    assert type(loss) is DISTILLERS.get(name) and type(loss).from_config is not Distiller.from_config
    if name == "ega":
        assert (loss.node_weight, loss.edge_weight, loss.temperature, loss.global_graph) == (0.5, 0.24, 0.3, True)
    if name in ("nce", "ccl"):
        assert loss.temperature == 0.2
    if name == "ccl":
        assert loss.logit_temperature == 1.0  # the EGA code's T = 1, not kd_temperature (4)
        ccl_d = DistillConfig(method=name, embed_dim=8, ccl={"temperature": 0.2, "logit_temperature": 2.0})
        assert build_distiller(name, ccl_d, num_samples=20, seed=0).logit_temperature == 2.0
    if name == "crd":
        assert loss.memory_s.shape == (20, 8) and loss.negatives == 19  # capped at the memory size − 1
        assert loss.negatives_from == "other_class"
        any_d = DistillConfig(method=name, embed_dim=8, crd={"negatives_from": "any"})
        assert build_distiller(name, any_d, num_samples=20, seed=0).negatives_from == "any"
    with pytest.raises(KeyError, match="unknown distiller 'no-such-distiller'"):
        build_distiller("no-such-distiller", d, num_samples=20, seed=0)
