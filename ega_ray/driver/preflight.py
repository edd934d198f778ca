"""What the driver checks before Ray starts: paths, the splits and their labels, the validation split carved
from the training split, the teacher, the teacher mode's own needs, and the output folder. Each failure is one
line naming the field, file or folder (ConfigError / OutputFolderError). No Ray here; torch only where a
teacher is built.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ega_ray.config import EPOCHS_FIELD, Config, is_uri
from ega_ray.config_distill import without_method_settings
from ega_ray.data.classes import fewer_than_two
from ega_ray.data.parquet import check_labels, check_split, stratified_label_mask
from ega_ray.data.split_files import identity_change, split_identity, unreadable_named
from ega_ray.data.splits import carve_validation, index_mask, validation_record
from ega_ray.errors import ConfigError, OutputFolderError
from ega_ray.models.weights import is_weights_file, sha256_of
from ega_ray.run_folder import claim, remove_own, settings_differences
from ega_ray.teacher_modes import TEACHER_MODES

if TYPE_CHECKING:
    from ega_ray.models.teachers.base import Teacher


def resolve(cfg: Config, check_teacher_file: bool = True) -> Config:
    """A copy whose local paths are absolute and exist (Ray Train workers run in another working directory):
    ``builtin:`` datasets are prepared, data splits and the teacher's weights file must exist.
    ``check_teacher_file=False`` skips the weights (pretraining does not use the teacher)."""
    from ega_ray.data.digits import builtin_split

    cfg = cfg.model_copy(deep=True)
    for field in ("train", "test", "validation"):
        value = getattr(cfg.data, field)
        if value is None:
            continue
        if value.startswith("builtin:"):
            if field == "validation":
                raise ConfigError(
                    f"data.validation: {value!r} has a train and a test split only; leave data.validation empty "
                    "to carve the validation split from data.train (data.validation_fraction)"
                )
            try:
                value = builtin_split(value, field)
            except ValueError as err:
                raise ConfigError(f"data.{field}: {err}") from None
        if not is_uri(value):
            path = Path(value).expanduser().resolve()
            if not path.exists():
                raise ConfigError(f"data.{field}: {value!r} does not exist (a Parquet folder or s3:// / gs:// URI)")
            setattr(cfg.data, field, str(path))
    w = cfg.teacher.weights
    if check_teacher_file and w is not None and is_weights_file(w):
        path = Path(w).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"teacher.weights: file {w!r} does not exist")
        cfg.teacher.weights = str(path)
    if cfg.teacher.cache is not None and not is_uri(cfg.teacher.cache):
        cfg.teacher.cache = str(Path(cfg.teacher.cache).expanduser().resolve())
    for field in ("train", "test"):
        if cfg.data.validation == getattr(cfg.data, field):
            raise ConfigError(
                f"data.validation: {cfg.data.validation!r} is also data.{field}; the split that selects must be "
                "apart from the rows trained on and from the split reported on"
            )
    cfg.run.output = str(cfg.output_dir.expanduser().resolve())
    if cfg.run.storage is not None and not is_uri(cfg.run.storage):
        cfg.run.storage = str(Path(cfg.run.storage).expanduser().resolve())
    return cfg


@dataclass
class PreparedData:
    num_classes: int
    keep: np.ndarray  # which training rows keep their label (by index); False for every carved validation row
    indices: np.ndarray  # the training split's index column (all rows, the carved ones included)
    num_train: int  # rows trained on (the training split less the carved validation rows)
    num_validation: int
    num_test: int
    carved: np.ndarray | None  # the validation rows carved from data.train (a mask by index), None: data.validation
    validation: dict[str, Any]  # what validation_rows.json records (``ega_ray.data.splits.validation_record``)

    @property
    def trained(self) -> np.ndarray | None:
        """A mask by index of the training split's rows that are trained on; None: all of them."""
        return None if self.carved is None else ~self.carved


def prepare_data(cfg: Config) -> PreparedData:
    """Check the splits and their labels on the driver; carve the validation split from the training split
    (unless ``data.validation`` names one) and choose the labeled subset of the rows left to train on."""
    with unreadable_named(data_splits(cfg)):  # a damaged page of a label or index column, named
        return _prepare_data(cfg)


def data_splits(cfg: Config) -> dict[str, str | None]:
    """The run's data splits by field (None: not given), for messages naming a damaged file."""
    return {f"data.{split}": getattr(cfg.data, split) for split in ("train", "test", "validation")}


