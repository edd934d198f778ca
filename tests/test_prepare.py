"""``ega-ray prepare``: each official format, written tiny under tmp_path, converted and read back."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from unprivileged import as_nobody, shared_folder

from ega_ray.cli import _parser
from ega_ray.data import prepare as prepare_module
from ega_ray.data.digits import builtin_split
from ega_ray.data.formats import FORMATS, PrepareError
from ega_ray.data.images import decode_images
from ega_ray.data.parquet import check_split
from ega_ray.data.prepare import prepare, run_prepare
from ega_ray.errors import OutputFolderError

RNG = np.random.default_rng(0)


def rand_images(n: int, h: int, w: int | None = None) -> np.ndarray:
    return RNG.integers(0, 256, (n, h, w or h, 3), dtype=np.uint8)


def read(split: Path) -> dict[str, list]:
    return pq.read_table(split).to_pydict()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_clean(parent: Path, *expected: str) -> None:
    """Only the expected entries: no OUT.tmp-* or .OUT.old-* left behind."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(expected)


# ---------------------------------------------------------------- writers of the official formats


def write_cifar100(root: Path, n_train: int = 5, n_test: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    root.mkdir(parents=True)
    names = [f"class_{i}" for i in range(100)]
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []}, f, protocol=2)
    source = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rand_images(n, 32)
        labels = [int(x) for x in RNG.integers(0, 100, n)]
        data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # channel-major R, G, B planes
        with open(root / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"filenames": [b"x.png"] * n}, f, protocol=2)
        source[split] = (images, labels)
    return source


