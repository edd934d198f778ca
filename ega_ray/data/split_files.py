"""A Parquet split's files, read from their footers only: the checks preflight makes before Ray starts
(every file opens, agrees with the others on its columns, and its row groups agree with its footer), the
split's identity that a run folder records (so that a resume on other data is refused), and, after a read
failed, the file and row group whose data pages cannot be decoded. No Ray, no torch.

Local folders and URIs (``s3://``, ``gs://``, …) are read through ``pyarrow.fs``: a footer costs two ranged
reads per file, whatever the file's size. See docs/data.md ("A split's identity").
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ega_ray.errors import DataError, find_usage_error, iter_causes
from ega_ray.uris import is_uri

PREPARE_RECORD = "prepare.json"  # ``ega-ray prepare``'s record, beside the split folders it wrote
_MAGIC = b"PAR1"
# what the text of a failure that may come from decoding Parquet pages holds (Arrow's own messages, as Ray
# passes a task's or a worker's failure on); not the bare word "parquet", which every failure of a Ray Data
# read stage carries in its operator's name (ReadParquet->…) and which would start a scan of every split
_READ_FAILURE = re.compile(
    r"snappy|zstd|lz4|gzip|brotli|thrift|decompress|corrupt|deserializ|page header|ParquetException"
    r"|Parquet (?:file|page|magic)|magic bytes|(?:unexpected )?end of (?:stream|file)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SplitFile:
    """One Parquet file of a split, as its footer describes it."""

    path: str
    size: int
    footer_sha256: str
    metadata: pq.FileMetaData


def _files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """The split's Parquet files as Arrow's dataset discovery finds them (hidden and ``_`` files left out,
    the same files Ray Data reads), sorted."""
    ds = pads.dataset(path, format="parquet")
    return ds.filesystem, sorted(ds.files)


def _read_footer(fs: pafs.FileSystem, file: str) -> SplitFile:
    """The file's size, its footer's SHA-256 and its parsed metadata; OSError/ArrowException when the file
    is not a complete Parquet file."""
    with fs.open_input_file(file) as f:
        size = f.size()
        if size < 12:
            raise OSError(f"{size} bytes, too short for a Parquet file")
        f.seek(size - 8)
        tail = f.read(8)
        if tail[4:] != _MAGIC:
            raise OSError("does not end in the Parquet magic bytes (truncated, or not Parquet)")
        length = int.from_bytes(tail[:4], "little")
        if length > size - 12:
            raise OSError(f"its footer claims {length} bytes, more than the file holds")
        f.seek(size - 8 - length)
        footer = f.read(length)
        f.seek(0)
        metadata = pq.ParquetFile(f).metadata
    return SplitFile(file, size, hashlib.sha256(footer).hexdigest(), metadata)


def split_files(path: str, field: str) -> list[SplitFile]:
    """Every file of the split at ``path``, after checking what its footer says: each file opens, has the
    columns and types of the first, and its row groups' row counts add up to its footer's, with every column
    chunk inside the file. Data pages are not read (see :func:`locate_unreadable`).

    Args:
        path: the split (a folder of Parquet files, one file, or a URI).
        field: the config field naming it, for messages (``data.train``).

    Returns:
        The files, sorted by path.

    Raises:
        ValueError: one line naming the field and the file at fault.
    """
    try:
        fs, files = _files(path)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{field}: {path!r} is not a readable Parquet split: {err}") from None
    if not files:
        raise ValueError(f"{field}: {path!r} holds no Parquet file")
    found: list[SplitFile] = []
    for file in files:
        try:
            info = _read_footer(fs, file)
        except (OSError, pa.ArrowException) as err:
            raise ValueError(f"{field}: file {file} is not a readable Parquet file: {_first_line(err)}") from None
        _check_row_groups(info, field)
        if found:
            first = found[0]
            schema, expected = info.metadata.schema.to_arrow_schema(), first.metadata.schema.to_arrow_schema()
            if not schema.equals(expected):
                raise ValueError(
                    f"{field}: file {file} has columns ({_columns(schema)}) unlike {first.path} "
                    f"({_columns(expected)}); every file of a split needs the same columns"
                )
        found.append(info)
    return found


def _check_row_groups(info: SplitFile, field: str) -> None:
    meta = info.metadata
    in_groups = sum(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    if in_groups != meta.num_rows:
        raise ValueError(
            f"{field}: file {info.path}: its row groups hold {in_groups} rows but its footer says {meta.num_rows}"
        )
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if group.num_columns != meta.num_columns:
            raise ValueError(
                f"{field}: file {info.path}: row group {g} has {group.num_columns} columns, the file {meta.num_columns}"
            )
        for c in range(group.num_columns):
            chunk = group.column(c)
            offsets = (chunk.dictionary_page_offset, chunk.data_page_offset)
            start = min((o for o in offsets if o is not None and o > 0), default=0)
            if start + chunk.total_compressed_size > info.size:
                raise ValueError(
                    f"{field}: file {info.path}: row group {g} column {chunk.path_in_schema!r} lies past the end "
                    f"of the file ({info.size} bytes): the file is truncated"
                )


def _columns(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def split_identity(path: str, field: str) -> dict[str, Any]:
    """What a run folder records of a split, to tell whether a later run reads the same data: its path, row
    count, a digest of its files (names, sizes and footers: footers hold every row group's sizes and column
    statistics), and, for a split that ``ega-ray prepare`` wrote, the content digest it recorded (every
    row's label and image bytes, in order) while the files still match that record's counts.

    Args:
        path: the split (resolved: an absolute local path or a URI).
        field: the config field naming it.

    Returns:
        ``{"path", "rows", "files", "content"}`` (``content`` None without a prepare record).
    """
    files = split_files(path, field)
    rows = sum(f.metadata.num_rows for f in files)
    listing = [[Path(f.path).name, f.size, f.footer_sha256] for f in files]
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    content = _prepared_digest(path, rows, len(files))
    return {"path": path, "rows": rows, "files": f"sha256:{digest}", "content": content}


def _prepared_digest(path: str, rows: int, files: int) -> str | None:
    """The content digest ``ega-ray prepare`` recorded for the split folder ``path`` (in ``../prepare.json``),
    if the record still describes it (same row and file counts); None otherwise."""
    if is_uri(path):
        return None
    record_file = Path(path).parent / PREPARE_RECORD
    try:
        record = json.loads(record_file.read_text())
        entry = record["splits"][Path(path).name]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(entry, dict) or entry.get("rows") != rows or entry.get("files") != files:
        return None
    digest = entry.get("digest")
    return digest if isinstance(digest, str) else None


def identity_change(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """How a split's identity changed (``80 rows → 120 rows (content digest changed)``); None: the same.
    Other files, or (where both have one) another content digest: a re-prepare can change an image's bytes
    without changing any footer, and files replaced by hand leave prepare's record as it was."""
    if before.get("content") and now.get("content") and before["content"] != now["content"]:
        what = "content digest changed"
    elif before.get("files") != now.get("files"):
        what = "files changed: names, sizes or footers"
    elif before.get("rows") == now.get("rows"):
        return None
    else:
        what = ""
    rows = f"{before.get('rows')} rows → {now.get('rows')} rows" if before.get("rows") != now.get("rows") else ""
    return f"{rows} ({what})" if rows and what else rows or what


def locate_unreadable(path: str, field: str) -> str | None:
    """Read every row group of the split at ``path`` in full (data pages decompressed and decoded) and name
    the first that cannot be: ``data.train: file F row group 2: Corrupt snappy compressed data``. Slow (the
    whole split is read): for after a read has failed. None when every row group reads."""
    try:
        fs, files = _files(path)
    except (OSError, pa.ArrowException):
        return None
    for file in files:
        try:
            with fs.open_input_file(file) as f:
                reader = pq.ParquetFile(f)
                for group in range(reader.num_row_groups):
                    try:
                        reader.read_row_group(group)
                    except (OSError, pa.ArrowException) as err:
                        return f"{field}: file {file} row group {group}: {_first_line(err)}"
        except (OSError, pa.ArrowException) as err:
            return f"{field}: file {file}: {_first_line(err)}"
    return None


def _failure_text(err: BaseException) -> str:
    """The text of ``err`` and of the errors behind it (causes, contexts, Ray Train's per-worker failures)."""
    return "\n".join(f"{type(e).__name__}: {e}" for e in iter_causes(err))


def explain_read_failure(err: BaseException, splits: dict[str, str | None]) -> DataError | None:
    """For a failure that may come from reading Parquet (Arrow's ``Corrupt snappy compressed data``, with no
    file name, often inside a Ray task's traceback), the one-line DataError naming the file and row group
    that cannot be read: every row group of ``splits`` is read (:func:`locate_unreadable`). None when
    ``err`` is not such a failure, is already a user's error, or every row group reads.

    Args:
        err: the failure, as it reached the driver.
        splits: the splits the run reads, by field (``{"data.train": path}``; None: not given).

    Returns:
        The DataError to raise instead, or None.
    """
    if find_usage_error(err) is not None or not _READ_FAILURE.search(_failure_text(err)):
        return None
    for field, path in splits.items():
        found = locate_unreadable(path, field) if path is not None else None
        if found:
            return DataError(f"{found}; the file is damaged: restore it or prepare the split again")
    return None


@contextmanager
def unreadable_named(splits: dict[str, str | None]) -> Iterator[None]:
    """Run the block; a failure there that :func:`explain_read_failure` traces to a damaged Parquet row
    group of ``splits`` is raised as that one-line DataError (the original error as its cause)."""
    try:
        yield
    except Exception as err:
        found = explain_read_failure(err, splits)
        if found is None:
            raise
        raise found from err
