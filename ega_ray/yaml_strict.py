"""YAML that a person wrote (config files, ``--set`` values), read strictly.

PyYAML's safe loader keeps the last of two equal keys of a mapping without a word, so a config with two
``optim:`` sections silently loses the first; and its aliases let a few lines stand for billions of values
(a "billion laughs" file), which the loader builds in no time but every reader of the result walks for
minutes before running out of memory. ``load_yaml`` refuses both, with one line naming the source:

- a key given twice in one mapping: the key's path (``optim``, ``optim.lr``) and both line numbers. Keys
  brought in by a merge (``<<: *defaults``) may be overridden: that is what a merge is for;
- a document larger than ``MAX_NODES`` values once its aliases are expanded, and an alias inside its own
  anchor (a structure that contains itself).

Both are checked on the composed node graph, before any Python object is built: the expanded size is
counted once per node (a node reached by several aliases is counted as often as it is reached, but
walked once), so a bomb is refused in milliseconds. Imports nothing of the package but its errors.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ega_ray.errors import ConfigError

__all__ = ["MAX_NODES", "load_yaml"]

# Values (scalars, lists and mappings, aliases expanded) one document may hold. A full config is a few hundred;
# the limit leaves room for long lists in a search space while a bomb is refused long before it costs anything.
MAX_NODES = 10_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader whose documents are checked (``_check_graph``) between composing and constructing."""

    source = "YAML"

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_graph(self, node)
        return node


def _key_text(loader: yaml.SafeLoader, key: Node) -> tuple[Any, str]:
    """A mapping key as the constructor will see it (for comparing) and as a message shows it."""
    if isinstance(key, ScalarNode):
        return loader.construct_object(key), str(key.value)  # equal as dict keys: 1, 1.0 and true are one key
    return (key.tag, id(key)), f"<{key.tag.rsplit(':', 1)[-1]} key>"  # complex keys: rare, compared by identity


def _check_graph(loader: _StrictLoader, root: Node) -> None:
    """Raise ConfigError for a duplicate key, a self-containing alias or more than MAX_NODES values."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Node, path: str) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ConfigError(f"{loader.source}: {path or 'the document'} contains itself through an alias")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                total += size(item, f"{path}[{i}]")
                _cap(total, path)
        elif isinstance(node, MappingNode):
            first_line: dict[Any, int] = {}
            for key, value in node.value:
                if key.tag == _MERGE_TAG:
                    total += size(value, path)
                    continue
                identity, shown = _key_text(loader, key)
                where = f"{path}.{shown}" if path else shown
                line = key.start_mark.line + 1
                if identity in first_line:
                    raise ConfigError(
                        f"{loader.source}: key {where!r} appears twice (lines {first_line[identity]} and {line}); "
                        "YAML would silently keep only the last: give each key once"
                    )
                first_line[identity] = line
                total += size(key, where) + size(value, where)
                _cap(total, path)
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    def _cap(total: int, path: str) -> None:
        if total > MAX_NODES:
            raise ConfigError(
                f"{loader.source}: more than {MAX_NODES} values once its aliases are expanded (at "
                f"{path or 'the top level'}); a config this large is a mistake or an alias bomb"
            )

    size(root, "")


def load_yaml(text: str | bytes, source: str) -> Any:
    """The one YAML document in ``text``, read with PyYAML's safe loader, refusing duplicate keys and alias
    bombs (see the module's docstring).

    Args:
        text: the YAML text.
        source: how messages name it, e.g. ``config file 'my.yaml'`` or ``--set optim.lr``.

    Returns:
        The document's value (None for an empty document).

    Raises:
        ConfigError: one line naming ``source``: a duplicate key, too many values, or text that is not YAML.
    """
    loader = _StrictLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    finally:
        loader.dispose()
