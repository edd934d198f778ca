"""What a run reads, checked before Ray starts: a split's identity (so that a resume on other data under the
same path is refused), its Parquet files' footers, the batch against each worker's share of the rows, and a
damaged data page named by file and row group. Real Parquet files, real folders; no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ega_ray.cli import main
from ega_ray.config import load_config
from ega_ray.data.images import encode_png
from ega_ray.data.parquet import check_split, write_split
from ega_ray.data.prepare import prepare
from ega_ray.data.split_files import (
    explain_read_failure,
    identity_change,
    locate_unreadable,
    split_files,
    split_identity,
)
from ega_ray.driver.preflight import check_batch_rows, input_differences, resolve, run_folder
from ega_ray.errors import ConfigError, DataError, OutputFolderError, find_usage_error
from ega_ray.run_folder import MARKER, read_marker

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % 10


def write_rows(folder: Path, n: int, seed: int = 0, rows_per_file: int = 10_000) -> str:
    write_split(folder, *images(n, seed), rows_per_file=rows_per_file)
    return str(folder)


def test_a_split_rewritten_with_other_rows_has_another_identity_and_the_same_rows_the_same(tmp_path):
    split = tmp_path / "train"
    first = split_identity(write_rows(split, 80), "data.train")
    assert first["rows"] == 80 and first["content"] is None  # written by write_split: no prepare record
    assert split_identity(write_rows(split, 80), "data.train") == first, "the same rows give the same files"
    again = split_identity(write_rows(split, 120), "data.train")
    assert again["rows"] == 120 and again["files"] != first["files"]
    assert identity_change(first, again) == "80 rows → 120 rows (files changed: names, sizes or footers)"
    other = split_identity(write_rows(split, 80, seed=1), "data.train")
    assert identity_change(first, other) == "files changed: names, sizes or footers"
    assert identity_change(first, first) is None


def test_a_users_parquet_folder_without_a_record_has_an_identity(tmp_path):
    """Written with pyarrow directly, several files, no prepare.json: the footers identify it."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for part in range(3):
        index = list(range(part * 4, part * 4 + 4))
        table = pa.table({"image": [b"x" * (part + 1)] * 4, "label": [part] * 4, "index": index})
        pq.write_table(table, folder / f"p{part}.parquet")
    ident = split_identity(str(folder), "data.test")
    assert ident["rows"] == 12 and ident["content"] is None and ident["files"].startswith("sha256:")
    assert check_split(str(folder), "data.test") == 12
    (folder / "p1.parquet").unlink()
    assert identity_change(ident, split_identity(str(folder), "data.test")).startswith("12 rows → 8 rows")


def write_png_tree(src: Path, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(src / cls / f"{i}.png")


def test_a_prepared_split_is_identified_by_the_content_digest_prepare_recorded(tmp_path):
    src, out = tmp_path / "src", tmp_path / "data"
    write_png_tree(src, 3)
    report = prepare("imagefolder", src, out, log=None)
    first = split_identity(str(out / "train"), "data.train")
    assert first["content"] == report["splits"]["train"]["digest"] and first["rows"] == 6
    prepare("imagefolder", src, out, log=None)
    assert split_identity(str(out / "train"), "data.train") == first, "a re-prepare of the same images"
    write_png_tree(src, 3, seed=1)  # other images, the same row count
    prepare("imagefolder", src, out, log=None)
    assert identity_change(first, split_identity(str(out / "train"), "data.train")) == "content digest changed"
    write_png_tree(src, 5, seed=1)
    prepare("imagefolder", src, out, log=None)
    now = split_identity(str(out / "train"), "data.train")
    assert identity_change(first, now) == "6 rows → 10 rows (content digest changed)"
    # files changed after prepare recorded them: the record no longer describes them and is not trusted
    write_rows(out / "train", 4)
    assert split_identity(str(out / "train"), "data.train")["content"] is None


def smoke(out: Path, *overrides: str):
    return resolve(load_config(SMOKE, [f"run.output={out}", *overrides]))


def test_a_resume_on_other_data_or_another_teacher_file_is_refused_naming_what_changed(tmp_path):
    """The run folder's marker records its inputs' identities; the same paths holding other data refuse."""
    train, test, out = tmp_path / "train", tmp_path / "test", tmp_path / "run"
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"first weights")
    write_rows(train, 80)
    write_rows(test, 20, seed=5)
    paths = [f"data.train={train}", f"data.test={test}", f"teacher.weights={weights}"]
    with run_folder(smoke(out, *paths), "distill"):
        pass
    inputs = read_marker(out)["inputs"]
    assert inputs["data.train"]["rows"] == 80 and inputs["data.test"]["rows"] == 20
    assert sorted(inputs) == ["data.test", "data.train", "teacher.weights"]
    with run_folder(smoke(out, *paths, "optim.epochs=3"), "distill"):
        pass  # the same inputs: resumed, more epochs allowed
    write_rows(train, 120)
    weights.write_bytes(b"other weights")
    marker_before = (out / MARKER).read_text()
    with pytest.raises(OutputFolderError) as refused:
        with run_folder(smoke(out, *paths, "optim.epochs=4"), "distill"):
            pass
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"--output {out}: holds a run trained on other inputs under the same")
    assert f"data.train {train}: 80 rows → 120 rows (files changed: names, sizes or footers)" in line
    assert f"teacher.weights {weights}: sha256 " in line and "data.test" not in line
    assert (out / MARKER).read_text() == marker_before, "a refused run writes nothing"


