"""``ega-ray benchmark``: every distiller on the same data, teacher, student and seeds, run the same way.

One Ray Tune experiment holds the grid method × seed (plus the CE-only student); each trial is a full
``run_distill`` (a TorchTrainer) whose run folder is ``<output>/trials/<method>-seed<k>``, so an interrupted
benchmark resumes with ``--resume``: finished runs are kept, unfinished ones continue from their last
checkpoint. Trials run in parallel as the cluster's resources allow. Each method trains with its reference
loss weights (``default_gamma``/``default_beta`` of its class; EGA with the config's own), or with the
config's weights for all (``--config-weights``); everything else comes from the config. The teacher's own
linear head, trained alongside every run on the same labels, is the third reference.

Writes ``results.csv`` (one row per run), ``results.md`` (mean ± std over seeds, best- and last-epoch
top-1) and ``results.png`` (a bar chart).
"""

from __future__ import annotations

import copy
import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from ega_ray.config import Config, ConfigError, parse_config
from ega_ray.losses import DISTILLERS
from ega_ray.train.common import latest_state
from ega_ray.train.launch import connect_ray
from ega_ray.tune.experiment import (
    checked,
    experiment_folder,
    experiment_location,
    run_experiment,
    run_trial,
    save_experiment_config,
    saved_experiment_config,
    trial_concurrency,
    trial_config,
    trial_storage,
    verify_state,
)

CE_ONLY = "ce"  # the student without a teacher: distill.beta = 0
EXPERIMENT = "benchmark"


ALL_METHODS = "all"


def parse_methods(text: str) -> list[str]:
    """``ega,kd,…`` → names, each checked against the registry (or ``ce``); ``all``: every registered
    distiller, EGA first. Refused before Ray starts."""
    if text.strip() == ALL_METHODS:
        return sorted(DISTILLERS.names(), key=lambda m: m != "ega")
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods: empty; give a comma-separated list such as ega,kd,crd")
    for m in methods:
        if m != CE_ONLY and m not in DISTILLERS:
            raise ConfigError(f"--methods: unknown method {m!r}; allowed: {', '.join(DISTILLERS.names())}, {CE_ONLY}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods: {text!r} names a method twice")
    return methods


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def method_config(
    base: dict[str, Any], method: str, seed: int, root: Path, reference_weights: bool = True
) -> dict[str, Any]:
    """The run config of one (method, seed) in its own run folder: with the method's reference loss weights,
    or (``reference_weights=False``) with the config's gamma, beta and alpha for every method."""
    raw = copy.deepcopy(base)
    if method == CE_ONLY:
        raw["distill"]["beta"] = 0.0
    else:
        raw["distill"]["method"] = method
        if method != "ega" and reference_weights:
            cls = DISTILLERS.get(method)
            raw["distill"] |= {"gamma": cls.default_gamma, "beta": cls.default_beta, "alpha": 0.0}
    raw["run"]["seed"] = seed
    return trial_config(raw, root, run_name(method, seed))


def run_benchmark_trial(params: dict[str, Any], base: dict[str, Any], root: str) -> None:
    reference = base["benchmark_reference_weights"]
    base = {k: v for k, v in base.items() if k != "benchmark_reference_weights"}
    run_trial(method_config(base, params["method"], params["seed"], Path(root), reference))


