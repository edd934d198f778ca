"""Reading a config: ``--set`` overrides into the raw dict, pydantic's errors as one line each, a section's
dump as dotted keys. Imports neither torch nor Ray."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ega_ray.errors import ConfigError
from ega_ray.yaml_strict import load_yaml


def flat_settings(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A section's dump with its nested settings (``distill.ega``) as dotted keys (``ega.node_weight``)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out |= flat_settings(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _model_of(annotation: Any) -> Any:
    """The model class in an annotation (``EGASettings | None`` → EGASettings)."""
    return next((a for a in getattr(annotation, "__args__", ()) if isinstance(a, type)), annotation)


def format_error(error: dict[str, Any], model: type[BaseModel]) -> str:
    """One of pydantic's errors as one line naming the field."""
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        parent: Any = model
        for part in error["loc"][:-1]:
            parent = _model_of(parent.model_fields[str(part)].annotation)
        return f"{loc}: unknown field; allowed here: {', '.join(parent.model_fields)}"
    if error["type"] == "missing":
        return f"{loc}: required field is missing"
    msg = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    suffix = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{loc}: {msg}{suffix}" if loc else f"{msg}{suffix}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.epochs=10")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[leaf] = load_yaml(value, f"--set {item!r}: the value")
    return raw
