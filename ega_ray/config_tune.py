"""The config's ``tune`` section: the searched fields (dotted paths into the config) and how trials are
scheduled. Imports neither torch nor Ray (``ega_ray.tune.space`` turns it into Ray Tune's space)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ega_ray.config_distill import moved_message, other_methods_path

if TYPE_CHECKING:
    from ega_ray.config import Config


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SpaceEntry(_Section):
    """One searched config field: a range (uniform / loguniform / int) or a list of values (choice / grid)."""

    type: Literal["uniform", "loguniform", "int", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None
    include_none: bool = Field(False, description="also try None (for distill.ega.temperature: the paper's hard graph)")

    @model_validator(mode="after")
    def _well_formed(self) -> SpaceEntry:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{self.type} needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"{self.type} needs 'low' and 'high'")
            if not self.low < self.high:
                raise ValueError(f"empty range: low {self.low} must be below high {self.high}")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self

    def bounds(self) -> list[Any]:
        """The values whose validity stands for the whole entry: the ends of a range, or every listed value."""
        return list(self.values) if self.type in ("choice", "grid") else [self.low, self.high]


DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "distill.ega.temperature": {"type": "loguniform", "low": 0.03, "high": 1.0, "include_none": True},
    "distill.ega.node_weight": {"type": "uniform", "low": 0.1, "high": 2.0},
    "distill.ega.edge_weight": {"type": "uniform", "low": 0.05, "high": 1.0},
    "distill.beta": {"type": "uniform", "low": 0.25, "high": 2.0},
    "optim.lr": {"type": "loguniform", "low": 0.0125, "high": 0.2},
}


def default_space(method: str) -> dict[str, dict[str, Any]]:
    """The searched fields when ``tune.space`` is not given: ``DEFAULT_SPACE`` less another method's settings."""
    return {k: v for k, v in DEFAULT_SPACE.items() if not other_methods_path(k, method)}


class TuneSection(_Section):
    """``ega-ray tune``: the searched fields and how trials are scheduled (see docs/tuning.md)."""

    num_samples: int = Field(8, ge=1, description="trials to sample (grid entries multiply them)")
    metric: Literal["validation_top1", "validation_top5"] = Field(
        "validation_top1", description="the validation split's metric to maximise"
    )
    search: Literal["random", "optuna"] = Field("random", description="optuna needs the optional extra [tune]")
    grace_period: int = Field(3, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/reduction_factor of trials at each rung")
    max_concurrent: int | None = Field(None, ge=1, description="None: as many as the cluster's CPUs/GPUs hold")
    space: dict[str, SpaceEntry] = Field(
        default_factory=lambda: {k: SpaceEntry(**v) for k, v in DEFAULT_SPACE.items()},
        description="dotted config field (distill.ega.temperature) → search entry; replaces the default space "
        "when given (default: DEFAULT_SPACE, less the settings of methods other than distill.method)",
    )


def check_space(cfg: Config) -> None:
    """Every searched key names a config field outside tune/run, and its values are valid for that field.

    Args:
        cfg: the config, every section valid.

    Raises:
        ValueError: naming the key, and the value or what the keys may be.
    """
    sections = [name for name in type(cfg).model_fields if name not in ("tune", "run")]
    for key, entry in cfg.tune.space.items():
        section, *parents, field = key.split(".")
        node: Any = getattr(cfg, section) if section in sections else None
        for part in parents:
            known = isinstance(node, BaseModel) and part in type(node).model_fields
            node = getattr(node, part) if known else None
        if not isinstance(node, BaseModel) or field not in type(node).model_fields:
            hint = moved_message(key) or (
                f"section.field or section.method.field, sections: {', '.join(sections)}; a method's settings "
                f"only for distill.method {cfg.distill.method!r}"
            )
            raise ValueError(f"tune.space: {key!r} is not a searchable config field ({hint})")
        for value in entry.bounds():
            raw = getattr(cfg, section).model_dump()
            leaf = raw
            for part in parents:
                leaf = leaf[part]
            leaf[field] = value
            try:
                type(getattr(cfg, section)).model_validate(raw)
            except ValidationError as err:
                msg = err.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"tune.space.{key}: value {value!r} is not allowed: {msg}") from None
