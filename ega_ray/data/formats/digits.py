"""scikit-learn's bundled digits (no --src, no network): the rows ``builtin:digits`` prepares
(``ega_ray.data.digits``: 8×8 images upscaled to 32×32 RGB, a stratified 80/20 split with seed 0),
PNG-encoded through the same writer as every format, so both give the same Parquet files."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np

from ega_ray.data.formats.base import FORMATS, Source, Split, array_rows


@FORMATS.register("digits", bundled_with="scikit-learn")
def open_digits(src: Path | None, max_pixels: int) -> Source:  # noqa: ARG001 - images are 32×32
    assert src is None

    @cache
    def splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
        from ega_ray.data.digits import digits_splits  # imports scikit-learn: only once the rows are written

        return digits_splits()

    def split(name: str) -> Split:
        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            yield splits()[name]

        return Split(name, array_rows(chunks, name), 0)  # 0: the count is known once the digits are loaded

    return Source(
        None, [str(i) for i in range(10)], [split("train"), split("test")], origin="sklearn.datasets.load_digits"
    )
