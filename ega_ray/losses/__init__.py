"""Distillation losses, one per file (lightly style), and the registry that picks one by name.

``DISTILLERS.get(name)`` is the class that ``distill.method`` names; ``cls.from_config(cfg.distill,
num_samples, seed)`` builds it from the fields every method shares and the method's own settings
(``cfg.distill.settings``: the model ``SETTINGS.get(name)``, in ``ega_ray/losses/settings/`` because the
config checks it without importing torch). Every distiller takes the teacher's and the student's
embeddings (and, by keyword, what else its method needs: see ``base.py``) and returns a scalar. ``METHODS``
is the table of both registries (see ``ega_ray.registry``): a new loss is its file, its settings model and
one line there, and the CLI, the config and the benchmark take the method names from it. Importing this
package imports no torch; the loss classes are imported from their modules when first used
(``from ega_ray.losses import EGALoss`` works too).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ega_ray.registry import Registry

if TYPE_CHECKING:
    from ega_ray.config import DistillConfig
    from ega_ray.losses.base import Distiller
    from ega_ray.losses.settings import MethodSettings

_NONE = "ega_ray.losses.settings:MethodSettings"  # a method without settings of its own
# name: (the loss class, its settings model: the config's ``distill.<name>`` section)
METHODS = {
    "ega": ("ega_ray.losses.ega:EGALoss", "ega_ray.losses.settings.ega:EGASettings"),
    "kd": ("ega_ray.losses.kd:LogitKD", _NONE),  # its temperature is the shared distill.kd_temperature
    "hint": ("ega_ray.losses.hint:HintLoss", _NONE),
    "rkd": ("ega_ray.losses.rkd:RKDLoss", "ega_ray.losses.settings.rkd:RKDSettings"),
    "pkt": ("ega_ray.losses.pkt:PKTLoss", _NONE),
    "crd": ("ega_ray.losses.crd:CRDLoss", "ega_ray.losses.settings.crd:CRDSettings"),
    "nce": ("ega_ray.losses.nce:NCELoss", "ega_ray.losses.settings.nce:NCESettings"),
    "ccl": ("ega_ray.losses.ccl:CCLLoss", "ega_ray.losses.settings.ccl:CCLSettings"),
}
DISTILLERS: Registry[Distiller] = Registry("distiller", {name: loss for name, (loss, _) in METHODS.items()})
SETTINGS: Registry[MethodSettings] = Registry("distiller", {name: model for name, (_, model) in METHODS.items()})

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


__all__ = ["DISTILLERS", "METHODS", "SETTINGS", "build_distiller", *_EXPORTS]
