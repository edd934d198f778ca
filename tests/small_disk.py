"""A real full disk for tests: a small tmpfs mounted in a private mount namespace (``unshare -m``, as root),
seen only by the process run on it and gone when that process ends. No loop files, nothing left mounted."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def on_a_small_disk(disk: Path, size_kib: int, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``argv`` (from the repository, this checkout first on PYTHONPATH) with a ``size_kib`` tmpfs mounted
    at ``disk`` (created); skip the test where a tmpfs cannot be mounted."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a real full disk needs root and unshare (a tmpfs in a private mount namespace)")
    disk.mkdir(parents=True, exist_ok=True)
    shell = f"mount -t tmpfs -o size={size_kib}k tmpfs {shlex.quote(str(disk))} || exit 97; exec {shlex.join(argv)}"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)  # fmt: skip
    if done.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return done


def python_on_a_small_disk(disk: Path, size_kib: int, code: str) -> subprocess.CompletedProcess:
    """Python ``code`` (``DISK``: the mount point, a str) run with a ``size_kib`` tmpfs at ``disk``."""
    return on_a_small_disk(disk, size_kib, [sys.executable, "-c", f"DISK = {str(disk)!r}\n{code}"])
