"""``ega-ray benchmark``: every distiller on the same data, teacher, student and seeds, run the same way.

One Ray Tune experiment holds the grid method × seed (plus the CE-only student); each trial is a full
``run_distill`` (a TorchTrainer) whose run folder is ``<output>/trials/<method>-seed<k>``, so an interrupted
benchmark resumes with ``--resume``: finished runs are kept, unfinished ones continue from their last
checkpoint. Trials run in parallel as the cluster's resources allow. Each method trains with its reference
loss weights (``default_gamma``/``default_beta`` of its class; EGA with the config's own), or with the
config's weights for all (``--config-weights``); everything else comes from the config. The teacher's own
linear head, trained alongside every run on the same labels, is the third reference.

``--tune-trials K`` gives every method the same search before its tuned runs: K trials of Ray Tune with ASHA
(``tune.grace_period``, ``tune.reduction_factor``) over the method's own knobs (``search_space`` of its
class: EGA's temperature and hard graph, node and edge weights; each baseline's weights and temperatures)
and the learning rate, on seed 0, one experiment per method (``tuning-<method>``: ASHA compares a method's
trials with each other only). The reference settings compete too, with the reference grid's seed-0 run (the
same seed, no extra run): a method keeps them unless a trial beat that run, so a search that found nothing
better never ends below the reference. Then the seeds run again with each method's new settings
(``<method>-tuned-seed<k>``); a method that kept its reference settings has its reference runs as tuned
rows (nothing is run twice). Tuned rows sit beside the reference rows, with the budget stated.

A run that diverges (a non-finite loss: ``DivergedError``) ends its trial and the benchmark goes on; it is
a row with ``status`` ``diverged``, left out of every mean, and never a search's best trial.

Every choice (each run's epoch, each method's tuned settings) is made on the validation split; the results are
the test split's top-1 at the epoch the validation split selected and at the last epoch. Writes
``results.csv`` (one row per run, its ``status``), ``results.md`` (per method: runs, mean ± std and
the 95% t interval over seeds of best- and last-epoch top-1; EGA − each method paired over seeds, with
its interval and verdict; the diverged runs, ``ega_ray/tune/tables.py``) and ``results.png`` (a bar chart).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from ega_ray.config import Config, ConfigError, parse_config
from ega_ray.disk import write_atomic, write_with
from ega_ray.driver.launch import connect_ray
from ega_ray.driver.outputs import SELECTION_METRIC, selected_scores, write_json
from ega_ray.driver.tracking import write_rows
from ega_ray.errors import DivergedError, find_usage_error
from ega_ray.tune.experiment import (
    checked,
    experiment_folder,
    experiment_location,
    run_experiment,
    run_trial,
    save_experiment_config,
    saved_experiment_config,
    trial_concurrency,
    trial_storage,
    verify_state,
)
from ega_ray.tune.methods import (
    best_trial,
    method_config,
    method_space,
    run_name,
    tuned_choice,
)
from ega_ray.tune.space import effective_params, tune_space
from ega_ray.tune.tables import CE_ONLY, DIVERGED, FINISHED, finished, results_lines
from ega_ray.worker.common import latest_state

EXPERIMENT = "benchmark"
TUNED = "benchmark-tuned"
# what results.csv holds of each run's scores (``selected_scores``), each named after its split
RESULT_SCORES = ("selected_epoch", "validation_top1_at_selected", "test_top1_at_selected", "test_top1_last",
                 "test_teacher_head_top1_last")  # fmt: skip
def run_benchmark_trial(
    params: dict[str, Any],
    base: dict[str, Any],
    root: str,
    reference_weights: bool,
    tuned: dict[str, dict[str, Any]] | None = None,
) -> None:
    """A seed's run of a method: with its reference weights, or (``tuned``: each method's best settings)
    with its tuned settings in its ``tuned`` run folder."""
    method, seed = params["method"], params["seed"]
    if tuned is None:
        run_trial(method_config(base, method, seed, Path(root), reference_weights))
    else:
        name = run_name(method, seed, "tuned")
        run_trial(method_config(base, method, seed, Path(root), reference_weights, tuned[method], name))


def tuning_trial(params: dict[str, Any], base: dict[str, Any], root: str, method: str, reference_weights: bool) -> None:
    """One trial of a method's search: its reference config on seed 0 with this trial's values."""
    name = f"tune-{method}-{tune.get_context().get_trial_id()}"
    run_trial(method_config(base, method, 0, Path(root), reference_weights, params, name))


def run_benchmark(
    cfg: Config | None,
    methods: list[str],
    seeds: int,
    output: str | Path,
    resume: bool = False,
    reference_weights: bool = True,
    tune_trials: int = 0,
) -> list[dict[str, Any]]:
    """Run (or resume) the benchmark: every method (and CE only) on the same data, teacher, student and seeds.

    Args:
        cfg: the base config (the embedded default's: ``ega_ray.embedded.embedded_with_teacher``); None with
            ``resume`` (read back from ``output``).
        methods: the distillers compared (registry names).
        seeds: runs per method and variant, seeds 0..seeds-1.
        output: results.csv, results.md, results.png, tuned_settings.json and every run's folder.
        resume: continue the interrupted benchmark in ``output`` (finished runs kept).
        reference_weights: each method with its reference weights (else the config's distill weights).
        tune_trials: K > 0 adds each method's K-trial search on seed 0 and its tuned runs (module docstring).

    Returns:
        The rows of results.csv.
    """
    output = Path(output).expanduser().resolve()
    if not resume:
        if seeds < 1:
            raise ConfigError(f"--seeds: {seeds}; at least 1")
        if tune_trials < 0:
            raise ConfigError(f"--tune-trials: {tune_trials}; 0 (reference weights only) or more")
        cfg = checked(cfg)  # before anything is written
    with experiment_folder(output, "benchmark", resume):
        if resume:
            state = saved_experiment_config(output, "benchmark_config.yaml", "benchmark")
            cfg, methods, seeds = checked(parse_config(state["config"])), state["methods"], state["seeds"]
            reference_weights, tune_trials = state["reference_weights"], state.get("tune_trials", 0)
            for name in experiments(methods, tune_trials):
                verify_state(output, experiment_location(output, cfg.run.storage, name))
        if CE_ONLY not in methods:
            methods = [*methods, CE_ONLY]
        base = cfg.model_dump(mode="json")
        if not resume:
            save_experiment_config(
                output,
                "benchmark_config.yaml",
                {
                    "methods": methods,
                    "seeds": seeds,
                    "reference_weights": reference_weights,
                    "tune_trials": tune_trials,
                    "config": base,
                },
            )
        t0 = time.time()
        connect_ray(cfg)
        base["scaling"]["socket_ifname"] = cfg.scaling.socket_ifname  # what the node checks chose, for every run

        seeds_grid = {"method": tune.grid_search(methods), "seed": tune.grid_search(list(range(seeds)))}
        weights = {"reference_weights": reference_weights}
        results = run_experiment(
            run_benchmark_trial, base, output, cfg.run.storage, EXPERIMENT, resume,
            grid_tuner(cfg, seeds_grid, EXPERIMENT), weights,
        )  # fmt: skip
        rows = collect(cfg, methods, seeds, output, diverged=diverged_runs(results))
        settings = {}
        if tune_trials:
            reference_seed0 = {r["method"]: r["validation_top1_at_selected"] for r in rows if r["seed"] == 0}
            searched = {m: search_method(cfg, base, m, tune_trials, output, resume, reference_weights) for m in methods}
            settings = {m: tuned_choice(*searched[m], reference_seed0[m]) for m in methods}
            retuned = [m for m in methods if settings[m]]
            diverged = {}
            if retuned:  # a method that keeps its reference settings has run them: its reference runs
                grid = seeds_grid | {"method": tune.grid_search(retuned)}
                tuned_results = run_experiment(
                    run_benchmark_trial, base, output, cfg.run.storage, TUNED, resume, grid_tuner(cfg, grid, TUNED),
                    weights | {"tuned": settings},
                )  # fmt: skip
                diverged = diverged_runs(tuned_results, "tuned")
            rows += tuned_rows(rows, collect(cfg, retuned, seeds, output, "tuned", diverged), methods)
            seed0 = {m: {"search": searched[m][0], "reference": reference_seed0[m]} for m in methods}
            write_json(
                {"trials_per_method": tune_trials, "best": settings, "seed0_validation_top1": seed0},
                output / "tuned_settings.json",
            )
        write_results(rows, cfg, methods, output, time.time() - t0, tune_trials, settings)
        return rows


def experiments(methods: list[str], tune_trials: int) -> list[str]:
    """The Tune experiments of a benchmark, in the order they run."""
    return [EXPERIMENT, *([f"tuning-{m}" for m in methods] + [TUNED] if tune_trials else [])]


def grid_tuner(cfg: Config, param_space: dict[str, Any], name: str):
    """A Tuner over a fixed grid, no scheduler: every run goes to its last epoch."""

    def new_tuner(trainable, root: str, callbacks: list) -> tune.Tuner:
        return tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=trial_concurrency(cfg)),
            run_config=tune.RunConfig(name=name, storage_path=root, callbacks=callbacks),
        )

    return new_tuner


def diverged_runs(results: Iterable, variant: str = "reference") -> dict[str, str]:
    """Run name → the one line of each trial of a grid that ended in a DivergedError."""
    out = {}
    for result in results:
        found = find_usage_error(result.error) if result.error is not None else None
        if isinstance(found, DivergedError):
            out[run_name(result.config["method"], result.config["seed"], variant)] = str(found)
    return out


def search_method(
    cfg: Config, base: dict[str, Any], method: str, trials: int, output: Path, resume: bool, reference_weights: bool
) -> tuple[float | None, dict[str, Any]]:
    """``method``'s K-trial search (ASHA over its own knobs and the learning rate, seed 0): the best trial's
    validation top-1 at its selected epoch (read from its registered checkpoint) and its values; a trial that
    diverged is never the best ((None, {}) when every trial diverged)."""
    t, name = cfg.tune, f"tuning-{method}"

    def new_tuner(trainable, root: str, callbacks: list) -> tune.Tuner:
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.optim.epochs + 1,  # no rung at the last epoch: finished trials write their run folder
            grace_period=min(t.grace_period, cfg.optim.epochs),
            reduction_factor=t.reduction_factor,
        )
        return tune.Tuner(
            trainable,
            param_space=tune_space(method_space(method)),
            tune_config=tune.TuneConfig(
                metric=SELECTION_METRIC, mode="max", scheduler=scheduler, num_samples=trials,
                max_concurrent_trials=trial_concurrency(cfg),
            ),
            run_config=tune.RunConfig(name=name, storage_path=root, callbacks=callbacks),
        )  # fmt: skip

    trial_args = {"method": method, "reference_weights": reference_weights}
    results = run_experiment(tuning_trial, base, output, cfg.run.storage, name, resume, new_tuner, trial_args)
    storage, scored = trial_storage(cfg.run.storage, output), []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("_")[2]
        state = latest_state(storage, f"tune-{method}-{trial_id}")
        diverged = result.error is not None and isinstance(find_usage_error(result.error), DivergedError)
        if state is not None or diverged:
            params = {k: v for k, v in result.config.items() if k in method_space(method) or "|" in k}
            top1 = None if diverged else state["best"][SELECTION_METRIC]
            scored.append((top1, trial_id, effective_params(params)))
    if not scored:
        raise RuntimeError(f"benchmark: the search of {method} produced no trial with an epoch")
    return best_trial(scored)


def collect(
    cfg: Config,
    methods: list[str],
    seeds: int,
    output: Path,
    variant: str = "reference",
    diverged: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (method, seed) from the run's latest checkpoint (the epoch the validation split selected, its
    validation top-1, the test top-1 there and at the last epoch); a run in ``diverged`` (run name → its
    line) is a row with status ``diverged`` and no scores; runs that did not finish otherwise are named."""
    storage, rows, missing = trial_storage(cfg.run.storage, output), [], []
    for method in methods:
        for seed in range(seeds):
            name = run_name(method, seed, variant)
            state = latest_state(storage, name)
            if name in (diverged or {}):
                rows.append(
                    {"method": method, "variant": variant, "seed": seed} | dict.fromkeys(RESULT_SCORES)
                    | {"epochs": state["epoch"] if state else 0, "status": DIVERGED, "note": diverged[name]}
                )  # fmt: skip
                continue
            if state is None or state["epoch"] < cfg.optim.epochs:
                missing.append(name)
                continue
            scores = selected_scores(state["history"], state["best"]["epoch"])
            rows.append(
                {"method": method, "variant": variant, "seed": seed}
                | {k: scores[k] for k in RESULT_SCORES}
                | {"epochs": state["epoch"], "status": FINISHED, "note": ""}
            )
    if missing:
        raise RuntimeError(f"benchmark: runs without their last epoch: {', '.join(missing)} (see their logs)")
    return rows


def tuned_rows(
    reference: list[dict[str, Any]], retuned: list[dict[str, Any]], methods: list[str]
) -> list[dict[str, Any]]:
    """The tuned rows in method order: a retuned method's own runs, else its reference runs (same settings,
    same seeds: not run twice)."""
    return [
        row
        for m in methods
        for row in ([r for r in retuned if r["method"] == m] or
                    [r | {"variant": "tuned"} for r in reference if (r["method"], r["variant"]) == (m, "reference")])
    ]  # fmt: skip


def summary_rows(
    rows: list[dict[str, Any]], methods: list[str], variant: str = "reference"
) -> list[tuple[str, list[float], list[float]]]:
    """(label, test top-1 at the selected epoch per seed, test top-1 at the last epoch per seed) per method of
    ``variant``, then the teacher head (its last epoch, over every run of it); runs that diverged are left out."""
    out = [
        (
            m,
            [r["test_top1_at_selected"] for r in finished(rows, m, variant)],
            [r["test_top1_last"] for r in finished(rows, m, variant)],
        )
        for m in methods
    ]
    heads = [r["test_teacher_head_top1_last"] for r in finished(rows, variant=variant)]
    return [*out, ("teacher head (linear, same labels)", heads, heads)]


def write_results(
    rows: list[dict[str, Any]],
    cfg: Config,
    methods: list[str],
    output: Path,
    wall_s: float,
    tune_trials: int = 0,
    settings: dict[str, dict[str, Any]] | None = None,
) -> None:
    write_rows(output / "results.csv", rows)
    lines = results_lines(rows, cfg, methods, wall_s, tune_trials, settings)
    write_atomic(output / "results.md", "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + "\n")
    reference = summary_rows(rows, methods)
    tuned = summary_rows(rows, methods, "tuned") if tune_trials else None
    seeds, diverged = len({r["seed"] for r in rows}), sum(r["status"] == DIVERGED for r in rows)
    title = f"{cfg.teacher.name} → {cfg.student.name}, {seeds} seeds" + (f", {diverged} diverged runs left out"
                                                                         if diverged else "")  # fmt: skip
    plot_results(reference, tuned, output / "results.png", title)


def plot_results(
    reference: list[tuple[str, list[float], list[float]]],
    tuned: list[tuple[str, list[float], list[float]]] | None,
    path: Path,
    title: str,
) -> None:
    """Test top-1 at the selected epoch per method (mean ± std over seeds); tuned bars beside the reference
    ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label.split(" (")[0] for label, _, _ in reference]
    groups = [("reference weights", reference)] + ([("tuned", tuned)] if tuned else [])
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(labels), 4))
    lows, highs = [], []
    for g, (_, table) in enumerate(groups):
        means = [statistics.mean(best) if best else 0.0 for _, best, _ in table]
        stds = [statistics.stdev(best) if len(best) > 1 else 0.0 for _, best, _ in table]
        xs = [i + (g - (len(groups) - 1) / 2) * width for i in range(len(labels))]
        colors = ["tab:red" if lab == "ega" else "tab:gray" if lab in (CE_ONLY, "teacher head") else "tab:blue"
                  for lab in labels]  # fmt: skip
        ax.bar(xs, means, width, yerr=stds, capsize=3, color=colors, alpha=1.0 if g == 0 else 0.55)
        lows += [m - s for m, s, (_, b, _) in zip(means, stds, table, strict=True) if b]
        highs += [m + s for m, s in zip(means, stds, strict=True)]
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 5), min(100.0, max(highs, default=100.0) + 2))
    ax.set_ylabel("test top-1 at the selected epoch (%)")
    ax.set_title(title, fontsize=9)
    if tuned:  # the variants by shade, in a neutral colour (a bar's own colour says which method it is)
        from matplotlib.patches import Patch

        shades = [Patch(color="tab:blue", alpha=1.0 if g == 0 else 0.55, label=name)
                  for g, (name, _) in enumerate(groups)]  # fmt: skip
        ax.legend(handles=shades, fontsize=8)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
