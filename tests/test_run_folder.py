"""Output folders: what a command may write into, the lock, the settings a run folder records, the atomic
rebuild. Real folders, real flock, real processes; no Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ega_ray.config import load_config
from ega_ray.driver.preflight import resolve, run_folder
from ega_ray.errors import OutputFolderError
from ega_ray.run_folder import MARKER, check_target, claim, read_marker, rebuild, remove_own, settings_differences

REPO = Path(__file__).resolve().parents[1]


def someones_folder(path: Path) -> Path:
    (path / "photos").mkdir(parents=True)
    (path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a photo")
    (path / "thesis.txt").write_text("four years of work")
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_folder_with_someone_elses_files_is_refused_and_left_as_it_was(tmp_path):
    home = someones_folder(tmp_path / "home")
    before = snapshot(home)
    for attempt in (
        lambda: claim(home, "distill").__enter__(),
        lambda: rebuild(home, "cache-teacher").__enter__(),
        lambda: remove_own(home, "distill"),
    ):
        with pytest.raises(
            OutputFolderError, match=r"home: holds files ega-ray did not write \(photos/, thesis\.txt\)"
        ):
            attempt()
    assert snapshot(home) == before and sorted(p.name for p in home.iterdir()) == ["photos", "thesis.txt"]


def test_empty_subfolders_are_someone_elses_too(tmp_path):
    (tmp_path / "out" / "train").mkdir(parents=True)
    with pytest.raises(OutputFolderError, match=r"holds files ega-ray did not write \(train/\)"):
        check_target(tmp_path / "out", "prepare", "--out")


def test_a_new_or_empty_folder_is_claimed_and_marked(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        with claim(path, "distill", record={"settings": {"optim.lr": 0.05}}) as marker:
            assert marker["kind"] == "distill" and f"pid {os.getpid()}" in marker["holder"]
        saved = read_marker(path)
        assert saved["kind"] == "distill" and saved["settings"] == {"optim.lr": 0.05}
        assert [p.name for p in path.iterdir()] == [MARKER], "nothing but the marker: no lock file is left behind"


def test_another_commands_output_is_refused_by_name(tmp_path):
    with claim(tmp_path / "run", "distill"):
        pass
    with pytest.raises(OutputFolderError, match=r"holds the output of `ega-ray distill`, not of `ega-ray tune`"):
        check_target(tmp_path / "run", "tune")


def test_a_file_or_an_unwritable_place_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(OutputFolderError, match=r"notes\.txt: is a file, not a folder"):
        claim(tmp_path / "notes.txt", "distill").__enter__()
    with pytest.raises(OutputFolderError, match=r"notes\.txt/run: cannot be created \(Not a directory\)"):
        claim(tmp_path / "notes.txt" / "run", "distill").__enter__()


def test_a_folder_in_use_is_refused_while_the_first_command_holds_it(tmp_path):
    with claim(tmp_path / "run", "distill"):
        with pytest.raises(OutputFolderError, match=rf"in use by another ega-ray command \(pid {os.getpid()} on"):
            claim(tmp_path / "run", "distill").__enter__()
        with pytest.raises(OutputFolderError, match=r"in use by another ega-ray command"):
            remove_own(tmp_path / "run", "distill")
    with claim(tmp_path / "run", "distill"):  # released when the first one ended
        pass


def test_the_lock_is_held_across_processes_and_released_when_the_holder_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from ega_ray.run_folder import claim
            with claim({str(tmp_path / "run")!r}, "distill"):
                print("held", flush=True)
                time.sleep(120)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputFolderError, match=rf"in use by another ega-ray command \(pid {holder.pid} on"):
            claim(tmp_path / "run", "distill").__enter__()
    finally:
        holder.kill()  # no clean-up code runs: the kernel releases the lock
        holder.wait()
    with claim(tmp_path / "run", "distill"):
        pass


def test_rebuild_replaces_its_own_output_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "cache"
    with rebuild(dest, "cache-teacher") as tmp:
        (tmp / "a.txt").write_text("first")
    assert (dest / "a.txt").read_text() == "first" and read_marker(dest)["kind"] == "cache-teacher"
    before = snapshot(dest)
    with pytest.raises(RuntimeError, match="boom"):
        with rebuild(dest, "cache-teacher") as tmp:
            (tmp / "a.txt").write_text("second, half written")
            raise RuntimeError("boom")
    assert snapshot(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"], "no temporary folder left behind"
    with rebuild(dest, "cache-teacher") as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in dest.iterdir()) == [MARKER, "b.txt"], "the old content is gone, not merged"
    with pytest.raises(OutputFolderError, match=r"new: holds"):
        someones_folder(tmp_path / "new")
        rebuild(tmp_path / "new", "cache-teacher").__enter__()


def test_a_failed_rebuild_of_a_new_folder_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with rebuild(tmp_path / "cache", "cache-teacher"):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_settings_differences_name_each_field_and_let_epochs_grow():
    before = {"optim.epochs": 30, "optim.lr": 0.05, "student.name": "resnet8"}
    assert settings_differences(before, before | {"optim.epochs": 60}, "optim.epochs") == []
    assert settings_differences(before, before | {"optim.epochs": 10}, "optim.epochs") == [
        "optim.epochs: 30 → 10 (epochs may be raised, not lowered)"
    ]
    assert settings_differences(before, before | {"optim.lr": 0.1, "student.name": "vgg13"}, "optim.epochs") == [
        "optim.lr: 0.05 → 0.1",
        'student.name: "resnet8" → "vgg13"',
    ]


def smoke(out: Path, *overrides: str):
    return resolve(load_config(REPO / "configs" / "smoke.yaml", [f"run.output={out}", *overrides]))


def test_a_run_folder_resumes_only_the_same_run(tmp_path):
    """What `ega-ray distill` checks before anything is written: same settings (or more epochs) resume;
    other results-defining settings are refused naming each; where and how fast it runs may change."""
    out = tmp_path / "run"
    with run_folder(smoke(out), "distill"):
        (out / "metrics.csv").write_text("epoch\n1\n2\n")
    with run_folder(smoke(out), "distill"):
        pass
    with run_folder(smoke(out, "optim.epochs=4", "scaling.num_workers=1", "optim.compile=true"), "distill"):
        pass
    assert read_marker(out)["settings"]["optim.epochs"] == 4, "the marker follows the raised epochs"
    with pytest.raises(OutputFolderError, match=r"distill.method: \"ega\" → \"kd\"; optim.lr: 0.05 → 0.1"):
        with run_folder(smoke(out, "optim.epochs=4", "optim.lr=0.1", "distill.method=kd"), "distill"):
            pass
    with pytest.raises(OutputFolderError, match=r"student.name: \"resnet8\" → \"resnet20\""):
        with run_folder(smoke(out, "optim.epochs=4", "student.name=resnet20"), "distill"):
            pass
    with pytest.raises(OutputFolderError, match=r"optim.epochs: 4 → 2 \(epochs may be raised, not lowered\)"):
        with run_folder(smoke(out), "distill"):
            pass
    assert (out / "metrics.csv").read_text() == "epoch\n1\n2\n"
    assert json.loads((out / MARKER).read_text())["settings"]["optim.lr"] == 0.05


@pytest.mark.parametrize("settings", [["optim.lr", 0.05], "optim.lr=0.05", 3])
def test_a_marker_whose_settings_are_not_a_mapping_is_one_line_naming_the_file(tmp_path, settings):
    out = tmp_path / "run"
    with run_folder(smoke(out), "distill"):
        pass
    marker = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps(marker | {"settings": settings}))
    before = snapshot(out)
    with pytest.raises(OutputFolderError) as info:
        with run_folder(smoke(out), "distill"):
            pass
    msg = str(info.value)
    assert "\n" not in msg and str(out / MARKER) in msg and "not a mapping" in msg
    assert snapshot(out) == before, "nothing is written into the damaged folder"
