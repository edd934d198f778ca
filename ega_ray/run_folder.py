"""Output folders: every ega-ray command writes only into a folder that is new, empty, or marked as its own.

A folder a command writes gets a marker file (``.ega-ray.json``: which command wrote it and, for a
training run, the settings that define its results). A command refuses, with one line naming the folder
and what is in it, a folder that holds files it did not write, or an output of another command. While it
runs it holds an exclusive lock on the folder (``flock`` on the folder itself; released by the kernel when
the process ends, however it ends), so a second command on the same folder is refused at once instead of
both writing it. Folders that a command rebuilds whole (a teacher cache, a prepared dataset) are built in a
temporary sibling and swapped in by renames, so a failure leaves the old folder as it was; the sibling is
locked (``flock``) while it is filled, so the next run of the command removes one that a killed process left
and never one that a live process fills. The marker also lists the files a command wrote beside a user's
(``written``: name → SHA-256), so that ``ega-ray export`` replaces only files it can prove are ega-ray's.

Imports nothing of the package but its errors and ``disk`` (no torch, no Ray).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ega_ray.disk import check_name_length, write_atomic
from ega_ray.errors import OutputFolderError

MARKER = ".ega-ray.json"
FORMAT = "ega-ray-output/1"
_COMMANDS = {"embedded": "`ega-ray distill` with no --config (the embedded default)"}


def command_name(kind: str) -> str:
    """How messages name the command that writes ``kind`` folders."""
    return _COMMANDS.get(kind, f"`ega-ray {kind}`")


def contents(path: Path, first: int = 4) -> str:
    """``a.txt, photos/ and 3 more``: what a folder holds, for error messages."""
    names = sorted(f"{p.name}/" if p.is_dir() else p.name for p in path.iterdir() if p.name != MARKER)
    more = f" and {len(names) - first} more" if len(names) > first else ""
    return ", ".join(names[:first]) + more


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of folder ``path``; None when it has none."""
    file = path / MARKER
    if not file.is_file():
        return None
    try:
        marker = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise OutputFolderError(
            f"{path}: its {MARKER} cannot be read ({err}); remove the folder or choose another"
        ) from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("kind"), str):
        raise OutputFolderError(f"{path}: {MARKER} is not an ega-ray marker; remove the folder or choose another")
    if not isinstance(marker.get("settings", {}), dict):  # what a rerun compares its settings with, key by key
        raise OutputFolderError(
            f"{path}: {path / MARKER} is damaged (its settings are a {type(marker['settings']).__name__}, not a "
            "mapping); remove the folder or choose another"
        )
    return marker


