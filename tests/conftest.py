"""Shared fixtures: one local Ray for the tests that need it (stopped at the end), and a private cache
for built-in data so tests never touch the user's ~/.cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
