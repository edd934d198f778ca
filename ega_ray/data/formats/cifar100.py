"""CIFAR-100, python version: the unpacked ``cifar-100-python/`` with the pickles ``train``, ``test`` and
``meta``. Images are PNG-encoded from the stored arrays (pixel-exact); labels are the 100 fine labels."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ega_ray.data.formats.base import FORMATS, PrepareError, Source, Split, array_rows, need, official_folder


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR's pickles hold dicts, lists, strings, bytes and NumPy arrays; anything else a pickle names (a function to
    call, as a crafted file would) is refused, so converting a downloaded file cannot run code."""

    ALLOWED = {
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # how protocol-5 pickles spell an array: a buffer and a shape
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only NumPy arrays may appear in a CIFAR pickle")
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except Exception as err:  # truncated: EOFError / UnpicklingError; garbage: many kinds
        raise PrepareError(
            f"{path}: cannot be unpickled ({type(err).__name__}: {err}); the file is truncated or not a CIFAR pickle"
        ) from None


def _cifar_split(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = _unpickle(path)
    if not isinstance(raw, dict) or b"data" not in raw or b"fine_labels" not in raw:
        raise PrepareError(f"{path}: not a CIFAR-100 pickle (expected a dict with b'data' and b'fine_labels')")
    data = np.asarray(raw[b"data"])
    labels = np.asarray(raw[b"fine_labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise PrepareError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data):
        raise PrepareError(f"{path}: {len(data)} images but {labels.size} fine labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise PrepareError(f"{path}: fine labels must be in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def download_cifar100(root: Path) -> Path:
    """Fetch CIFAR-100 into ``root`` with torchvision (it checks the archive's MD5); the official folder."""
    from torchvision import datasets  # only here: importing it takes seconds

    datasets.CIFAR100(str(root), train=True, download=True)
    return root / datasets.CIFAR100.base_folder


@FORMATS.register("cifar100", download=download_cifar100)
def open_cifar100(src: Path | None, max_pixels: int) -> Source:  # noqa: ARG001 - images are 32×32
    assert src is not None
    src = official_folder(src, "cifar-100-python", "meta")
    expects = "cifar100 expects --src to be the unpacked cifar-100-python/ folder with the pickles train, test and meta"
    files = {name: need(src / name, expects) for name in ("train", "test", "meta")}
    meta = _unpickle(files["meta"])
    if not isinstance(meta, dict) or b"fine_label_names" not in meta:
        raise PrepareError(f"{files['meta']}: not the CIFAR-100 meta pickle (no b'fine_label_names')")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]

    def split(name: str) -> Split:
        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            yield _cifar_split(files[name], len(classes))  # a pickle loads whole (150 MB for train)

        # the row count is only known once the pickle is loaded: 0 = unknown for the progress lines
        return Split(name, array_rows(chunks, name), 0)

    return Source(src, classes, [split("train"), split("test")])