def _prepare_data(cfg: Config) -> PreparedData:
    d = cfg.data
    try:
        n_train = check_split(d.train, "data.train")
        n_test = check_split(d.test, "data.test")
        labels, index = check_labels(d.train, "data.train", n_train, unlabeled_ok=True)
        test_labels, _ = check_labels(d.test, "data.test", n_test, unlabeled_ok=False)
        if d.validation is not None:
            n_val = check_split(d.validation, "data.validation")
            val_labels, val_index = check_labels(d.validation, "data.validation", n_val, unlabeled_ok=False)
            carved = None
        else:
            carved = carve_validation(labels, index, d.validation_fraction, d.validation_seed)
            val_labels, val_index = labels[np.isin(index, carved)], carved
            n_val = len(carved)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for field, y in (("train", labels), ("validation", val_labels), ("test", test_labels)):
        problem = fewer_than_two(y, f"data.{field}: {getattr(d, field) or d.train!r}")  # 1 class: plausible nonsense
        if problem:
            raise ConfigError(problem)
    seen = int(max(labels.max(), val_labels.max(), test_labels.max())) + 1
    if seen < 1:
        raise ConfigError(f"data.train: {d.train!r} has no labeled row (every label is -1)")
    num_classes = d.num_classes or seen
    if seen > num_classes:
        splits = (("train", labels), ("validation", val_labels), ("test", test_labels))
        field = next(f for f, y in splits if y.max() >= num_classes)
        raise ConfigError(
            f"data.num_classes: {num_classes}, but data.{field} {getattr(d, field) or d.train!r} has label "
            f"{seen - 1} (labels are 0..C-1, -1 unlabeled)"
        )
    size = int(index.max()) + 1
    mask = None if carved is None else index_mask(carved, size)
    rest = np.ones(len(index), dtype=bool) if mask is None else ~mask[index]
    keep = np.zeros(size, dtype=bool)
    budget = stratified_label_mask(labels[rest], index[rest], d.label_fraction, cfg.run.seed)
    keep[: len(budget)] = budget
    record = validation_record(
        carved,
        labels if carved is not None else val_labels,
        index if carved is not None else val_index,
        d.train if carved is not None else d.validation,
        d.validation_fraction,
        d.validation_seed,
    )
    return PreparedData(num_classes, keep, index, int(rest.sum()), n_val, n_test, mask, record)


def check_student(name: str, field: str = "student.name") -> None:
    """A family's member exists (``torchvision:NAME``); registered names are checked by the config."""
    family, _, model = name.partition(":")
    if family == "torchvision":
        import torchvision

        if model not in torchvision.models.list_models():
            raise ConfigError(f"{field}: unknown torchvision model {model!r}; see torchvision.models.list_models()")


def check_teacher(cfg: Config) -> Teacher:
    """Build the teacher once on the driver, so that bad weights fail before workers start."""
    from ega_ray.models import build_teacher

    try:
        return build_teacher(cfg.teacher.name, cfg.teacher.weights, cfg.teacher.sha256)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        raise ConfigError(
            f"teacher: {cfg.teacher.name} with weights {cfg.teacher.weights!r}: {str(err).splitlines()[0]}"
        ) from None