def test_either_digest_tells_other_data():
    """Files replaced by hand leave prepare's record as it was; a re-prepare may leave every footer as it was."""
    split = {"path": "/d/train", "rows": 80, "files": "sha256:a", "content": "sha256:c"}
    assert identity_change(split, split | {"files": "sha256:b"}) == "files changed: names, sizes or footers"
    assert identity_change(split, split | {"content": "sha256:d"}) == "content digest changed"
    assert identity_change(split, split | {"content": None}) is None, "a record no longer trusted: the files decide"


def test_input_differences_name_an_input_given_or_dropped():
    train = {"path": "/d/train", "rows": 80, "files": "sha256:a", "content": None}
    val = {"path": "/d/val", "rows": 9, "files": "sha256:b", "content": None}
    assert input_differences({"data.train": train}, {"data.train": train}) == []
    assert input_differences({"data.train": train}, {"data.train": train, "data.validation": val}) == [
        "data.validation: (none) → /d/val"
    ]


def test_a_marker_without_inputs_is_resumed_and_then_records_them(tmp_path):
    """A run folder written before inputs were recorded has nothing to compare: it is taken as it is."""
    out = tmp_path / "run"
    paths = [f"data.train={write_rows(tmp_path / 'train', 80)}", f"data.test={write_rows(tmp_path / 'test', 20)}"]
    with run_folder(smoke(out, *paths), "distill"):
        pass
    marker = json.loads((out / MARKER).read_text())
    del marker["inputs"]
    (out / MARKER).write_text(json.dumps(marker))
    with run_folder(smoke(out, *paths), "distill"):
        pass
    assert read_marker(out)["inputs"]["data.train"]["rows"] == 80


def test_the_batch_must_fit_a_workers_share_of_the_rows():
    check_batch_rows(100, 64, 2, "optim.batch_size")  # 50 rows per worker, 32 per worker batch
    check_batch_rows(64, 64, 1, "optim.batch_size")
    with pytest.raises(ConfigError) as refused:
        check_batch_rows(61, 64, 2, "optim.batch_size")
    assert str(refused.value) == (
        "optim.batch_size: 64 (32 rows per worker) is larger than a worker's share of data.train: 61 rows trained "
        "on (less the validation split) over scaling.num_workers 2 is 30 rows per worker; allowed: "
        "optim.batch_size at most 60, or fewer workers"
    )
    with pytest.raises(ConfigError, match=r"^pretrain.batch_size: 256 \(256 rows per worker\)"):
        check_batch_rows(200, 256, 1, "pretrain.batch_size")


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_the_cli_refuses_a_batch_too_large_and_a_resume_on_other_data_before_ray_starts(tmp_path, capsys):
    """Both refusals come before Ray (this test is not marked ``ray``: conftest fails it if Ray starts), and
    the refused batch leaves no folder behind, so the corrected rerun is not refused as another setting."""
    train, test, out = tmp_path / "train", tmp_path / "test", tmp_path / "run"
    write_rows(train, 80)
    write_rows(test, 20, seed=5)
    data = ["--set", f"data.train={train}", "--set", f"data.test={test}", "--output", str(out)]
    assert main(["distill", "--config", str(SMOKE), *data, "--set", "optim.batch_size=128"]) == 2
    line = one_line(capsys)
    assert line.startswith("ega-ray: config error: optim.batch_size: 128 (64 rows per worker) is larger than")
    assert "70 rows trained on (less the validation split) over scaling.num_workers 2 is 35 rows per worker" in line
    assert not out.exists()
    assert main(["pretrain-teacher", "--config", str(SMOKE), *data, "--set", "pretrain.batch_size=128"]) == 2
    assert one_line(capsys).startswith("ega-ray: config error: pretrain.batch_size: 128 (64 rows per worker) is")
    assert not out.exists()
    with run_folder(smoke(out, f"data.train={train}", f"data.test={test}"), "distill"):
        pass  # what a first run leaves: the marker with its inputs
    write_rows(train, 120)
    assert main(["distill", "--config", str(SMOKE), *data, "--set", "optim.epochs=3"]) == 2
    assert f"data.train {train}: 80 rows → 120 rows" in one_line(capsys)


