"""A name → constructor registry, in the spirit of timm's ``register_model``, that knows its names without
importing anything.

Students, teachers and distillers each have one, declared in their package's ``__init__`` as a table
``name → "module:attribute"``: the attribute (a function or a class) is imported the first time it is
built, so checking a config's names costs no torch import. A name may carry a family prefix
(``torchvision:resnet18``): an entry registered as ``torchvision:*`` receives the part after the colon.
Adding a model, teacher family or loss is its file plus one line in the table.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A table from a name (``resnet8``, or a family member ``timm:NAME`` through a ``timm:*`` entry) to the
    ``module:attribute`` that builds it; the module is imported only when a name is built."""

    def __init__(self, kind: str, entries: dict[str, str]) -> None:
        """Args:
        kind: what the entries are, for messages (``student``, ``teacher``, ``distiller``).
        entries: name → ``module:attribute``.
        """
        for name, target in entries.items():
            if target.count(":") != 1:
                raise ValueError(f"{kind} {name!r}: target {target!r} must be 'module:attribute'")
        self.kind = kind
        self._entries = dict(entries)

    def names(self) -> list[str]:
        """Returns: the registered names, sorted (families as ``fam:*``)."""
        return sorted(self._entries)

    def _lookup(self, name: str) -> tuple[str, str | None]:
        """The entry's target for ``name`` and, for a family entry (``fam:*``), the part after the colon."""
        if name in self._entries:
            return self._entries[name], None
        family, sep, rest = name.partition(":")
        if sep and rest and f"{family}:*" in self._entries:
            return self._entries[f"{family}:*"], rest
        raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")

    def check(self, name: str) -> str:
        """Check ``name`` without importing anything (a family's member names are checked when it is built).

        Args:
            name: a registry name.

        Returns:
            ``name``; a ValueError naming it and the known names when it is not registered.
        """
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}")
        return name

    def __contains__(self, name: str) -> bool:
        try:
            self._lookup(name)
        except KeyError:
            return False
        return True

    def get(self, name: str) -> Any:
        """Args:
            name: a registry name.

        Returns:
            The constructor (function or class) registered for it, imported now.
        """
        module, _, attribute = self._lookup(name)[0].partition(":")
        return getattr(import_module(module), attribute)

    def build(self, name: str, **kwargs: Any) -> T:
        """Build ``name``.

        Args:
            name: a registry name.
            kwargs: the constructor's keyword arguments (a family's constructor gets the member name first).

        Returns:
            What the constructor returns.
        """
        rest = self._lookup(name)[1]
        fn = self.get(name)
        return fn(rest, **kwargs) if rest is not None else fn(**kwargs)
