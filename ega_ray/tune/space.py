"""The searched fields of ``ega-ray tune``: Ray Tune's parameter space from the config's ``tune.space``, and
a trial's parameters back into a config."""

from __future__ import annotations

import copy
from typing import Any

from ray import tune

from ega_ray.config import SpaceEntry

NONE_SUFFIX = "|none"  # a boolean companion parameter: the field takes None (hard graph for the temperature)


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
    """``base`` (a raw config) with a trial's parameters set at their dotted paths (``distill.ega.temperature``).

    Args:
        base: the raw config dict; not modified.
        params: dotted path → value, with the ``|none`` companions of ``tune_space``.

    Returns:
        A new raw config dict.
    """
    raw = copy.deepcopy(base)
    for key, value in effective_params(params).items():
        *parents, field = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[field] = value
    return raw
