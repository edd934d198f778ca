"""``ega-ray eval``: a saved student on a labeled Parquet split: top-1, top-5, per-class accuracy, a confusion
matrix and a kNN probe of its embeddings, written to ``eval.json`` and ``confusion.png``.

``builtin:digits`` is the digits' test split. eval.json names the split (its folder) and, from the
``config.yaml`` beside the student file, what it was to the run that trained the student (test, validation or
train). The student sees what it saw in evaluation during training: images decoded and resized to its
``image_size`` (PIL bicubic, ``decode_images``), scaled to [0, 1] and normalized with its saved mean and
std (``ViewMaker.student(train=False)``). The split is read in batches of ``--batch-size`` rows, so memory
holds one batch of images plus, per row, its top-5 classes and its embedding (``embed_dim`` floats, for the
kNN probe; the bank's too). The kNN probe is pretraining's: cosine distance, the ``k`` nearest labeled
rows of the bank vote weighted by 1/distance (scikit-learn's ``weights="distance"``); without
``--knn-train`` every row of the split is classified by the others (leave-one-out).

Every check (the student file, both splits' columns and labels, their classes against the student's:
``ega_ray.data.classes.match_classes``, the output folder) runs before the first image is decoded; each
failure is one line. The output folder is new, empty or an earlier ``eval``
output, rebuilt whole (``run_folder.rebuild``): an interrupted evaluation leaves the previous one as it was.
An output inside another command's folder (the default: beside the student, in its run folder) is written
only while that folder's lock is held, so never into a run that is still writing it, and eval.json's
``student_sha256`` is the file that was evaluated (a student that changes meanwhile is refused).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402

from ega_ray import uris  # noqa: E402
from ega_ray.config import is_uri  # noqa: E402
from ega_ray.data.augment import ViewMaker  # noqa: E402
from ega_ray.data.classes import match_classes  # noqa: E402
from ega_ray.data.parquet import check_labels, check_split, decode_images  # noqa: E402
from ega_ray.disk import write_atomic, write_with  # noqa: E402
from ega_ray.errors import DataError, UsageError  # noqa: E402
from ega_ray.export import load_student  # noqa: E402
from ega_ray.models.heads import StudentClassifier  # noqa: E402
from ega_ray.models.weights import sha256_of  # noqa: E402
from ega_ray.run_folder import check_target, locked, read_marker, rebuild  # noqa: E402

KIND = "eval"
TOP_K = 5
ANNOTATE_UP_TO = 20  # classes: counts written in the confusion matrix's cells
NAMES_UP_TO = 40  # classes: axis ticks carry class names (beyond: class numbers every tenth)


@dataclass
class Split:
    path: str  # resolved: an absolute folder or a URI
    flag: str
    rows: int
    labels: np.ndarray
    names: list[str] | None = None  # the class names (the student's, else the split's prepare.json's)
    class_check: str = ""  # how its classes were matched with the student's (ega_ray.data.classes)


@dataclass
class Pass:
    """What one pass over a split keeps per row: its label, its top-k classes and its embedding."""

    labels: np.ndarray
    topk: np.ndarray
    embeddings: np.ndarray


def resolve_split(value: str, flag: str, builtin_split_name: str) -> str:
    """``builtin:digits`` → its prepared ``builtin_split_name`` split; a local path made absolute (it must exist)."""
    if value.startswith("builtin:"):
        from ega_ray.data.digits import builtin_split

        try:
            return builtin_split(value, builtin_split_name)
        except ValueError as err:
            raise UsageError(f"{flag}: {err}") from None
    if is_uri(value):
        return value
    path = Path(value).expanduser().resolve()
    if not path.exists():
        raise DataError(f"{flag} {value}: no such folder (a Parquet split made by `ega-ray prepare`)")
    return str(path)


def check_eval_split(
    value: str,
    flag: str,
    num_classes: int,
    unlabeled_ok: bool,
    builtin_split_name: str,
    student_names: list[str] | None = None,
) -> Split:
    """The split's columns, labels and index, checked as training checks them; its classes the student's
    (``ega_ray.data.classes.match_classes``: the count and the names where recorded, every label in range)."""
    path = resolve_split(value, flag, builtin_split_name)
    try:
        rows = check_split(path, flag)
        labels, _ = check_labels(path, flag, rows, unlabeled_ok=unlabeled_ok)
    except ValueError as err:
        raise DataError(str(err)) from None
    names, class_check = match_classes(flag, path, labels, num_classes, student_names)
    if (labels >= 0).sum() == 0:
        raise DataError(f"{flag}: {path!r} has no labeled row (every label is -1)")
    return Split(path, flag, rows, labels, names, class_check)


def split_of_run(student: Path, split_path: str) -> str | None:
    """What ``split_path`` was to the run that trained ``student`` (read from the ``config.yaml`` beside the
    student file): ``test`` (reported on), ``validation`` (selected on) or ``train``; None when unknown.

    Args:
        student: the student file.
        split_path: the evaluated split's resolved path.

    Returns:
        The split's role in that run, or None.
    """
    try:
        data = yaml.safe_load((student.parent / "config.yaml").read_text())["data"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return next((role for role in ("test", "validation", "train") if data.get(role) == split_path), None)


def default_output(student: Path, data: str) -> Path:
    """``<student's folder>/eval-<student stem>-<split folder name>``, e.g. runs/x/eval-student_best-val."""
    split_name = uris.basename(data).removeprefix("builtin:") or "data"
    return student.parent / f"eval-{student.stem}-{split_name}"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here; use --device cpu")
    return torch.device(name)


