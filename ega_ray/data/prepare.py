"""``ega-ray prepare``: convert the official distribution formats of the EGA datasets (CIFAR-100, STL-10,
Tiny ImageNet), any class-per-folder image tree, and the bundled digits into ega-ray's Parquet format
(see ``ega_ray.data.parquet`` and docs/data.md).

Every conversion streams: images are read, checked and encoded one at a time and written in shards of at
most ``rows_per_file`` rows. The whole output goes to a temporary sibling folder ``.OUT.tmp-<random>``,
finished with ``prepare.json``, and is renamed to ``OUT`` only at the end, so an interrupted or failed
conversion never leaves a complete-looking ``OUT`` (and an older ``OUT`` stays as it was). ``OUT`` must be
new, empty, or an earlier ``ega-ray prepare`` output (see ``ega_ray.run_folder``).

What is read: symbolic links to folders are never followed; a link to a file is read only when its target
lies inside ``--src``; both are listed in the report otherwise. An unreadable folder or a file name that is
not valid UTF-8 stops the conversion naming it. Images over ``max_pixels`` are refused like unreadable ones
(``--skip-bad`` skips them); 16-bit images are scaled to 8 bits."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from ega_ray.data.parquet import MAX_PIXELS, ShardWriter, encode_png, open_image, to_rgb8
from ega_ray.errors import UsageError
from ega_ray.run_folder import check_target, new_marker, read_marker, rebuild, write_marker

DATASETS = ("cifar100", "stl10", "tinyimagenet", "imagefolder", "digits")
DOWNLOADABLE = ("cifar100", "stl10")
KEEP_FORMATS = frozenset({"PNG", "JPEG"})  # stored as the original file bytes; anything else → PNG
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # re-encoded as 8-bit PNG (scaled)
PROGRESS_ROWS = 10_000
PROGRESS_SECONDS = 5.0
SPLIT_FOLDERS = ("train", "val", "test")
STL_SIDE = 96
STL_BYTES = 3 * STL_SIDE * STL_SIDE
STL_CHUNK = 1_000  # images read from a .bin at a time
STDERR = "stderr"  # prepare()'s default log: sys.stderr as it is at call time
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


class PrepareError(UsageError):
    """A conversion cannot go on: a missing or malformed source file, or an unreadable image."""


class BadImage(Exception):
    """One image file cannot be decoded; skippable with ``--skip-bad``."""


# A row source: (name of the image in messages, a loader returning the encoded bytes or raising BadImage, label).
Row = tuple[str, Callable[[], bytes], int]


@dataclass
class Split:
    name: str
    rows: Callable[[], Iterator[Row]]  # called once, when the split is written
    expected: int  # rows the source announces (skipped files included), for the progress lines


@dataclass
class Source:
    path: Path  # the official folder actually read
    classes: list[str] | None
    splits: list[Split]
    ignored: list[str] = field(default_factory=list)  # files that are not images, not converted
    notes: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # symbolic links not followed, with why


# ---------------------------------------------------------------- helpers


def _image_extensions() -> frozenset[str]:
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def load_image_file(path: Path, max_pixels: int = MAX_PIXELS) -> bytes:
    """The bytes to store for one image file: the original bytes for 8-bit PNG and JPEG (after checking that
    the whole image decodes), a lossless PNG of the RGB image for any other format PIL reads (16-bit images
    scaled to 8 bits). More than ``max_pixels`` pixels is refused before the pixels are decoded."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BadImage(f"cannot read file ({err.strerror or err})") from None
    try:
        with open_image(data, max_pixels) as im:
            fmt = im.format
            im.load()  # a full decode: catches truncated and corrupt files, not only bad headers
            if fmt in KEEP_FORMATS and im.mode not in HIGH_BIT_MODES:
                return data
            rgb = to_rgb8(im)
    except UnidentifiedImageError:
        raise BadImage("not a readable image (no image format PIL knows)") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, DecompressionBombError…
        raise BadImage(f"not a readable image ({type(err).__name__}: {err})") from None
    return encode_png(rgb)


def check_name(path: Path) -> Path:
    """``path`` if its name is valid UTF-8 (names end up in prepare.json and in messages); else PrepareError."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise PrepareError(f"{os.fsencode(path)!r}: the name is not valid UTF-8; rename it") from None
    return path


def _entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` (names checked), or a PrepareError naming a folder that cannot be read."""
    try:
        return [check_name(p) for p in folder.iterdir()]
    except OSError as err:
        raise PrepareError(f"{folder}: cannot be read ({err.strerror or err})") from None


