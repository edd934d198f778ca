"""What every dataset format of ``ega-ray prepare`` shares: the registry ``FORMATS``, the ``Source`` an opener
returns (its splits as streams of rows), the errors, and the checked reading of files and folders.

What is read: symbolic links to folders are never followed; a link to a file is read only when its target
lies inside ``--src``; both are listed in the report otherwise. An unreadable folder or a file name that is
not valid UTF-8 stops the conversion naming it. Images over ``max_pixels`` are refused like unreadable ones
(``--skip-bad`` skips them); 16-bit images are scaled to 8 bits.

Imports neither torch nor Ray (a format imports torchvision only inside its download)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ega_ray.data.images import MAX_PIXELS, encode_png, open_image, to_rgb8
from ega_ray.errors import UsageError

KEEP_FORMATS = frozenset({"PNG", "JPEG"})  # stored as the original file bytes; anything else → PNG
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # re-encoded as 8-bit PNG (scaled)


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
    expected: int  # rows the source announces (skipped files included), for the progress lines; 0 = unknown


@dataclass
class Source:
    path: Path | None  # the official folder actually read; None for data bundled with a library
    classes: list[str] | None
    splits: list[Split]
    ignored: list[str] = field(default_factory=list)  # files that are not images, not converted
    notes: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # symbolic links not followed, with why
    origin: str | None = None  # what prepare.json names as the source when there is no path

    @property
    def described(self) -> str:
        """The source as prepare.json names it."""
        return self.origin or str(self.path)


# ---------------------------------------------------------------- the registry

# (--src resolved, or None for a bundled format; max_pixels) → the Source, its layout checked, no image read yet
Opener = Callable[[Path | None, int], Source]


@dataclass(frozen=True)
class Format:
    """One dataset format: how to open it, and what the command line must know of it."""

    name: str
    open: Opener
    bundled_with: str | None = None  # the library that ships the data; such a format takes no --src
    download: Callable[[Path], Path] | None = None  # fetch the official files into a folder; the official folder
    no_download: str | None = None  # why --download does not apply, when the format has a reason of its own

    @property
    def takes_src(self) -> bool:
        return self.bundled_with is None


class FormatRegistry:
    """Format name → its ``Format`` (opener and attributes), filled by ``@FORMATS.register`` in each format's
    file. The formats are light (no torch), so they register as they are imported, timm-style, unlike the
    model and loss registries, whose tables name modules imported only when used."""

    def __init__(self) -> None:
        self._formats: dict[str, Format] = {}

    def register(
        self,
        name: str,
        *,
        bundled_with: str | None = None,
        download: Callable[[Path], Path] | None = None,
        no_download: str | None = None,
    ) -> Callable[[Opener], Opener]:
        """Decorate the opener of format ``name`` (see ``Format`` for the keywords)."""

        def deco(opener: Opener) -> Opener:
            if name in self._formats:
                raise ValueError(f"dataset format {name!r} is registered twice")
            self._formats[name] = Format(name, opener, bundled_with, download, no_download)
            return opener

        return deco

    def names(self) -> list[str]:
        return sorted(self._formats)

    def __contains__(self, name: str) -> bool:
        return name in self._formats

    def check(self, name: str) -> str:
        if name not in self._formats:
            raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(self.names())}")
        return name

    def __getitem__(self, name: str) -> Format:
        return self._formats[self.check(name)]

    def downloadable(self) -> list[str]:
        """The formats ``--download`` can fetch."""
        return [n for n in self.names() if self._formats[n].download is not None]

    def bundled(self) -> list[str]:
        """The formats that take no ``--src``."""
        return [n for n in self.names() if not self._formats[n].takes_src]


FORMATS = FormatRegistry()


# ---------------------------------------------------------------- reading files and folders


def image_extensions() -> frozenset[str]:
    """The file extensions PIL opens (``.png``, ``.jpg``, ``.bmp``, …), lower-case."""
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


def entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` (names checked), or a PrepareError naming a folder that cannot be read."""
    try:
        return [check_name(p) for p in folder.iterdir()]
    except OSError as err:
        raise PrepareError(f"{folder}: cannot be read ({err.strerror or err})") from None


def is_real_dir(p: Path) -> bool:
    """A real folder; a symbolic link to one is never followed."""
    return p.is_dir() and not p.is_symlink()


def link_problem(path: Path, src: Path) -> str | None:
    """Why a symbolic link is not followed (None for a link to a file inside ``src``, which is read)."""
    if is_real_dir(path) or not path.is_symlink():
        return None
    target = path.resolve()
    if path.is_dir():
        return f"{path.name}: a link to a folder, not followed"
    if not target.is_file():
        return f"{path.name}: a broken link"
    if src != target and src not in target.parents:
        return f"{path.name}: a link to {target}, outside --src"
    return None


def list_files(
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
        for entry in entries(current):
            hidden = entry.name.startswith(".")
            problem = link_problem(entry, src)
            if problem is not None:
                links.append(f"{relative(entry.parent, src)}/{problem}")
            elif is_real_dir(entry):
                if hidden or not recursive:
                    other.append(entry)  # reported, not searched
                else:
                    pending.append(entry)
            elif entry.is_file():
                (other if hidden or entry.suffix.lower() not in exts else images).append(entry)

    def key(p: Path) -> str:
        return p.relative_to(folder).as_posix()

    return sorted(images, key=key), sorted(other, key=key), sorted(links)


def relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (POSIX), or whole when it is not inside it."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def need(path: Path, what: str) -> Path:
    """``path`` if it exists; else a PrepareError saying ``what`` the format expects."""
    if not path.exists():
        raise PrepareError(f"{path}: not found; {what}")
    return path


def real_dir(path: Path, expects: str) -> Path:
    """``path``, a folder that exists and is not a symbolic link (links to folders are never followed)."""
    if path.is_symlink():
        raise PrepareError(f"{path}: a symbolic link; ega-ray prepare does not follow links to folders")
    return need(path, expects)


def official_folder(src: Path, folder: str, marker: str) -> Path:
    """``src`` itself, or ``src/<folder>`` when ``src`` is the folder above the official one (as after
    ``--download``)."""
    if not (src / marker).exists() and (src / folder / marker).exists():
        return src / folder
    return src


# ---------------------------------------------------------------- rows


def file_rows(files: list[tuple[Path, int]], base: Path, max_pixels: int) -> Callable[[], Iterator[Row]]:
    """Rows from (image file, label) pairs, named relative to ``base``, each checked by ``load_image_file``."""

    def rows() -> Iterator[Row]:
        for path, label in files:
            yield relative(path, base), (lambda p=path: load_image_file(p, max_pixels)), label

    return rows


def array_rows(chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]], ref: str) -> Callable[[], Iterator[Row]]:
    """Rows from chunks of (uint8 (n, H, W, 3) images, labels), PNG-encoded losslessly, named ``ref[i]``."""

    def rows() -> Iterator[Row]:
        i = 0
        for images, labels in chunks():
            for image, label in zip(images, labels, strict=True):
                yield f"{ref}[{i}]", (lambda im=image: encode_png(im)), int(label)
                i += 1

    return rows
