"""The package's shape: no import cycles, a config and a CLI that import neither torch nor Ray, registries
whose every entry exists, and teacher modes that each answer for every layer."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ega_ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports anywhere (module level and inside functions), except under
    ``if TYPE_CHECKING:``; ``from pkg import name`` counts as pkg.name when that is a module, else pkg."""
    name, is_package = module_name(path), path.name == "__init__.py"

    def nearest(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(nearest(a.name) for a in node.names if a.name.startswith("ega_ray"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if node.module else anchor
            if base.startswith("ega_ray"):
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else nearest(base) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found - {None, name}


def test_no_import_cycles_in_the_package():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: imports_of(p, set(files)) for m, p in files.items()}
    cycles, state = [], {}

    def walk(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                walk(dep, [*stack, dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)
    assert "ega_ray.config_distill" in graph["ega_ray.config"], "the walk sees the config's imports"
    assert "ega_ray.losses" in graph["ega_ray.config_distill"], "and theirs"


def test_the_worker_side_never_imports_the_driver_side():
    """docs/architecture.md's two layers: what runs in Ray Train's workers (``ega_ray.worker``) imports nothing
    of the driver (``ega_ray.driver``: checks, Ray Data, the TorchTrainer, the run folder's files), so a worker
    process never loads it; the driver imports the worker's loop to hand it to Ray Train."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    worker = {m: imports_of(p, set(files)) for m, p in files.items() if m.startswith("ega_ray.worker")}
    assert {"ega_ray.worker.distill", "ega_ray.worker.pretrain", "ega_ray.worker.common"} <= set(worker)
    crossing = {m: sorted(d for d in deps if d.startswith("ega_ray.driver")) for m, deps in worker.items()}
    assert not any(crossing.values()), {m: d for m, d in crossing.items() if d}
    assert "ega_ray.worker.distill" in imports_of(files["ega_ray.driver.launch"], set(files)), "the walk sees it"
    assert not (PACKAGE / "train").exists(), "ega_ray/train/ was split into driver/ and worker/"


LIGHT = ["ega_ray.config", "ega_ray.cli", "ega_ray.teacher_modes", "ega_ray.losses"]
LIGHT += ["ega_ray.disk", "ega_ray.run_folder"]  # what every command's writes go through


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_neither_torch_nor_ray(module):
    probe = (
        f"import sys, {module}; from ega_ray.config import parse_config; "
        "parse_config({'data': {'train': 't', 'test': 'v'}, 'teacher': {'name': 'open_clip:ViT-B-32'}}); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'open_clip', 'timm', 'torchvision'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing {module} and parsing a config imported {done.stdout.strip()}"


def test_every_registry_entry_exists_and_builds_its_kind():
    from ega_ray.losses import DISTILLERS
    from ega_ray.losses.base import Distiller
    from ega_ray.models import STUDENTS, TEACHERS

    for registry in (STUDENTS, TEACHERS, DISTILLERS):
        for name in registry.names():
            assert callable(registry.get(name)), f"{registry.kind} {name}"
    for name in DISTILLERS.names():
        cls = DISTILLERS.get(name)
        assert issubclass(cls, Distiller) and cls.from_config is not Distiller.from_config, name
    assert STUDENTS.build("resnet8").feat_dim == 64
    assert "torchvision:resnet18" in STUDENTS and "torchvision" not in STUDENTS
    with pytest.raises(ValueError, match=r"unknown student 'resnet9000'; allowed: .*resnet8x4"):
        STUDENTS.check("resnet9000")


def test_each_teacher_mode_answers_for_every_layer():
    from ega_ray.teacher_modes import TEACHER_MODES, TeacherMode

    assert sorted(TEACHER_MODES) == ["cached", "online", "pipeline"]
    for name, mode in TEACHER_MODES.items():
        assert mode.name == name and type(mode).features is not TeacherMode.features, name
    assert [m for m in TEACHER_MODES.values() if m.teacher_in_worker] == [TEACHER_MODES["online"]]


def test_only_the_teacher_modes_know_the_modes():
    """No branch on a mode's name in the package outside ega_ray/teacher_modes.py: code asks the mode."""
    import re

    names = r"[\"'](online|cached|pipeline)[\"']"
    branch = re.compile(rf"teacher\.mode\s*(==|!=|in\b)|(==|!=)\s*{names}|{names}\s*(==|!=)")
    offenders = [
        f"{path.relative_to(REPO)}:{lineno}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "teacher_modes.py"
        for lineno, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line.split("#")[0])
    ]
    assert not offenders, "\n".join(offenders)


def test_the_test_tiers_agree_everywhere():
    """make test-fast selects conftest's fast tier, every marker a tier names is declared in pyproject.toml
    (pytest runs with --strict-markers, so a misspelt marker fails collection), and every tier is ordered."""
    from conftest import FAST_TIER, NEEDS, TIER_ORDER, UNMEASURED_SECONDS

    make_tier = re.search(r"^FAST_TIER := (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert make_tier and make_tier.group(1).strip() == FAST_TIER
    markers = (REPO / "pyproject.toml").read_text().split("markers = [", 1)[1].split("]", 1)[0]
    assert sorted(re.findall(r'^\s+"(\w+): ', markers, re.M)) == sorted(NEEDS)
    assert sorted(TIER_ORDER) == sorted([*NEEDS, "fast"]), "every tier has its place in the suite's order"
    assert set(UNMEASURED_SECONDS) == set(TIER_ORDER), "every tier has an expected duration"


def test_tests_are_handed_out_multihost_first_then_without_ray_then_longest_first():
    """conftest.hand_out_order on made-up tests: the multi-host tests first whatever their length, then the
    tests that start no Ray, then the ones that do; within each, the longest expected first (measured seconds,
    xdist's @group suffix ignored; a test never measured takes its tier's expected seconds), ties in tier order
    and then in collection order."""
    from conftest import UNMEASURED_SECONDS, hand_out_order

    tests = [
        ("t/a.py::fast_one", "fast"),
        ("t/b.py::ray_short", "ray"),
        ("t/c.py::ray_new", "ray"),  # never measured: a Ray test's expected seconds
        ("t/d.py::host_short@multihost", "multihost"),
        ("t/a.py::fast_two", "fast"),
        ("t/e.py::cluster_long", "cluster"),
        ("t/f.py::heavy_tie", "heavy"),
        ("t/g.py::fast_tie", "fast"),
        ("t/h.py::cluster_tie", "cluster"),
        ("t/i.py::ray_tie", "ray"),
    ]
    seconds = {"t/b.py::ray_short": 2.0, "t/d.py::host_short": 1.0, "t/e.py::cluster_long": 150.0,
               "t/f.py::heavy_tie": 7.0, "t/g.py::fast_tie": 7.0, "t/h.py::cluster_tie": 9.0,
               "t/i.py::ray_tie": 9.0}  # fmt: skip
    order = [tests[i][0].split("::")[1] for i in hand_out_order(tests, seconds)]
    assert UNMEASURED_SECONDS["ray"] > 9.0
    assert order == ["host_short@multihost", "fast_tie", "heavy_tie", "fast_one", "fast_two",
                     "cluster_long", "ray_new", "cluster_tie", "ray_tie", "ray_short"]  # fmt: skip


def test_the_durations_file_names_tests_that_exist(tmp_path, monkeypatch):
    """tests/durations.json (the hand-out order's measurements) names only tests of files that exist, with
    seconds; ``--write-durations`` merges a run's seconds into it, per test across setup, call and teardown."""
    import conftest

    measured = conftest.measured_seconds()
    assert measured and all(v >= conftest.DurationsWriter.MIN_SECONDS for v in measured.values())
    assert all((REPO / nodeid.split("::")[0]).is_file() and "@" not in nodeid for nodeid in measured)

    file = tmp_path / "durations.json"
    file.write_text('{"tests/test_architecture.py::kept": 5.0, "tests/gone.py::dropped": 9.0}')
    monkeypatch.setattr(conftest, "DURATIONS", file)
    writer = conftest.DurationsWriter()
    for when, seconds in (("setup", 2.0), ("call", 1.5), ("teardown", 0.5)):
        writer.pytest_runtest_logreport(
            pytest.TestReport("tests/test_config.py::new@group", (), {}, "passed", None, when, [], seconds)
        )
    writer.pytest_runtest_logreport(pytest.TestReport("tests/test_config.py::quick", (), {}, "passed", None,
                                                      "call", [], 0.2))  # fmt: skip
    writer.pytest_sessionfinish()
    assert json.loads(file.read_text()) == {"tests/test_architecture.py::kept": 5.0, "tests/test_config.py::new": 4.0}


def test_the_cli_is_a_table_from_verb_to_function():
    """Every verb the parser knows has its function in cli.VERBS, and the dispatch branches on no verb name."""
    from ega_ray import cli

    assert set(cli.VERBS) == set(cli.commands())
    source = (PACKAGE / "cli.py").read_text()
    assert "args.command ==" not in source and 'command == "' not in source
