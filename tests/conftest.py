"""Shared fixtures: one local Ray for the tests that need it (stopped at the end), and a private cache
for built-in data so tests never touch the user's ~/.cache.

The test tiers: a test is marked with what it needs (``ray``, ``cluster``, ``multihost``, ``heavy``, ``gpu``:
pyproject.toml says what each means); an unmarked test needs only Python and torch, and the unmarked ones are
the fast tier (``make test-fast``, :data:`FAST_TIER`). A test that takes the ``local_ray`` fixture is marked
``ray`` here, and one that starts Ray in this process without a mark that allows it fails, so the fast tier
cannot grow a Ray start unnoticed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]


def share_cores_between_test_processes() -> None:
    """Under pytest-xdist, each test process (and what it starts: CLI subprocesses, Ray drivers) computes on its
    share of the cores, not on one thread per core: torch's OpenMP threads of several processes on the same
    cores wait for each other (README, the fast tier's time). Set before any test module imports torch, which
    reads it once; an OMP_NUM_THREADS already set is kept. Ray workers get theirs from their CPU share."""
    processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if processes > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))


share_cores_between_test_processes()


def ray_workers_at_the_tests_priority() -> None:
    """Every Ray the tests start (local ones, ``ray start`` clusters, the hosts of tests/multihost.py) runs its
    workers at niceness 0, as the test processes themselves run, not at Ray's default of 15. At 15 a fit's
    workers get a sliver of a core whenever anything at niceness 0 computes beside them: the other test
    process, a CLI subprocess, another cluster's raylets and dashboards; the fit then takes many times as
    long and every Ray process's periodic work goes on all that time (docs/performance.md, "Ray's worker niceness").
    A value already set is kept."""
    os.environ.setdefault("RAY_worker_niceness", "0")


ray_workers_at_the_tests_priority()
NEEDS = ("ray", "cluster", "multihost", "heavy", "gpu")
STARTS_RAY = ("ray", "cluster", "multihost")
FAST_TIER = " and ".join(f"not {need}" for need in NEEDS)  # the -m expression of make test-fast


# the order of the tiers among the tests without a measured duration (tests/durations.json), and the tier of a
# test with several marks: the first of them here
TIER_ORDER = ("multihost", "fast", "heavy", "gpu", "cluster", "ray")
# what a test without a measured duration is expected to take, by tier, in seconds: a new Ray test is handed out
# among the other Ray runs, not after the fast tier, where it would run alone at the end
UNMEASURED_SECONDS = {"multihost": 60.0, "cluster": 60.0, "ray": 30.0, "heavy": 5.0, "gpu": 5.0, "fast": 0.0}
DURATIONS = Path(__file__).with_name("durations.json")


def tier(item: pytest.Item) -> str:
    """The tier a test belongs to: the first of its markers in :data:`TIER_ORDER`, or ``fast``."""
    return next((m for m in TIER_ORDER if item.get_closest_marker(m) is not None), "fast")


def base_nodeid(nodeid: str) -> str:
    """A test's node id without the ``@group`` suffix pytest-xdist adds to grouped tests."""
    return nodeid.split("@", 1)[0]


def hand_out_order(tests: list[tuple[str, str]], seconds: dict[str, float]) -> list[int]:
    """The order in which pytest-xdist hands the tests to its processes (``--dist loadgroup`` without
    reordering).

    The multi-host tests come first: their cluster's start is the suite's longest wait, and they run one after
    another on one process. Meanwhile the other process runs the tests that start no Ray: test clusters that
    run side by side slow each other down. The tests that start Ray come last, longest first, so that the two
    processes end close together: a long test handed out last runs alone while the other process has nothing
    left. README ("Tests") has the runs that chose this order.

    Args:
        tests: each test's (node id, tier), in collection order.
        seconds: measured seconds per node id (tests/durations.json); a test without one is expected to take
            its tier's :data:`UNMEASURED_SECONDS`.

    Returns:
        The indices into ``tests`` in hand-out order; ties keep the order of :data:`TIER_ORDER`, then
        collection order.
    """

    def key(i: int) -> tuple[bool, bool, float, int]:
        nodeid, test_tier = tests[i]
        expected = seconds.get(base_nodeid(nodeid), UNMEASURED_SECONDS[test_tier])
        return (test_tier != "multihost", test_tier in STARTS_RAY, -expected, TIER_ORDER.index(test_tier))

    return sorted(range(len(tests)), key=key)


def measured_seconds() -> dict[str, float]:
    """tests/durations.json: node id → seconds (setup, call and teardown) in a whole-suite run."""
    return json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--write-durations", action="store_true",
        help="write each test's seconds (at least 1 s) to tests/durations.json, the suite's hand-out order",
    )  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "local_ray" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)
    order = hand_out_order([(item.nodeid, tier(item)) for item in items], measured_seconds())
    items[:] = [items[i] for i in order]