def _is_dir(p: Path) -> bool:
    """A real folder; a symbolic link to one is never followed."""
    return p.is_dir() and not p.is_symlink()


def _link_problem(path: Path, src: Path) -> str | None:
    """Why a symbolic link is not followed (None for a link to a file inside ``src``, which is read)."""
    if _is_dir(path) or not path.is_symlink():
        return None
    target = path.resolve()
    if path.is_dir():
        return f"{path.name}: a link to a folder, not followed"
    if not target.is_file():
        return f"{path.name}: a broken link"
    if src != target and src not in target.parents:
        return f"{path.name}: a link to {target}, outside --src"
    return None


def _list_files(
    folder: Path, recursive: bool, exts: frozenset[str], src: Path
) -> tuple[list[Path], list[Path], list[str]]:
    """Image files under ``folder`` (by extension, sorted by relative path), the other entries (files with
    non-image extensions, hidden files such as .DS_Store or ._name.jpg, hidden folders), and the symbolic
    links not followed (with why, relative to ``src``)."""
    images: list[Path] = []
    other: list[Path] = []
    links: list[str] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        for entry in _entries(current):
            hidden = entry.name.startswith(".")
            problem = _link_problem(entry, src)
            if problem is not None:
                links.append(f"{_rel(entry.parent, src)}/{problem}")
            elif _is_dir(entry):
                if hidden or not recursive:
                    other.append(entry)  # reported, not searched
                else:
                    pending.append(entry)
            elif entry.is_file():
                (other if hidden or entry.suffix.lower() not in exts else images).append(entry)

    def key(p: Path) -> str:
        return p.relative_to(folder).as_posix()

    return sorted(images, key=key), sorted(other, key=key), sorted(links)


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise PrepareError(f"{path}: not found; {what}")
    return path


def _official(src: Path, folder: str, marker: str) -> Path:
    """``src`` itself, or ``src/<folder>`` when ``src`` is the folder above the official one (as after
    ``--download``)."""
    if not (src / marker).exists() and (src / folder / marker).exists():
        return src / folder
    return src


def _file_rows(files: list[tuple[Path, int]], base: Path, max_pixels: int) -> Callable[[], Iterator[Row]]:
    def rows() -> Iterator[Row]:
        for path, label in files:
            yield _rel(path, base), (lambda p=path: load_image_file(p, max_pixels)), label

    return rows


def _array_rows(chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]], ref: str) -> Callable[[], Iterator[Row]]:
    """Rows from chunks of (uint8 (n, H, W, 3) images, labels), PNG-encoded losslessly."""

    def rows() -> Iterator[Row]:
        i = 0
        for images, labels in chunks():
            for image, label in zip(images, labels, strict=True):
                yield f"{ref}[{i}]", (lambda im=image: encode_png(im)), int(label)
                i += 1

    return rows


# ---------------------------------------------------------------- CIFAR-100


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


def open_cifar100(src: Path, max_pixels: int = MAX_PIXELS) -> Source:  # noqa: ARG001 - images are 32×32
    src = _official(src, "cifar-100-python", "meta")
    expects = "cifar100 expects --src to be the unpacked cifar-100-python/ folder with the pickles train, test and meta"
    files = {name: _need(src / name, expects) for name in ("train", "test", "meta")}
    meta = _unpickle(files["meta"])
    if not isinstance(meta, dict) or b"fine_label_names" not in meta:
        raise PrepareError(f"{files['meta']}: not the CIFAR-100 meta pickle (no b'fine_label_names')")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]

    def split(name: str) -> Split:
        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            yield _cifar_split(files[name], len(classes))  # a pickle loads whole (150 MB for train)

        # the row count is only known once the pickle is loaded: 0 = unknown for the progress lines
        return Split(name, _array_rows(chunks, name), 0)

    return Source(src, classes, [split("train"), split("test")])


# ---------------------------------------------------------------- STL-10


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


