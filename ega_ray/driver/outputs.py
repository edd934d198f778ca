"""What a run writes to its folder: resolved config, metrics.csv, learning-curve PNG, student exports,
summary.json. Written by the driver from the checkpoints Ray Train reported, each file atomically
(``ega_ray.disk``); the students are recorded in the folder's marker (``ega-ray export`` may replace them)."""

from __future__ import annotations

import csv
import io
import json
import logging
import traceback
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from ega_ray.config import Config  # noqa: E402
from ega_ray.data.classes import trained_class_names  # noqa: E402
from ega_ray.disk import write_atomic, write_with  # noqa: E402
from ega_ray.errors import UsageError  # noqa: E402
from ega_ray.export import build_classifier, write_student  # noqa: E402
from ega_ray.run_folder import record_written  # noqa: E402

logger = logging.getLogger(__name__)


def write_config(cfg: Config, out: Path) -> None:
    write_atomic(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def write_metrics_csv(history: list[dict], path: Path) -> None:
    """``history`` as CSV (columns: every key, in order of appearance), replacing ``path`` atomically."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    write_atomic(path, buf.getvalue())


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Training losses (left) and validation and test accuracies (right) per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "train_ce", "train_distill", "train_teacher_ce"):
        if key in history[0]:
            ax_l.plot(epochs, [row[key] for row in history], label=key.removeprefix("train_"))
    ax_l.set(xlabel="epoch", ylabel="loss", title="training loss")
    ax_l.legend()
    for key, label in (
        ("validation_top1", "student top-1, validation"),
        ("test_top1", "student top-1, test"),
        ("validation_teacher_top1", "teacher head top-1, validation"),
        ("knn_top1", "kNN top-1, test"),
    ):
        rows = [row for row in history if key in row]
        if rows:
            xs, ys = [r["epoch"] for r in rows], [r[key] for r in rows]
            ax_a.plot(xs, ys, marker="." if len(rows) < 30 else None, label=label)
    ax_a.set(xlabel="epoch", ylabel="%", title="accuracy")
    if ax_a.lines:
        ax_a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def export_student(cfg: Config, state: dict, out: Path, stem: str, pt2: bool = True) -> None:
    """``<stem>.pt``, ``<stem>.safetensors`` and (``pt2``) ``<stem>.pt2`` of a checkpoint's student (see
    ``ega_ray.export``). A student that ``torch.export`` cannot capture keeps its .pt and .safetensors: the
    run's results are not lost to an exporter's limits, and `ega-ray export --student <stem>.pt` shows the
    error again."""
    meta = {
        "student": cfg.student.name,
        "num_classes": state["num_classes"],
        "embed_dim": cfg.distill.embed_dim,
        "image_size": cfg.data.image_size,
        "mean": list(cfg.augment.student_mean),
        "std": list(cfg.augment.student_std),
        "epoch": state["epoch"],
        "class_names": trained_class_names(cfg.data.train, state["num_classes"]),
    }
    model = build_classifier(meta)
    model.load_state_dict(state["student"])
    record_written(out, list(write_student(model, meta, out, stem, ("pt", "safetensors")).values()))
    if not pt2:
        return
    try:
        record_written(out, list(write_student(model, meta, out, stem, ("pt2",)).values()))
    except UsageError:
        raise  # a full disk: one line, not a warning
    except Exception as err:  # noqa: BLE001 - torch.export's failures have no common type
        where = traceback.extract_tb(err.__traceback__)[-1]
        logger.warning(
            "%s.pt2 not written: torch.export failed (%s: %s, at %s:%d)",
            stem, type(err).__name__, err, Path(where.filename).name, where.lineno,
        )  # fmt: skip


def write_json(data: dict, path: Path) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
