"""Weights files by path: which ``weights`` values name a file, and its SHA-256. No torch (config uses it)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def is_weights_file(weights: str) -> bool:
    """Weights values with a path separator or a dot name files; others are hub tags (``openai``, ``DEFAULT``)."""
    return "/" in weights or "\\" in weights or "." in weights


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
