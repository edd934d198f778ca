"""``ega-ray tune``: search graph temperature, loss weights and learning rate with Ray Tune.

Each trial is a function trainable that builds the trial's config and runs ``run_distill`` — a full
TorchTrainer with its own ScalingConfig — with ``TuneReportCallback`` forwarding every epoch's metrics to
Tune (Ray 2.60's Train V2 integration). ASHA stops weak trials at its rungs. A trial's run folder is
``<output>/trials/<trial_id>``, so a resumed search continues unfinished trials from their last Ray Train
checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from ega_ray.config import Config, ConfigError, parse_config
from ega_ray.driver.launch import connect_ray
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
    verify_state,
)
from ega_ray.tune.space import apply_params, tune_space

SEARCH_DIR = "search"


def search_trial(params: dict[str, Any], base: dict[str, Any], root: str) -> None:
    """One trial: the base config with this trial's values, as a full distillation run in its own folder."""
    run_trial(trial_config(apply_params(base, params), Path(root), tune.get_context().get_trial_id()))


def _searcher(cfg: Config):
    if cfg.tune.search == "random":
        return None  # Tune's BasicVariantGenerator: random sampling, grid entries expanded
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ConfigError(f"tune.search: optuna needs `pip install ega-ray[tune]` ({err})") from None
    return OptunaSearch()


def run_search(cfg: Config | None, output: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a Ray Tune search over ``cfg.tune.space`` (ASHA, selected on the validation split).

    Args:
        cfg: the base config (the embedded default's: ``ega_ray.embedded.embedded_tune_config``); None with
            ``resume`` (read back from ``output``).
        output: the search's folder: trials.csv, best.yaml, plots and each trial's run folder.
        resume: continue the interrupted search in ``output`` (finished trials kept).

    Returns:
        The best trial's row of trials.csv.
    """
    output = Path(output).expanduser().resolve()
    if not resume:  # checked before anything is written
        cfg = checked(cfg)
        if cfg.tune.search == "optuna":
            _searcher(cfg)  # fail before Ray starts when the extra is missing
    with experiment_folder(output, "tune", resume):
        if resume:
            cfg = checked(parse_config(saved_experiment_config(output, "search_config.yaml", "tune")))
            verify_state(output, experiment_location(output, cfg.run.storage, SEARCH_DIR))
        base = cfg.model_dump(mode="json")
        if not resume:
            save_experiment_config(output, "search_config.yaml", base)
        return _search(cfg, base, output, resume)


def _search(cfg: Config, base: dict[str, Any], output: Path, resume: bool) -> dict[str, Any]:
    from ega_ray.tune.report import write_report

    t0 = time.time()
    connect_ray(cfg)
    base["scaling"]["socket_ifname"] = cfg.scaling.socket_ifname  # what the node checks chose, for every trial
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

    results = run_experiment(search_trial, base, output, cfg.run.storage, SEARCH_DIR, resume, new_tuner)
    return write_report(results, cfg, output, wall_time_s=time.time() - t0)
