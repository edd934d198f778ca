"""Ray's own log lines kept out of a run's console, in the driver and in every worker process."""

from __future__ import annotations

import logging

import ray

QUIET_LOGGERS = ("ray", "ray.train", "ray.data", "ray.tune")  # their INFO lines are Ray's, not the run's


def quiet_ray_logs(verbose: bool) -> None:
    """Ray's INFO logs (reports, checkpoints, Ray Data's execution plans) off in this process unless
    ``verbose``; warnings and errors still show (Ray Data's only errors: its warnings are about settings
    ega-ray makes on purpose, such as its progress bars being off)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose and _in_ray_worker():
        # Ray Train logs each report through a logger named after its file, not ``ray.train``: at the root
        logging.getLogger().setLevel(logging.WARNING)


def _in_ray_worker() -> bool:
    worker = ray._private.worker
    return worker.global_worker.mode == worker.WORKER_MODE