def check_batch_rows(num_train: int, batch_size: int, num_workers: int, field: str) -> None:
    """Every worker gets at least one full batch per epoch: Ray Train splits the training rows equally over
    ``num_workers`` workers (``floor(rows / workers)`` each, the rest dropped), and each worker trains on
    batches of ``batch_size / num_workers`` rows, dropping a partial last batch. A ConfigError naming
    ``field``, the rows per worker and what is allowed otherwise.

    Args:
        num_train: the rows trained on (the training split less its carved validation rows).
        batch_size: the global batch (a multiple of ``num_workers``, checked by the config).
        num_workers: scaling.num_workers.
        field: the batch's config field (``optim.batch_size``, ``pretrain.batch_size``).
    """
    per_worker_rows = num_train // num_workers
    per_worker_batch = max(batch_size // num_workers, 1)
    if per_worker_rows < per_worker_batch:
        raise ConfigError(
            f"{field}: {batch_size} ({per_worker_batch} rows per worker) is larger than a worker's share of "
            f"data.train: {num_train} rows trained on (less the validation split) over scaling.num_workers "
            f"{num_workers} is {per_worker_rows} rows per worker; allowed: {field} at most "
            f"{per_worker_rows * num_workers}, or fewer workers"
        )


def check_distill(cfg: Config) -> tuple[PreparedData, int]:
    """Everything a distillation run checks before Ray starts; the data and the teacher's embedding width."""
    data = prepare_data(cfg)
    check_batch_rows(data.num_train, cfg.optim.batch_size, cfg.scaling.num_workers, "optim.batch_size")
    check_student(cfg.student.name)
    spec = check_teacher(cfg).spec
    TEACHER_MODES[cfg.teacher.mode].preflight(cfg, spec)
    return data, spec.embed_dim


def input_identities(cfg: Config, command: str) -> dict[str, dict[str, Any]]:
    """What the run reads, by field, with each input's identity: every data split's
    (``ega_ray.data.split_files.split_identity``), for a distillation the teacher's weights file's SHA-256
    (whatever the teacher family checks: not all of them take ``teacher.sha256``) and a teacher cache's
    manifest's SHA-256 (the manifest holds its files' digests, checked against them before Ray starts).

    Args:
        cfg: a resolved config (``resolve``: absolute local paths).
        command: ``distill`` or ``pretrain-teacher``.

    Returns:
        ``{field: {"path": ..., ...}}``, JSON-serialisable, as the run folder's marker records it.
    """
    inputs: dict[str, dict[str, Any]] = {}
    try:
        for split in ("train", "test", "validation"):
            path = getattr(cfg.data, split)
            if path is not None:
                inputs[f"data.{split}"] = split_identity(path, f"data.{split}")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if command != "distill":
        return inputs
    weights = cfg.teacher.weights
    if weights is not None and is_weights_file(weights):
        inputs["teacher.weights"] = {"path": weights, "sha256": sha256_of(weights)}
    return inputs | TEACHER_MODES[cfg.teacher.mode].inputs(cfg)


def input_differences(before: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> list[str]:
    """``field path: what changed`` for every input whose identity differs between two runs' records
    (``input_identities``)."""
    diffs = []
    for field in sorted(set(before) | set(now)):
        old, new = before.get(field), now.get(field)
        if old is None or new is None:
            diffs.append(f"{field}: {(old or {}).get('path', '(none)')} → {(new or {}).get('path', '(none)')}")
        elif field.startswith("data."):
            change = identity_change(old, new)
            if change:
                diffs.append(f"{field} {new['path']}: {change}")
        else:  # a file's digest: its first 12 hex digits are enough to tell the two apart
            diffs += [
                f"{field} {new['path']}: {key} {str(old.get(key))[:12]}… → {str(new.get(key))[:12]}…"
                for key in sorted(set(old) | set(new))
                if old.get(key) != new.get(key)
            ]
    return diffs


@contextmanager
def run_folder(cfg: Config, command: str) -> Iterator[Path]:
    """The run's output folder, claimed for ``command`` (see ``ega_ray.run_folder``) and locked while the run
    lasts. A folder that already holds a run resumes it only if every setting that defines the results is the
    same, except that the number of epochs may be raised, and its inputs are the same data and teacher
    (``input_identities``); otherwise it is refused, naming what differs, before anything is written."""
    out = cfg.output_dir
    settings = json.loads(json.dumps(cfg.result_settings(command)))  # as the marker stores them
    inputs = json.loads(json.dumps(input_identities(cfg, command)))
    growing = EPOCHS_FIELD[command]

    def same_run(marker: dict[str, Any]) -> None:
        before, now = marker.get("settings", {}), settings
        if before.get("distill.method") != now.get("distill.method"):  # named once, not by each setting it owns
            before, now = without_method_settings(before), without_method_settings(now)
        diffs = settings_differences(before, now, growing)
        if diffs:
            raise OutputFolderError(
                f"--output {out}: holds a run with other settings ({'; '.join(diffs)}); a rerun resumes it only "
                f"with the same settings ({growing} may be raised): choose another folder, or delete it to start over"
            )
        # a folder written before its inputs were recorded has nothing to compare: it is taken as it is
        recorded = marker.get("inputs")
        changed = input_differences(recorded, inputs) if isinstance(recorded, dict) else []
        if changed:
            raise OutputFolderError(
                f"--output {out}: holds a run trained on other inputs under the same paths ({'; '.join(changed)}); "
                "a rerun resumes it only on the same data and teacher: choose another folder, or delete it to "
                "start over"
            )

    with claim(out, command, record={"settings": settings, "inputs": inputs}, check=same_run):
        yield out


def clear_run(path: Path, command: str = "distill") -> None:
    """Remove a run folder that ``command`` wrote (or an empty one), so that the next run with its name starts
    fresh instead of resuming; anything else is refused (OutputFolderError)."""
    remove_own(path, command)