def write_marker(path: Path, marker: dict[str, Any]) -> None:
    write_atomic(path / MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_written(folder: Path, files: list[Path]) -> None:
    """Add ``files`` (in ``folder``, just written by the caller, who holds the folder's lock) to its marker's
    ``written`` list: the proof ``written_here`` asks for before a file is replaced. No-op without a marker
    (a user's own folder gets no ega-ray file it did not ask for)."""
    marker = read_marker(folder)
    if marker is None:
        return
    written = dict(marker.get("written") or {})
    written |= {f.name: file_sha256(f) for f in files}
    write_marker(folder, marker | {"written": written})


def written_here(path: Path) -> bool:
    """Whether file ``path`` is one an ega-ray command wrote and nobody changed since: its folder's marker
    lists it with this content's SHA-256."""
    marker = read_marker(path.parent)
    recorded = ((marker or {}).get("written") or {}).get(path.name)
    return recorded is not None and path.is_file() and file_sha256(path) == recorded


def new_marker(kind: str, **record: Any) -> dict[str, Any]:
    return {"format": FORMAT, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}


def check_target(path: Path, kind: str, flag: str = "--output") -> dict[str, Any] | None:
    """Raise OutputFolderError unless ``path`` is absent, an empty folder, or a folder marked by a ``kind``
    command; return its marker (None when there is none yet). Writes nothing."""
    check_name_length(path, flag, OutputFolderError)
    if path.is_symlink() and not path.exists():
        raise OutputFolderError(f"{flag} {path}: a broken symbolic link; choose a folder")
    if not path.exists():
        return None
    if not path.is_dir():
        raise OutputFolderError(f"{flag} {path}: is a file, not a folder; choose a new or empty folder")
    try:
        marker = read_marker(path)
        listing = contents(path)
    except PermissionError as err:
        raise OutputFolderError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    if marker is None:
        if listing:
            raise OutputFolderError(
                f"{flag} {path}: holds files ega-ray did not write ({listing}); choose a new or empty folder"
            )
        return None
    if marker["kind"] != kind:
        raise OutputFolderError(
            f"{flag} {path}: holds the output of {command_name(marker['kind'])}, not of {command_name(kind)}; "
            "choose another folder"
        )
    return marker


def _make_dir(path: Path, flag: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"{flag} {path}: cannot be created ({err.strerror or err})") from None
    probe = path / f".ega-ray-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise OutputFolderError(f"{flag} {path}: is not writable ({err.strerror or err})") from None


@contextmanager
def locked(path: Path, flag: str = "--output") -> Iterator[None]:
    """Hold the exclusive lock of folder ``path`` (``flock`` on the folder: no lock file is left behind);
    OutputFolderError at once if another command holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (read_marker(path) or {}).get("holder") or "another process"
            raise OutputFolderError(
                f"{flag} {path}: in use by another ega-ray command ({holder}); wait for it or choose another folder"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def claim(
    path: str | Path,
    kind: str,
    *,
    flag: str = "--output",
    record: dict[str, Any] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Own folder ``path`` for a ``kind`` command while the block runs: created (or an empty folder taken)
    and marked, or an earlier ``kind`` output taken back after ``check(its marker)`` accepts it (``check``
    raises OutputFolderError to refuse, e.g. a run with other settings). The marker then holds ``record``.
    Everything is checked before anything is written; the folder stays locked until the block ends."""
    path = Path(path)
    check_target(path, kind, flag)  # someone else's folder is refused before anything is created
    _make_dir(path, flag)
    with locked(path, flag):  # a folder in use is refused as such, whatever it holds
        marker = check_target(path, kind, flag)
        if marker is not None and check is not None:
            check(marker)
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        marker = (marker or new_marker(kind)) | (record or {}) | {"holder": holder}
        write_marker(path, marker)
        yield marker


def remove_own(path: Path, kind: str, flag: str = "--output") -> None:
    """Delete folder ``path`` if a ``kind`` command wrote it (or it is empty); refuse anything else."""
    if check_target(path, kind, flag) is None and not path.exists():
        return
    with locked(path, flag):
        pass  # refuses a folder that a running command holds
    shutil.rmtree(path)


def replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder ``new`` to ``dest``, replacing an older ``dest``. The old folder is moved
    aside first and put back if the final rename fails, so ``dest`` is never left half-written."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        dest.rename(old)
    try:
        new.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


STALE_AFTER_S = 10.0  # a temporary folder this young may have been created and not locked yet


def _restore_or_drop_old(dest: Path, older_than_s: float) -> list[Path]:
    """The ``.<name>.old-*`` siblings that a process killed inside ``replace_dir`` left: when ``dest`` is
    missing (killed between its two renames) the newest is renamed back to ``dest``, which is then the folder
    as it was before; the others (killed after the new ``dest`` was in place) are removed. Only folders
    older than a few seconds: a live ``replace_dir`` removes its own."""
    # a rename keeps a folder's mtime and sets its ctime: ctime is when it was moved aside
    olds = [
        p for p in dest.parent.glob(f".{dest.name}.old-*")
        if p.is_dir() and not p.is_symlink() and time.time() - p.lstat().st_ctime >= older_than_s
    ] if dest.parent.is_dir() else []  # fmt: skip
    olds.sort(key=lambda p: p.lstat().st_ctime)
    if olds and not dest.exists():
        olds.pop().rename(dest)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    return olds


def remove_stale_temporaries(dest: Path, older_than_s: float | None = None) -> list[Path]:
    """Remove the temporary siblings ``.<name>.tmp-*`` of ``dest`` that a killed process left: only those
    whose ``flock`` can be taken (a live ``replacing`` holds its own) and that are older than a few seconds
    (a folder is created an instant before its lock is taken); put back or remove the ``.<name>.old-*`` that
    a kill inside ``replace_dir`` left (``_restore_or_drop_old``).

    Args:
        dest: the folder whose siblings are looked at.
        older_than_s: the age below which a sibling may still be a live process's (default
            :data:`STALE_AFTER_S`).

    Returns:
        What was removed.
    """
    older_than_s = STALE_AFTER_S if older_than_s is None else older_than_s
    removed = _restore_or_drop_old(dest, older_than_s)
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*") if dest.parent.is_dir() else ():
        try:
            if not tmp.is_dir() or tmp.is_symlink() or time.time() - tmp.lstat().st_mtime < older_than_s:
                continue
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live process is filling it
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        finally:
            os.close(fd)
    return removed


@contextmanager
def replacing(dest: str | Path) -> Iterator[Path]:
    """Write a new ``dest`` whole, with no checks and no marker: yields an empty temporary sibling folder
    ``.<name>.tmp-<random>`` (its parents created) to fill; when the block ends without error it replaces
    ``dest`` (``replace_dir``); otherwise it is removed and ``dest`` stays as it was. The sibling is locked
    while it is filled; the ones a killed process left are removed first (``remove_stale_temporaries``).
    The one way a folder is rewritten: ``rebuild`` adds the checks, the lock and the marker of a command's
    output folder."""
    dest = Path(dest)
    remove_stale_temporaries(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # tells remove_stale_temporaries it is alive
        yield tmp
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


@contextmanager
def rebuild(
    dest: str | Path, kind: str, *, flag: str = "--output", record: dict[str, Any] | None = None
) -> Iterator[Path]:
    """Build a new ``dest`` whole: yields an empty, marked temporary sibling folder to fill; when the block
    ends without error it replaces ``dest`` (which must be absent, empty, or an earlier ``kind`` output) by
    renames; otherwise it is removed and ``dest`` stays as it was. ``dest`` is locked meanwhile."""
    dest = Path(dest)
    remove_stale_temporaries(dest)  # before dest is made: a folder a killed swap moved aside is put back first
    check_target(dest, kind, flag)
    created = not dest.exists()
    _make_dir(dest, flag)  # an (empty) dest carries the lock while the new content is built
    try:
        with locked(dest, flag):
            earlier = check_target(dest, kind, flag)
            with replacing(dest) as tmp:
                marker = new_marker(kind, **(record or {}))
                if earlier:  # the folder's creation time stays: a rerun with the same inputs is byte-identical
                    marker["created"] = earlier.get("created", marker["created"])
                write_marker(tmp, marker)
                yield tmp
    except BaseException:
        if created and dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        raise


def settings_differences(before: dict[str, Any], now: dict[str, Any], growing: str | None = None) -> list[str]:
    """``field: old → new`` for every setting that differs between two flat records; ``growing`` (e.g.
    ``optim.epochs``) may be raised, not lowered."""
    missing = object()
    diffs = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key, missing), now.get(key, missing)
        if old == new or (key == growing and isinstance(old, int) and isinstance(new, int) and new > old):
            continue
        shown = [("(unset)" if v is missing else json.dumps(v))[:60] for v in (old, new)]
        lowered = " (epochs may be raised, not lowered)" if key == growing else ""
        diffs.append(f"{key}: {shown[0]} → {shown[1]}{lowered}")
    return diffs
