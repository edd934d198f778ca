"""What a run writes to its folder: resolved config, metrics.csv, learning-curve PNG, student exports,
summary.json. Written by the driver from the checkpoints Ray Train reported, each file atomically
(``ega_ray.disk``); the students are recorded in the folder's marker (``ega-ray export`` may replace them)."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from ega_ray import uris  # noqa: E402
from ega_ray.config import Config  # noqa: E402
from ega_ray.data.classes import trained_class_names  # noqa: E402
from ega_ray.disk import write_atomic, write_with  # noqa: E402
from ega_ray.driver.tracking import METRICS_CSV, write_rows  # noqa: E402
from ega_ray.errors import UsageError  # noqa: E402
from ega_ray.export import build_classifier, write_student  # noqa: E402
from ega_ray.run_folder import record_written  # noqa: E402
from ega_ray.worker.common import load_state  # noqa: E402

if TYPE_CHECKING:
    import ray.train

    from ega_ray.driver.preflight import PreparedData

logger = logging.getLogger(__name__)


def write_config(cfg: Config, out: Path) -> None:
    write_atomic(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


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


SELECTION_METRIC = "validation_top1"  # the best epoch, Ray Train's best checkpoint (Tune's metric: tune.metric)


def write_distill_outputs(
    cfg: Config,
    data: PreparedData,
    result: ray.train.Result,
    out: Path,
    wall_s: float,
    deployable: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """metrics.csv, learning_curves.png, the exported students and summary.json (with ``extra``: what the
    teacher mode adds), from the checkpoints; the best student also as a ``.pt2`` program when
    ``deployable`` (a search's trials skip it: seconds each)."""
    # summary.json is written last: until then none describes an older epoch than the students beside it
    (out / "summary.json").unlink(missing_ok=True)
    last = load_state(result.checkpoint)
    scored = result.best_checkpoints
    best_ckpt = max(scored, key=lambda cm: cm[1][SELECTION_METRIC])[0] if scored else None
    best = load_state(best_ckpt) if best_ckpt is not None else last
    history = last["history"]
    write_rows(out / METRICS_CSV, history)
    plot_curves(
        history,
        out / "learning_curves.png",
        f"{cfg.run.name}: {cfg.distill.method} (β={cfg.distill.beta}) {cfg.teacher.name} → {cfg.student.name}",
    )
    export_student(cfg, last, out, "student_last", pt2=False)  # `ega-ray export` makes one when wanted
    export_student(cfg, best, out, "student_best", pt2=deployable)
    summary = {
        "name": cfg.run.name,
        "method": cfg.distill.method if cfg.distill.beta > 0 else "ce-only",
        "teacher": cfg.teacher.name,
        "teacher_mode": cfg.teacher.mode,
        "student": cfg.student.name,
        "epochs": history[-1]["epoch"],
        "num_workers": cfg.scaling.num_workers,
        "global_batch": cfg.optim.batch_size,
        "labeled_train_rows": int(data.keep.sum()),
        "train_rows": data.num_train,
        "validation_rows": data.num_validation,
        "validation_split": data.validation["split"],
        "test_rows": data.num_test,
        **selected_scores(history, last["best"]["epoch"]),
        "seed": cfg.run.seed,
        "wall_time_s": round(wall_s, 1),
        "output": str(out),
        "checkpoints": checkpoint_location(cfg, out),
    } | (extra or {})
    write_json(summary, out / "summary.json")
    return summary


def checkpoint_location(cfg: Config, out: Path) -> str:
    """Where Ray Train keeps the run's checkpoints: ``<run.storage>/<run folder name>``, or beside the run
    folder on the driver's host when ``run.storage`` is unset."""
    return uris.join(cfg.checkpoint_root, out.name)


def selected_scores(history: list[dict[str, Any]], selected_epoch: int) -> dict[str, Any]:
    """What a run reports, each key naming its split: the epoch the validation split selected (its best
    validation top-1), the validation score that selected it, and the test split's scores at that epoch and
    at the last one. The test split's own best epoch is never reported: choosing it would select on test.

    Args:
        history: the run's metrics, one dict per epoch (``epoch`` from 1).
        selected_epoch: the epoch with the best validation top-1 (the first of ties).

    Returns:
        The summary's score fields.
    """
    at = next(row for row in history if row["epoch"] == selected_epoch)
    last = history[-1]
    return {
        "selected_epoch": selected_epoch,
        "selected_by": SELECTION_METRIC,
        "validation_top1_at_selected": at["validation_top1"],
        "test_top1_at_selected": at["test_top1"],
        "test_top5_at_selected": at["test_top5"],
        "test_teacher_head_top1_at_selected": at["test_teacher_top1"],
        "validation_top1_last": last["validation_top1"],
        "test_top1_last": last["test_top1"],
        "test_top5_last": last["test_top5"],
        "test_teacher_head_top1_last": last["test_teacher_top1"],
    }
