"""The config's ``distill`` section: the fields every method shares, and the chosen method's own settings.

Each distiller declares its settings model in ``ega_ray/losses/settings/`` (registered in
``ega_ray.losses.SETTINGS``); this section has one optional field per method, named by it, of which only
the chosen method's is set: ``distill.ega.node_weight``, ``distill.crd.negatives``. Its defaults fill in when
the method's key is left out; the settings of another method than ``distill.method`` are refused, naming
the field, and so are the flat names these settings had before (``distill.node_weight``), naming the new
path. Imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_serializer, model_validator

from ega_ray.losses import DISTILLERS, SETTINGS
from ega_ray.losses.settings import MethodSettings

# the flat names of the settings that moved under their method's key (configs written before it)
MOVED = {
    "node_weight": "distill.ega.node_weight",
    "edge_weight": "distill.ega.edge_weight",
    "temperature": "distill.ega.temperature",
    "graph_size": "distill.ega.graph_size",
    "rkd_distance_weight": "distill.rkd.distance_weight",
    "rkd_angle_weight": "distill.rkd.angle_weight",
    "contrast_temperature": "distill.nce.temperature (nce) or distill.ccl.temperature (ccl)",
    "ccl_temperature": "distill.ccl.logit_temperature",
    "crd_temperature": "distill.crd.temperature",
    "crd_negatives": "distill.crd.negatives",
    "crd_negatives_from": "distill.crd.negatives_from",
    "crd_momentum": "distill.crd.momentum",
    "crd_bank": "distill.crd.bank",
    "crd_queue_size": "distill.crd.queue_size",
}


def moved_message(path: str) -> str | None:
    """For a dotted path written the old way (``distill.node_weight``), where that setting lives now."""
    section, _, field = path.partition(".")
    if section == "distill" and field in MOVED:
        return f"{field} moved to {MOVED[field]} (a method's own settings live under its name)"
    return None


class DistillShared(BaseModel):
    """What every method shares; the chosen method's settings are the field named by it (``settings``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: str = Field("ega", description="distiller registry name")
    embed_dim: int = Field(256, ge=1, description="joint embedding width of both projection heads")
    global_graph: bool = Field(
        True, description="graph (and every batch-relational loss) over the global batch (all DDP ranks) or per rank"
    )
    standardize_teacher_features: bool = Field(
        False, description="parameter-free BatchNorm on teacher features before its projection (see docs/method.md)"
    )
    gamma: float = Field(1.0, ge=0, description="weight of the student's cross-entropy")
    beta: float = Field(1.0, ge=0, description="weight of the distiller")
    alpha: float = Field(0.0, ge=0, description="weight of KD against the teacher head's logits")
    kd_temperature: float = Field(4.0, gt=0, description="KD's temperature (the alpha term and kd)")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        return DISTILLERS.check(v)

    @model_validator(mode="before")
    @classmethod
    def _method_settings(cls, raw: Any) -> Any:
        """The chosen method's settings (its defaults when left out); another method's, or an old name, refused."""
        if not isinstance(raw, dict):
            return raw
        for old in raw:
            if (moved := moved_message(f"distill.{old}")) is not None:
                raise ValueError(moved)
        method = raw.get("method", "ega")
        for name in SETTINGS.names():
            given = raw.get(name)
            if name != method and given is not None:
                first = next(iter(given), "") if isinstance(given, dict) and given else ""
                field = name + (f".{first}" if first else "")
                raise ValueError(
                    f"{field} is a setting of method {name!r}, but distill.method is {method!r} "
                    f"(set distill.method: {name}, or drop distill.{name})"
                )
        if method in SETTINGS and raw.get(method) is None:
            raw = {**raw, method: {}}
        return raw

    @model_serializer(mode="wrap")
    def _only_the_chosen_method(self, handler: Any) -> dict[str, Any]:
        """Dumps hold the chosen method's settings alone, so that a dumped section parses again."""
        out = handler(self)
        return {k: v for k, v in out.items() if k not in SETTINGS or k == self.method}

    @property
    def settings(self) -> MethodSettings:
        """The chosen method's settings."""
        return getattr(self, self.method)


DistillConfig: type[DistillShared] = create_model(
    "DistillConfig",
    __base__=DistillShared,
    __module__=__name__,
    **{name: (SETTINGS.get(name) | None, None) for name in SETTINGS.names()},
)


def other_methods_path(path: str, method: str) -> bool:
    """Whether the dotted ``path`` is a setting of another method than ``method`` (``distill.crd.…``)."""
    section, name, *rest = path.split(".") + [""]
    return section == "distill" and name in SETTINGS and name != method and bool(rest[0])


def without_method_settings(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat settings record (``distill.ega.node_weight``: value) less every method's own settings: what two
    runs of different methods are compared on, since ``distill.method`` differing already says that they do."""
    return {k: v for k, v in flat.items() if k.split(".")[:2][-1] not in SETTINGS or not k.startswith("distill.")}


def with_method(raw: dict[str, Any], method: str) -> dict[str, Any]:
    """A raw config switched to ``method``: the settings of the method it had dropped, from ``distill`` and from
    ``tune.space`` (``method``'s own, when given, stay).

    Args:
        raw: a raw config dict (e.g. a dumped one); not modified.
        method: a distiller registry name.

    Returns:
        A new raw config dict.
    """
    distill = {k: v for k, v in (raw.get("distill") or {}).items() if k not in SETTINGS or k == method}
    out = {**raw, "distill": distill | {"method": method}}
    space = (raw.get("tune") or {}).get("space")
    if isinstance(space, dict):
        out["tune"] = {**raw["tune"], "space": {k: v for k, v in space.items() if not other_methods_path(k, method)}}
    return out
