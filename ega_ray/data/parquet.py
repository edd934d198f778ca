"""The on-disk format: sharded Parquet with columns ``image`` (PNG bytes), ``label`` (int64, −1 for
unlabeled), ``index`` (int64, 0..N−1 within the split, stable). Read back through Ray Data."""

from __future__ import annotations

import io
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

REQUIRED_COLUMNS = ("image", "label", "index")


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_split(out_dir: str | Path, images: np.ndarray, labels: np.ndarray, rows_per_file: int = 10_000) -> Path:
    """Write one split atomically: into a temporary sibling folder, renamed into place at the end."""
    out_dir = Path(out_dir)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for part, start in enumerate(range(0, len(images), rows_per_file)):
            stop = min(start + rows_per_file, len(images))
            table = pa.table(
                {
                    "image": pa.array([encode_png(im) for im in images[start:stop]], type=pa.binary()),
                    "label": pa.array(labels[start:stop], type=pa.int64()),
                    "index": pa.array(np.arange(start, stop), type=pa.int64()),
                }
            )
            pq.write_table(table, tmp / f"part-{part:05d}.parquet")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_columns(path: str, columns: list[str]) -> pa.Table:
    """Read some columns of a Parquet split (local path or URI) without Ray, e.g. labels on the driver."""
    return pads.dataset(path, format="parquet").to_table(columns=columns)


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
    return rows


def decode_images(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data batch transform: PNG/JPEG bytes (or uint8 arrays) → uint8 (N, S, S, 3)."""
    out = []
    for item in batch["image"]:
        if isinstance(item, (bytes, bytearray)):
            im = Image.open(io.BytesIO(item)).convert("RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BICUBIC)
            out.append(np.asarray(im, dtype=np.uint8))
        else:
            out.append(np.asarray(item, dtype=np.uint8))
    batch["image"] = np.stack(out)
    return batch


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
