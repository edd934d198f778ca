"""Shared fixtures: one local Ray for the tests that need it (stopped at the end), and a private cache
for built-in data so tests never touch the user's ~/.cache.

The test tiers: a test is marked with what it needs (``ray``, ``cluster``, ``multihost``, ``heavy``, ``gpu``:
pyproject.toml says what each means); an unmarked test needs only Python and torch, and the unmarked ones are
the fast tier (``make test-fast``, :data:`FAST_TIER`). A test that takes the ``local_ray`` fixture is marked
``ray`` here, and one that starts Ray in this process without a mark that allows it fails, so the fast tier
cannot grow a Ray start unnoticed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NEEDS = ("ray", "cluster", "multihost", "heavy", "gpu")
STARTS_RAY = ("ray", "cluster", "multihost")
FAST_TIER = " and ".join(f"not {need}" for need in NEEDS)  # the -m expression of make test-fast


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "local_ray" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)


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
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("ega-ray-cache")
    os.environ["EGA_RAY_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray started by this test session only, and shut down after it."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as connect_ray sets it: one actor less
    # a new local Ray, even while another test runs a `ray start` cluster on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
