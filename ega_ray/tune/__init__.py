"""Hyperparameter search with Ray Tune: each trial is a full Ray Train distillation (Train V2 in Tune)."""

from ega_ray.tune.search import run_search

__all__ = ["run_search"]
