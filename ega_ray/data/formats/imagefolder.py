"""Any class-per-folder image tree, as torchvision's ``ImageFolder``: ``SRC/<class>/…`` (one split,
``train``), or ``SRC/{train,val,test}/<class>/…``. Labels are the sorted class folder names; images are
searched recursively and ordered by their path. PNG and JPEG files are stored as their original bytes, any
other format PIL reads as a lossless PNG."""

from __future__ import annotations

from pathlib import Path

from ega_ray.data.formats.base import (
    FORMATS,
    PrepareError,
    Source,
    Split,
    entries,
    file_rows,
    image_extensions,
    is_real_dir,
    link_problem,
    list_files,
    relative,
)

SPLIT_FOLDERS = ("train", "val", "test")


@FORMATS.register("imagefolder")
def open_imagefolder(src: Path | None, max_pixels: int) -> Source:
    assert src is not None
    if not is_real_dir(src):
        raise PrepareError(f"{src}: not a folder; imagefolder expects one subfolder of images per class")
    top = entries(src)
    links = sorted(problem for p in top if (problem := link_problem(p, src)) is not None)
    subdirs = sorted(p for p in top if is_real_dir(p) and not p.name.startswith("."))
    split_dirs = [
        src / s for s in SPLIT_FOLDERS if is_real_dir(src / s) and any(is_real_dir(p) for p in entries(src / s))
    ]
    ignored = [p for p in top if (p.is_file() and not p.is_symlink()) or p.name.startswith(".")]
    if split_dirs:
        others = [p.name for p in subdirs if p.name not in SPLIT_FOLDERS]
        if others:
            raise PrepareError(
                f"{src}: has split folders ({', '.join(p.name for p in split_dirs)}) and also other folders "
                f"{others[:5]}; put the class folders inside the split folders"
            )
        for s in SPLIT_FOLDERS:
            if is_real_dir(src / s) and src / s not in split_dirs:
                raise PrepareError(f"{src / s}: a split folder without class folders; imagefolder needs one per class")
        roots = {p.name: p for p in split_dirs}
    else:
        roots = {"train": src}
    class_dirs = {
        split: sorted(p for p in entries(root) if is_real_dir(p) and not p.name.startswith("."))
        for split, root in roots.items()
    }
    classes = sorted({p.name for dirs in class_dirs.values() for p in dirs})
    if not classes:
        raise PrepareError(f"{src}: no class folders; imagefolder expects one subfolder of images per class")
    label_of = {c: i for i, c in enumerate(classes)}
    exts = image_extensions()
    splits = []
    for split, root in roots.items():
        if root != src:
            listing = entries(root)
            ignored += [p for p in listing if (p.is_file() and not p.is_symlink()) or p.name.startswith(".")]
            links += [f"{split}/{problem}" for p in listing if (problem := link_problem(p, src)) is not None]
        files: list[tuple[Path, int]] = []
        for class_dir in class_dirs[split]:
            images, other, bad_links = list_files(class_dir, True, exts, src)
            files += [(p, label_of[class_dir.name]) for p in images]
            ignored += other
            links += bad_links
        if not files:
            raise PrepareError(f"{root}: no image files in its class folders")
        splits.append(Split(split, file_rows(files, src, max_pixels), len(files)))
    return Source(src, classes, splits, sorted(relative(p, src) for p in ignored), links=sorted(links))