class DurationsWriter:
    """``--write-durations``: the seconds of each test of this run (setup, call and teardown, as its test
    process spent them) replace its entry in tests/durations.json; tests under a second are left out, and so
    are the entries of test files that no longer exist."""

    MIN_SECONDS = 1.0

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        nodeid = base_nodeid(report.nodeid)
        self.seconds[nodeid] = self.seconds.get(nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self) -> None:
        merged = measured_seconds() | self.seconds
        kept = {
            nodeid: round(seconds, 1)
            for nodeid, seconds in sorted(merged.items())
            if seconds >= self.MIN_SECONDS and (REPO / nodeid.split("::", 1)[0]).is_file()
        }
        DURATIONS.write_text(json.dumps(kept, indent=1) + "\n")


# the test files whose tests share one pytest-xdist process (their xdist_group mark, --dist loadgroup), because
# they share a cluster that each process would otherwise start again
GROUPED_FILES = ("tests/test_multihost.py",)


class LoadgroupGuard:
    """Stops a run in which ``--dist loadgroup`` does not group: pytest-xdist marks a grouped test by a suffix on
    its node id, which pytest 9.2 no longer reads (pytest-xdist#1386); each test process would then start its
    own multi-host cluster. pyproject.toml pins pytest below 9.2 for this."""

    @staticmethod
    def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
        lost = [i for i in ids if i.startswith(GROUPED_FILES) and "@" not in i]
        if lost:
            pytest.exit(
                f"--dist loadgroup lost the group of {len(lost)} tests (e.g. {lost[0]}): pytest {pytest.__version__} "
                "with this pytest-xdist does not group them (pytest-xdist#1386); install requirements.lock's versions",
                returncode=pytest.ExitCode.USAGE_ERROR,
            )


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist") and config.getoption("dist", None) == "loadgroup":
        config.pluginmanager.register(LoadgroupGuard())
    if config.getoption("write_durations") and not os.environ.get("PYTEST_XDIST_WORKER"):
        config.pluginmanager.register(DurationsWriter())  # in the process that gets every test's reports


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _tier_guard(request: pytest.FixtureRequest):
    """Fail a test that starts Ray in this process without a marker that says it needs Ray."""
    allowed = any(request.node.get_closest_marker(m) for m in STARTS_RAY)
    before = allowed or _ray_running()
    yield
    if not before and _ray_running():
        pytest.fail(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.ray (tests/conftest.py, the tiers)")


@pytest.fixture(scope="session", autouse=True)
def _ray_train_polls_often() -> None:
    """Every Ray the tests start (local ones, ``ray start`` clusters, the jobs' drivers) inherits this: its
    Ray Train controllers poll their workers as a local ``ega-ray`` run's do, not every 2 s, so no test
    waits idle between a fit's steps (docs/performance.md)."""
    from ega_ray.constants import LOCAL_HEALTH_CHECK_INTERVAL_S

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(LOCAL_HEALTH_CHECK_INTERVAL_S))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("ega-ray-cache")
    os.environ["EGA_RAY_CACHE"] = str(cache)
    return cache


