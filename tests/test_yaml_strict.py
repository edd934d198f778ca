"""Config YAML read strictly: a key given twice and an alias bomb are one-line ConfigErrors naming the file
(and, for a key, its path and both lines), before any Python object of the document is built. No Ray."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ega_ray.config import apply_overrides, load_config
from ega_ray.errors import ConfigError
from ega_ray.yaml_strict import MAX_NODES, load_yaml

DATA = "data:\n  train: builtin:digits\n  test: builtin:digits\n"


def _refused(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def test_the_issues_two_optim_sections_are_refused_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(DATA + "optim:\n  epochs: 2\n  milestones: [1]\noptim:\n  lr: 0.1\n")
    msg = _refused(path)
    assert "twice.yaml" in msg and "'optim'" in msg and "lines 4 and 7" in msg


def test_a_key_repeated_inside_a_section_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "inner.yaml"
    path.write_text(DATA + "optim:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n")
    msg = _refused(path)
    assert "inner.yaml" in msg and "'optim.lr'" in msg and "lines 5 and 7" in msg


def test_keys_equal_as_python_values_are_duplicates_too() -> None:
    # 1 and true are the same dict key: PyYAML would keep one of them silently
    with pytest.raises(ConfigError, match=r"'x\.true' appears twice \(lines 2 and 3\)"):
        load_yaml("x:\n  1: a\n  true: b\n", "t")


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    lines = [DATA.rstrip("\n"), "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10^9 values
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nrun:\n  name: *a8\n")
    start = time.perf_counter()
    msg = _refused(path)
    assert time.perf_counter() - start < 1.0
    assert "bomb.yaml" in msg and f"more than {MAX_NODES} values" in msg


def test_an_alias_bomb_in_a_set_value_is_refused() -> None:
    bomb = "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
        "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]"  # fmt: skip
    with pytest.raises(ConfigError, match=r"--set 'optim.milestones=.*more than 10000 values"):
        apply_overrides({}, [f"optim.milestones={bomb}"])


def test_a_structure_that_contains_itself_is_refused() -> None:
    with pytest.raises(ConfigError, match="'t': a.b contains itself through an alias"):
        load_yaml("a: &a\n  b: *a\n", "'t'")


def test_ordinary_aliases_and_merges_still_load(tmp_path: Path) -> None:
    path = tmp_path / "aliases.yaml"
    path.write_text(
        DATA
        + "optim:\n  lr: &lr 0.1\n  epochs: 3\n  milestones: [2]\n"
        + "pretrain:\n  lr: *lr\n"
        + "tune:\n  space:\n"
        + "    distill.ega.node_weight: &range {type: uniform, low: 0.1, high: 2.0}\n"
        + "    distill.beta: {<<: *range, high: 1.5}\n"  # a merged key may be overridden
    )
    cfg = load_config(path, ["run.name=exp2"])
    assert cfg.pretrain.lr == cfg.optim.lr == 0.1 and cfg.run.name == "exp2"
    assert (cfg.tune.space["distill.beta"].low, cfg.tune.space["distill.beta"].high) == (0.1, 1.5)


def test_a_large_list_below_the_cap_loads() -> None:
    values = ", ".join(str(i) for i in range(MAX_NODES // 2))
    assert len(load_yaml(f"values: [{values}]\n", "t")["values"]) == MAX_NODES // 2