@torch.inference_mode()
def run_pass(
    model: StudentClassifier, meta: dict[str, Any], split: Split, batch_size: int, device: torch.device
) -> Pass:
    """The student over ``split`` in batches: labels, top-k classes and embeddings per row (file order)."""
    views = ViewMaker(
        pad=0,
        flip=False,
        student_size=meta["image_size"],
        student_mean=meta["mean"],
        student_std=meta["std"],
        device=device,
    )
    k = min(TOP_K, meta["num_classes"])
    labels, topk, embeddings = [], [], []
    dataset = pads.dataset(split.path, format="parquet")
    for record in dataset.to_batches(columns=["image", "label", "index"], batch_size=batch_size):
        if record.num_rows == 0:
            continue
        batch = {"image": record.column("image").to_pylist(), "index": record.column("index").to_numpy()}
        images = decode_images(batch, meta["image_size"], split.flag)["image"]
        emb, logits = model(views.student(torch.from_numpy(images).to(device), train=False))
        labels.append(record.column("label").to_numpy())
        topk.append(logits.float().topk(k, dim=1).indices.cpu().numpy().astype(np.int32))
        embeddings.append(emb.float().cpu().numpy())
    return Pass(np.concatenate(labels).astype(np.int64), np.concatenate(topk), np.concatenate(embeddings))