def write_stl10(root: Path, unlabeled: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root.mkdir(parents=True)
    source = {}
    for split, n in (("train", 3), ("test", 2)) + ((("unlabeled", 2),) if unlabeled else ()):
        images = rand_images(n, 96)
        (root / f"{split}_X.bin").write_bytes(images.transpose(0, 3, 2, 1).tobytes())  # column-major per image
        labels = RNG.integers(1, 11, n).astype(np.uint8)
        if split != "unlabeled":
            (root / f"{split}_y.bin").write_bytes(labels.tobytes())
        source[split] = (images, labels)
    (root / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    return source


def write_jpeg(path: Path, size: int = 16, mode: str = "RGB") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rand_images(1, size)[0]).convert(mode).save(path, format="JPEG")
    return path.read_bytes()


def write_png(path: Path, image: np.ndarray | None = None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rand_images(1, 8)[0] if image is None else image).save(path, format="PNG")
    return path.read_bytes()


def write_tinyimagenet(root: Path) -> dict[str, list[tuple[bytes, int]]]:
    wnids = ["n09999999", "n01000000"]  # not sorted: labels follow the file's order
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    train = []
    for label, wnid in enumerate(wnids):
        for i in range(2):
            train.append((write_jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"), label))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    val = []
    lines = []
    for i, label in enumerate([1, 0, 1]):
        val.append((write_jpeg(root / "val" / "images" / f"val_{i}.JPEG", mode="L" if i == 2 else "RGB"), label))
        lines.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t15\t15")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_jpeg(root / "test" / "images" / "test_0.JPEG")
    return {"train": train, "val": val}


# ---------------------------------------------------------------- per format


def test_cifar100_is_pixel_exact_and_sharded(tmp_path):
    source = write_cifar100(tmp_path / "cifar-100-python")
    out = tmp_path / "out"
    report = prepare("cifar100", tmp_path / "cifar-100-python", out, rows_per_file=2, log=None)
    assert report["splits"] == {
        "train": {"rows": 5, "files": 3, "skipped": 0},
        "test": {"rows": 3, "files": 2, "skipped": 0},
    }
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    for split, (images, labels) in source.items():
        table = read(out / split)
        assert table["index"] == list(range(len(images)))
        assert table["label"] == labels
        for png, image in zip(table["image"], images, strict=True):
            assert png.startswith(b"\x89PNG") and np.array_equal(pixels(png), image)
        assert check_split(str(out / split), f"data.{split}") == len(images)
        batch = decode_images({"image": np.array(table["image"], dtype=object)}, image_size=32)
        assert np.array_equal(batch["image"], images)
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["dataset"] == "cifar100" and meta["source"] == str(tmp_path / "cifar-100-python")
    assert meta["classes"][:2] == ["class_0", "class_1"] and len(meta["classes"]) == 100
    assert meta["splits"]["train"]["rows"] == 5 and meta["skipped"] == []
    assert_clean(tmp_path, "cifar-100-python", "out")
    # the folder above the official one works too (the --download layout)
    assert prepare("cifar100", tmp_path, tmp_path / "out2", log=None)["splits"]["test"]["rows"] == 3


def test_cifar100_malformed_pickles_stop_with_the_file_name(tmp_path):
    src = tmp_path / "cifar-100-python"
    write_cifar100(src)
    good = (src / "test").read_bytes()
    (src / "test").write_bytes(good[: len(good) // 2])
    with pytest.raises(PrepareError, match=r"cifar-100-python/test: cannot be unpickled"):
        prepare("cifar100", src, tmp_path / "out", log=None)
    assert_clean(tmp_path, "cifar-100-python")
    with open(src / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [1, 2]}, f, protocol=2)
    with pytest.raises(PrepareError, match=r"test: 3 images but 2 fine labels"):
        prepare("cifar100", src, tmp_path / "out", log=None)
    with open(src / "test", "wb") as f:  # a crafted pickle that would run a command when loaded
        f.write(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    with pytest.raises(PrepareError, match=r"test: cannot be unpickled .*refusing os.system"):
        prepare("cifar100", src, tmp_path / "out", log=None)
    assert not (tmp_path / "pwned").exists()
    (src / "meta").unlink()
    with pytest.raises(PrepareError, match=r"meta: not found; cifar100 expects .*cifar-100-python"):
        prepare("cifar100", src, tmp_path / "out", log=None)
    assert_clean(tmp_path, "cifar-100-python")


def test_stl10_is_pixel_exact_with_shifted_labels_and_unlabeled(tmp_path, monkeypatch):
    source = write_stl10(tmp_path / "stl10_binary")
    out = tmp_path / "out"
    monkeypatch.setattr(prepare_module, "PROGRESS_ROWS", 2)
    log = io.StringIO()
    report = prepare("stl10", tmp_path / "stl10_binary", out, log=log)
    assert (
        "prepare stl10/train: 2/3 images, " in log.getvalue() and "prepare stl10/unlabeled: 2 rows in" in log.getvalue()
    )
    assert {s: i["rows"] for s, i in report["splits"].items()} == {"train": 3, "test": 2, "unlabeled": 2}
    for split, (images, labels) in source.items():
        table = read(out / split)
        assert table["index"] == list(range(len(images)))
        want = [-1] * len(images) if split == "unlabeled" else [int(x) - 1 for x in labels]
        assert table["label"] == want
        assert all(np.array_equal(pixels(png), im) for png, im in zip(table["image"], images, strict=True))
        assert check_split(str(out / split), split) == len(images)
    assert json.loads((out / "prepare.json").read_text())["classes"] == [f"c{i}" for i in range(10)]


def test_stl10_truncated_or_mismatched_bins_stop_with_the_file_name(tmp_path):
    src = tmp_path / "stl10_binary"
    write_stl10(src, unlabeled=True)
    data = (src / "unlabeled_X.bin").read_bytes()
    (src / "unlabeled_X.bin").write_bytes(data[:-100])
    with pytest.raises(PrepareError, match=r"unlabeled_X\.bin: \d+ bytes is not a positive multiple of 3·96·96"):
        prepare("stl10", src, tmp_path / "out", log=None)
    (src / "unlabeled_X.bin").unlink()
    (src / "train_y.bin").write_bytes(b"\x01\x02")
    with pytest.raises(PrepareError, match=r"train_y\.bin: 2 labels but train_X\.bin holds 3 images"):
        prepare("stl10", src, tmp_path / "out", log=None)
    (src / "train_y.bin").unlink()
    with pytest.raises(PrepareError, match=r"train_y\.bin: not found; stl10 expects"):
        prepare("stl10", src, tmp_path / "out", log=None)
    assert_clean(tmp_path, "stl10_binary")


def test_tinyimagenet_keeps_original_jpeg_bytes_and_wnid_order(tmp_path):
    src = tmp_path / "tiny-imagenet-200"
    source = write_tinyimagenet(src)
    out = tmp_path / "out"
    report = prepare("tinyimagenet", src, out, log=None)
    assert report["classes"] == ["n09999999", "n01000000"]
    assert "not converted" in report["notes"][0]  # test/ has no labels
    for split, rows in source.items():
        table = read(out / split)
        assert table["image"] == [data for data, _ in rows]  # byte for byte, no re-encode
        assert table["label"] == [label for _, label in rows]
        assert table["index"] == list(range(len(rows)))
        assert decode_images({"image": np.array(table["image"], dtype=object)}, 16)["image"].shape == (
            len(rows),
            16,
            16,
            3,
        )
    # an image without an annotation is not dropped silently
    write_jpeg(src / "val" / "images" / "val_9.JPEG")
    with pytest.raises(PrepareError, match=r"val/images/val_9\.JPEG: has no line in val_annotations\.txt"):
        prepare("tinyimagenet", src, out, log=None)
    assert read(out / "val")["label"] == [1, 0, 1], "the older complete OUT is untouched"
    with pytest.raises(PrepareError, match=r"tinyimagenet cannot be downloaded through torchvision.*tiny-imagenet-200"):
        prepare("tinyimagenet", tmp_path / "dl", out, download=True, log=None)


# ---------------------------------------------------------------- image folders, bad files, atomicity


def test_imagefolder_single_split_keeps_png_and_converts_bmp(tmp_path):
    src = tmp_path / "src"
    png = write_png(src / "b_cls" / "x.png")
    bmp_image = rand_images(1, 8)[0]
    (src / "a_cls").mkdir()
    Image.fromarray(bmp_image).save(src / "a_cls" / "z.bmp")
    gray = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(gray).save(src / "a_cls" / "g.bmp")
    jpg = write_jpeg(src / "a_cls" / "nested" / "y.jpg")
    (src / "a_cls" / "notes.txt").write_text("not an image")
    (src / "b_cls" / ".DS_Store").write_bytes(b"\0")
    write_png(src / "b_cls" / ".ipynb_checkpoints" / "x.png")
    report = prepare("imagefolder", src, tmp_path / "out", log=None)
    assert report["classes"] == ["a_cls", "b_cls"]
    assert report["ignored"] == ["a_cls/notes.txt", "b_cls/.DS_Store", "b_cls/.ipynb_checkpoints"]
    table = read(tmp_path / "out" / "train")
    # sorted by relative path: a_cls/g.bmp, a_cls/nested/y.jpg, a_cls/z.bmp, b_cls/x.png
    assert table["label"] == [0, 0, 0, 1] and table["index"] == [0, 1, 2, 3]
    assert np.array_equal(pixels(table["image"][0]), np.repeat(gray[..., None], 3, axis=-1))  # gray → RGB PNG
    assert table["image"][1] == jpg and table["image"][3] == png
    assert table["image"][2].startswith(b"\x89PNG") and np.array_equal(pixels(table["image"][2]), bmp_image)
    assert check_split(str(tmp_path / "out" / "train"), "data.train") == 4


def test_imagefolder_split_folders_share_one_label_mapping(tmp_path):
    src = tmp_path / "src"
    write_png(src / "train" / "cat" / "1.png")
    write_png(src / "train" / "dog" / "1.png")
    write_png(src / "val" / "dog" / "1.png")
    write_png(src / "val" / "emu" / "1.png")
    report = prepare("imagefolder", src, tmp_path / "out", log=None)
    assert report["classes"] == ["cat", "dog", "emu"]
    assert read(tmp_path / "out" / "train")["label"] == [0, 1]
    assert read(tmp_path / "out" / "val")["label"] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".ega-ray.json", "prepare.json", "train", "val"]


def test_corrupt_image_stops_or_is_skipped(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        write_png(src / "a" / f"{i}.png")
    (src / "a" / "1.png").write_bytes(RNG.integers(0, 256, 200, dtype=np.uint8).tobytes())
    good = write_png(src / "b" / "t.png")
    (src / "b" / "t.png").write_bytes(good[: len(good) // 2])  # truncated
    write_png(src / "b" / "u.png")
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"a/1\.png: not a readable image .*--skip-bad"):
        prepare("imagefolder", src, out, log=None)
    assert_clean(tmp_path, "src")  # no OUT, no OUT.tmp-*
    report = prepare("imagefolder", src, out, skip_bad=True, log=None)
    assert [s["file"] for s in report["skipped"]] == ["a/1.png", "b/t.png"]
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["splits"]["train"] == {"rows": 3, "files": 1, "skipped": 2} and len(meta["skipped"]) == 2
    table = read(out / "train")
    assert table["index"] == [0, 1, 2] and table["label"] == [0, 0, 1]
    assert table["image"] == [(src / name).read_bytes() for name in ("a/0.png", "a/2.png", "b/u.png")]


def test_failure_in_a_later_split_leaves_no_out_and_keeps_an_older_one(tmp_path):
    src = tmp_path / "src"
    write_png(src / "train" / "a" / "0.png")
    write_png(src / "train" / "b" / "0.png")
    write_png(src / "val" / "a" / "0.png")
    (src / "val" / "a" / "1.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"val/a/1\.png"):
        prepare("imagefolder", src, out, log=None)  # train was written first, then val failed
    assert_clean(tmp_path, "src")
    (src / "val" / "a" / "1.png").unlink()
    prepare("imagefolder", src, out, log=None)
    before = tree(out)
    write_png(src / "train" / "a" / "1.png")
    (src / "val" / "a" / "2.png").write_bytes(b"garbage")
    with pytest.raises(PrepareError, match=r"val/a/2\.png"):
        prepare("imagefolder", src, out, log=None)
    assert tree(out) == before
    assert_clean(tmp_path, "src", "out")


def test_rerunning_gives_identical_files(tmp_path):
    write_cifar100(tmp_path / "c")
    prepare("cifar100", tmp_path / "c", tmp_path / "out", rows_per_file=2, log=None)
    first = tree(tmp_path / "out")
    prepare("cifar100", tmp_path / "c", tmp_path / "out", rows_per_file=2, log=None)
    assert tree(tmp_path / "out") == first
    assert_clean(tmp_path, "c", "out")


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    src = tmp_path / "src"
    write_png(src / "a" / "0.png")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputFolderError, match=r"home: holds files ega-ray did not write \(thesis\.tex\)"):
        prepare("imagefolder", src, tmp_path / "home", log=None)
    (tmp_path / "theirs" / "train").mkdir(parents=True)  # another tool's dataset: Parquet in split folders
    (tmp_path / "theirs" / "train" / "part-0.parquet").write_bytes(b"PAR1 their data PAR1")
    (tmp_path / "theirs" / "val").mkdir()  # and an empty one
    with pytest.raises(OutputFolderError, match=r"theirs: holds files ega-ray did not write \(train/, val/\)"):
        prepare("imagefolder", src, tmp_path / "theirs", log=None)
    assert (tmp_path / "theirs" / "train" / "part-0.parquet").read_bytes() == b"PAR1 their data PAR1"
    with pytest.raises(PrepareError, match=r"would replace the source folder"):
        prepare("imagefolder", src, tmp_path, log=None)
    with pytest.raises(PrepareError, match=r"is inside the source folder"):
        prepare("imagefolder", src, src / "out", log=None)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


# ---------------------------------------------------------------- command line


def parse(argv: list[str]) -> argparse.Namespace:
    return _parser().parse_args(argv)


def test_the_cli_offers_exactly_the_registered_formats_one_file_each():
    assert FORMATS.names() == ["cifar100", "digits", "imagefolder", "stl10", "tinyimagenet"]
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    name = next(a for a in sub.choices["prepare"]._actions if a.dest == "name")
    assert list(name.choices) == FORMATS.names()
    files = Path(prepare_module.__file__).parent / "formats"
    assert sorted(p.stem for p in files.glob("*.py")) == sorted([*FORMATS.names(), "__init__", "base"])
    for format_name in FORMATS.names():  # each format registers itself, from its own file
        assert FORMATS[format_name].open.__module__ == f"ega_ray.data.formats.{format_name}"
    assert FORMATS.downloadable() == ["cifar100", "stl10"] and FORMATS.bundled() == ["digits"]


def test_prepare_digits_writes_the_rows_of_builtin_digits(tmp_path):
    report = prepare("digits", None, tmp_path / "out", log=None)
    assert report["classes"] == [str(i) for i in range(10)] and report["source"] == "sklearn.datasets.load_digits"
    assert report["splits"] == {
        "train": {"rows": 1437, "files": 1, "skipped": 0},
        "test": {"rows": 360, "files": 1, "skipped": 0},
    }
    for split in ("train", "test"):
        builtin = Path(builtin_split("builtin:digits", split))
        ours = read(tmp_path / "out" / split)
        assert ours == read(builtin)  # images, labels and index, row for row
        assert sorted(ours["index"]) == list(range(report["splits"][split]["rows"]))
        assert tree(tmp_path / "out" / split) == tree(builtin), "the same Parquet files, byte for byte"


def test_cli_error_is_one_line_and_status_2(tmp_path, capsys):
    args = parse(["prepare", "stl10", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert run_prepare(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("ega-ray prepare: error: --src ") and captured.err.count("\n") == 1
    assert "missing: not found" in captured.err
    assert run_prepare(parse(["prepare", "digits", "--out", str(tmp_path / "d"), "--download"])) == 2
    assert "takes no --src and no --download" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_success_prints_the_report(tmp_path, capsys):
    src = tmp_path / "src"
    write_png(src / "a" / "0.png")
    write_png(src / "b" / "0.png")
    (src / "a" / "1.png").write_bytes(b"bad")
    args = parse(["prepare", "imagefolder", "--src", str(src), "--out", str(tmp_path / "out"), "--skip-bad"])
    assert run_prepare(args) == 0
    captured = capsys.readouterr()
    assert "train: 2 rows" in captured.out
    assert "unreadable image files skipped: 1: train: a/1.png" in captured.out
    assert "prepare imagefolder/train: 2 rows in" in captured.err  # progress and timing on stderr


def test_download_failure_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from urllib.error import URLError

    def offline(root, train=True, transform=None, target_transform=None, download=False):  # CIFAR100's signature
        assert download and Path(root).is_dir()
        raise URLError("[Errno -3] Temporary failure in name resolution")

    # a stand-in torchvision (importing the real one takes seconds); only the download call is replaced
    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR100=offline)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    args = parse(["prepare", "cifar100", "--download", "--src", str(tmp_path / "dl"), "--out", str(tmp_path / "o")])
    assert run_prepare(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--download cifar100 into" in err and "name resolution" in err
    assert (tmp_path / "dl").is_dir() and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- odd and hostile trees


def test_symbolic_links_are_not_followed_out_of_src_or_into_loops(tmp_path):
    src = tmp_path / "src"
    cat = write_png(src / "cat" / "0.png")
    write_png(src / "dog" / "0.png")
    (src / "cat" / "up").symlink_to("..")  # a loop: cat/up/cat/up/...
    outside = write_png(tmp_path / "private" / "secret.png")
    (src / "cat" / "leak.png").symlink_to(tmp_path / "private" / "secret.png")
    (src / "cat" / "alias.png").symlink_to(src / "cat" / "0.png")  # a link inside --src is read
    (src / "cat" / "gone.png").symlink_to(src / "nowhere.png")
    (src / "bird").symlink_to(tmp_path / "private")  # a class folder that is a link
    report = prepare("imagefolder", src, tmp_path / "out", log=None)
    rows = read(tmp_path / "out" / "train")
    assert report["classes"] == ["cat", "dog"] and rows["label"] == [0, 0, 1], "2 cats (one via a link), 1 dog"
    assert sorted(rows["image"]) == sorted([cat, cat, (src / "dog" / "0.png").read_bytes()])
    assert outside not in rows["image"]
    assert report["links_not_followed"] == [
        "bird: a link to a folder, not followed",
        "cat/gone.png: a broken link",
        f"cat/leak.png: a link to {tmp_path / 'private' / 'secret.png'}, outside --src",
        "cat/up: a link to a folder, not followed",
    ]


def test_tinyimagenet_annotations_cannot_name_files_outside_val_images(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    write_tinyimagenet(root)
    write_jpeg(tmp_path / "elsewhere.JPEG")
    annotations = root / "val" / "val_annotations.txt"
    original = annotations.read_text()
    for name in (str(tmp_path / "elsewhere.JPEG"), "../../elsewhere.JPEG", ".."):
        annotations.write_text(original + f"{name}\tn01000000\t0\t0\t1\t1\n")
        with pytest.raises(PrepareError, match=r"val_annotations\.txt:4: .* is not a file name in .*val/images"):
            prepare("tinyimagenet", root, tmp_path / "out", log=None)
    annotations.write_text(original)
    (root / "val" / "images" / "val_0.JPEG").unlink()
    (root / "val" / "images" / "val_0.JPEG").symlink_to(tmp_path / "elsewhere.JPEG")
    with pytest.raises(
        PrepareError, match=r"val_annotations\.txt:1: .*val_0\.JPEG: a link to .*elsewhere\.JPEG, outside"
    ):
        prepare("tinyimagenet", root, tmp_path / "out", log=None)
    assert not (tmp_path / "out").exists()


def test_names_that_are_not_utf8_are_named_in_one_line(tmp_path):
    src = tmp_path / "src"
    write_png(src / "cat" / "0.png")
    bad = os.fsdecode(b"caf\xe9.png")  # Latin-1, as an old camera or archive may name a file
    write_png(src / "cat" / bad)
    with pytest.raises(PrepareError, match=r"caf\\xe9\.png'?: the name is not valid UTF-8; rename it"):
        prepare("imagefolder", src, tmp_path / "out", log=None)
    (src / "cat" / bad).unlink()
    (src / os.fsdecode(b"chien\xe9")).mkdir()
    with pytest.raises(PrepareError, match=r"chien\\xe9'?: the name is not valid UTF-8"):
        prepare("imagefolder", src, tmp_path / "out", log=None)


@pytest.fixture
def shared_tmp():
    with shared_folder() as path:
        yield path


def test_an_unreadable_class_folder_is_an_error_not_an_empty_class(shared_tmp):
    src = shared_tmp / "src"
    write_png(src / "cat" / "0.png")
    write_png(src / "dog" / "0.png")
    (src / "dog").chmod(0o000)
    done = as_nobody("-m", "ega_ray.cli", "prepare", "imagefolder", "--src", str(src), "--out", "out", cwd=shared_tmp)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"ega-ray prepare: error: {src / 'dog'}: cannot be read (Permission denied)"
    assert not (shared_tmp / "out").exists()


def test_images_over_the_pixel_limit_are_refused_or_skipped(tmp_path):
    src = tmp_path / "src"
    write_png(src / "a" / "0.png")
    write_png(src / "b" / "0.png")
    big = src / "a" / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    with pytest.raises(
        PrepareError, match=r"big\.png: not a readable image \(ValueError: 300×200 = 60,000 pixels is over"
    ):
        prepare("imagefolder", src, tmp_path / "out", max_pixels=50_000, log=None)
    report = prepare("imagefolder", src, tmp_path / "out", max_pixels=50_000, skip_bad=True, log=None)
    assert report["splits"]["train"]["rows"] == 2 and report["skipped"][0]["file"] == "a/big.png"
    assert prepare("imagefolder", src, tmp_path / "out", log=None)["splits"]["train"]["rows"] == 3  # default limit
    with pytest.raises(PrepareError, match=r"--max-pixels must be >= 1"):
        prepare("imagefolder", src, tmp_path / "out", max_pixels=0, log=None)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    src = tmp_path / "src"
    deep = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    (src / "a").mkdir(parents=True)
    Image.fromarray(deep).save(src / "a" / "deep.png")
    write_png(src / "b" / "0.png")
    prepare("imagefolder", src, tmp_path / "out", log=None)
    stored = read(tmp_path / "out" / "train")["image"][0]
    assert stored != (src / "a" / "deep.png").read_bytes(), "re-encoded as 8 bits, not kept as 16-bit bytes"
    assert pixels(stored)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_protocol_5_cifar_pickles_are_read_and_code_is_still_refused(tmp_path):
    source = write_cifar100(tmp_path / "c")
    for split in ("train", "test"):  # as `pickle.dump(..., protocol=5)` of NumPy 2 writes them
        with open(tmp_path / "c" / split, "rb") as f:
            raw = pickle.load(f)
        with open(tmp_path / "c" / split, "wb") as f:
            pickle.dump(raw, f, protocol=5)
    prepare("cifar100", tmp_path / "c", tmp_path / "out", log=None)
    assert read(tmp_path / "out" / "train")["label"] == source["train"][1]

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / "c" / "train", "wb") as f:
        pickle.dump({b"data": Boom(), b"fine_labels": []}, f, protocol=5)
    with pytest.raises(PrepareError, match=r"refusing posix\.system: only NumPy arrays may appear"):
        prepare("cifar100", tmp_path / "c", tmp_path / "out2", log=None)
    assert not (tmp_path / "pwned").exists()


def test_sigterm_mid_prepare_cleans_up_like_ctrl_c(tmp_path):
    src = tmp_path / "src"
    gradient = np.broadcast_to(np.arange(1200, dtype=np.uint8)[None, :, None], (1200, 1200, 3)).copy()
    for i in range(40):  # slow enough to be caught mid-way: ~40 ms each to check and store
        write_png(src / "a" / f"{i:02d}.png", gradient)
    write_png(src / "b" / "0.png")
    # one row per file: the first part file appears after the first image, long before the last
    argv = ["prepare", "imagefolder", "--src", str(src), "--out", str(tmp_path / "out"), "--rows-per-file", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ega_ray.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.tmp-*/train/*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "no .out.tmp-* and no half-written out"


def test_an_output_of_an_earlier_version_without_a_marker_is_still_replaced(tmp_path):
    src = tmp_path / "src"
    write_png(src / "a" / "0.png")
    write_png(src / "b" / "0.png")
    old = tmp_path / "out"
    (old / "train").mkdir(parents=True)
    (old / "train" / "part-00000.parquet").write_bytes(b"old rows")
    (old / "prepare.json").write_text(json.dumps({"dataset": "imagefolder", "splits": {"train": {"rows": 1}}}))
    prepare("imagefolder", src, old, log=None)
    assert read(old / "train")["label"] == [0, 1]
    (old / "notes.txt").write_text("mine")  # no longer only what prepare wrote: refused from now on
    (old / ".ega-ray.json").unlink()
    with pytest.raises(OutputFolderError, match=r"holds files ega-ray did not write"):
        prepare("imagefolder", src, old, log=None)


def test_a_dataset_of_one_class_is_refused_before_anything_is_written(tmp_path, capsys):
    src = tmp_path / "src"
    write_png(src / "cat" / "0.png")
    write_png(src / "cat" / "1.png")
    with pytest.raises(PrepareError, match=r"imagefolder from .*src has 1 class \(cat\); a classifier needs at least"):
        prepare("imagefolder", src, tmp_path / "out", log=None)
    assert_clean(tmp_path, "src")
    args = parse(["prepare", "imagefolder", "--src", str(src), "--out", str(tmp_path / "out")])
    assert run_prepare(args) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_dataset_left_with_one_class_after_skipping_is_refused(tmp_path):
    """Two class folders, but every image of one is unreadable (or the folder empty): the labels written
    hold one class, and the conversion is refused without leaving an output."""
    src = tmp_path / "src"
    write_png(src / "cat" / "0.png")
    (src / "dog").mkdir()
    (src / "dog" / "0.png").write_bytes(b"not a png")
    with pytest.raises(PrepareError, match=r"\(as converted\) has labeled rows of one class only \(label 0\)"):
        prepare("imagefolder", src, tmp_path / "out", skip_bad=True, log=None)
    assert_clean(tmp_path, "src")
