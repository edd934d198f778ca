"""Real 2-worker Ray Train runs on CPU: an undecodable image, a diverged run, the embedded default (SimCLR
teacher included); and a split's Ray Data stages beside workers that hold almost every CPU. An interruption
and resume is in test_reproducible.py (it ends as the uninterrupted run); what a run writes and retries after
a lost node are tested through real clusters in test_cluster.py."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from ega_ray.config import load_config
from ega_ray.driver.launch import run_distill
from ega_ray.driver.preflight import resolve

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.ray


def smoke(tmp_path, *overrides: str):
    return load_config(REPO / "configs" / "smoke.yaml", [f"run.output={tmp_path / 'run'}", *overrides])


def read_metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_an_undecodable_image_stops_the_run_naming_its_row(tmp_path, local_ray):
    """Through real Ray Data: the error raised in the decoding stage reaches the driver, and the CLI's
    unwrapping finds the row's split and index in it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ega_ray.data.digits import builtin_split
    from ega_ray.errors import DataError, find_usage_error

    table = pq.read_table(builtin_split("builtin:digits", "train"))
    images = table["image"].to_pylist()
    broken = int(table["index"][100].as_py())
    images[100] = b"\x89PNG broken"
    (tmp_path / "train").mkdir()
    pq.write_table(table.set_column(0, "image", pa.array(images, pa.binary())), tmp_path / "train" / "part-0.parquet")
    with pytest.raises(Exception) as caught:  # noqa: B017 - Ray's wrapper type depends on where it failed
        run_distill(smoke(tmp_path, f"data.train={tmp_path / 'train'}", "optim.epochs=1"))
    found = find_usage_error(caught.value)
    assert isinstance(found, DataError), caught.value
    assert str(found).startswith(f"data.train: the image of the row with index {broken} cannot be decoded")


def test_a_splits_reading_and_decoding_run_beside_workers_that_leave_less_than_a_cpu(local_ray):
    """Every task of a split's Ray Data stages asks for a fraction of a CPU: the driver makes the split, then a
    placement group holds all but half a CPU of the Ray (as Ray Train's does for 1.5-CPU workers on 2-CPU
    hosts), and the split is still read, its rows selected and decoded. At Ray Data's default of a whole CPU
    this waits forever, as the rebuilding of a lost host's materialized blocks did (docs/data.md)."""
    import threading

    import numpy as np
    import pyarrow.parquet as pq
    from ray.util.placement_group import placement_group, remove_placement_group

    from ega_ray.data.digits import builtin_split
    from ega_ray.driver.launch import configure_ray_data, read_split

    configure_ray_data()  # as a run's driver reads its splits
    path = builtin_split("builtin:digits", "train")
    index = pq.read_table(path, columns=["index"])["index"].to_numpy()
    wanted = np.zeros(index.max() + 1, dtype=bool)
    wanted[index[::3]] = True  # a third of the rows, as a carved split selects them
    split = read_split(path, 32, "data.train", wanted)
    held = placement_group([{"CPU": local_ray.cluster_resources()["CPU"] - 0.5}])
    rows: list[int] = []

    def count() -> None:
        rows.append(sum(len(batch["label"]) for batch in split.iter_batches()))

    try:
        local_ray.get(held.ready(), timeout=120)
        assert local_ray.available_resources().get("CPU", 0) <= 0.5
        read = threading.Thread(target=count, daemon=True)  # a hang must not hold the suite
        read.start()
        read.join(timeout=120)
    finally:
        remove_placement_group(held)
    assert rows == [int(wanted.sum())], "the split was not read beside the held CPUs within 2 minutes"


def test_a_non_finite_loss_stops_the_run_with_one_line_and_nothing_saved(tmp_path, local_ray, capsys):
    """An absurd lr through the CLI (in this process, on the test's Ray): exit status 2 and one line naming the
    epoch, step, term and lr; no checkpoint and no student file of the diverged epoch. The workers end the
    run together (no worker failure for Ray Train to restart with run.max_failures, nor to log)."""
    from ega_ray.cli import main

    run_dir = tmp_path / "run"
    argv = ["distill", "--config", str(REPO / "configs" / "smoke.yaml"), "--output", str(run_dir)]
    sets = ["optim.lr=1e8", "optim.max_steps_per_epoch=6", "optim.epochs=2", "optim.milestones=[2]"]
    assert main(argv + [arg for s in [*sets, "run.max_failures=1"] for arg in ("--set", s)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ega-ray: ")]
    # no worker failure: Ray Train neither logs the workers' traceback nor restarts them to diverge again
    assert len(lines) == 1 and "Error in training function" not in err and "DivergedError" not in err, err
    assert re.fullmatch(r"ega-ray: diverged: the .+ is not finite at epoch 1, step [1-6] \(lr 1e\+08\); .+", lines[0])
    assert not list(run_dir.glob("checkpoint_*")) and not list(run_dir.glob("student_*")), sorted(run_dir.iterdir())
    assert not (run_dir / "metrics.csv").exists() or read_metrics(run_dir) == []


def test_embedded_default_end_to_end_in_miniature(tmp_path, local_ray, capsys):
    """The README's main command with one epoch per stage: teacher, EGA, CE-only, table, summary.json."""
    from ega_ray.embedded import embedded_config, ensure_teacher, run_embedded

    overrides = ["pretrain.epochs=1", "optim.epochs=1", "optim.milestones=[1]", "optim.max_steps_per_epoch=6"]
    summary = run_embedded(overrides, output=str(tmp_path / "embedded"))
    out = capsys.readouterr().out
    assert "CE + EGA" in out and "CE only" in out
    saved = json.loads((tmp_path / "embedded" / "summary.json").read_text())
    assert saved == summary
    scores = ["teacher_knn_test_top1", "student_ce_test_top1_at_selected", "student_ega_test_top1_at_selected"]
    for key in (*scores, "student_ega_test_top1_last", "student_ega_validation_top1_at_selected", "wall_time_s"):
        assert 0.0 <= saved[key] and (key == "wall_time_s" or saved[key] <= 100.0)
    assert "test top-1 (%)" in out and saved["validation_rows"] == 145 and saved["test_rows"] == 360
    assert (tmp_path / "embedded" / "teacher" / "validation_rows.json").is_file(), "held out of pretraining too"
    assert saved["labeled_train_rows"] < 0.15 * saved["train_rows"]
    assert (tmp_path / "embedded" / "ega" / "metrics.csv").is_file()
    teacher_file = tmp_path / "embedded" / "teacher" / "teacher.pt"
    # the SimCLR teacher (ega-ray pretrain-teacher) is a loadable `ssl` teacher at its pretraining size
    from ega_ray.models import build_teacher

    teacher = build_teacher("ssl", weights=str(teacher_file))
    assert teacher.spec.input_size == 16 and teacher.spec.embed_dim == 64
    rows = read_metrics(tmp_path / "embedded" / "teacher")
    assert [int(r["epoch"]) for r in rows] == [1] and rows[-1]["knn_top1"] != ""
    mtime = teacher_file.stat().st_mtime
    base = resolve(embedded_config(overrides, output=str(tmp_path / "embedded")))
    assert ensure_teacher(base, teacher_file.parent)[0] == teacher_file
    assert teacher_file.stat().st_mtime == mtime, "the cached teacher is reused when its settings match"
