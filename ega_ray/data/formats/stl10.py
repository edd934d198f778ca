"""STL-10, binary version: the unpacked ``stl10_binary/`` with ``train_X.bin``/``train_y.bin``,
``test_X.bin``/``test_y.bin`` and optionally ``unlabeled_X.bin`` (label −1) and ``class_names.txt``. Images
are PNG-encoded from the stored arrays (pixel-exact); the ``.bin`` files are read in chunks, never whole."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ega_ray.data.formats.base import FORMATS, PrepareError, Source, Split, array_rows, need, official_folder

STL_SIDE = 96
STL_BYTES = 3 * STL_SIDE * STL_SIDE
STL_CHUNK = 1_000  # images read from a .bin at a time


def _stl_count(path: Path) -> int:
    """Images in an STL-10 ``*_X.bin``; its size must be a positive multiple of 3·96·96 bytes."""
    size = path.stat().st_size
    if size == 0 or size % STL_BYTES:
        raise PrepareError(
            f"{path}: {size} bytes is not a positive multiple of 3·96·96 = {STL_BYTES}; the file is truncated "
            "or not an STL-10 image file"
        )
    return size // STL_BYTES


def _stl_chunks(path: Path, labels: np.ndarray) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """HWC uint8 images of an STL-10 ``*_X.bin`` (column-major per image), read STL_CHUNK at a time."""

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with open(path, "rb") as f:
            for start in range(0, len(labels), STL_CHUNK):
                n = min(STL_CHUNK, len(labels) - start)
                raw = f.read(n * STL_BYTES)
                if len(raw) != n * STL_BYTES:
                    raise PrepareError(f"{path}: ended early (changed while being read?)")
                block = np.frombuffer(raw, dtype=np.uint8).reshape(n, 3, STL_SIDE, STL_SIDE)
                yield np.ascontiguousarray(block.transpose(0, 3, 2, 1)), labels[start : start + n]

    return chunks


def download_stl10(root: Path) -> Path:
    """Fetch STL-10 into ``root`` with torchvision (it checks the archive's MD5); the official folder."""
    from torchvision import datasets  # only here: importing it takes seconds

    datasets.STL10(str(root), split="train", download=True)  # the archive holds every split
    return root / datasets.STL10.base_folder


@FORMATS.register("stl10", download=download_stl10)
def open_stl10(src: Path | None, max_pixels: int) -> Source:  # noqa: ARG001 - images are 96×96
    assert src is not None
    src = official_folder(src, "stl10_binary", "train_X.bin")
    expects = (
        "stl10 expects --src to be the unpacked stl10_binary/ folder with train_X.bin, train_y.bin, test_X.bin, "
        "test_y.bin (and optionally unlabeled_X.bin, class_names.txt)"
    )
    splits = []
    for name in ("train", "test"):
        x_path, y_path = need(src / f"{name}_X.bin", expects), need(src / f"{name}_y.bin", expects)
        count = _stl_count(x_path)
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
        if len(labels) != count:
            raise PrepareError(f"{y_path}: {len(labels)} labels but {x_path.name} holds {count} images")
        if labels.min() < 1 or labels.max() > 10:
            raise PrepareError(f"{y_path}: labels must be 1..10, found {labels.min()}..{labels.max()}")
        splits.append(Split(name, array_rows(_stl_chunks(x_path, labels - 1), x_path.name), count))
    if (src / "unlabeled_X.bin").exists():
        count = _stl_count(src / "unlabeled_X.bin")
        unlabeled = np.full(count, -1, dtype=np.int64)
        splits.append(
            Split("unlabeled", array_rows(_stl_chunks(src / "unlabeled_X.bin", unlabeled), "unlabeled_X.bin"), count)
        )
    classes = None
    names_file = src / "class_names.txt"
    if names_file.exists():
        classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(classes) != 10:
            raise PrepareError(f"{names_file}: expected 10 class names, one a line, found {len(classes)}")
    return Source(src, classes, splits)
