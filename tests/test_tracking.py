"""What a run records while it trains (metrics.csv every epoch, TensorBoard, MLflow, W&B offline) and the
compact line per epoch on the console. The recorder is Ray Train's UserCallback; here it is driven the way
the controller drives it, and tests/test_train_ray.py checks it inside real runs."""

from __future__ import annotations

import csv
import io
import struct
import time
from pathlib import Path

import pytest

from ega_ray.config import parse_config
from ega_ray.driver.tracking import RunRecorder, epoch_lines, format_epoch, write_rows


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in TensorBoard event files (TFRecord framing: length, crc, Event proto, crc)."""
    from tensorboardX.proto import event_pb2

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def report(epoch: int, top1: float) -> dict:
    return {"epoch": epoch, "train_loss": 2.0 / epoch, "train_ce": 1.0 / epoch, "validation_top1": top1, "lr": 0.05}


def test_every_epoch_lands_in_metrics_csv_tensorboard_mlflow_and_wandb(tmp_path):
    cfg = parse_config({"data": {"train": "t", "test": "v"}, "run": {"loggers": ["tensorboard", "mlflow", "wandb"]}})
    recorder = RunRecorder(str(tmp_path), "run-a", 3, cfg.run.loggers, cfg.model_dump(mode="json"), verbose=False)
    recorder.after_report(None, [report(1, 40.0), report(1, 40.0)], None)  # both ranks report
    assert [r["epoch"] for r in rows_of(tmp_path / "metrics.csv")] == ["1"], "readable after the first epoch"
    recorder.after_report(None, [report(2, 55.0)], None)
    recorder.after_report(None, [report(2, 57.5)], None)  # epoch 2 trained again after a restore: replaces
    recorder.after_report(None, [report(3, 60.0)], None)  # the last epoch: the trackers are closed
    assert [(r["epoch"], r["validation_top1"]) for r in rows_of(tmp_path / "metrics.csv")] == [
        ("1", "40.0"), ("2", "57.5"), ("3", "60.0")
    ]  # fmt: skip

    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["validation/top1"][-1] == (3, 60.0) and [s for s, _ in scalars["train/loss"]] == [1, 2, 2, 3]
    assert scalars["lr"][0] == (1, pytest.approx(0.05))

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("ega-ray").experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "validation_top1"))
    assert history == [(1, 40.0), (2, 55.0), (2, 57.5), (3, 60.0)]
    assert run.data.params["distill.method"] == "ega" and run.info.run_name == "run-a"

    offline = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0, "W&B wrote its offline run, for `wandb sync`"

    # the same run folder recorded again (a resumed run): one MLflow run, continued
    again = RunRecorder(str(tmp_path), "run-a", 4, ["mlflow"], cfg.model_dump(mode="json"), verbose=False)
    again.after_report(None, [report(4, 61.0)], None)
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [r["epoch"] for r in rows_of(tmp_path / "metrics.csv")] == ["1", "2", "3", "4"]


def test_the_epoch_line_is_compact_and_shows_gpu_columns_only_on_a_gpu():
    cpu = {"epoch": "3", "train_loss": "1.5", "train_ce": "0.5", "train_distill": "1.0",
           "validation_top1": "81.25", "best_validation_top1": "82.0", "selected_epoch": "2", "test_top1": "79.5",
           "train_img_per_s": "1234.5", "gpu_mem_peak_gib": "0.0", "gpu_util_pct": "0.0"}  # fmt: skip
    line = format_epoch(cpu, 30, 125.0)
    assert line == (
        "epoch  3/30  loss 1.500 (ce 0.500, distill 1.000)  validation top-1 81.25% (best 82.00 @2)  test 79.50%  "
        "1,234 img/s  eta 2m05s"
    )
    gpu = format_epoch(cpu | {"gpu_mem_peak_gib": "7.25", "gpu_util_pct": "93.4"}, 30, None)
    assert gpu.endswith("1,234 img/s  GPU 7.2 GiB 93%") and "eta" not in gpu


def test_epoch_lines_print_each_new_epoch_once(tmp_path):
    write_rows(tmp_path / "metrics.csv", [report(1, 10.0)])  # an earlier run's epoch: not printed again
    stream = io.StringIO()
    with epoch_lines(tmp_path, "smoke", 3, stream=stream, poll_s=0.05):
        for epoch in (2, 3):
            time.sleep(0.2)
            write_rows(tmp_path / "metrics.csv", [report(e, 10.0 * e) for e in range(1, epoch + 1)])
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["[smoke] epoch 2/3", "[smoke] epoch 3/3"], lines
    assert "eta" in lines[0] and "eta" not in lines[1]
