"""What a run records while it trains, and what it prints.

:class:`RunRecorder` is a Ray Train ``UserCallback``: Ray Train runs it in its controller, on the driver's
node, after every epoch's report. It rewrites ``metrics.csv`` (one row per epoch, readable mid-run: a
finished epoch is there within seconds), writes TensorBoard event files (``<run>/tensorboard/``), and, when
``run.loggers`` asks, logs to Weights & Biases (offline by default: no network) and MLflow (a local
``file:`` store by default). A Tune trial is a run like any other, so every trial records the same way in
its own folder.

:func:`epoch_lines` runs on the driver while the run trains: it prints one compact line per epoch (losses,
top-1, best, images/s, ETA; GPU memory and utilisation only on a GPU) from the ``metrics.csv`` the
controller writes, so the console shows ega-ray's lines, not Ray's.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import ray
import ray.train

from ega_ray.disk import write_atomic
from ega_ray.ray_logs import quiet_ray_logs

METRICS_CSV = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
LOGGERS = ("tensorboard", "wandb", "mlflow")
def read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV (columns: every key, in order of appearance), replacing ``path`` atomically."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


def scalar_tag(key: str) -> str:
    """TensorBoard's grouping: ``train_loss`` → ``train/loss``, ``validation_top1`` → ``validation/top1``."""
    group, sep, rest = key.partition("_")
    return f"{group}/{rest}" if sep and group in ("train", "validation", "test", "gpu", "best") else key


class RunRecorder(ray.train.UserCallback):
    """Records every epoch's metrics in the run folder and the trackers ``loggers`` names (see the module
    docstring). Runs in Ray Train's controller; holds only plain values until its first report (it is
    pickled there), and opens its writers then."""

    def __init__(
        self, out: str, name: str, epochs: int, loggers: list[str], config: dict[str, Any], verbose: bool
    ) -> None:
        self.out, self.name, self.epochs, self.loggers = Path(out), name, epochs, list(loggers)
        self.config, self.verbose = config, verbose
        self.rows: list[dict[str, Any]] | None = None
        self.tb = self.wandb_run = self.mlflow = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        row = metrics[0]  # every rank reports the same all-reduced metrics; rank 0's has them all
        if "epoch" not in row:
            return
        epoch = int(row["epoch"])
        if self.rows is None:  # the first report of this controller: open the writers, keep earlier epochs
            quiet_ray_logs(self.verbose)
            self.rows = [r for r in read_rows(self.out / METRICS_CSV) if int(r["epoch"]) < epoch]
            self._open()
        self.rows = [r for r in self.rows if int(r["epoch"]) < epoch] + [row]  # an epoch trained again replaces
        write_rows(self.out / METRICS_CSV, self.rows)
        numbers = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(scalar_tag(key), value, epoch)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=epoch)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: v for k, v in numbers.items() if math.isfinite(v)}, step=epoch)
        if epoch >= self.epochs:  # the run's last epoch: everything on disk now
            self.close()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()
        self.tb = self.wandb_run = self.mlflow = None

    def _open(self) -> None:
        run_id = hashlib.sha256(str(self.out).encode()).hexdigest()[:16]  # one tracker run per run folder
        if "tensorboard" in self.loggers:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.out / TENSORBOARD_DIR))
        if "wandb" in self.loggers:
            import wandb

            w = self.config["run"]
            self.wandb_run = wandb.init(
                project=w["wandb_project"], name=self.name, id=run_id, resume="allow", dir=str(self.out),
                mode=w["wandb_mode"], config=self.config,
            )  # fmt: skip
        if "mlflow" in self.loggers:
            import mlflow

            r = self.config["run"]
            uri = r["mlflow_tracking_uri"] or (self.out / "mlruns").as_uri()
            if uri.startswith("file:"):  # MLflow 3 keeps the file store, in "maintenance mode", behind a switch
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(r["mlflow_experiment"])
            found = mlflow.search_runs(filter_string=f"tags.ega_ray_run = '{run_id}'", output_format="list")
            if found:
                mlflow.start_run(run_id=found[0].info.run_id)
            else:
                mlflow.start_run(run_name=self.name, tags={"ega_ray_run": run_id, "ega_ray_output": str(self.out)})
                mlflow.log_params(flat_params(self.config))
            self.mlflow = mlflow


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """``section.field`` → value as text, for trackers' parameter tables (MLflow caps a value at 500 chars)."""
    return {
        f"{s}.{k}": str(v)[:500] for s, fields in config.items() if isinstance(fields, dict) for k, v in fields.items()
    }


def format_epoch(row: dict[str, str], total: int, eta_s: float | None) -> str:
    """One compact line for an epoch of ``metrics.csv`` (values as CSV gives them: text)."""

    def num(key: str) -> float | None:
        try:
            return float(row[key])
        except (KeyError, ValueError):
            return None

    parts = [f"epoch {int(float(row['epoch'])):>{len(str(total))}}/{total}"]
    loss = num("train_loss")
    if loss is not None:
        terms = [f"{k} {v:.3f}" for k in ("ce", "distill") if (v := num(f"train_{k}")) is not None]
        parts.append(f"loss {loss:.3f}" + (f" ({', '.join(terms)})" if terms else ""))
    if (top1 := num("validation_top1")) is not None:
        best, at = num("best_validation_top1"), num("selected_epoch")
        chosen = f" (best {best:.2f} @{int(at)})" if best is not None and at else ""
        parts.append(f"validation top-1 {top1:.2f}%{chosen}")
    if (test := num("test_top1")) is not None:
        parts.append(f"test {test:.2f}%")
    if (knn := num("knn_top1")) is not None:
        parts.append(f"kNN {knn:.2f}%")
    if (speed := num("train_img_per_s")) is not None:
        parts.append(f"{speed:,.0f} img/s")
    if (mem := num("gpu_mem_peak_gib")) and mem > 0:  # GPU columns only on a GPU
        util = num("gpu_util_pct")
        parts.append(f"GPU {mem:.1f} GiB" + (f" {util:.0f}%" if util is not None and math.isfinite(util) else ""))
    if eta_s is not None:
        parts.append(f"eta {int(eta_s) // 60}m{int(eta_s) % 60:02d}s")
    return "  ".join(parts)


@contextmanager
def epoch_lines(out: Path, label: str, total: int, stream: TextIO | None = None, poll_s: float = 0.5) -> Iterator[None]:
    """While the block runs, print ``[label] <line>`` for every epoch the controller adds to ``metrics.csv``
    (the ETA from this process's pace). ``stream``: default stderr; the last lines are printed at exit too."""
    stream = stream or sys.stderr
    seen = {r["epoch"] for r in read_rows(out / METRICS_CSV)}  # a resumed run's earlier epochs are not news
    t0, done = time.monotonic(), 0
    stop = threading.Event()

    def show_new() -> None:
        nonlocal done
        for row in read_rows(out / METRICS_CSV):
            if row["epoch"] in seen:
                continue
            seen.add(row["epoch"])
            done += 1
            left = total - int(float(row["epoch"]))
            eta = (time.monotonic() - t0) / done * left if left > 0 else None
            print(f"[{label}] {format_epoch(row, total, eta)}", file=stream, flush=True)

    def watch() -> None:
        while not stop.wait(poll_s):
            show_new()

    thread = threading.Thread(target=watch, name="ega-ray-epoch-lines", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        show_new()
