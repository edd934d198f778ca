"""The on-disk format: sharded Parquet with columns ``image`` (encoded PNG or JPEG bytes), ``label`` (int64,
−1 for unlabeled), ``index`` (int64, 0..N−1 within the split, stable). Read back through Ray Data.
See docs/data.md; ``ega_ray.data.prepare`` converts the official dataset formats into it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ega_ray.data.images import decode_images, encode_png
from ega_ray.data.split_files import split_files
from ega_ray.run_folder import replacing

REQUIRED_COLUMNS = ("image", "label", "index")
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())])


class ShardWriter:
    """Stream rows (encoded image bytes, label) into ``folder/part-NNNNN.parquet``.

    Rows get ``index`` 0, 1, 2, … in the order they are added. A file holds at most ``rows_per_file`` rows;
    rows are buffered and written as a row group when the file is full or the buffer holds
    ``row_group_bytes`` of images, so memory stays bounded however long the split is. The same rows always
    give the same files, byte for byte. ``digest()``: the SHA-256 of the rows added (each row's label, image
    length and image bytes, in order), the content digest ``ega-ray prepare`` records for a split."""

    def __init__(self, folder: str | Path, rows_per_file: int = 10_000, row_group_bytes: int = 64 << 20):
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
        self.folder = Path(folder)
        self.rows_per_file = rows_per_file
        self.row_group_bytes = row_group_bytes
        self.rows = 0  # rows added so far
        self.files: list[Path] = []
        self._images: list[bytes] = []
        self._labels: list[int] = []
        self._bytes = 0
        self._written = 0  # rows already in files
        self._in_file = 0  # rows (written or buffered) in the current file
        self._writer: pq.ParquetWriter | None = None
        self._content = hashlib.sha256()

    def add(self, image: bytes, label: int) -> None:
        self._images.append(bytes(image))
        self._labels.append(int(label))
        self._content.update(int(label).to_bytes(8, "little", signed=True) + len(image).to_bytes(8, "little"))
        self._content.update(image)
        self._bytes += len(image)
        self.rows += 1
        self._in_file += 1
        if self._in_file == self.rows_per_file or self._bytes >= self.row_group_bytes:
            self._flush()
            if self._in_file == self.rows_per_file:
                self._close_file()

    def _flush(self) -> None:
        if not self._images:
            return
        if self._writer is None:
            path = self.folder / f"part-{len(self.files):05d}.parquet"
            self._writer = pq.ParquetWriter(path, SCHEMA)
            self.files.append(path)
        n = len(self._images)
        table = pa.table(
            {
                "image": pa.array(self._images, type=pa.binary()),
                "label": pa.array(self._labels, type=pa.int64()),
                "index": pa.array(np.arange(self._written, self._written + n), type=pa.int64()),
            },
            schema=SCHEMA,
        )
        self._writer.write_table(table)
        self._written += n
        self._images, self._labels, self._bytes = [], [], 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._in_file = 0

    def close(self) -> int:
        """Write what is buffered and close the last file; return the number of rows."""
        self._flush()
        self._close_file()
        return self.rows

    def digest(self) -> str:
        """``sha256:<hex>`` of the rows added so far (see the class)."""
        return f"sha256:{self._content.hexdigest()}"

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # failing: release the file, the caller discards the folder
            self._writer.close()
            self._writer = None


def write_split(out_dir: str | Path, images: np.ndarray, labels: np.ndarray, rows_per_file: int = 10_000) -> Path:
    """Write one split atomically (``run_folder.replacing``: into a temporary sibling folder, renamed into
    place at the end)."""
    out_dir = Path(out_dir)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    with replacing(out_dir) as tmp, ShardWriter(tmp, rows_per_file) as writer:
        for image, label in zip(images, labels, strict=True):
            writer.add(encode_png(image), int(label))
    return out_dir


def read_columns(path: str, columns: list[str]) -> pa.Table:
    """Read some columns of a Parquet split (local path or URI) without Ray, e.g. labels on the driver."""
    return pads.dataset(path, format="parquet").to_table(columns=columns)


def read_decoded(
    path: str, image_size: int, split: str = "data.test", wanted: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """A whole (non-empty, checked) split, decoded on the calling process, e.g. a small evaluation split on
    the driver: image (N, S, S, 3) uint8, label, index. ``wanted``: only the rows it marks (a mask by index,
    e.g. the validation rows carved from the training split)."""
    table = read_columns(path, ["image", "label", "index"])
    if wanted is not None:
        table = table.filter(pa.array(wanted[table["index"].to_numpy()]))
    index = table["index"].to_numpy()
    batch = decode_images({"image": table["image"].to_pylist(), "index": index}, image_size, split)
    return batch | {"label": table["label"].to_numpy()}


def check_split(path: str, field: str) -> int:
    """Raise a clear error unless ``path`` holds a readable Parquet split with the required columns;
    return its row count."""
    try:
        ds = pads.dataset(path, format="parquet")
        names = ds.schema.names
        rows = ds.count_rows()
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{field}: {path!r} is not a readable Parquet split: {err}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{field}: {path!r} lacks column(s) {missing}; a split needs {list(REQUIRED_COLUMNS)}")
    if rows == 0:
        raise ValueError(f"{field}: {path!r} has no rows")
    split_files(path, field)  # every file opens and agrees with the others and with its own footer
    return rows


def check_labels(path: str, field: str, rows: int, unlabeled_ok: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``label`` and ``index`` columns of a split (int64), after checking what training relies on: both
    integer and never null, every index in 0..rows−1 and unique, every label ≥ 0 (or −1 = unlabeled where
    ``unlabeled_ok``). A ValueError names the split, the column and an offending row otherwise."""
    schema = pads.dataset(path, format="parquet").schema
    for column, what in (("label", "class numbers 0..C−1, −1 for unlabeled"), ("index", f"row numbers 0..{rows - 1}")):
        kind = schema.field(column).type
        if not pa.types.is_integer(kind):
            raise ValueError(f"{field}: {path!r} column {column!r} is of type {kind}; it must hold integers ({what})")
    table = read_columns(path, ["label", "index"])
    for column in ("label", "index"):
        nulls = table[column].null_count
        if nulls:
            first = int(np.flatnonzero(table[column].is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{field}: {path!r} column {column!r} is null in {nulls} row(s), the first at row {first}")
    labels = table["label"].to_numpy().astype(np.int64)
    index = table["index"].to_numpy().astype(np.int64)
    outside = (index < 0) | (index >= rows)
    if outside.any():
        raise ValueError(
            f"{field}: {path!r} has index {index[outside][0]}; the column 'index' must number the {rows} rows "
            f"0..{rows - 1}, each once"
        )
    values, counts = np.unique(index, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"{field}: {path!r} has index {values[counts > 1][0]} {counts[counts > 1][0]} times; the column "
            f"'index' must number the {rows} rows 0..{rows - 1}, each once"
        )
    lowest = -1 if unlabeled_ok else 0
    bad = labels < lowest
    if bad.any():
        allowed = "0..C−1, or −1 for an unlabeled row" if unlabeled_ok else "0..C−1 (rows evaluated on need labels)"
        raise ValueError(f"{field}: {path!r} has label {labels[bad][0]} (index {index[bad][0]}); labels are {allowed}")
    return labels, index


def stratified_label_mask(labels: np.ndarray, index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean array over ``index`` values: which rows keep their label. Per class, ceil(fraction·count)
    rows are kept, chosen with ``seed``; fraction 1 keeps all."""
    keep = np.zeros(int(index.max()) + 1, dtype=bool)
    if fraction >= 1.0:
        keep[index[labels >= 0]] = True
        return keep
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels[labels >= 0]):
        members = index[labels == cls]
        chosen = rng.choice(members, size=int(np.ceil(fraction * len(members))), replace=False)
        keep[chosen] = True
    return keep


def mask_labels(batch: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """Ray Data batch transform: labels of rows outside ``keep`` become −1 (unlabeled)."""
    batch["label"] = np.where(keep[batch["index"]], batch["label"], -1)
    return batch


def select_rows(batch: dict[str, np.ndarray], wanted: np.ndarray) -> dict[str, np.ndarray]:
    """Ray Data batch transform: only the rows ``wanted`` marks (a boolean mask by index), e.g. the training
    split less its carved validation rows, or those rows alone."""
    chosen = wanted[batch["index"]]
    return {k: v[chosen] for k, v in batch.items()}