def distance_vote(
    distances: np.ndarray, neighbours: np.ndarray, bank_labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """scikit-learn's ``weights="distance"`` vote: each neighbour counts 1/distance; a row with neighbours at
    distance 0 counts only those. Ties go to the lowest class."""
    with np.errstate(divide="ignore"):
        weights = 1.0 / distances
    exact = np.isinf(weights)
    rows = exact.any(axis=1)
    weights[rows] = exact[rows]
    scores = np.zeros((len(distances), num_classes))
    np.add.at(scores, (np.arange(len(distances))[:, None], bank_labels[neighbours]), weights)
    return scores.argmax(axis=1)


def knn_top1(
    query: np.ndarray, query_labels: np.ndarray, bank: np.ndarray | None, bank_labels: np.ndarray | None, k: int
) -> tuple[float, int]:
    """kNN top-1 (%) of ``query`` against the labeled rows of ``bank`` (cosine, distance-weighted), or, with
    ``bank=None``, leave-one-out within ``query``; returns it with the k used (at most the bank's size)."""
    num_classes = int(max(query_labels.max(), -1 if bank_labels is None else bank_labels.max())) + 1
    if bank is None:
        size = len(query) - 1
        k = min(k, size)
        index = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(query)
        distances, neighbours = index.kneighbors(None)  # no query: each row's neighbours exclude itself
        predicted = distance_vote(distances, neighbours, query_labels, num_classes)
    else:
        labeled = bank_labels >= 0
        k = min(k, int(labeled.sum()))
        index = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(bank[labeled])
        distances, neighbours = index.kneighbors(query)
        predicted = distance_vote(distances, neighbours, bank_labels[labeled], num_classes)
    return 100.0 * float((predicted == query_labels).mean()), k


def plot_confusion(confusion: np.ndarray, names: list[str] | None, path: Path, title: str) -> None:
    """Rows: true class, columns: predicted, coloured by the share of the true class's rows (square-root
    scale); counts in the cells up to 20 classes, class names on the axes up to 40."""
    c = len(confusion)
    per_row = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1) * 100.0
    side = min(max(5.0, 0.11 * c + 3.5), 16.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    # a square-root scale: with 100 classes, the 1-5% confusions that matter would be invisible on a linear one
    norm = PowerNorm(gamma=0.5, vmin=0, vmax=100)
    image = ax.imshow(per_row, cmap="Blues", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class's rows (square-root scale)")
    if c <= NAMES_UP_TO:
        ticks, labels = np.arange(c), names or [str(i) for i in range(c)]
    else:
        ticks = np.arange(0, c, 10)
        labels = [str(i) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90 if c <= NAMES_UP_TO and names else 0, fontsize=8 if c > 10 else 10)
    ax.set_yticks(ticks, labels, fontsize=8 if c > 10 else 10)
    if c <= ANNOTATE_UP_TO:
        for (i, j), n in np.ndenumerate(confusion):
            if n:
                ax.text(
                    j, i, str(n), ha="center", va="center", fontsize=8, color="white" if per_row[i, j] > 40 else "black"
                )
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def run_eval(
    student: str,
    data: str,
    knn_train: str | None = None,
    knn_k: int = 10,
    output: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate ``student`` on ``data`` (see the module's docstring); return eval.json's content."""
    t0 = time.time()
    for flag, value in (("--knn-k", knn_k), ("--batch-size", batch_size)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    student_path = Path(student).expanduser()
    try:  # hashed before it is loaded: the lock below proves the evaluated file is the one eval.json names
        loaded_sha256 = sha256_of(student_path)
    except OSError:
        loaded_sha256 = None  # load_student says why in one line
    model, meta = load_student(student_path)
    classes = meta["num_classes"]
    student_names = meta.get("class_names")
    split = check_eval_split(data, "--data", classes, False, "test", student_names)
    bank = None
    if knn_train is not None:
        bank = check_eval_split(knn_train, "--knn-train", classes, True, "train", student_names)
    elif split.rows < 2:
        raise DataError(f"--data: {split.path!r} has 1 row; the leave-one-out kNN probe needs 2 (or pass --knn-train)")
    out = Path(output).expanduser() if output else default_output(student_path, split.path)
    check_target(out, KIND)
    dev = pick_device(device)
    with holding_parent(out, "--output" if output else "--output (default: beside --student)"):
        student_sha256 = sha256_of(student_path)
        if student_sha256 != loaded_sha256:
            raise UsageError(f"--student {student_path}: changed while it was read; run the evaluation again")
        return _evaluate(model, meta, student_path, student_sha256, split, bank, knn_k, out, batch_size, dev, t0)


@contextmanager
def holding_parent(out: Path, flag: str) -> Iterator[None]:
    """Hold the lock of ``out``'s parent while the block runs when the parent is an ega-ray command's folder
    (a run folder: the default output is beside the student): refused at once while that command runs."""
    parent = out.parent
    if parent.is_dir() and read_marker(parent) is not None:
        with locked(parent, flag):
            yield
    else:
        yield


def _evaluate(
    model: StudentClassifier,
    meta: dict[str, Any],
    student_path: Path,
    student_sha256: str,
    split: Split,
    bank: Split | None,
    knn_k: int,
    out: Path,
    batch_size: int,
    dev: torch.device,
    t0: float,
) -> dict[str, Any]:
    classes = meta["num_classes"]
    model.to(dev)
    evaluated = run_pass(model, meta, split, batch_size, dev)
    banked = run_pass(model, meta, bank, batch_size, dev) if bank is not None else None
    y = evaluated.labels
    confusion = np.bincount(y * classes + evaluated.topk[:, 0], minlength=classes * classes).reshape(classes, classes)
    rows_per_class = confusion.sum(axis=1)
    names = split.names
    per_class = [
        {
            "class": i,
            **({"name": names[i]} if names else {}),
            "rows": int(rows_per_class[i]),
            "top1": round(100.0 * float(confusion[i, i]) / rows_per_class[i], 4) if rows_per_class[i] else None,
        }
        for i in range(classes)
    ]
    knn, k_used = knn_top1(
        evaluated.embeddings,
        y,
        None if banked is None else banked.embeddings,
        None if banked is None else banked.labels,
        knn_k,
    )
    result = {
        "student": str(student_path.resolve()),
        "student_sha256": student_sha256,
        "student_name": meta["student"],
        "epoch": meta["epoch"],
        "data": split.path,
        "split": uris.basename(split.path),  # the split's folder name, e.g. test
        "split_of_run": split_of_run(student_path, split.path),  # test | validation | train | None (unknown)
        "rows": int(len(y)),
        "num_classes": classes,
        "class_check": split.class_check,  # names | count | labels: how the split's classes matched the student's
        "top1": round(100.0 * float((evaluated.topk[:, 0] == y).mean()), 4),
        "top5": round(100.0 * float((evaluated.topk == y[:, None]).any(axis=1).mean()), 4),
        "top5_k": int(evaluated.topk.shape[1]),
        "per_class": per_class,
        "knn": {
            "top1": round(knn, 4),
            "k": k_used,
            "bank": bank.path if bank is not None else "leave-one-out",
            "bank_rows": int((banked.labels >= 0).sum()) if banked is not None else int(len(y)) - 1,
            "embedding": f"the student's {meta['embed_dim']}-d projection (the distillation's joint space)",
        },
        "confusion_matrix": confusion.tolist(),
        "device": str(dev),
        "wall_time_s": None,
    }
    with rebuild(out, KIND, record={"student": result["student"], "data": split.path}) as tmp:
        title = f"{meta['student']} (epoch {meta['epoch']}) on {uris.basename(split.path)}: top-1 {result['top1']:.2f}%"
        plot_confusion(confusion, names, tmp / "confusion.png", title)
        result["wall_time_s"] = round(time.time() - t0, 1)
        write_atomic(tmp / "eval.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    result["output"] = str(out.resolve())
    return result


CLASS_CHECKS = {
    "names": ", the student's by name",
    "count": ", as many as the student's (it records no names)",
    "labels": ", taken to be the student's (the split records no class names)",
}
SPLIT_ROLES = {
    "test": ", the training run's data.test (reported on)",
    "validation": ", the training run's data.validation (selected on: not a held-out score)",
    "train": ", the training run's data.train (trained on: not a held-out score)",
}


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The few lines `ega-ray eval` prints."""
    scored = [c for c in result["per_class"] if c["top1"] is not None]
    worst = sorted(scored, key=lambda c: c["top1"])[:3]
    knn = result["knn"]
    bank = "leave-one-out" if knn["bank"] == "leave-one-out" else f"bank {knn['bank_rows']} rows"
    return [
        f"student: {result['student_name']} (epoch {result['epoch']}), {result['student']}",
        f"data: {result['data']} ({result['rows']} rows, {result['num_classes']} classes"
        f"{CLASS_CHECKS.get(result.get('class_check'), '')}); split "
        f"{result['split']}{SPLIT_ROLES.get(result['split_of_run'], '')}",
        f"top-1: {result['top1']:.2f}  top-{result['top5_k']}: {result['top5']:.2f}",
        f"kNN top-1: {knn['top1']:.2f} (k={knn['k']}, {bank})",
        "lowest classes: " + ", ".join(f"{c.get('name', c['class'])} {c['top1']:.1f}" for c in worst),
        f"output: {result['output']} (eval.json, confusion.png)",
    ]
