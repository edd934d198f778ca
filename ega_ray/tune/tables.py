"""The benchmark's tables in Markdown, from its rows (one per run, as in results.csv): per method the runs
that finished, mean ± std and the 95% interval; EGA against each other method paired over seeds; the runs
that diverged, named and left out of every mean. Plain functions, no Ray, no torch."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ega_ray.tune.stats import Summary, paired_difference, summarize

if TYPE_CHECKING:
    from ega_ray.config import Config

FINISHED, DIVERGED = "finished", "diverged"
CE_ONLY = "ce"  # the benchmark's CE-only student: no teacher (distill.beta = 0)
EGA = "ega"
TEACHER_HEAD = "teacher head (linear, same labels)"
AT_SELECTED, AT_LAST = "test_top1_at_selected", "test_top1_last"  # results.csv's columns that the tables report


def label(method: str) -> str:
    return "CE only (no teacher)" if method == CE_ONLY else method


def finished(rows: list[dict[str, Any]], method: str | None = None, variant: str = "reference") -> list[dict]:
    """The runs of ``variant`` (and ``method``, when given) that finished; diverged runs are not among them."""
    return [
        r
        for r in rows
        if r["variant"] == variant and r.get("status", FINISHED) == FINISHED and method in (None, r["method"])
    ]


def _num(x: float, signed: bool = False) -> str:
    return "—" if math.isnan(x) else f"{x:+.2f}" if signed else f"{x:.2f}"


def mean_std(s: Summary) -> str:
    """``mean ± std``; a single run shows its value alone, none a dash."""
    if s.n == 0:
        return "—"
    return _num(s.mean) if s.n == 1 else f"{s.mean:.2f} ± {s.std:.2f}"


def interval(s: Summary, signed: bool = False) -> str:
    return "—" if math.isnan(s.low) else f"[{_num(s.low, signed)}, {_num(s.high, signed)}]"


def method_table(rows: list[dict[str, Any]], methods: list[str], variant: str = "reference") -> list[str]:
    """Per method: runs (finished of all, the diverged counted), test top-1 at the epoch the validation split
    selected and at the last epoch as mean ± std
    and 95% interval over the finished runs; then the teacher head over every finished run of ``variant``."""
    lines = [
        "| method | runs | selected epoch: mean ± std | 95% CI | last epoch: mean ± std | 95% CI |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    mine = [r for r in rows if r["variant"] == variant]
    for m in methods:
        runs = [r for r in mine if r["method"] == m]
        done = finished(rows, m, variant)
        diverged = len(runs) - len(done)
        count = f"{len(done)}" if not diverged else f"{len(done)} of {len(runs)} ({diverged} diverged)"
        best, last = (summarize([r[key] for r in done]) for key in (AT_SELECTED, AT_LAST))
        lines.append(
            f"| {label(m)} | {count} | {mean_std(best)} | {interval(best)} | {mean_std(last)} | {interval(last)} |"
        )
    heads = summarize([r["test_teacher_head_top1_last"] for r in finished(rows, variant=variant)])
    lines.append(f"| {TEACHER_HEAD} | {heads.n} | {mean_std(heads)} | {interval(heads)} | {mean_std(heads)} | "
                 f"{interval(heads)} |")  # fmt: skip
    return lines


def paired_table(rows: list[dict[str, Any]], methods: list[str], variant: str = "reference") -> list[str]:
    """EGA − each other method, paired over the seeds both finished: test top-1 at the selected and the last
    epoch, each with
    its 95% interval and verdict. Empty when EGA is not among ``methods``."""
    if EGA not in methods:
        return []
    lines = [
        "| EGA − method | seeds | selected epoch | 95% CI | verdict | last epoch | 95% CI | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def by_seed(method: str, key: str) -> dict[int, float]:
        return {r["seed"]: r[key] for r in finished(rows, method, variant)}

    for m in methods:
        if m == EGA:
            continue
        best = paired_difference(by_seed(EGA, AT_SELECTED), by_seed(m, AT_SELECTED))
        last = paired_difference(by_seed(EGA, AT_LAST), by_seed(m, AT_LAST))
        lines.append(
            f"| {label(m)} | {len(best.seeds)} | {_num(best.diff.mean, True)} | {interval(best.diff, True)} | "
            f"{best.verdict} | {_num(last.diff.mean, True)} | {interval(last.diff, True)} | {last.verdict} |"
        )
    return lines


def diverged_lines(rows: list[dict[str, Any]], variant: str = "reference") -> list[str]:
    """One line per diverged run of ``variant``: its method, seed and where it diverged."""
    return [
        f"- {label(r['method'])}, seed {r['seed']}: diverged ({r.get('note') or 'a loss was not finite'})"
        for r in rows
        if r["variant"] == variant and r.get("status") == DIVERGED
    ]


def variant_section(rows: list[dict[str, Any]], methods: list[str], variant: str = "reference") -> list[str]:
    """The method table, the paired table with how to read it, and the diverged runs of ``variant``."""
    seeds = len({r["seed"] for r in rows if r["variant"] == variant})
    lines = method_table(rows, methods, variant)
    paired = paired_table(rows, methods, variant)
    if paired:
        lines += [
            "",
            f"EGA − each method, paired over the seeds both finished (of {seeds}): the mean difference in points "
            "and its 95% t interval. \"EGA better\" / \"EGA worse\": the interval excludes 0; \"not resolved "
            "(±h)\": it holds 0, and with this many seeds a difference smaller than about h points cannot be told "
            "from seed-to-seed noise.",
            "",
            *paired,
        ]
    gone = diverged_lines(rows, variant)
    if gone:
        lines += ["", f"Diverged ({len(gone)} run{'' if len(gone) == 1 else 's'}, left out of the means and pairs):",
                  *gone]  # fmt: skip
    return lines


def _shown(settings: dict[str, Any]) -> str:
    if not settings:
        return "reference (no trial beat it on seed 0)"
    return ", ".join(
        f"{k.split('.', 1)[1]} {'hard' if v is None else f'{v:.3g}' if isinstance(v, float) else v}"
        for k, v in sorted(settings.items())
    )


def results_lines(
    rows: list[dict[str, Any]],
    cfg: Config,
    methods: list[str],
    wall_s: float,
    tune_trials: int = 0,
    settings: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """results.md: the set-up and seed count, then per variant the method table, EGA's paired differences
    and the diverged runs (``ega_ray/tune/tables.py``); with a search, each method's tuned settings."""
    seeds = sorted({r["seed"] for r in rows})
    diverged = sum(r["status"] == DIVERGED for r in rows)
    lines = [
        f"teacher `{cfg.teacher.name}` → student `{cfg.student.name}`, {cfg.optim.epochs} epochs, "
        f"label fraction {cfg.data.label_fraction}, {len(seeds)} seeds ({', '.join(map(str, seeds))}); test "
        "top-1 (%) at the epoch the validation split selected and at the last epoch, over the runs that finished: "
        "mean ± sample std, and the 95% Student-t interval of the mean"
        + (f"; {diverged} run{'' if diverged == 1 else 's'} diverged (listed, not averaged)" if diverged else ""),
        "",
    ]
    if len(seeds) < 3:
        lines += [f"Only {len(seeds)} seed{'' if len(seeds) == 1 else 's'}: too few to resolve differences "
                  "between methods (use --seeds 3 or more).", ""]  # fmt: skip
    if not tune_trials:
        return lines + variant_section(rows, methods) + ["", f"wall time {wall_s:.0f} s"]
    t = cfg.tune
    lines += ["### Reference weights", "", *variant_section(rows, methods), "", "### Tuned", ""]
    lines += variant_section(rows, methods, "tuned")
    lines += ["", "| method | tuned settings |", "| --- | --- |"]
    lines += [f"| {label(m)} | {_shown((settings or {}).get(m, {}))} |" for m in methods]
    return lines + [
        "",
        f"Tuned: every method got the same search budget, {tune_trials} trial{'s' * (tune_trials != 1)} of random "
        "search with ASHA "
        f"(grace period {min(t.grace_period, cfg.optim.epochs)} epochs, reduction factor {t.reduction_factor}, "
        f"at most {cfg.optim.epochs} epochs) over its own knobs and the learning rate, on seed 0; then "
        f"{len(seeds)} seeds with the best trial's settings, or the reference settings where no trial beat their "
        "seed-0 run (tuned_settings.json); trials and settings compared on the validation split. A trial that "
        "diverged is never the best.",
        "",
        f"wall time {wall_s:.0f} s",
    ]
