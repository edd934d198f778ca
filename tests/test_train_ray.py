"""A real 2-worker Ray Train run on CPU: checkpoints, an interruption, resume, and what a run writes."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from ray.train import TrainingFailedError

from ega_ray.config import load_config
from ega_ray.train.launch import run_distill

from .conftest import REPO

pytestmark = pytest.mark.slow


def smoke(tmp_path, *overrides: str):
    return load_config(REPO / "configs" / "smoke.yaml", [f"run.output={tmp_path / 'run'}", *overrides])


def read_metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, local_ray):
    cfg = smoke(tmp_path, "optim.epochs=3", "run.fail_after_epoch=1", "run.max_failures=0")
    with pytest.raises(TrainingFailedError):
        run_distill(cfg)
    run_dir = tmp_path / "run"
    first = sorted(run_dir.glob("checkpoint_*"))
    assert len(first) == 1, "the failed run keeps the checkpoint of epoch 1"
    state = torch.load(first[0] / "state.pt", weights_only=True)
    assert state["epoch"] == 1

    summary = run_distill(cfg)  # same name and folder: resumes (the injected failure fires only once)
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3], "no epoch lost or counted twice"
    assert [int(r["restarts"]) for r in rows] == [0, 1, 1], "epochs 2-3 ran after a restore, epoch 1 before"
    assert float(rows[0]["train_loss"]) == pytest.approx(state["history"][0]["train_loss"])
    assert summary["epochs"] == 3


def test_failure_config_retries_from_the_last_checkpoint(tmp_path, local_ray):
    cfg = smoke(tmp_path, "optim.epochs=2", "run.fail_after_epoch=1", "run.max_failures=1")
    summary = run_distill(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [int(r["restarts"]) for r in rows] == [0, 1]
    assert summary["epochs"] == 2


def test_run_writes_its_outputs(tmp_path, local_ray):
    cfg = smoke(tmp_path, "optim.epochs=1", "data.label_fraction=0.1")
    summary = run_distill(cfg)
    run_dir = tmp_path / "run"
    for name in (
        "config.yaml",
        "metrics.csv",
        "learning_curves.png",
        "summary.json",
        "student_last.pt",
        "student_best.pt",
        "student_last.torchscript.pt",
        "student_best.torchscript.pt",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["labeled_train_rows"] == pytest.approx(0.1 * summary["train_rows"], abs=10)
    assert 0.0 <= summary["last_val_top1"] <= 100.0
    assert (run_dir / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    scripted = torch.jit.load(str(run_dir / "student_last.torchscript.pt"))
    assert scripted(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    exported = torch.load(run_dir / "student_best.pt", weights_only=True)
    assert exported["student"] == "resnet8" and exported["num_classes"] == 10
