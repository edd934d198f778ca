"""A run resumes only from a checkpoint that loads: checked on the driver before Ray starts. The snapshot is
Ray Train's own (written with its ``_CheckpointManagerState``, read back with ``ray.train.Result.from_path``,
which is how Ray Train resumes); no Ray cluster is started."""

from __future__ import annotations

import json
import logging
import re

import pytest
import ray.train
import torch
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
    _CheckpointManagerState,
    _TrainingResultState,
)

from ega_ray.driver.checkpoints import SNAPSHOT, CheckpointError, check_resume, remove_unregistered
from ega_ray.worker.common import STATE_FILE

NAME = "run"


def ray_run(tmp_path, epochs=(1, 2), latest=None):
    """A run folder as Ray Train leaves it: one checkpoint per epoch in ``epochs`` (report indices in order),
    each with its state.pt, and the snapshot registering them, ``latest`` (default: the last) as the latest."""
    folder = tmp_path / NAME
    results = []
    for epoch in epochs:
        name = f"checkpoint_2026-12-07_00-00-0{epoch}.000000"
        (folder / name).mkdir(parents=True)
        torch.save({"epoch": epoch, "history": [{"epoch": e} for e in range(1, epoch + 1)]}, folder / name / STATE_FILE)
        results.append(_TrainingResultState(checkpoint_dir_name=name, metrics={"epoch": epoch}))
    latest = results[-1] if latest is None else results[latest]
    snapshot = _CheckpointManagerState(
        checkpoint_results=results,
        checkpoint_report_indices=list(range(len(results))),
        latest_checkpoint_result=latest,
        pending_training_results=[],
        pending_validation_specs=[],
        current_report_index=len(results),
        validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[],
    )
    (folder / SNAPSHOT).write_text(snapshot.model_dump_json())
    return folder, [r.checkpoint_dir_name for r in results]


def resumes_from(folder) -> int:
    """The epoch Ray Train would resume from (its own reading of the snapshot)."""
    checkpoint = ray.train.Result.from_path(str(folder)).checkpoint
    with checkpoint.as_directory() as d:
        return torch.load(f"{d}/{STATE_FILE}", weights_only=True)["epoch"]


def truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


def test_good_checkpoints_are_left_as_they_are(tmp_path):
    folder, _ = ray_run(tmp_path)
    before = (folder / SNAPSHOT).read_text()
    assert check_resume(str(tmp_path), NAME) is None
    assert (folder / SNAPSHOT).read_text() == before and resumes_from(folder) == 2
    assert check_resume(str(tmp_path), "no-such-run") is None, "a new run: nothing to check"
    assert check_resume("s3://bucket/runs", NAME) is None, "a bucket is left to Ray"


def test_a_truncated_latest_checkpoint_is_skipped_for_the_previous_good_one_with_a_warning(tmp_path, caplog):
    folder, names = ray_run(tmp_path)
    truncate(folder / names[1] / STATE_FILE)
    with caplog.at_level(logging.WARNING):
        warning = check_resume(str(tmp_path), NAME)
    assert str(folder / names[1] / STATE_FILE) in warning and f"resuming from {names[0]}" in warning
    assert warning in caplog.text
    assert resumes_from(folder) == 1, "Ray Train now resumes from the one before"
    assert not (folder / names[1]).exists()
    assert check_resume(str(tmp_path), NAME) is None, "and the folder is consistent again"


def test_a_run_whose_only_checkpoint_does_not_load_is_refused_naming_the_file(tmp_path):
    folder, names = ray_run(tmp_path, epochs=(3,))
    truncate(folder / names[0] / STATE_FILE)
    with pytest.raises(CheckpointError, match=rf"^{folder / names[0] / STATE_FILE}: the run's latest checkpoint does "
                       rf"not load: .*; delete {folder} to start over"):  # fmt: skip
        check_resume(str(tmp_path), NAME)
    assert (folder / names[0] / STATE_FILE).exists(), "a refusal changes nothing"


def test_a_truncated_snapshot_is_refused_naming_it(tmp_path):
    folder, _ = ray_run(tmp_path)
    text = (folder / SNAPSHOT).read_text()
    (folder / SNAPSHOT).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=rf"^{folder / SNAPSHOT}: Ray Train's record of the run's checkpoints "
                       rf"cannot be read \(.*\), so the run cannot resume; delete {folder}"):  # fmt: skip
        check_resume(str(tmp_path), NAME)
    (folder / SNAPSHOT).write_text(json.dumps({"checkpoint_results": "nonsense"}))
    with pytest.raises(CheckpointError, match="cannot be read"):
        check_resume(str(tmp_path), NAME)


