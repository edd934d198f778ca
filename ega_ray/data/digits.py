"""scikit-learn's digits (1,797 real 8×8 handwritten digits, bundled, no network) as 32×32 RGB Parquet."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ega_ray.data.parquet import write_split


def digits_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 (N, size, size, 3) and their labels 0..9."""
    d = load_digits()
    gray = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    up = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in gray])
    return np.repeat(up[..., None], 3, axis=-1), d.target.astype(np.int64)


def digits_splits(
    test_fraction: float = 0.2, seed: int = 0, size: int = 32
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``train`` and ``test`` (images, labels): a stratified split of all digits. What ``builtin:digits`` and
    ``ega-ray prepare digits`` both write, so the two give the same rows. (A run's validation split is carved
    from ``train``: see ``ega_ray.data.splits``.)"""
    images, labels = digits_images(size)
    x_tr, x_va, y_tr, y_va = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return {"train": (x_tr, y_tr), "test": (x_va, y_va)}


def prepare_digits(out: str | Path, test_fraction: float = 0.2, seed: int = 0, size: int = 32) -> dict[str, Path]:
    """Write ``out/train`` and ``out/test`` (stratified split); skips the work when both exist."""
    out = Path(out)
    paths = {"train": out / "train", "test": out / "test"}
    if all(p.exists() for p in paths.values()):
        return paths
    for split, (images, labels) in digits_splits(test_fraction, seed, size).items():
        write_split(paths[split], images, labels)
    return paths


BUILTIN_PREFIX = "builtin:"


def cache_dir() -> Path:
    """Where built-in datasets are prepared: $EGA_RAY_CACHE, else ~/.cache/ega-ray."""
    return Path(os.environ.get("EGA_RAY_CACHE", Path.home() / ".cache" / "ega-ray")).expanduser()


def builtin_split(value: str, split: str) -> str:
    """``builtin:digits`` → the prepared split's local folder (prepared on first use); ``split``: train or
    test."""
    name = value.removeprefix(BUILTIN_PREFIX)
    if name != "digits":
        raise ValueError(f"unknown built-in dataset {name!r}; allowed: digits")
    return str(prepare_digits(cache_dir() / "digits")[split])