def run_benchmark(
    cfg: Config | Callable[[], Config] | None,
    methods: list[str],
    seeds: int,
    output: str | Path,
    resume: bool = False,
    reference_weights: bool = True,
) -> list[dict[str, Any]]:
    """Run (or resume) the benchmark; ``cfg`` may be a function that makes the config once ``output`` is
    claimed (the embedded default pretrains its teacher inside it)."""
    output = Path(output).expanduser().resolve()
    if not resume:
        if seeds < 1:
            raise ConfigError(f"--seeds: {seeds}; at least 1")
        if isinstance(cfg, Config):  # checked before anything is written
            cfg = checked(cfg)
    with experiment_folder(output, "benchmark", resume):
        if resume:
            state = saved_experiment_config(output, "benchmark_config.yaml", "benchmark")
            cfg, methods, seeds = checked(parse_config(state["config"])), state["methods"], state["seeds"]
            reference_weights = state["reference_weights"]
            verify_state(output, experiment_location(output, cfg.run.storage, EXPERIMENT))
        elif not isinstance(cfg, Config):
            cfg = checked(cfg())
        if CE_ONLY not in methods:
            methods = [*methods, CE_ONLY]
        base = cfg.model_dump(mode="json")
        if not resume:
            save_experiment_config(
                output,
                "benchmark_config.yaml",
                {"methods": methods, "seeds": seeds, "reference_weights": reference_weights, "config": base},
            )
        t0 = time.time()
        connect_ray(cfg)

        def new_tuner(trainable, root: str, callbacks: list) -> tune.Tuner:
            return tune.Tuner(
                trainable,
                param_space={"method": tune.grid_search(methods), "seed": tune.grid_search(list(range(seeds)))},
                tune_config=tune.TuneConfig(max_concurrent_trials=trial_concurrency(cfg)),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=root, callbacks=callbacks),
            )

        trial_base = base | {"benchmark_reference_weights": reference_weights}
        run_experiment(run_benchmark_trial, trial_base, output, cfg.run.storage, EXPERIMENT, resume, new_tuner)
        rows = collect(cfg, methods, seeds, output)
        write_results(rows, cfg, methods, output, time.time() - t0)
        return rows


def collect(cfg: Config, methods: list[str], seeds: int, output: Path) -> list[dict[str, Any]]:
    """One row per (method, seed) from the run's latest checkpoint; runs that did not finish are named."""
    storage, rows, missing = trial_storage(cfg.run.storage, output), [], []
    for method in methods:
        for seed in range(seeds):
            state = latest_state(storage, run_name(method, seed))
            if state is None or state["epoch"] < cfg.optim.epochs:
                missing.append(run_name(method, seed))
                continue
            history = state["history"]
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "best_top1": max(h["val_top1"] for h in history),
                    "best_epoch": state["best"]["epoch"],
                    "last_top1": history[-1]["val_top1"],
                    "teacher_head_top1": history[-1]["val_teacher_top1"],
                    "epochs": state["epoch"],
                }
            )
    if missing:
        raise RuntimeError(f"benchmark: runs without their last epoch: {', '.join(missing)} (see their logs)")
    return rows


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def summary_rows(rows: list[dict[str, Any]], methods: list[str]) -> list[tuple[str, list[float], list[float]]]:
    """(label, best top-1 per seed, last top-1 per seed) per method, then the teacher head (over every run)."""
    out = [
        (
            m,
            [r["best_top1"] for r in rows if r["method"] == m],
            [r["last_top1"] for r in rows if r["method"] == m],
        )
        for m in methods
    ]
    heads = [r["teacher_head_top1"] for r in rows]
    return [*out, ("teacher head (linear, same labels)", heads, heads)]


def write_results(rows: list[dict[str, Any]], cfg: Config, methods: list[str], output: Path, wall_s: float) -> None:
    with open(output / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = summary_rows(rows, methods)
    seeds = len({r["seed"] for r in rows})
    lines = [
        f"teacher `{cfg.teacher.name}` → student `{cfg.student.name}`, {cfg.optim.epochs} epochs, "
        f"label fraction {cfg.data.label_fraction}, {seeds} seeds; validation top-1 (%), mean ± std over seeds",
        "",
        "| method | best epoch | last epoch |",
        "| --- | --- | --- |",
    ]
    for label, best, last in table:
        name = "CE only (no teacher)" if label == CE_ONLY else label
        lines.append(f"| {name} | {_mean_std(best)} | {_mean_std(last)} |")
    lines += ["", f"wall time {wall_s:.0f} s"]
    (output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + "\n")
    plot_results(table, output / "results.png", f"{cfg.teacher.name} → {cfg.student.name}, {seeds} seeds")


def plot_results(table: list[tuple[str, list[float], list[float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label.split(" (")[0] for label, _, _ in table]
    means = [statistics.mean(best) for _, best, _ in table]
    stds = [statistics.stdev(best) if len(best) > 1 else 0.0 for _, best, _ in table]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(labels), 4))
    colors = ["tab:red" if label == "ega" else "tab:gray" if label in (CE_ONLY, "teacher head") else "tab:blue"
              for label in labels]  # fmt: skip
    ax.bar(labels, means, yerr=stds, capsize=4, color=colors)
    low = min(m - s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(max(0.0, low - 5), min(100.0, max(m + s for m, s in zip(means, stds, strict=True)) + 2))
    ax.set_ylabel("best validation top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
