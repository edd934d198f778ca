"""requirements.lock: the exact versions every machine of a run installs (``make``, every node of
cluster.yaml). Under ``ray job submit``, ``jobs/runtime_env.yaml`` names the lock, and the job's driver
checks that its node runs those versions before anything starts. No torch, no Ray."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

from ega_ray.errors import ConfigError

LOCK_ENV = "EGA_RAY_REQUIREMENTS_LOCK"
TOOLS = {"pip", "setuptools", "wheel"}  # how packages are installed, not what runs
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    """PEP 503's normalized form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(path: str | Path) -> dict[str, str]:
    """Package → version for every ``name==version`` line of a pip lock file."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def differences(path: str | Path) -> list[str]:
    """``name: lock X, installed Y`` (or ``not installed``) for each pinned package this Python lacks."""
    out = []
    for name, version in sorted(pinned(path).items()):
        if name in TOOLS:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(f"{name}: lock {version}, not installed")
            continue
        if installed != version:
            out.append(f"{name}: lock {version}, installed {installed}")
    return out


def check_environment() -> None:
    """When ``$EGA_RAY_REQUIREMENTS_LOCK`` names a lock (``ray job submit`` with jobs/runtime_env.yaml), a
    ConfigError unless this machine runs exactly its versions."""
    lock = os.environ.get(LOCK_ENV)
    if not lock:
        return
    if not Path(lock).is_file():
        raise ConfigError(f"{LOCK_ENV}: {lock!r} does not exist (run from the checkout, or unset it)")
    diffs = differences(lock)
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise ConfigError(
            f"{LOCK_ENV}: this node's packages differ from {lock} ({shown}); install it with "
            f"`pip install -r {lock}` (cluster.yaml's setup_commands do) or unset {LOCK_ENV}"
        )
