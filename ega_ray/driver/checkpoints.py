"""The run's Ray Train checkpoints, checked on the driver before a run resumes from them.

Ray Train V2 records a run's checkpoints in ``<storage>/<name>/checkpoint_manager_snapshot.json`` (the
registered ``checkpoint_*`` folders, which is the latest) and a new ``fit()`` resumes from the latest one;
a snapshot or a ``state.pt`` that does not load would fail there, in Ray's traceback, without the file's
name. Before a fit (``launch.fit``), for a run whose storage is a local folder:

- a snapshot that does not parse is refused in one line naming it (nothing to resume from is known);
- a registered checkpoint whose ``state.pt`` does not load (``weights_only``, as the workers load it) or whose
  folder is gone is dropped from the snapshot, with a warning naming it, and the run resumes from the newest
  one that loads; when none loads, the run is refused in one line naming the latest one's file;
- ``checkpoint_*`` folders that Ray never registered (an upload cut short: a full disk, a killed run) are
  removed, before the fit and after it, however it ended.

The snapshot's fields are Ray's (``_CheckpointManagerState`` in Ray 2.60); only the checkpoint lists are
touched. Storage in a bucket (``run.storage`` s3:// or gs://) is left to Ray.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from ega_ray.disk import write_atomic
from ega_ray.errors import UsageError
from ega_ray.worker.common import STATE_FILE

SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
CHECKPOINT_PREFIX = "checkpoint_"
logger = logging.getLogger(__name__)


class CheckpointError(UsageError):
    """A run's checkpoint record that cannot be resumed from: the message names the file."""

    label = "checkpoint"


def run_dir(storage: str, name: str) -> Path | None:
    """The run's folder of checkpoints when its storage is local (None for a bucket)."""
    if "://" in storage and not storage.startswith("file://"):
        return None
    return Path(storage.removeprefix("file://")) / name


def state_problem(path: Path) -> str | None:
    """Why ``path`` (a checkpoint's state.pt) does not load as the workers load it; None when it does."""
    if not path.is_file():
        return "missing"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        return f"does not load: {first}"
    if not isinstance(state, dict) or "epoch" not in state:
        return "not a checkpoint of this ega-ray (no epoch)"
    return None


def _registered(snapshot: dict[str, Any]) -> set[str]:
    entries = [*snapshot.get("checkpoint_results", []), *snapshot.get("pending_training_results", [])]
    if snapshot.get("latest_checkpoint_result"):
        entries.append(snapshot["latest_checkpoint_result"])
    return {e["checkpoint_dir_name"] for e in entries}


def read_snapshot(folder: Path) -> dict[str, Any] | None:
    """Ray Train's snapshot of run folder ``folder``; None when there is none; a one-line CheckpointError
    naming the file when it does not parse."""
    path = folder / SNAPSHOT
    if not path.exists():
        return None
    try:
        snapshot = json.loads(path.read_text())
        names = _registered(snapshot)
        results, indices = snapshot.get("checkpoint_results"), snapshot.get("checkpoint_report_indices", [])
        ok = (
            isinstance(results, list)
            and all(isinstance(n, str) for n in names)
            and (not indices or len(indices) == len(results))  # one report index per registered checkpoint
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        ok, detail = False, f" ({' '.join(str(err).split())[:100]})"
    else:
        detail = ""
    if not ok:
        raise CheckpointError(
            f"{path}: Ray Train's record of the run's checkpoints cannot be read{detail}, so the run cannot resume; "
            f"delete {folder} to start over (or choose another --output)"
        )
    return snapshot


def remove_unregistered(folder: Path | None) -> list[Path]:
    """Remove the ``checkpoint_*`` folders of ``folder`` that its snapshot does not register (an upload cut
    short); return them. Called only while the run folder is locked by this command."""
    if folder is None or not folder.is_dir():
        return []
    try:
        snapshot = read_snapshot(folder)
    except CheckpointError:
        return []  # the fit's check says why; nothing is removed on a guess
    registered = _registered(snapshot) if snapshot else set()
    removed = []
    for path in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*")):
        if path.is_dir() and not path.is_symlink() and path.name not in registered:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logger.warning("removed %s: a checkpoint folder Ray Train never registered (a write cut short)", path)
    return removed


def check_resume(storage: str, name: str) -> str | None:
    """Make run ``name``'s checkpoints under ``storage`` safe to resume from (see the module's docstring).

    Args:
        storage: Ray Train's storage_path.
        name: the run's name under it.

    Returns:
        The warning given when a checkpoint was dropped (None otherwise).

    Raises:
        CheckpointError: the snapshot does not parse, or no registered checkpoint loads.
    """
    folder = run_dir(storage, name)
    if folder is None or not folder.is_dir():
        return None
    snapshot = read_snapshot(folder)
    remove_unregistered(folder)
    if snapshot is None or not snapshot.get("latest_checkpoint_result"):
        return None
    results = list(snapshot["checkpoint_results"])
    indices = list(snapshot.get("checkpoint_report_indices", []))
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    bad = {}
    for entry in results + [snapshot["latest_checkpoint_result"]]:
        problem = state_problem(folder / entry["checkpoint_dir_name"] / STATE_FILE)
        if problem:
            bad[entry["checkpoint_dir_name"]] = problem
    if not bad:
        return None
    keep = [(i, e) for i, e in zip(indices, results, strict=True) if e["checkpoint_dir_name"] not in bad]
    if latest in bad and not keep:
        raise CheckpointError(
            f"{folder / latest / STATE_FILE}: the run's latest checkpoint {bad[latest]}, and no earlier one loads; "
            f"delete {folder} to start over (or choose another --output)"
        )
    newest = max(keep, key=lambda pair: pair[0])[1] if latest in bad else snapshot["latest_checkpoint_result"]
    fixed = snapshot | {
        "checkpoint_results": [e for _, e in keep],
        "checkpoint_report_indices": [i for i, _ in keep],
        "latest_checkpoint_result": newest,
    }
    for field in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                  "failed_validation_checkpoint_dir_names"):  # fmt: skip
        if isinstance(fixed.get(field), list):
            fixed[field] = [n for n in fixed[field] if n not in bad]
    write_atomic(folder / SNAPSHOT, json.dumps(fixed))
    for dropped in bad:
        shutil.rmtree(folder / dropped, ignore_errors=True)
    names = "; ".join(f"{folder / n / STATE_FILE} {why}" for n, why in bad.items())
    warning = (
        f"skipped checkpoint(s) that cannot be resumed from ({names}); "
        f"resuming from {newest['checkpoint_dir_name']}"
    )
    logger.warning(warning)
    return warning