def open_stl10(src: Path, max_pixels: int = MAX_PIXELS) -> Source:  # noqa: ARG001 - images are 96×96
    src = _official(src, "stl10_binary", "train_X.bin")
    expects = (
        "stl10 expects --src to be the unpacked stl10_binary/ folder with train_X.bin, train_y.bin, test_X.bin, "
        "test_y.bin (and optionally unlabeled_X.bin, class_names.txt)"
    )
    splits = []
    for name in ("train", "test"):
        x_path, y_path = _need(src / f"{name}_X.bin", expects), _need(src / f"{name}_y.bin", expects)
        count = _stl_count(x_path)
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
        if len(labels) != count:
            raise PrepareError(f"{y_path}: {len(labels)} labels but {x_path.name} holds {count} images")
        if labels.min() < 1 or labels.max() > 10:
            raise PrepareError(f"{y_path}: labels must be 1..10, found {labels.min()}..{labels.max()}")
        splits.append(Split(name, _array_rows(_stl_chunks(x_path, labels - 1), x_path.name), count))
    if (src / "unlabeled_X.bin").exists():
        count = _stl_count(src / "unlabeled_X.bin")
        unlabeled = np.full(count, -1, dtype=np.int64)
        splits.append(
            Split("unlabeled", _array_rows(_stl_chunks(src / "unlabeled_X.bin", unlabeled), "unlabeled_X.bin"), count)
        )
    classes = None
    names_file = src / "class_names.txt"
    if names_file.exists():
        classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(classes) != 10:
            raise PrepareError(f"{names_file}: expected 10 class names, one a line, found {len(classes)}")
    return Source(src, classes, splits)


# ---------------------------------------------------------------- Tiny ImageNet


