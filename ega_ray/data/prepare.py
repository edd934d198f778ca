"""``ega-ray prepare``: the writer that turns a dataset format (``ega_ray.data.formats``: CIFAR-100, STL-10,
Tiny ImageNet, any class-per-folder image tree, the bundled digits) into ega-ray's Parquet format (see
``ega_ray.data.parquet`` and docs/data.md). The command line's arguments are parsed in ``ega_ray.cli``.

Every conversion streams: images are read, checked and encoded one at a time and written in shards of at
most ``rows_per_file`` rows. The whole output goes to a temporary sibling folder ``.OUT.tmp-<random>``,
finished with ``prepare.json``, and is renamed to ``OUT`` only at the end (``run_folder.rebuild``), so an
interrupted or failed conversion never leaves a complete-looking ``OUT`` (and an older ``OUT`` stays as it
was). ``OUT`` must be new, empty, or an earlier ``ega-ray prepare`` output (see ``ega_ray.run_folder``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ega_ray.constants import MAX_PIXELS
from ega_ray.data.classes import fewer_than_two, too_few_names
from ega_ray.data.formats import FORMATS, BadImage, Format, PrepareError, Source, Split
from ega_ray.data.formats.base import is_real_dir
from ega_ray.data.parquet import ShardWriter, read_columns
from ega_ray.disk import check_name_length, disk_full, write_atomic
from ega_ray.errors import UsageError
from ega_ray.run_folder import check_target, new_marker, read_marker, rebuild, write_marker

PROGRESS_ROWS = 10_000
PROGRESS_SECONDS = 5.0
STDERR = "stderr"  # prepare()'s default log: sys.stderr as it is at call time


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
    dataset: str, base: Path | None, split: Split, folder: Path, skip_bad: bool, rows_per_file: int, log: TextIO | None
) -> tuple[int, int, str, list[dict[str, str]]]:
    """Stream one split into ``folder``; return (rows, files, content digest, skipped). Row names are relative
    to ``base`` (None: the source has no folder)."""
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
                    where = base / ref if base is not None else ref
                    raise PrepareError(f"{where}: {err}; pass --skip-bad to skip unreadable images") from None
                skipped.append({"split": split.name, "file": ref, "error": str(err)})
            else:
                writer.add(image, label)
            seen += 1
            progress.tick(seen)
        rows = writer.close()
    progress.done(rows, len(skipped))
    if rows == 0:
        raise PrepareError(f"{dataset} split {split.name!r}: no image could be converted ({len(skipped)} skipped)")
    return rows, len(writer.files), writer.digest(), skipped


def _check_out(out: Path, source: Path | None) -> None:
    """``out`` may be written: not the source or inside it, and new, empty or an earlier prepare output."""
    if source is not None:
        if out == source or out in source.parents:
            raise PrepareError(f"--out {out} would replace the source folder {source}; choose another --out")
        if source in out.parents:
            raise PrepareError(f"--out {out} is inside the source folder {source}; choose a folder outside it")
    check_name_length(out, "--out", PrepareError)
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
    return bool(splits) and all(is_real_dir(p) and p.name in splits for p in others)


def _check_classes(name: str, source: Source, written: Path | None = None) -> None:
    """A PrepareError unless the dataset has two classes or more: as its format lists them (before anything
    is read), then (``written``: the folder of the converted splits) among the labels actually written, which
    an empty class folder or skipped images can leave at one."""
    where = f"{name} from {source.described}"
    problem = too_few_names(source.classes, where)
    if written is not None and problem is None:
        labels = [read_columns(str(written / s.name), ["label"])["label"].to_numpy() for s in source.splits]
        problem = fewer_than_two(np.concatenate(labels), f"{where} (as converted)")
    if problem:
        raise PrepareError(problem)


def _download(fmt: Format, root: Path) -> Path:
    """Fetch format ``fmt``'s official files into ``root`` (created); return the official folder."""
    if fmt.download is None:
        downloadable = " and ".join(FORMATS.downloadable())
        raise PrepareError(fmt.no_download or f"--download is only for {downloadable}, not {fmt.name}")
    from urllib.error import URLError

    root.mkdir(parents=True, exist_ok=True)
    try:
        return fmt.download(root)
    except (URLError, OSError, RuntimeError) as err:
        reason = getattr(err, "reason", None) or err
        raise PrepareError(f"--download {fmt.name} into {root} failed: {reason}") from None


def _open(fmt: Format, src: str | Path | None, download: bool, max_pixels: int) -> Source:
    """Format ``fmt`` opened on ``src`` (after ``--download`` into it): its layout checked, nothing written."""
    if not fmt.takes_src:
        if src is not None or download:
            raise PrepareError(f"{fmt.name} is bundled with {fmt.bundled_with}: it takes no --src and no --download")
        return fmt.open(None, max_pixels)
    if src is None:
        raise PrepareError(f"{fmt.name} needs --src (the folder of the official files)")
    src_path = Path(src).expanduser().resolve()
    if download:
        src_path = _download(fmt, src_path)
    elif not src_path.exists():
        raise PrepareError(f"--src {src_path}: not found")
    return fmt.open(src_path, max_pixels)


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
    """Convert dataset ``name`` (a format in ``FORMATS``) from ``src`` into ``out/<split>/part-NNNNN.parquet``
    plus ``out/prepare.json``, atomically; return the report (the content of prepare.json). ``log``: where
    progress lines go (default: the current stderr; None: nowhere). ``max_pixels``: larger image files are
    refused (or skipped with ``skip_bad``). Raises PrepareError (or OutputFolderError for an ``out`` it may not
    write)."""
    stream = sys.stderr if log == STDERR else log
    assert stream is None or not isinstance(stream, str), f"log must be a stream, None or {STDERR!r}"
    if name not in FORMATS:
        raise PrepareError(f"unknown dataset {name!r}; allowed: {', '.join(FORMATS.names())}")
    if rows_per_file < 1:
        raise PrepareError(f"--rows-per-file must be >= 1, got {rows_per_file}")
    if max_pixels < 1:
        raise PrepareError(f"--max-pixels must be >= 1, got {max_pixels}")
    out = Path(out).expanduser().resolve()
    source = _open(FORMATS[name], src, download, max_pixels)
    _check_out(out, source.path)
    _check_classes(name, source)
    for note in source.notes:
        if stream is not None:
            print(f"prepare {name}: note: {note}", file=stream)

    report: dict[str, Any] = {
        "dataset": name,
        "source": source.described,
        "classes": source.classes,
        "splits": {},
        "skipped": [],
    }
    with rebuild(out, "prepare", flag="--out") as tmp:
        for split in source.splits:
            rows, files, digest, skipped = _write_split(
                name, source.path, split, tmp / split.name, skip_bad, rows_per_file, stream
            )
            # the digest identifies the split's content: a run folder records it (ega_ray.data.split_files)
            report["splits"][split.name] = {"rows": rows, "files": files, "digest": digest, "skipped": len(skipped)}
            report["skipped"] += skipped
        _check_classes(name, source, tmp)
        report["ignored"] = source.ignored
        report["links_not_followed"] = source.links
        report["notes"] = source.notes
        write_atomic(tmp / "prepare.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    report["out"] = str(out)
    return report


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
        full = disk_full(err, fallback=Path(args.out).expanduser().absolute())  # the folder and the free space
        message = " ".join(str(full or err).split())
        print(f"ega-ray prepare: error: {message}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0
