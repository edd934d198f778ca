"""Writing the files a command leaves for others to read: whole or not at all, and a full disk or an
over-long name said in one line.

Every such file (metrics.csv, summary.json, eval.json, config.yaml, markers, students, reports) is written
through :func:`atomic_path` or :func:`write_atomic`: into a temporary sibling (``.<name>.tmp-<random>``),
flushed to the disk, then renamed over the target, so a reader sees the old file or the new one, never half
of one, whatever kills the writer. A full disk (``ENOSPC``, and torch's ``RuntimeError`` that hides it:
"unexpected pos" from its zip writer) becomes :class:`DiskFullError`: ``no space left on <folder>: N MB
needed, M free``. ``tests/test_writes.py`` checks that no other module writes such a file in place.

Imports nothing of the package but its errors (no torch, no Ray).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ega_ray.errors import UsageError, iter_causes

MB = 1 << 20
# torch's zip writer (PyTorchStreamWriter) reports a failed write as a RuntimeError with these words
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "no space left", "failed writing")


class DiskFullError(UsageError):
    """The disk holding an output has no room for it: the message names the folder, what was needed and
    what is free."""

    label = "disk full"


def free_bytes(path: str | Path) -> int:
    """Free bytes for an unprivileged writer on the file system holding ``path`` (its nearest existing
    ancestor when ``path`` does not exist yet)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _mb(n: int) -> str:
    return f"{n / MB:,.1f}" if n < 10 * MB else f"{n / MB:,.0f}"


def no_space(folder: str | Path, needed: int | None = None) -> DiskFullError:
    """The one-line error for a full disk under ``folder`` (``needed``: bytes the write needed, if known)."""
    free = free_bytes(folder)
    need = f"{_mb(needed)} MB needed, " if needed else ""
    return DiskFullError(f"no space left on {Path(folder).absolute()}: {need}{_mb(free)} MB free")


def is_no_space(err: BaseException) -> bool:
    """Whether ``err`` is a write that failed for lack of space: ``ENOSPC``/``EDQUOT``, or torch's zip
    writer's RuntimeError (which drops the errno)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, OSError) and "no space left on device" in str(err).lower():
        return True  # pyarrow's file system errors carry the text, not the errno
    if isinstance(err, RuntimeError):
        text = str(err).lower()
        return any(words in text for words in _TORCH_WRITE_FAILED)
    return False


def disk_full(err: BaseException, fallback: str | Path | None = None) -> DiskFullError | None:
    """The DiskFullError for a full disk anywhere behind ``err`` (:func:`ega_ray.errors.iter_causes`).

    Args:
        err: the error as it reached the driver.
        fallback: the folder to name when the failed write does not name its file.

    Returns:
        The one-line error, naming the failed file's folder when the error names it (else ``fallback``), or
        None when no full disk is behind ``err``.
    """
    for e in iter_causes(err):
        if isinstance(e, DiskFullError):
            return e
        if is_no_space(e):
            name = getattr(e, "filename", None)
            if name:
                return no_space(Path(str(name)).parent)
            if fallback is not None:
                return no_space(fallback)
            return DiskFullError(f"no space left on the device ({' '.join(str(e).split())[:150]})")
    return None


def need_space(folder: str | Path, needed: int) -> None:
    """Raise DiskFullError before writing ``needed`` bytes under ``folder`` when the disk has less free
    (checked first, since some writers abort the process on a full disk instead of raising)."""
    if free_bytes(folder) < needed:
        raise no_space(folder, needed)


@contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix) to write; when the block ends without error it is
    renamed to ``path``; otherwise removed and ``path`` left as it was. ``needed``: bytes the file will take
    (checked before the block when given). A full disk is a DiskFullError naming the folder."""
    path = Path(path)
    if needed is not None:
        need_space(path.parent, needed)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        _sync(tmp)
        os.replace(tmp, path)
    except Exception as err:
        if is_no_space(err):
            tmp.unlink(missing_ok=True)  # its space is the space the message reports as free
            raise no_space(path.parent, needed) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    """Flush ``path``'s content to the disk before it is renamed into place (a rename can reach the disk
    before the data, and a crash would leave an empty file under the final name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (see :func:`atomic_path`); return ``path``."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(path, len(raw)) as tmp:
        tmp.write_bytes(raw)
    return Path(path)


def write_with(path: str | Path, write: Callable[[Path], object], needed: int | None = None) -> Path:
    """``write(tmp)`` (a library's own writer: torch.save, savefig, ...) into a temporary sibling renamed to
    ``path`` (see :func:`atomic_path`); return ``path``."""
    with atomic_path(path, needed) as tmp:
        write(tmp)
    return Path(path)


def name_too_long(err: BaseException) -> bool:
    """Whether ``err`` is the file system refusing a name (or a path) as too long."""
    return isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG


def check_name_length(path: str | Path, flag: str, error: type[UsageError] = UsageError) -> None:
    """An ``error`` naming ``flag`` when the file system refuses ``path`` as too long (a name over 255
    bytes on most file systems); nothing otherwise."""
    try:
        os.lstat(path)
    except OSError as err:
        if name_too_long(err):
            longest = max(len(part.encode()) for part in Path(path).parts)
            shown = str(path) if len(str(path)) <= 80 else f"{str(path)[:60]}…{str(path)[-15:]}"
            raise error(
                f"{flag} {shown}: a name too long for the file system ({longest} bytes in one name, "
                f"{len(str(path).encode())} in the path); choose a shorter one"
            ) from None
