"""The benchmark's per-method choices, as pure functions: which methods (``--methods``), each method's run
config with its reference loss weights, what its search covers (its own knobs and the learning rate), and
which settings its tuned runs use (the best trial, if it beat the reference on the validation split)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ega_ray.config import ConfigError, SpaceEntry
from ega_ray.config_distill import with_method
from ega_ray.losses import DISTILLERS
from ega_ray.tune.experiment import trial_config
from ega_ray.tune.space import apply_params
from ega_ray.tune.tables import CE_ONLY

LR_SPACE = {"optim.lr": {"type": "loguniform", "low": 0.0125, "high": 0.2}}  # searched for every method


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


def run_name(method: str, seed: int, variant: str = "reference") -> str:
    return f"{method}-seed{seed}" if variant == "reference" else f"{method}-{variant}-seed{seed}"


def method_space(method: str) -> dict[str, SpaceEntry]:
    """What ``--tune-trials`` searches for ``method``: its own knobs and the learning rate."""
    own = {} if method == CE_ONLY else DISTILLERS.get(method).search_space
    return {key: SpaceEntry(**entry) for key, entry in (own | LR_SPACE).items()}


def method_config(
    base: dict[str, Any],
    method: str,
    seed: int,
    root: Path,
    reference_weights: bool = True,
    params: dict[str, Any] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """The run config of one (method, seed) in its own run folder (``name``, default ``<method>-seed<k>``):
    with the method's reference loss weights, or (``reference_weights=False``) with the config's gamma, beta
    and alpha for every method; then ``params`` (dotted fields: a search trial's or the tuned values)."""
    raw = copy.deepcopy(base)
    if method == CE_ONLY:
        raw["distill"]["beta"] = 0.0
    else:
        raw = with_method(raw, method)  # the base method's own settings are not this one's
        if method != "ega" and reference_weights:
            cls = DISTILLERS.get(method)
            raw["distill"] |= {"gamma": cls.default_gamma, "beta": cls.default_beta, "alpha": 0.0}
    raw["run"]["seed"] = seed
    return trial_config(apply_params(raw, params or {}), root, name or run_name(method, seed))


def tuned_choice(
    search_top1: float | None, search_params: dict[str, Any], reference_top1: float | None
) -> dict[str, Any]:
    """The settings a method's tuned runs use: the best search trial's values if that trial beat the
    reference settings' seed-0 run (both by the validation top-1 of the selected epoch on seed 0, never a test
    score), else ``{}``: the reference
    settings, which win ties (the smaller change). None: no trial that did not diverge (the reference is
    kept), or a reference run that diverged (any trial that did not beats it)."""
    if search_top1 is None:
        return {}
    return search_params if reference_top1 is None or search_top1 > reference_top1 else {}


def best_trial(scored: list[tuple[float | None, str, dict[str, Any]]]) -> tuple[float | None, dict[str, Any]]:
    """The best (top-1, values) of a method's search trials, each (best top-1, trial id, values) with top-1
    None for a trial that diverged, which is never chosen; (None, {}) when every trial diverged. A tie goes
    to the first trial by id, not to whichever Tune lists first: a resumed benchmark lists its trials in
    another order and must name the settings its tuned runs were trained with."""
    usable = sorted((s for s in scored if s[0] is not None), key=lambda s: s[1])
    if not usable:
        return None, {}
    top1, _, params = max(usable, key=lambda s: s[0])
    return top1, params
