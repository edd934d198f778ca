"""The benchmark's statistics over seeds, as plain functions (no Ray, no torch): per method the mean, the
sample standard deviation and a 95% Student-t interval of the mean; against EGA the paired differences
over the seeds both have, with their own t interval, and what that interval can and cannot tell.

A paired difference removes what a seed does to both methods alike (its label subset, its initial weights,
its augmentations), so it resolves smaller differences than comparing two means. With n seeds the
interval's half-width is t(0.975, n−1)·s/√n: a difference smaller than that is "not resolved", whatever
its sign. One seed gives no interval at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    """Values over seeds: ``n``, ``mean``, sample ``std`` (n−1), and the 95% t interval of the mean
    (``low``, ``high``); std and interval NaN with fewer than two values, everything NaN with none."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom."""
    return float(scipy_stats.t.ppf(p, dof))


def summarize(values: Sequence[float], level: float = LEVEL) -> Summary:
    """Mean, sample std and the ``level`` t interval of the mean of ``values`` (one per seed).

    Args:
        values: finite numbers, one per seed.
        level: the interval's coverage.

    Returns:
        The :class:`Summary`.
    """
    n = len(values)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    """EGA − another method over the seeds both finished: the seeds, the differences' summary, the verdict."""

    seeds: list[int]
    diff: Summary
    verdict: str


def paired_difference(ega: Mapping[int, float], other: Mapping[int, float], level: float = LEVEL) -> Paired:
    """EGA's score minus ``other``'s on each seed both have (runs that diverged are not in either mapping).

    Args:
        ega: seed → EGA's score.
        other: seed → the other method's score.
        level: the interval's coverage.

    Returns:
        The :class:`Paired` difference and its verdict (:func:`verdict`).
    """
    seeds = sorted(set(ega) & set(other))
    diff = summarize([ega[s] - other[s] for s in seeds], level)
    return Paired(seeds, diff, verdict(diff))


def verdict(diff: Summary) -> str:
    """In words, what the interval of EGA − method says: better or worse when it excludes 0, else not
    resolved, with the seeds and the interval's half-width (smaller differences are not resolved)."""
    n = diff.n
    if n < 2:
        return f"not resolved: {n} common seed{'' if n == 1 else 's'}, no interval"
    if diff.low > 0:
        return f"EGA better ({n} seeds)"
    if diff.high < 0:
        return f"EGA worse ({n} seeds)"
    return f"not resolved with {n} seeds (±{diff.half_width:.2f})"
