"""The gradient noise scale: up to which batch size does a larger batch still buy fewer steps?

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training" (2018). With G the true
gradient and Σ the per-example gradient covariance, the gradient of a batch of B examples has

    E |G_B|² = |G|² + tr(Σ) / B,

and the *simple noise scale* B_noise = tr(Σ) / |G|² predicts the trade-off between steps S and examples E
needed to reach a given loss: S / S_min = 1 + B_noise / B. Below B_noise a batch ×k cuts the steps by
about k (the linear LR rule's regime); far above it, a larger batch needs nearly as many steps as before,
so at the same number of epochs it trains less. Two batch sizes b < B give unbiased estimates (App. A.1):

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)        tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

Both are noisy per draw, so each |G_·|² is a mean over several independent batches. An EGA batch is a set
of ``graph_size``-node graphs whose losses are averaged: its "examples" are graphs, but measured in images
the formulas hold unchanged as long as both batch sizes are multiples of the graph size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class NoiseScale:
    """|G|² and tr(Σ) of one loss at one point of training; the derived figures as properties."""

    grad_sq: float  # |G|², the squared norm of the full-data gradient
    trace_cov: float  # tr(Σ), the per-example gradient variance summed over all parameters
    b_simple_range: tuple[float, float] | None = None  # 10th–90th percentile of B_noise over bootstrap resamples

    @property
    def b_simple(self) -> float:
        """tr(Σ) / |G|², in examples. The estimates are differences of noisy means: |G|² ≤ 0 measured means
        the mean gradient is lost in the noise (inf), tr(Σ) ≤ 0 that the noise is (0)."""
        if self.grad_sq <= 0:
            return math.inf
        return max(self.trace_cov, 0.0) / self.grad_sq

    def steps_ratio(self, batch: int, reference: int) -> float:
        """Steps to the same loss at ``batch`` over steps at ``reference``: (1 + B_noise/B) / (1 + B_noise/B_ref)."""
        b = self.b_simple
        if math.isinf(b):
            return reference / batch  # noise-dominated: steps fall as 1/B (the linear rule holds)
        return (1 + b / batch) / (1 + b / reference)

    def epochs_factor(self, batch: int, reference: int) -> float:
        """How many times the reference's epochs ``batch`` needs to reach the same loss (1 = the linear rule)."""
        return batch / reference * self.steps_ratio(batch, reference)


def estimate_noise_scale(sq_small: float, b_small: int, sq_big: float, b_big: int) -> NoiseScale:
    """|G|² and tr(Σ) from mean squared gradient norms at two batch sizes ``b_small < b_big``."""
    if not 0 < b_small < b_big:
        raise ValueError(f"batch sizes must satisfy 0 < b_small < b_big, got {b_small} and {b_big}")
    grad_sq = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace_cov = (sq_small - sq_big) / (1 / b_small - 1 / b_big)
    return NoiseScale(grad_sq=grad_sq, trace_cov=trace_cov)


def grad_sq_norms(losses: dict[str, torch.Tensor], params: Sequence[torch.Tensor]) -> dict[str, float]:
    """|∇loss|² over ``params`` for each named loss of one forward (float64; unreached parameters count 0)."""
    out = {}
    for i, (name, loss) in enumerate(losses.items()):
        grads = torch.autograd.grad(loss, list(params), allow_unused=True, retain_graph=i < len(losses) - 1)
        out[name] = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
    return out


def measure_noise_scale(
    batch_losses: Callable[[int], dict[str, torch.Tensor]],
    params: Sequence[torch.Tensor],
    b_small: int,
    b_big: int,
    draws_small: int = 32,
    draws_big: int = 16,
) -> dict[str, NoiseScale]:
    """The noise scale of each loss ``batch_losses(b)`` returns (mean losses of one fresh random batch of b
    examples, by name) w.r.t. ``params``, from ``draws_small`` batches of ``b_small`` and ``draws_big`` of
    ``b_big``, each with its bootstrap range. Changes no parameter; each draw is one forward and a backward
    per loss."""

    def sq_norms(b: int, draws: int) -> dict[str, np.ndarray]:
        per_draw = [grad_sq_norms(batch_losses(b), params) for _ in range(draws)]
        return {name: np.array([d[name] for d in per_draw]) for name in per_draw[0]}

    small, big = sq_norms(b_small, draws_small), sq_norms(b_big, draws_big)
    out = {}
    for name in small:
        point = estimate_noise_scale(small[name].mean(), b_small, big[name].mean(), b_big)
        out[name] = replace(point, b_simple_range=bootstrap_range(small[name], b_small, big[name], b_big))
    return out


def bootstrap_range(
    small: np.ndarray, b_small: int, big: np.ndarray, b_big: int, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """The 10th and 90th percentiles of B_noise when the per-draw |G_b|² and |G_B|² are resampled with
    replacement: how far one measurement can be trusted (a few dozen draws leave a wide range)."""
    rng = np.random.default_rng(seed)
    s = small[rng.integers(0, len(small), (resamples, len(small)))].mean(1)
    g = big[rng.integers(0, len(big), (resamples, len(big)))].mean(1)
    values = [estimate_noise_scale(a, b_small, b, b_big).b_simple for a, b in zip(s, g, strict=True)]
    lo, hi = np.quantile(values, [0.1, 0.9], method="nearest")  # no interpolation: values may be inf
    return float(lo), float(hi)
