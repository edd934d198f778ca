"""What a careless or hostile user meets on the command line: one line and exit status 2, before Ray starts,
and nothing written that the command does not own."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from unprivileged import as_nobody, shared_folder

from ega_ray.cli import main
from ega_ray.errors import DataError
from ega_ray.run_folder import MARKER, claim

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def someones_folder(path: Path) -> dict[str, bytes]:
    (path / "photos").mkdir(parents=True)
    (path / "photos" / "cat.jpg").write_bytes(b"a photo")
    (path / "thesis.txt").write_text("four years of work")
    return {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.heavy
def test_no_command_touches_a_folder_it_did_not_write(tmp_path):
    """Every verb, in one fresh process (so that no other test's Ray counts): exit 2 and one line for each,
    the folder unchanged, Ray never started."""
    home = tmp_path / "home"
    before = someones_folder(home)
    runs = [
        ["distill", "--config", SMOKE, "--output", str(home)],
        ["pretrain-teacher", "--config", SMOKE, "--output", str(home)],
        ["cache-teacher", "--config", SMOKE, "--output", str(home)],
        ["tune", "--config", SMOKE, "--output", str(home)],
        ["benchmark", "--config", SMOKE, "--methods", "kd", "--seeds", "1", "--output", str(home)],
        ["distill", "--output", str(home)],  # the embedded default
        ["tune", "--output", str(home)],  # the embedded default as a search: refused before its teacher
        ["benchmark", "--methods", "kd", "--seeds", "1", "--output", str(home)],
        ["prepare", "digits", "--out", str(home)],
    ]
    script = (
        "import json, sys, ray\n"
        "from ega_ray.cli import main\n"
        "codes = [main(argv) for argv in json.loads(sys.argv[1])]\n"
        "print(json.dumps({'codes': codes, 'ray': ray.is_initialized()}))\n"
    )
    cache = tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(runs)], capture_output=True, text=True, timeout=300, cwd=REPO,
        env=os.environ | {"EGA_RAY_CACHE": str(cache)},
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2] * len(runs), "ray": False}, done.stderr
    assert not (cache / "embedded-teacher").exists(), "a teacher was pretrained for a refused folder"
    lines = [line for line in done.stderr.splitlines() if line.startswith("ega-ray")]
    assert len(lines) == len(runs) and "Traceback" not in done.stderr, done.stderr
    assert all("home: holds files ega-ray did not write (photos/, thesis.txt)" in line for line in lines), lines
    assert {p.name: p.read_bytes() for p in home.rglob("*") if p.is_file()} == before


def test_the_embedded_default_checks_every_stage_folder_before_the_first_stage(tmp_path, capsys):
    root = tmp_path / "embedded"
    with claim(root, "embedded"):
        pass
    someones_folder(root / "ce")
    assert main(["distill", "--output", str(root), "--set", "pretrain.epochs=1"]) == 2
    assert one_line(capsys).startswith(f"ega-ray: output folder: --output {root / 'ce'}: holds files ega-ray did not")
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "ce"], "no teacher was pretrained"


def test_an_output_that_is_a_file_or_in_use_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["distill", "--config", SMOKE, "--output", str(tmp_path / "notes.txt")]) == 2
    assert one_line(capsys) == f"ega-ray: output folder: --output {tmp_path / 'notes.txt'}: is a file, not a folder; " \
        "choose a new or empty folder"  # fmt: skip
    with claim(tmp_path / "run", "distill"):
        assert main(["distill", "--config", SMOKE, "--output", str(tmp_path / "run")]) == 2
        assert f"in use by another ega-ray command (pid {os.getpid()} on" in one_line(capsys)


@pytest.mark.heavy
def test_an_unwritable_output_is_one_line():
    with shared_folder() as shared:
        (shared / "locked").mkdir(mode=0o755)  # owned by this user; the unprivileged one may not write it
        done = as_nobody("-m", "ega_ray.cli", "distill", "--config", SMOKE, "--output", "locked/run", cwd=shared)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (  # after the smoke teacher's "randomly initialised" warning
        f"ega-ray: output folder: --output {shared / 'locked' / 'run'}: cannot be created (Permission denied)"
    )


def test_a_teacher_file_holding_pickled_objects_is_one_line(tmp_path, capsys):
    weights = tmp_path / "teacher.pt"
    torch.save({"args": argparse.Namespace(lr=0.05), "state_dict": {}}, weights)  # as RepDistiller saves them
    assert (
        main(["distill", "--config", SMOKE, "--set", f"teacher.weights={weights}", "--output", str(tmp_path / "r")])
        == 2
    )
    line = one_line(capsys)
    assert line.startswith("ega-ray: config error: teacher: zoo:resnet8 with weights") and "argparse.Namespace" in line
    assert not (tmp_path / "r").exists()


def test_a_users_error_raised_inside_ray_is_printed_as_one_line(capsys, monkeypatch):
    """Ray wraps an exception raised in a task, a Ray Data stage or a Train worker; the CLI finds ours inside."""
    import ray.exceptions

    inner = DataError("data.train: the image of the row with index 8 cannot be decoded (OSError: broken)")
    wrapped = ray.exceptions.RayTaskError("map_batches", "traceback text", inner)

    def failing_run(args):
        try:
            raise wrapped
        except ray.exceptions.RayTaskError as err:
            raise RuntimeError("Training failed") from err

    monkeypatch.setattr("ega_ray.cli._run", failing_run)
    assert main(["distill"]) == 2
    assert one_line(capsys) == f"ega-ray: data error: {inner}"
    monkeypatch.setattr("ega_ray.cli._run", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # anything else is not ours to hide
        main(["distill"])
