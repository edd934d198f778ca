"""Running a command as an unprivileged user: root reads and writes every folder, so a test of what
permissions refuse needs another user (``setpriv`` to uid 65534 when the tests run as root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def shared_folder() -> Iterator[Path]:
    """A temporary folder that the unprivileged user can reach and write (pytest's own is private)."""
    path = Path(tempfile.mkdtemp(prefix="ega-ray-test-", dir="/tmp"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        for p in path.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(path)


def as_nobody(*argv: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python argv`` as the unprivileged user, with its home, caches and matplotlib's config under ``cwd``."""
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    env = {
        **os.environ,
        "HOME": str(cwd),
        "PYTHONPATH": str(REPO),
        "EGA_RAY_CACHE": str(cwd / ".cache"),
        "MPLCONFIGDIR": str(cwd / ".mpl"),
    }
    return subprocess.run(
        [*prefix, sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