class SharedOutputs:
    """What several tests inspect but none changes (a finished run, a teacher file, a teacher cache), made once
    per test session by whichever test needs it first, under a file lock that pytest-xdist's processes share,
    and found complete by the others. A test that would change one copies it first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, make: Callable[[Path], dict | None]) -> tuple[Path, dict]:
        """The folder ``name``, made by ``make(folder)`` if no test has made it yet, and what ``make``
        returned (kept as JSON beside it, so every process gets the same value)."""
        folder, done = self.root / name, self.root / f"{name}.json"
        with FileLock(str(self.root / f"{name}.lock")):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)  # a make that failed earlier in this session
                value = make(folder) or {}
                done.write_text(json.dumps(value))
            return folder, json.loads(done.read_text())


@pytest.fixture(scope="session")
def shared_outputs(tmp_path_factory: pytest.TempPathFactory) -> SharedOutputs:
    """One store per session: under pytest-xdist each process has its own base temp, beside the others'."""
    base = tmp_path_factory.getbasetemp()
    return SharedOutputs((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-outputs")


@pytest.fixture(scope="session")
def teacher_resnet8(shared_outputs: SharedOutputs) -> Path:
    """A randomly initialised resnet8 saved as a teacher weights file (the same bytes for every test)."""

    def make(folder: Path) -> None:
        import torch

        from ega_ray.models import build_student

        folder.mkdir(parents=True)
        torch.manual_seed(1)
        torch.save(build_student("resnet8").state_dict(), folder / "resnet8.pt")

    return shared_outputs.get("teacher-resnet8", make)[0] / "resnet8.pt"


@pytest.fixture(scope="session")
def teacher_cache_2_views(shared_outputs: SharedOutputs, teacher_resnet8: Path, local_ray) -> tuple[Path, dict]:
    """That teacher's 2-view cache of the smoke config's training split (``ega-ray cache-teacher``, on the
    session's local Ray), and the summary its build returned."""

    def make(folder: Path) -> dict:
        from ega_ray.config import load_config
        from ega_ray.driver.teacher_cache import build_cache

        cfg = load_config(
            REPO / "configs" / "smoke.yaml",
            [f"run.output={folder.parent / 'cache-build'}", f"teacher.weights={teacher_resnet8}", "optim.epochs=1"],
        )
        return build_cache(cfg, views=2, output=folder)

    return shared_outputs.get("teacher-cache-2-views", make)


@pytest.fixture(scope="session")
def pipeline_run(shared_outputs: SharedOutputs, teacher_resnet8: Path, local_ray) -> tuple[Path, dict]:
    """A finished smoke run (``ega-ray distill``'s path, not a trial: its students exported, ``.pt2`` included)
    in the pipeline teacher mode on the streaming data path, 2 epochs, and its summary: test_teacher_modes.py
    checks what its teacher actors did, test_checkpoints.py resumes a copy whose checkpoint it truncated."""

    def make(folder: Path) -> dict:
        from ega_ray.driver.launch import run_distill

        return run_distill(pipeline_run_config(folder, teacher_resnet8))

    return shared_outputs.get("pipeline-run", make)


def pipeline_run_config(output: Path, teacher_weights: Path, *overrides: str):
    """The config of :func:`pipeline_run`, written to ``output`` (``overrides`` last)."""
    from ega_ray.config import load_config

    settings = ["optim.epochs=2", "teacher.mode=pipeline", "run.deterministic=false", *overrides]
    return load_config(
        REPO / "configs" / "smoke.yaml", [f"run.output={output}", f"teacher.weights={teacher_weights}", *settings]
    )


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray started by this test session only, and shut down after it."""
    import ray
    from ray_processes import free_port

    from ega_ray.driver.launch import set_local_train_defaults

    os.environ.pop("RAY_ADDRESS", None)
    set_local_train_defaults()  # as connect_ray sets them before it starts a local Ray
    # a new local Ray, even while another test runs a `ray start` cluster on this machine; without a dashboard,
    # but with a port of its own for one: Ray's state API is looked up there, and Ray Train's placement-group
    # cleaner takes "no such actor" from it for a dead controller. At the default port it would ask the
    # dashboard of another test's `ega-ray` run, and tear down this session's live runs (docs/performance.md)
    ray.init(address="local", num_cpus=4, include_dashboard=False, dashboard_port=free_port(), configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
