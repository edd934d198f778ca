"""The benchmark's statistics and tables as pure functions, against direct computations: numpy for means and
standard deviations, Student's t quantile from its density integrated numerically (not scipy's call that
the module uses), and Markdown tables built from synthetic rows with a diverged run among them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ega_ray.tune.stats import paired_difference, summarize, t_quantile
from ega_ray.tune.tables import method_table, paired_table, results_lines, variant_section


def t_quantile_by_integration(p: float, dof: int) -> float:
    """Where the integral of Student's t density from 0 reaches p − 1/2 (Simpson's rule, bisection)."""
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 20_001)
        f = np.exp(log_c - (dof + 1) / 2 * np.log1p(t**2 / dof))
        h = t[1] - t[0]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("dof", [1, 2, 4, 9, 30])
def test_the_t_quantile_matches_the_integrated_density(dof: int) -> None:
    assert t_quantile(0.975, dof) == pytest.approx(t_quantile_by_integration(0.975, dof), rel=1e-6)
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)  # the printed tables' value


def test_mean_std_and_interval_against_numpy() -> None:
    values = [93.1, 95.4, 94.0, 96.2]
    s = summarize(values)
    x = np.array(values)
    half = t_quantile_by_integration(0.975, 3) * x.std(ddof=1) / math.sqrt(4)
    assert (s.n, s.mean, s.std) == (4, pytest.approx(x.mean()), pytest.approx(x.std(ddof=1)))
    assert (s.low, s.high) == (pytest.approx(x.mean() - half, rel=1e-9), pytest.approx(x.mean() + half, rel=1e-9))
    one, none = summarize([90.0]), summarize([])
    assert one.n == 1 and one.mean == 90.0 and math.isnan(one.std) and math.isnan(one.low)
    assert none.n == 0 and math.isnan(none.mean)


def test_paired_differences_use_the_seeds_both_have_and_say_what_they_resolve() -> None:
    ega = {0: 95.0, 1: 96.0, 2: 94.5, 3: 95.5}
    kd = {0: 93.0, 1: 94.5, 2: 92.0}  # seed 3 diverged: not in the mapping
    p = paired_difference(ega, kd)
    d = np.array([2.0, 1.5, 2.5])
    half = t_quantile_by_integration(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert p.seeds == [0, 1, 2] and p.diff.mean == pytest.approx(d.mean())
    assert (p.diff.low, p.diff.high) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert p.diff.low > 0 and p.verdict == "EGA better (3 seeds)"
    assert paired_difference(kd, ega).verdict == "EGA worse (3 seeds)"  # the same pairs the other way round
    noisy = paired_difference({0: 95.0, 1: 92.0, 2: 96.0}, {0: 94.0, 1: 94.0, 2: 94.0})
    assert noisy.diff.low < 0 < noisy.diff.high
    assert noisy.verdict == f"not resolved with 3 seeds (±{noisy.diff.half_width:.2f})"
    assert paired_difference({0: 95.0}, {0: 90.0, 1: 91.0}).verdict == "not resolved: 1 common seed, no interval"


def _row(method: str, seed: int, best: float | None, last: float | None = None, head: float = 80.0) -> dict:
    status = "finished" if best is not None else "diverged"
    return {
        "method": method, "variant": "reference", "seed": seed, "best_top1": best, "best_epoch": 2,
        "last_top1": best - 1 if best is not None and last is None else last,
        "teacher_head_top1": head if best is not None else None, "epochs": 10 if best is not None else 1,
        "status": status, "note": "" if best is not None else "the distiller's loss (distill) is not finite at …",
    }  # fmt: skip


ROWS = [
    _row("ega", 0, 95.0), _row("ega", 1, 96.0), _row("ega", 2, 94.5),
    _row("kd", 0, 93.0), _row("kd", 1, None), _row("kd", 2, 92.0),
    _row("ce", 0, 90.0), _row("ce", 1, 91.0), _row("ce", 2, 89.0),
]  # fmt: skip


def _cells(lines: list[str], first: str) -> list[str]:
    return next(line for line in lines if line.startswith(f"| {first} |")).strip("| ").split(" | ")


def test_the_method_table_averages_finished_runs_and_counts_the_diverged() -> None:
    lines = method_table(ROWS, ["ega", "kd", "ce"])
    assert lines[0].startswith("| method | runs | best epoch: mean ± std | 95% CI |")
    kd = _cells(lines, "kd")
    assert kd[1] == "2 of 3 (1 diverged)"
    x = np.array([93.0, 92.0])
    half = t_quantile_by_integration(0.975, 1) * x.std(ddof=1) / math.sqrt(2)
    assert kd[2] == f"{x.mean():.2f} ± {x.std(ddof=1):.2f}"
    assert kd[3] == f"[{x.mean() - half:.2f}, {x.mean() + half:.2f}]"
    assert _cells(lines, "CE only (no teacher)")[1] == "3"
    assert _cells(lines, "teacher head (linear, same labels)")[1] == "8"  # every finished run's head


def test_the_paired_table_and_the_section_name_the_diverged_run() -> None:
    lines = paired_table(ROWS, ["ega", "kd", "ce"])
    kd, ce = _cells(lines, "kd"), _cells(lines, "CE only (no teacher)")
    assert kd[:2] == ["kd", "2"] and kd[2] == f"{np.mean([2.0, 2.5]):+.2f}"  # seeds 0 and 2
    assert kd[4] == "not resolved with 2 seeds (±3.18)"  # t(0.975, 1) · 0.354 / √2
    assert ce[1] == "3" and ce[2] == "+5.17" and ce[4] == "EGA better (3 seeds)"
    assert paired_table(ROWS, ["kd", "ce"]) == []  # no EGA: nothing to pair against
    section = variant_section(ROWS, ["ega", "kd", "ce"])
    assert "- kd, seed 1: diverged (the distiller's loss (distill) is not finite at …)" in section
    assert any(line.startswith("Diverged (1 run, left out of the means and pairs)") for line in section)


def test_results_state_the_seed_count_and_warn_below_three() -> None:
    from ega_ray.config import parse_config

    cfg = parse_config({"data": {"train": "t", "val": "v"}})
    text = "\n".join(results_lines(ROWS, cfg, ["ega", "kd", "ce"], wall_s=12.0))
    assert "3 seeds (0, 1, 2)" in text and "1 run diverged (listed, not averaged)" in text
    assert "too few to resolve" not in text and text.endswith("wall time 12 s")
    two = [r for r in ROWS if r["seed"] < 2]
    assert "Only 2 seeds: too few to resolve differences" in "\n".join(results_lines(two, cfg, ["ega", "kd"], 1.0))
