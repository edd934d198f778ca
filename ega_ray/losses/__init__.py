"""Distillation losses, one per file (lightly style), and the registry that picks one by name.

``DISTILLERS.get(name)`` is the class that ``distill.method`` names; ``cls.from_config(cfg.distill,
num_samples, seed)`` builds it. Every distiller takes the teacher's and the student's embeddings (and, by
keyword, what else its method needs: see ``base.py``) and returns a scalar. The table is the registry (see
``ega_ray.registry``): a new loss is its file plus a line, and the CLI, the config and the benchmark take
the method names from it. Importing this package imports no torch; the loss classes are imported from
their modules when first used (``from ega_ray.losses import EGALoss`` works too).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ega_ray.registry import Registry

if TYPE_CHECKING:
    from ega_ray.config import DistillConfig
    from ega_ray.losses.base import Distiller

DISTILLERS: Registry[Distiller] = Registry(
    "distiller",
    {
        "ega": "ega_ray.losses.ega:EGALoss",
        "kd": "ega_ray.losses.kd:LogitKD",
        "hint": "ega_ray.losses.hint:HintLoss",
        "rkd": "ega_ray.losses.rkd:RKDLoss",
        "pkt": "ega_ray.losses.pkt:PKTLoss",
        "crd": "ega_ray.losses.crd:CRDLoss",
        "nce": "ega_ray.losses.nce:NCELoss",
        "ccl": "ega_ray.losses.ccl:CCLLoss",
    },
)

# what ``from ega_ray.losses import X`` finds, imported on first use
_EXPORTS = {
    "Distiller": "base",
    "EGALoss": "ega",
    "pearson_graph": "ega",
    "KDLoss": "kd",
    "LogitKD": "kd",
    "HintLoss": "hint",
    "RKDLoss": "rkd",
    "PKTLoss": "pkt",
    "CRDLoss": "crd",
    "NCELoss": "nce",
    "CCLLoss": "ccl",
    "NTXentLoss": "ntxent",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"ega_ray.losses.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ega_ray.losses' has no attribute {name!r}")


def build_distiller(method: str, d: DistillConfig, num_samples: int, seed: int) -> Distiller:
    """The distiller ``method`` built from the ``distill`` section ``d``."""
    return DISTILLERS.get(method).from_config(d, num_samples=num_samples, seed=seed)


__all__ = ["DISTILLERS", "build_distiller", *_EXPORTS]
