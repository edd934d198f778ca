"""Ray Tune search end to end on the smoke config: a search whose driver is killed mid-way and resumed,
its outputs (trials.csv, best.yaml, plots), and the search-space errors refused before Ray starts."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ega_ray.config import ConfigError, load_config, parse_config
from ega_ray.tune.search import run_search

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_search_resumes_after_the_driver_is_killed(tmp_path, local_ray):
    out = tmp_path / "search"
    cmd = [
        sys.executable,
        "-m",
        "ega_ray.cli",
        "tune",
        "--config",
        str(REPO / "configs" / "smoke.yaml"),
        "--num-samples",
        "2",
        "--output",
        str(out),
        "--set",
        "optim.epochs=2",
        "--set",
        "tune.max_concurrent=1",
        "--set",
        "tune.grace_period=2",
        "--set",
        "tune.search=optuna",  # the optional extra's searcher (in dev), resumed with its state
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 400
        while not list(out.glob("trials/*/summary.json")):
            assert proc.poll() is None, "the search ended before it could be interrupted"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(2)
        first = next(out.glob("trials/*/summary.json")).parent
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, without a goodbye
        proc.wait()

    best = run_search(None, out, resume=True)
    assert list((out / "search").glob("searcher-state-*.pkl")), "OptunaSearch saved no state"
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and best["trials"] == 2
    for column in ("temperature", "node_weight", "edge_weight", "lr", "best_top1", "last_top1", "epochs", "status"):
        assert column in rows[0]
    assert all(r["status"] == "COMPLETED" and r["epochs"] == "2" for r in rows), rows
    with open(first / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    # a finished trial may be rescheduled (the kill came before Tune recorded it) but trains no epoch again
    assert [(h["epoch"], h["restarts"]) for h in history] == [("1", "0"), ("2", "0")]
    assert best["best_top1"] == max(float(r["best_top1"]) for r in rows)
    winner = yaml.safe_load((out / "best.yaml").read_text())
    assert winner["distill"]["node_weight"] == pytest.approx(best["node_weight"])
    assert winner["optim"]["lr"] == pytest.approx(best["lr"])
    assert load_config(out / "best.yaml").run.name == "best", "best.yaml is a ready-to-run config"
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"


def _raw(**space) -> dict:
    return {"data": {"train": "t", "val": "v"}, "tune": {"space": space}}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"distill.temprature": {"type": "loguniform", "low": 0.1, "high": 1.0}}, r"'distill.temprature' is not a"),
        ({"run.seed": {"type": "choice", "values": [1, 2]}}, r"'run.seed' is not a searchable"),
        ({"distill.node_weight": {"type": "uniform", "low": 1.0, "high": 1.0}}, r"node_weight: empty range"),
        ({"distill.edge_weight": {"type": "choice", "values": []}}, r"edge_weight: choice needs a non-empty"),
        ({"distill.temperature": {"type": "uniform", "low": 0.0, "high": 1.0}}, r"temperature: value 0.0 is not"),
        ({"distill.temperature": {"type": "loguniform", "low": -1, "high": 1.0}}, r"temperature: loguniform needs"),
        ({"distill.node_weight": {"type": "uniform", "low": -1, "high": 1.0}}, r"node_weight: value -1"),
    ],
)
def test_bad_search_spaces_name_the_entry(space, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_raw(**space))


def test_search_space_errors_stop_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_raw(**{"distill.temperature": {"type": "uniform", "low": -0.5, "high": 1.0}})))
    proc = subprocess.run(
        [sys.executable, "-m", "ega_ray.cli", "tune", "--config", str(bad), "--output", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "tune.space.distill.temperature" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr and not (tmp_path / "o").exists()
