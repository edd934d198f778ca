"""``ega-ray tune``: search graph temperature, loss weights and learning rate with Ray Tune.

Each trial is a function trainable that builds the trial's config and runs ``run_distill`` — a full
TorchTrainer with its own ScalingConfig — with ``TuneReportCallback`` forwarding every epoch's metrics to
Tune (Ray 2.60's Train V2 integration). ASHA stops weak trials at its rungs. A trial's run folder is
``<output>/trials/<trial_id>``, so a resumed search continues unfinished trials from their last Ray Train
checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.data
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from ega_ray.config import Config, ConfigError, SpaceEntry, parse_config
from ega_ray.train.common import latest_state
from ega_ray.train.launch import connect_ray, run_distill
from ega_ray.tune.experiment import (
    TRIAL_DRIVER_CPU,
    checked,
    experiment_folder,
    experiment_location,
    run_experiment,
    save_experiment_config,
    saved_experiment_config,
    verify_state,
)

logger = logging.getLogger(__name__)
NONE_SUFFIX = "|none"  # a boolean companion parameter: the field takes None (hard graph for the temperature)
SEARCH_DIR = "search"


def tune_space(space: dict[str, SpaceEntry]) -> dict[str, Any]:
    """Ray Tune's param_space for the configured entries (flat dotted keys)."""
    out: dict[str, Any] = {}
    for key, e in space.items():
        if e.type == "uniform":
            out[key] = tune.uniform(e.low, e.high)
        elif e.type == "loguniform":
            out[key] = tune.loguniform(e.low, e.high)
        elif e.type == "int":
            out[key] = tune.randint(int(e.low), int(e.high) + 1)
        elif e.type == "choice":
            out[key] = tune.choice(e.values)
        else:
            out[key] = tune.grid_search(e.values)
        if e.include_none:
            out[key + NONE_SUFFIX] = tune.choice([False, True])
    return out


def effective_params(params: dict[str, Any]) -> dict[str, Any]:
    """The config values a trial runs with: companions ``key|none`` turn their field to None."""
    return {k: (None if params.get(k + NONE_SUFFIX) else v) for k, v in params.items() if not k.endswith(NONE_SUFFIX)}


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(base)
    for key, value in effective_params(params).items():
        section, field = key.split(".", 1)
        raw[section][field] = value
    return raw


def trial_storage(storage: str | None, output: Path) -> str:
    """Where the trials' Ray Train checkpoints go: ``<output>/trials``, or under ``run.storage`` when set."""
    return f"{storage.rstrip('/')}/{output.name}/trials" if storage else str(output / "trials")


def run_trial(params: dict[str, Any], base: dict[str, Any], root: str) -> None:
    """One trial: the base config with this trial's values, as a full distillation run."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # trial actors: Tune's table is the display
    trial_id = tune.get_context().get_trial_id()
    raw = apply_params(base, params)
    output = Path(root)
    raw["run"] |= {
        "name": trial_id,
        "output": str(output / "trials" / trial_id),
        "storage": trial_storage(base["run"]["storage"], output),
        "progress_bar": False,  # Tune's trial table is the display; a bar per trial would garble it
    }
    cfg = parse_config(raw)
    finished = finished_history(cfg, cfg.optim.epochs)
    run_distill(cfg, callbacks=[TuneReportCallback()])  # resumes from the trial's latest checkpoint, if any
    if finished:
        # rescheduled after an interruption with every epoch already done: nothing was trained or reported now
        tune.report(finished[-1])


def finished_history(cfg: Config, epochs: int) -> list[dict[str, Any]] | None:
    """The metric history of a run whose latest checkpoint already holds the last epoch."""
    state = latest_state(cfg.checkpoint_root, cfg.output_dir.name)
    return state["history"] if state is not None and state["epoch"] >= epochs else None


def trial_concurrency(cfg: Config) -> int:
    """How many trials the cluster holds at once: CPUs (and GPUs) over what one trial takes (its workers,
    its driver's token share, and half a CPU left to its Ray Data reads)."""
    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    s, res = cfg.scaling, ray.cluster_resources()
    if s.use_gpu and not res.get("GPU"):
        logger.warning(
            "the cluster has no GPUs yet: trials run one at a time until the autoscaler adds some; "
            "set tune.max_concurrent to the number of trials your GPU nodes can hold at full size"
        )
    by_cpu = res.get("CPU", 1) / (s.num_workers * s.cpus_per_worker + 0.5 + TRIAL_DRIVER_CPU)
    by_gpu = res.get("GPU", 0) / (s.num_workers * s.gpus_per_worker) if s.use_gpu else math.inf
    return max(1, int(min(by_cpu, by_gpu)))


def _searcher(cfg: Config):
    if cfg.tune.search == "random":
        return None  # Tune's BasicVariantGenerator: random sampling, grid entries expanded
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ConfigError(f"tune.search: optuna needs `pip install ega-ray[tune]` ({err})") from None
    return OptunaSearch()


def run_search(cfg: Config | Callable[[], Config] | None, output: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the search; writes trials.csv, best.yaml and plots to ``output``; returns the best row.
    ``cfg`` may be a function that makes the config once the folder is claimed (the embedded default
    pretrains its teacher inside it); with ``resume`` it is read back from the folder."""
    output = Path(output).expanduser().resolve()
    if not resume and isinstance(cfg, Config):  # checked before anything is written
        cfg = checked(cfg)
        if cfg.tune.search == "optuna":
            _searcher(cfg)  # fail before Ray starts when the extra is missing
    with experiment_folder(output, "tune", resume):
        if resume:
            cfg = checked(parse_config(saved_experiment_config(output, "search_config.yaml", "tune")))
            verify_state(output, experiment_location(output, cfg.run.storage, SEARCH_DIR))
        elif not isinstance(cfg, Config):
            cfg = checked(cfg())
        base = cfg.model_dump(mode="json")
        if not resume:
            save_experiment_config(output, "search_config.yaml", base)
        return _search(cfg, base, output, resume)


def _search(cfg: Config, base: dict[str, Any], output: Path, resume: bool) -> dict[str, Any]:
    from ega_ray.tune.report import write_report

    t0 = time.time()
    connect_ray(cfg)
    t = cfg.tune

    def new_tuner(trainable, root: str, callbacks: list) -> tune.Tuner:
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.optim.epochs + 1,  # no rung at the last epoch: finished trials write their run folder
            grace_period=min(t.grace_period, cfg.optim.epochs),
            reduction_factor=t.reduction_factor,
        )
        return tune.Tuner(
            trainable,
            param_space=tune_space(t.space),
            tune_config=tune.TuneConfig(
                metric=t.metric,
                mode="max",
                scheduler=scheduler,
                search_alg=_searcher(cfg),
                num_samples=t.num_samples,
                max_concurrent_trials=trial_concurrency(cfg),
            ),
            run_config=tune.RunConfig(name=SEARCH_DIR, storage_path=root, callbacks=callbacks),
        )

    results = run_experiment(run_trial, base, output, cfg.run.storage, SEARCH_DIR, resume, new_tuner)
    return write_report(results, cfg, output, wall_time_s=time.time() - t0)