def open_tinyimagenet(src: Path, max_pixels: int = MAX_PIXELS) -> Source:
    src = _official(src, "tiny-imagenet-200", "wnids.txt")
    expects = (
        "tinyimagenet expects --src to be the unpacked tiny-imagenet-200/ folder with wnids.txt, "
        "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
    )
    wnids_file = _need(src / "wnids.txt", expects)
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise PrepareError(
            f"{wnids_file}: expected one distinct wnid a line, found {len(wnids)} ({len(set(wnids))} distinct)"
        )
    label_of = {w: i for i, w in enumerate(wnids)}
    exts = _image_extensions()
    ignored: list[Path] = []
    links: list[str] = []

    train_dir = _need(src / "train", expects)
    listing = _entries(train_dir)
    extra = sorted(p.name for p in listing if p.is_dir() and p.name not in label_of and p.name[0] != ".")
    if extra:
        raise PrepareError(f"{train_dir}: folder(s) {extra[:5]} are not listed in {wnids_file.name}")
    ignored += [p for p in listing if p.is_file() or p.name.startswith(".")]
    train: list[tuple[Path, int]] = []
    for wnid in wnids:
        images, other, bad_links = _list_files(_real_dir(train_dir / wnid / "images", expects), False, exts, src)
        train += [(p, label_of[wnid]) for p in images]
        ignored += other
        links += bad_links

    val_images_dir = _real_dir(src / "val" / "images", expects)
    ann_file = _need(src / "val" / "val_annotations.txt", expects)
    val: list[tuple[Path, int]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(ann_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in label_of:
            raise PrepareError(
                f"{ann_file}:{lineno}: expected 'filename<TAB>wnid<TAB>bbox…' with a wnid from {wnids_file.name}, "
                f"got {line[:80]!r}"
            )
        name = fields[0].strip()
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise PrepareError(
                f"{ann_file}:{lineno}: {name!r} is not a file name in {val_images_dir} (no folders, no absolute paths)"
            )
        if name in seen:
            raise PrepareError(f"{ann_file}:{lineno}: {name} is annotated twice")
        seen.add(name)
        path = _need(val_images_dir / name, f"it is listed in {ann_file}")
        problem = _link_problem(path, src)
        if problem is not None:
            raise PrepareError(f"{ann_file}:{lineno}: {val_images_dir}/{problem}")
        val.append((path, label_of[fields[1].strip()]))
    images, other, bad_links = _list_files(val_images_dir, False, exts, src)
    ignored += other
    links += bad_links
    unannotated = [p for p in images if p.name not in seen]

    def val_rows() -> Iterator[Row]:
        yield from _file_rows(val, src, max_pixels)()
        for path in unannotated:  # not dropped silently: an error, or skipped and reported with --skip-bad

            def no_label(p: Path = path) -> bytes:
                raise BadImage(f"has no line in {ann_file.name}")

            yield _rel(path, src), no_label, -1

    notes = []
    if (src / "test").exists():
        notes.append(f"{src / 'test'}: Tiny ImageNet's test images have no labels and are not converted")
    return Source(
        src,
        wnids,
        [
            Split("train", _file_rows(train, src, max_pixels), len(train)),
            Split("val", val_rows, len(val) + len(unannotated)),
        ],
        [_rel(p, src) for p in ignored],
        notes,
        links,
    )


def _real_dir(path: Path, expects: str) -> Path:
    """``path``, a folder that exists and is not a symbolic link (links to folders are never followed)."""
    if path.is_symlink():
        raise PrepareError(f"{path}: a symbolic link; ega-ray prepare does not follow links to folders")
    return _need(path, expects)


# ---------------------------------------------------------------- image folders


def open_imagefolder(src: Path, max_pixels: int = MAX_PIXELS) -> Source:
    if not _is_dir(src):
        raise PrepareError(f"{src}: not a folder; imagefolder expects one subfolder of images per class")
    top = _entries(src)
    links = sorted(problem for p in top if (problem := _link_problem(p, src)) is not None)
    subdirs = sorted(p for p in top if _is_dir(p) and not p.name.startswith("."))
    split_dirs = [src / s for s in SPLIT_FOLDERS if _is_dir(src / s) and any(_is_dir(p) for p in _entries(src / s))]
    ignored = [p for p in top if (p.is_file() and not p.is_symlink()) or p.name.startswith(".")]
    if split_dirs:
        others = [p.name for p in subdirs if p.name not in SPLIT_FOLDERS]
        if others:
            raise PrepareError(
                f"{src}: has split folders ({', '.join(p.name for p in split_dirs)}) and also other folders "
                f"{others[:5]}; put the class folders inside the split folders"
            )
        for s in SPLIT_FOLDERS:
            if _is_dir(src / s) and src / s not in split_dirs:
                raise PrepareError(f"{src / s}: a split folder without class folders; imagefolder needs one per class")
        roots = {p.name: p for p in split_dirs}
    else:
        roots = {"train": src}
    class_dirs = {
        split: sorted(p for p in _entries(root) if _is_dir(p) and not p.name.startswith("."))
        for split, root in roots.items()
    }
    classes = sorted({p.name for dirs in class_dirs.values() for p in dirs})
    if not classes:
        raise PrepareError(f"{src}: no class folders; imagefolder expects one subfolder of images per class")
    label_of = {c: i for i, c in enumerate(classes)}
    exts = _image_extensions()
    splits = []
    for split, root in roots.items():
        if root != src:
            entries = _entries(root)
            ignored += [p for p in entries if (p.is_file() and not p.is_symlink()) or p.name.startswith(".")]
            links += [f"{split}/{problem}" for p in entries if (problem := _link_problem(p, src)) is not None]
        files: list[tuple[Path, int]] = []
        for class_dir in class_dirs[split]:
            images, other, bad_links = _list_files(class_dir, True, exts, src)
            files += [(p, label_of[class_dir.name]) for p in images]
            ignored += other
            links += bad_links
        if not files:
            raise PrepareError(f"{root}: no image files in its class folders")
        splits.append(Split(split, _file_rows(files, src, max_pixels), len(files)))
    return Source(src, classes, splits, sorted(_rel(p, src) for p in ignored), links=sorted(links))


OPENERS: dict[str, Callable[..., Source]] = {
    "cifar100": open_cifar100,
    "stl10": open_stl10,
    "tinyimagenet": open_tinyimagenet,
    "imagefolder": open_imagefolder,
}


# ---------------------------------------------------------------- writing


class _Progress:
    def __init__(self, label: str, expected: int, log: TextIO | None):
        self.label, self.expected, self.log = label, expected, log
        self.start = self.last = time.monotonic()
        self.next_rows = PROGRESS_ROWS

    def tick(self, done: int) -> None:
        if self.log is None:
            return
        now = time.monotonic()
        if done >= self.next_rows or now - self.last >= PROGRESS_SECONDS:
            total = f"/{self.expected}" if self.expected else ""
            rate = done / max(now - self.start, 1e-9)
            print(f"prepare {self.label}: {done}{total} images, {rate:.0f} rows/s", file=self.log, flush=True)
            self.last = now
            self.next_rows = done - done % PROGRESS_ROWS + PROGRESS_ROWS

    def done(self, rows: int, skipped: int) -> None:
        if self.log is None:
            return
        secs = time.monotonic() - self.start
        extra = f", {skipped} skipped" if skipped else ""
        print(
            f"prepare {self.label}: {rows} rows in {secs:.1f} s ({rows / max(secs, 1e-9):.0f} rows/s){extra}",
            file=self.log,
            flush=True,
        )


def _write_split(
    dataset: str, base: Path, split: Split, folder: Path, skip_bad: bool, rows_per_file: int, log: TextIO | None
) -> tuple[int, int, list[dict[str, str]]]:
    """Stream one split into ``folder``; return (rows, files, skipped). Row names are relative to ``base``."""
    folder.mkdir()
    skipped: list[dict[str, str]] = []
    progress = _Progress(f"{dataset}/{split.name}", split.expected, log)
    with ShardWriter(folder, rows_per_file) as writer:
        seen = 0
        for ref, load, label in split.rows():
            try:
                image = load()
            except BadImage as err:
                if not skip_bad:
                    raise PrepareError(f"{base / ref}: {err}; pass --skip-bad to skip unreadable images") from None
                skipped.append({"split": split.name, "file": ref, "error": str(err)})
            else:
                writer.add(image, label)
            seen += 1
            progress.tick(seen)
        rows = writer.close()
    progress.done(rows, len(skipped))
    if rows == 0:
        raise PrepareError(f"{dataset} split {split.name!r}: no image could be converted ({len(skipped)} skipped)")
    return rows, len(writer.files), skipped


def _check_out(out: Path, source: Path | None) -> None:
    """``out`` may be written: not the source or inside it, and new, empty or an earlier prepare output."""
    if source is not None:
        if out == source or out in source.parents:
            raise PrepareError(f"--out {out} would replace the source folder {source}; choose another --out")
        if source in out.parents:
            raise PrepareError(f"--out {out} is inside the source folder {source}; choose a folder outside it")
    if out.is_dir() and not out.is_symlink() and read_marker(out) is None and _legacy_output(out):
        write_marker(out, new_marker("prepare"))  # an output of an earlier ega-ray, which wrote no marker
    check_target(out, "prepare", "--out")


def _legacy_output(out: Path) -> bool:
    """Whether ``out`` holds what ``ega-ray prepare`` wrote before it marked its folders: prepare.json naming
    a dataset, and only split folders of Parquet parts beside it."""
    try:
        report = json.loads((out / "prepare.json").read_text())
    except (OSError, ValueError):
        return False
    splits = set(report.get("splits") or {}) if isinstance(report, dict) else set()
    others = [p for p in out.iterdir() if p.name != "prepare.json"]
    return bool(splits) and all(_is_dir(p) and p.name in splits for p in others)


def _download(name: str, root: Path) -> Path:
    if name == "tinyimagenet":
        raise PrepareError(
            f"tinyimagenet cannot be downloaded through torchvision; get {TINY_IMAGENET_URL}, unzip it and pass "
            "--src .../tiny-imagenet-200"
        )
    if name not in DOWNLOADABLE:
        raise PrepareError(f"--download is only for {' and '.join(DOWNLOADABLE)}, not {name}")
    from urllib.error import URLError

    from torchvision import datasets

    root.mkdir(parents=True, exist_ok=True)
    try:
        if name == "cifar100":
            datasets.CIFAR100(str(root), train=True, download=True)
            return root / datasets.CIFAR100.base_folder
        datasets.STL10(str(root), split="train", download=True)  # the archive holds every split
        return root / datasets.STL10.base_folder
    except (URLError, OSError, RuntimeError) as err:
        reason = getattr(err, "reason", None) or err
        raise PrepareError(f"--download {name} into {root} failed: {reason}") from None


def prepare(
    name: str,
    src: str | Path | None,
    out: str | Path,
    *,
    skip_bad: bool = False,
    download: bool = False,
    rows_per_file: int = 10_000,
    max_pixels: int = MAX_PIXELS,
    log: TextIO | str | None = STDERR,
) -> dict[str, Any]:
    """Convert dataset ``name`` from ``src`` into ``out/<split>/part-NNNNN.parquet`` plus ``out/prepare.json``,
    atomically; return the report (the content of prepare.json). ``log``: where progress lines go (default:
    the current stderr; None: nowhere). ``max_pixels``: larger image files are refused (or skipped with
    ``skip_bad``). Raises PrepareError (or OutputFolderError for an ``out`` it may not write)."""
    stream = sys.stderr if log == STDERR else log
    assert stream is None or not isinstance(stream, str), f"log must be a stream, None or {STDERR!r}"
    if name not in DATASETS:
        raise PrepareError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if rows_per_file < 1:
        raise PrepareError(f"--rows-per-file must be >= 1, got {rows_per_file}")
    if max_pixels < 1:
        raise PrepareError(f"--max-pixels must be >= 1, got {max_pixels}")
    out = Path(out).expanduser().resolve()
    source: Source | None = None
    if name == "digits":
        if src is not None or download:
            raise PrepareError("digits is bundled with scikit-learn: it takes no --src and no --download")
        source_name = "sklearn.datasets.load_digits"
    else:
        if src is None:
            raise PrepareError(f"{name} needs --src (the folder of the official files)")
        src_path = Path(src).expanduser().resolve()
        if download:
            src_path = _download(name, src_path)
        elif not src_path.exists():
            raise PrepareError(f"--src {src_path}: not found")
        source = OPENERS[name](src_path, max_pixels)  # checks the layout before anything is written
        source_name = str(source.path)
    _check_out(out, source.path if source else None)
    for note in source.notes if source else []:
        if stream is not None:
            print(f"prepare {name}: note: {note}", file=stream)

    report: dict[str, Any] = {"dataset": name, "source": source_name, "classes": None, "splits": {}, "skipped": []}
    with rebuild(out, "prepare", flag="--out") as tmp:
        if source is None:
            from ega_ray.data.digits import prepare_digits
            from ega_ray.data.parquet import read_columns

            report["classes"] = [str(i) for i in range(10)]
            for split, path in prepare_digits(tmp).items():
                files = sorted(path.glob("*.parquet"))
                report["splits"][split] = {"rows": read_columns(str(path), ["index"]).num_rows, "files": len(files)}
        else:
            report["classes"] = source.classes
            for split in source.splits:
                rows, files, skipped = _write_split(
                    name, source.path, split, tmp / split.name, skip_bad, rows_per_file, stream
                )
                report["splits"][split.name] = {"rows": rows, "files": files, "skipped": len(skipped)}
                report["skipped"] += skipped
            report["ignored"] = source.ignored
            report["links_not_followed"] = source.links
        report["notes"] = source.notes if source else []
        (tmp / "prepare.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    report["out"] = str(out)
    return report


# ---------------------------------------------------------------- command line


def add_prepare_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prepare NAME --src DIR --out DIR [--skip-bad] [--download]`` to ``ega-ray``'s subcommands."""
    r = subparsers.add_parser(
        "prepare",
        help="convert a dataset into ega-ray's Parquet format",
        description="Convert a dataset's official files into OUT/<split>/part-NNNNN.parquet (columns image, label, "
        "index) and OUT/prepare.json, atomically. See docs/data.md.",
    )
    r.add_argument("name", choices=DATASETS, help="the source format")
    r.add_argument(
        "--src",
        help="the official folder (cifar-100-python/, stl10_binary/, tiny-imagenet-200/) or the image folder; "
        "with --download, where to download to. Not used by digits",
    )
    r.add_argument("--out", required=True, help="output folder; receives one folder per split and prepare.json")
    r.add_argument("--skip-bad", action="store_true", help="skip (and report) image files that cannot be decoded")
    r.add_argument("--download", action="store_true", help="cifar100, stl10: download into --src with torchvision")
    r.add_argument("--rows-per-file", type=int, default=10_000, help="rows per Parquet file (default 10000)")
    r.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"refuse image files with more pixels (default {MAX_PIXELS:,}; --skip-bad skips them)",
    )


def format_report(report: dict[str, Any], first: int = 5) -> str:
    lines = [f"{report['dataset']} → {report['out']}"]
    lines += [f"{split}: {info['rows']} rows" for split, info in report["splits"].items()]
    for key, what in (
        ("skipped", "unreadable image files skipped"),
        ("ignored", "non-image files ignored"),
        ("links_not_followed", "symbolic links not followed"),
    ):
        items = report.get(key) or []
        if key == "skipped":
            names = [f"{s['split']}: {s['file']} ({s['error']})" for s in items]
        else:
            names = list(items)
        if names or key == "skipped":
            more = f", … (+{len(names) - first}, see prepare.json)" if len(names) > first else ""
            lines.append(f"{what}: {len(names)}" + (f": {'; '.join(names[:first])}{more}" if names else ""))
    return "\n".join(lines)


def run_prepare(args: argparse.Namespace) -> int:
    """The ``prepare`` subcommand: 0 on success; 2 with one line on stderr on any error."""
    try:
        report = prepare(
            args.name,
            args.src,
            args.out,
            skip_bad=args.skip_bad,
            download=args.download,
            rows_per_file=getattr(args, "rows_per_file", 10_000),
            max_pixels=getattr(args, "max_pixels", MAX_PIXELS),
        )
    except (UsageError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"ega-ray prepare: error: {message}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0
