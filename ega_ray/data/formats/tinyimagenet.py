"""Tiny ImageNet: the unpacked ``tiny-imagenet-200/`` with ``wnids.txt`` (the label of a class is its line),
``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` and ``val/val_annotations.txt``. Images are stored as
their original JPEG bytes after a full decode; ``test/`` has no labels and is not converted. torchvision has
no downloader for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ega_ray.data.formats.base import (
    FORMATS,
    BadImage,
    PrepareError,
    Row,
    Source,
    Split,
    entries,
    file_rows,
    image_extensions,
    link_problem,
    list_files,
    need,
    official_folder,
    real_dir,
    relative,
)

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
NO_DOWNLOAD = (
    f"tinyimagenet cannot be downloaded through torchvision; get {TINY_IMAGENET_URL}, unzip it and pass "
    "--src .../tiny-imagenet-200"
)


@FORMATS.register("tinyimagenet", no_download=NO_DOWNLOAD)
def open_tinyimagenet(src: Path | None, max_pixels: int) -> Source:
    assert src is not None
    src = official_folder(src, "tiny-imagenet-200", "wnids.txt")
    expects = (
        "tinyimagenet expects --src to be the unpacked tiny-imagenet-200/ folder with wnids.txt, "
        "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
    )
    wnids_file = need(src / "wnids.txt", expects)
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise PrepareError(
            f"{wnids_file}: expected one distinct wnid a line, found {len(wnids)} ({len(set(wnids))} distinct)"
        )
    label_of = {w: i for i, w in enumerate(wnids)}
    exts = image_extensions()
    ignored: list[Path] = []
    links: list[str] = []

    train_dir = need(src / "train", expects)
    listing = entries(train_dir)
    extra = sorted(p.name for p in listing if p.is_dir() and p.name not in label_of and p.name[0] != ".")
    if extra:
        raise PrepareError(f"{train_dir}: folder(s) {extra[:5]} are not listed in {wnids_file.name}")
    ignored += [p for p in listing if p.is_file() or p.name.startswith(".")]
    train: list[tuple[Path, int]] = []
    for wnid in wnids:
        images, other, bad_links = list_files(real_dir(train_dir / wnid / "images", expects), False, exts, src)
        train += [(p, label_of[wnid]) for p in images]
        ignored += other
        links += bad_links

    val_images_dir = real_dir(src / "val" / "images", expects)
    ann_file = need(src / "val" / "val_annotations.txt", expects)
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
        path = need(val_images_dir / name, f"it is listed in {ann_file}")
        problem = link_problem(path, src)
        if problem is not None:
            raise PrepareError(f"{ann_file}:{lineno}: {val_images_dir}/{problem}")
        val.append((path, label_of[fields[1].strip()]))
    images, other, bad_links = list_files(val_images_dir, False, exts, src)
    ignored += other
    links += bad_links
    unannotated = [p for p in images if p.name not in seen]

    def val_rows() -> Iterator[Row]:
        yield from file_rows(val, src, max_pixels)()
        for path in unannotated:  # not dropped silently: an error, or skipped and reported with --skip-bad

            def no_label(p: Path = path) -> bytes:
                raise BadImage(f"has no line in {ann_file.name}")

            yield relative(path, src), no_label, -1

    notes = []
    if (src / "test").exists():
        notes.append(f"{src / 'test'}: Tiny ImageNet's test images have no labels and are not converted")
    return Source(
        src,
        wnids,
        [
            Split("train", file_rows(train, src, max_pixels), len(train)),
            Split("val", val_rows, len(val) + len(unannotated)),
        ],
        [relative(p, src) for p in ignored],
        notes,
        links,
    )