def test_checkpoint_folders_ray_never_registered_are_removed(tmp_path):
    folder, names = ray_run(tmp_path)
    partial = folder / "checkpoint_2026-12-07_00-00-09.000000"
    partial.mkdir()
    (partial / STATE_FILE).write_bytes(b"half a chec")  # an upload cut short by a full disk
    assert remove_unregistered(folder) == [partial]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, SNAPSHOT])
    (folder / SNAPSHOT).unlink()  # no record at all: nothing of it can be resumed from
    assert remove_unregistered(folder) == [folder / n for n in names]


@pytest.mark.ray
@pytest.mark.xdist_group("pipeline-run")  # beside the other test of that run: one test process makes it
def test_a_real_runs_truncated_checkpoint_is_refused_before_ray_starts_naming_it(
    tmp_path, pipeline_run, teacher_resnet8
):
    """A copy of the session's finished run (tests/conftest.py's ``pipeline_run``): what Ray Train wrote, truncated,
    is refused when the run is resumed with more epochs, before Ray is asked for anything."""
    import shutil

    from conftest import pipeline_run_config

    from ega_ray.driver.launch import run_distill
    from ega_ray.run_folder import written_here

    out = tmp_path / "run"
    shutil.copytree(pipeline_run[0], out)
    snapshot = json.loads((out / SNAPSHOT).read_text())  # as Ray Train 2.60 wrote it
    state = out / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] / STATE_FILE
    assert state.is_file() and check_resume(str(tmp_path), out.name) is None
    # the run records the students it wrote: `ega-ray export` may replace them, and only them
    assert all(written_here(out / f"student_{s}") for s in ("best.pt", "best.safetensors", "best.pt2", "last.pt"))
    partial = out / "checkpoint_2099-01-01_00-00-00.000000"  # an upload cut short
    partial.mkdir()
    (partial / STATE_FILE).write_bytes(b"half a chec")
    # every registered checkpoint: the run keeps its best epoch's beside its latest, and resumes from an earlier
    # one that loads (test_a_truncated_latest_checkpoint_is_skipped_for_the_previous_good_one_with_a_warning);
    # which epoch was best varies from run to run (run.deterministic=false)
    for entry in snapshot["checkpoint_results"]:
        truncate(out / entry["checkpoint_dir_name"] / STATE_FILE, 7919)
    assert state.stat().st_size == 7919
    with pytest.raises(CheckpointError, match=rf"^{state}: the run's latest checkpoint does not load"):
        run_distill(pipeline_run_config(out, teacher_resnet8, "optim.epochs=3"))
    assert not partial.exists(), "the unregistered folder is removed by the next run"
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2, "the finished run's outputs are intact"


@pytest.mark.ray
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_checkpoint_folder(tmp_path):
    """A real 1 MiB disk under the run folder (its own local Ray, in a subprocess): the first checkpoint
    does not fit, and the run stops with one line naming the folder, leaving no partial checkpoint."""
    import os
    import shlex
    import sys

    from small_disk import on_a_small_disk

    run = tmp_path / "disk" / "run"
    distill = [sys.executable, "-m", "ega_ray.cli", "distill", "--config", "configs/smoke.yaml", "--output", str(run),
               "--set", "optim.epochs=1", "--set", "optim.max_steps_per_epoch=2"]  # fmt: skip
    # the folder is listed before the tmpfs goes away with the namespace
    script = f"{shlex.join(distill)}; rc=$?; ls -A {shlex.quote(str(run))}; exit $rc"
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    done = on_a_small_disk(tmp_path / "disk", 1024, ["sh", "-c", script], timeout=400)
    assert done.returncode == 2, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("ega-ray:")]  # Ray logs its own lines too
    assert len(ours) == 1, done.stderr[-3000:]
    # Ray's log monitor may write its own line onto the end of ours (no newline between them): match the start
    assert re.match(rf"ega-ray: disk full: no space left on {run}: [\d.,]+ MB needed, [\d.,]+ MB free", ours[0])
    left = done.stdout.split()
    assert "config.yaml" in left and not [n for n in left if n.startswith("checkpoint_")], left
