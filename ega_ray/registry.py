"""A tiny name → constructor registry, in the spirit of timm's ``register_model``.

Students, teachers and distillers each have one. A name may carry a family prefix
(``torchvision:resnet18``): an entry registered as ``torchvision:*`` receives the part after the colon.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, name: str) -> tuple[Callable[..., T], str | None]:
        """The constructor for ``name`` and, for a family entry (``fam:*``), the part after the colon."""
        if name in self._entries:
            return self._entries[name], None
        family, sep, rest = name.partition(":")
        if sep and rest and f"{family}:*" in self._entries:
            return self._entries[f"{family}:*"], rest
        raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")

    def check(self, name: str) -> str:
        """``name`` if it is registered; a ValueError naming it and the known names otherwise."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}")
        return name

    def __contains__(self, name: str) -> bool:
        try:
            self.resolve(name)
        except KeyError:
            return False
        return True

    def build(self, name: str, **kwargs: Any) -> T:
        fn, rest = self.resolve(name)
        return fn(rest, **kwargs) if rest is not None else fn(**kwargs)