def corrupt_split(folder: Path, png: bool = False, damage: bool = True) -> tuple[Path, int]:
    """A split of two snappy files whose second file's third row group has a damaged data page (the footer
    intact, unless not ``damage``): the file and the row group. ``png``: decodable images (8×8, one grey
    level per label), else raw bytes."""
    folder.mkdir()
    n = 200
    table = pa.table(
        {
            # compressible, so that snappy writes copies: damaged, they point outside the page
            "image": pa.array([encode_png(np.full((8, 8, 3), 30 * (i % 3), np.uint8)) if png else bytes([i % 7]) * 500
                               for i in range(n)]),  # fmt: skip
            "label": pa.array(np.arange(n) % 3, pa.int64()),
            "index": pa.array(np.arange(n), pa.int64()),
        }
    )
    for part in range(2):
        rows = table.slice(part * 100, 100).set_column(2, "index", pa.array(np.arange(part * 100, part * 100 + 100)))
        # snappy, no dictionary: the damaged bytes land in a compressed data page
        pq.write_table(rows, folder / f"part-{part}.parquet", row_group_size=25, use_dictionary=False)
    damaged = folder / "part-1.parquet"
    if not damage:
        return damaged, -1
    chunk = pq.read_metadata(damaged).row_group(2).column(0)
    data = bytearray(damaged.read_bytes())
    end = chunk.data_page_offset + chunk.total_compressed_size
    middle = end - chunk.total_compressed_size // 2
    data[middle:end] = b"\xff" * (end - middle)  # snappy tags copying from before the output's start
    damaged.write_bytes(bytes(data))
    return damaged, 2


def test_a_damaged_data_page_is_named_by_file_and_row_group(tmp_path):
    damaged, group = corrupt_split(tmp_path / "train")
    split = str(tmp_path / "train")
    assert check_split(split, "data.train") == 200, "footers are intact: preflight cannot see a damaged page"
    with pytest.raises(OSError) as raised:  # what a reader meets, without the file's name
        pq.read_table(split)
    assert str(damaged) not in str(raised.value)
    where = f"data.train: file {damaged} row group {group}: "
    assert locate_unreadable(split, "data.train").startswith(where)
    explained = explain_read_failure(raised.value, {"data.test": None, "data.train": split})
    assert isinstance(explained, DataError) and "\n" not in str(explained)
    assert str(explained).startswith(where) and "restore it or prepare the split again" in str(explained)
    wrapped = RuntimeError("Training failed")
    wrapped.__cause__ = raised.value  # as Ray passes a task's failure on
    assert str(explain_read_failure(wrapped, {"data.train": split})) == str(explained)
    assert explain_read_failure(RuntimeError("worker died: out of memory"), {"data.train": split}) is None
    # a Ray Data read stage's name is no decode failure: no scan of every split for an actor that died
    stage = RuntimeError("Task ReadParquet->MapBatches(decode_images) failed: the actor died unexpectedly")
    assert explain_read_failure(stage, {"data.train": split}) is None
    good = write_rows(tmp_path / "good", 10)
    assert explain_read_failure(raised.value, {"data.train": good}) is None, "nothing damaged: not ours to name"


@pytest.mark.ray
def test_a_damaged_page_met_by_ray_data_in_a_run_is_one_line_naming_file_and_row_group(tmp_path, local_ray):
    """A run whose training split has a damaged page (footers intact, so preflight passes): Ray Data's read
    task fails with Arrow's message inside its traceback, and the run ends with the one line naming it."""
    from ega_ray.driver.launch import run_distill

    damaged, group = corrupt_split(tmp_path / "train", png=True)
    corrupt_split(tmp_path / "validation", png=True, damage=False)
    splits = [f"data.train={tmp_path / 'train'}", f"data.validation={tmp_path / 'validation'}"]
    with pytest.raises(DataError) as named:  # the explicit validation split: no driver-side read of data.train
        run_distill(load_config(SMOKE, [f"run.output={tmp_path / 'run'}", *splits, "optim.epochs=1"]), trial=True)
    assert str(named.value).startswith(f"data.train: file {damaged} row group {group}: ")  # Arrow's words follow
    assert find_usage_error(named.value) is named.value, "the CLI prints it as one line"


def test_preflight_names_a_truncated_file_and_a_file_with_other_columns(tmp_path):
    split = tmp_path / "train"
    write_rows(split, 30, rows_per_file=10)
    files = sorted(split.glob("*.parquet"))
    assert len(split_files(str(split), "data.train")) == 3
    whole = files[1].read_bytes()
    files[1].write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"^data.train: file {files[1]} is not a readable Parquet file: "):
        split_files(str(split), "data.train")
    files[1].write_bytes(whole)
    pq.write_table(pa.table({"image": [b"x"], "label": pa.array([1], pa.int32()), "index": [30]}), split / "x.parquet")
    with pytest.raises(ValueError, match=r"x.parquet has columns \(image: binary, label: int32, index: int64\) unlike"):
        split_files(str(split), "data.train")
