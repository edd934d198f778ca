"""Nothing overwritten, nothing silently wrong: ``ega-ray export`` replaces only files it can prove it wrote,
a truncated student or an over-long name is one line, a full disk (a real one: a small tmpfs) is one line
and leaves no partial file, temporary folders of killed commands are removed by the next run, every file
left for others is written atomically, and ``eval`` never writes into a run folder another command holds.
Real files, real flock, real processes, real torch; no Ray."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from small_disk import python_on_a_small_disk

from ega_ray.cli import main
from ega_ray.disk import write_atomic, write_with
from ega_ray.errors import OutputFolderError
from ega_ray.export import StudentFileError, build_classifier, load_student, write_student
from ega_ray.run_folder import (
    MARKER,
    STALE_AFTER_S,
    check_target,
    claim,
    read_marker,
    rebuild,
    record_written,
    remove_stale_temporaries,
    written_here,
)

REPO = Path(__file__).resolve().parents[1]
META = {"student": "resnet8", "num_classes": 3, "embed_dim": 8, "image_size": 16, "mean": [0.5] * 3,
        "std": [0.25] * 3, "epoch": 2}  # fmt: skip


def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier(META)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------ export: only files it wrote


def test_export_refuses_a_users_files_beside_the_student_and_replaces_them_only_with_force(tmp_path, capsys):
    write_student(student(), META, tmp_path, "model", ("pt",))
    for suffix in ("safetensors", "pt2", "onnx"):
        (tmp_path / f"model.{suffix}").write_bytes(f"the user's own {suffix}".encode())
    before = contents(tmp_path)
    assert main(["export", "--student", str(tmp_path / "model.pt")]) == 2
    line = one_line(capsys)
    assert line.startswith(f"ega-ray: output folder: --student {tmp_path / 'model.pt'}: model.safetensors, model.pt2 ")
    assert "--force" in line
    assert contents(tmp_path) == before, "nothing is written when one target is refused"

    # the other way round: a .safetensors student beside the user's model.pt
    other = tmp_path / "other"
    write_student(student(), META, other, "model", ("safetensors",))
    (other / "model.pt").write_bytes(b"the user's own checkpoint")
    assert main(["export", "--student", str(other / "model.safetensors")]) == 2
    assert "model.pt beside it is not a file ega-ray wrote" in one_line(capsys)
    assert (other / "model.pt").read_bytes() == b"the user's own checkpoint"

    assert main(["export", "--student", str(other / "model.safetensors"), "--force"]) == 0
    assert load_student(other / "model.pt")[1] == META, "--force replaces it"
    assert not (other / MARKER).exists(), "a user's folder gets no marker"


def test_export_in_a_run_folder_replaces_what_the_run_recorded_and_nothing_changed_since(tmp_path, capsys):
    run = tmp_path / "run"
    with claim(run, "distill"):
        written = write_student(student(), META, run, "student_best", ("pt", "safetensors"))
        record_written(run, list(written.values()))
    assert all(written_here(p) for p in written.values())
    assert main(["export", "--student", str(run / "student_best.pt")]) == 0, "its own .safetensors is replaced"
    capsys.readouterr()
    assert written_here(run / "student_best.pt2"), "what export wrote is recorded too"
    assert main(["export", "--student", str(run / "student_best.pt")]) == 0, "and so can be replaced again"
    capsys.readouterr()

    (run / "student_best.safetensors").write_bytes(b"edited by hand")
    assert not written_here(run / "student_best.safetensors")
    assert main(["export", "--student", str(run / "student_best.pt")]) == 2
    assert "student_best.safetensors beside it is not a file ega-ray wrote (or was changed since)" in one_line(capsys)
    assert (run / "student_best.safetensors").read_bytes() == b"edited by hand"


# ------------------------------------------------------------------ one line for a truncated file or a long name


def test_a_truncated_student_is_one_line(tmp_path, capsys):
    write_student(student(), META, tmp_path, "s", ("pt",))
    data = (tmp_path / "s.pt").read_bytes()
    for cut in (7919, len(data) // 2):  # torch's reader raises OSError (Invalid argument), then RuntimeError
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(StudentFileError, match="not a weights-only torch file"):
            load_student(tmp_path / "cut.pt")
        assert main(["export", "--student", str(tmp_path / "cut.pt")]) == 2
        assert one_line(capsys).startswith(f"ega-ray: student file: --student {tmp_path / 'cut.pt'}: ")


def test_a_name_too_long_for_the_file_system_is_one_line_naming_the_flag(tmp_path, capsys):
    long = tmp_path / ("x" * 300)
    with pytest.raises(OutputFolderError, match=r"^--output .*: a name too long for the file system \(300 bytes"):
        check_target(long, "distill")
    with pytest.raises(OutputFolderError, match=r"^--out .*: a name too long"):
        with claim(long / "sub", "prepare", flag="--out"):
            pass
    assert main(["export", "--student", str(long / "s.pt")]) == 2
    assert re.match(r"ega-ray: student file: --student .*: a name too long for the file system", one_line(capsys))
    assert main(["prepare", "digits", "--out", str(long)]) == 2
    assert re.match(r"ega-ray prepare: error: --out .*: a name too long for the file system", one_line(capsys))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ a full disk, for real


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path):
    done = python_on_a_small_disk(tmp_path / "disk", 1024, textwrap.dedent("""
        import os, sys, torch
        from pathlib import Path
        from ega_ray.cli import main
        from ega_ray.disk import DiskFullError, write_atomic, write_with
        from ega_ray.export import build_classifier, write_student
        meta = dict(student="resnet8", num_classes=3, embed_dim=8, image_size=16, mean=[0.5] * 3, std=[0.25] * 3,
                    epoch=1)
        disk = Path(DISK)
        write_student(build_classifier(meta), meta, disk, "s", ("pt",))  # about 330 KB of the 1 MiB
        # the export's check before writing (torch.export's writer would abort the process on a full disk)
        print("rc", main(["export", "--student", str(disk / "s.pt")]), flush=True)
        # a write whose size is not known beforehand: torch's zip writer fails ("unexpected pos")
        big = {"w": torch.zeros(400_000)}
        try:
            write_with(disk / "big.pt", lambda tmp: torch.save(big, tmp))
        except DiskFullError as err:
            print("torch:", err)
        try:
            write_atomic(disk / "notes.txt", "x" * 2_000_000)
        except DiskFullError as err:
            print("text:", err)
        print("left:", sorted(p.name for p in disk.iterdir()))
        # a prepared dataset larger than the disk: Parquet shards written by pyarrow
        print("prepare rc", main(["prepare", "digits", "--out", str(disk / "digits")]), flush=True)
        print("after prepare:", sorted(p.name for p in disk.iterdir()))
    """))
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, err[-3000:]
    assert "rc 2" in out, out
    lines = [x for x in err.splitlines() if x.startswith("ega-ray:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "prepare rc 2" in out and "after prepare: ['s.pt']" in out, out  # its temporary folder removed
    prepared = [x for x in err.splitlines() if x.startswith("ega-ray prepare:")]
    assert len(prepared) == 1 and re.fullmatch(rf"ega-ray prepare: error: no space left on {tmp_path}/disk/digits: "
                                               r"[\d.,]+ MB free", prepared[0]), err  # fmt: skip
    assert re.fullmatch(rf"ega-ray: disk full: no space left on {tmp_path}/disk: [\d.,]+ MB needed, [\d.,]+ MB free",
                        lines[0]), lines  # fmt: skip
    assert re.search(r"torch: no space left on .*/disk: [\d.,]+ MB free", out), out
    assert re.search(r"text: no space left on .*/disk: [\d.,]+ MB needed, [\d.,]+ MB free", out), out
    assert "left: ['s.pt']" in out, "no partial file, no temporary file"


# ------------------------------------------------------------------ temporary folders of killed commands


def test_a_killed_rebuilds_temporary_folder_is_removed_by_the_next_run_and_a_live_one_is_not(tmp_path):
    dest = tmp_path / "data"
    worker = textwrap.dedent(f"""
        import time
        from ega_ray.run_folder import replacing
        with replacing({str(dest)!r}) as tmp:
            (tmp / "part-00000.parquet").write_bytes(b"half a split")
            print(tmp, flush=True)
            time.sleep(120)
    """)
    env = os.environ | {"PYTHONPATH": str(REPO)}
    killed = subprocess.Popen([sys.executable, "-c", worker], stdout=subprocess.PIPE, text=True, env=env)
    dead = Path(killed.stdout.readline().strip())
    killed.kill()  # like `kill -9` or a lost node: no clean-up code runs
    killed.wait()
    live = subprocess.Popen([sys.executable, "-c", worker], stdout=subprocess.PIPE, text=True, env=env)
    try:
        filling = Path(live.stdout.readline().strip())
        old = time.time() - 2 * STALE_AFTER_S
        for tmp in (dead, filling):
            os.utime(tmp, (old, old))  # both old enough: only the lock tells them apart
        with rebuild(dest, "prepare", flag="--out") as tmp:
            (tmp / "prepare.json").write_text("{}")
        assert not dead.exists(), "the killed command's folder is removed by the next run"
        assert filling.is_dir() and (filling / "part-00000.parquet").exists(), "a live one is left alone"
        assert remove_stale_temporaries(dest) == []
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temporaries(dest) == [filling]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# ------------------------------------------------------------------ atomic and current


WRITES_IN_PLACE = re.compile(r"\.write_text\(|\.write_bytes\(|\bopen\([^)]*[\"'][wax]b?\+?[\"']|savefig\((?!tmp)")


def test_no_module_writes_a_file_for_others_in_place():
    """Every file a command leaves for others (metrics.csv, summary.json, eval.json, config.yaml, markers,
    students, reports, plots) goes through ega_ray.disk's atomic writers: no plain write in place elsewhere."""
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in sorted((REPO / "ega_ray").rglob("*.py"))
        if path.name != "disk.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if WRITES_IN_PLACE.search(line)
    ]
    assert not found, "write these with ega_ray.disk.write_atomic / write_with:\n" + "\n".join(found)
    assert WRITES_IN_PLACE.search('with open(path, "w", newline="") as f:'), "the pattern sees a plain write"


def test_an_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = write_atomic(tmp_path / "summary.json", '{"epoch": 2}\n')

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"epo')
        raise KeyboardInterrupt  # a kill

    with pytest.raises(KeyboardInterrupt):
        write_with(target, half_then_fail)
    assert target.read_text() == '{"epoch": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_eval_never_writes_into_a_run_folder_another_command_holds(tmp_path, capsys):
    import numpy as np

    from ega_ray.data.parquet import write_split

    rng = np.random.default_rng(0)
    write_split(tmp_path / "val", rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), np.arange(6) % 3)
    run = tmp_path / "run"
    with claim(run, "distill"):
        write_student(student(), META, run, "student_best", ("pt",))
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from ega_ray.run_folder import claim
            with claim({str(run)!r}, "distill"):
                print("held", flush=True)
                time.sleep(120)
        """)],
        stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    args = ["eval", "--student", str(run / "student_best.pt"), "--data", str(tmp_path / "val")]
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in run.iterdir())
        assert main(args) == 2
        line = one_line(capsys)
        assert line.startswith(f"ega-ray: output folder: --output (default: beside --student) {run}: in use by another")
        assert f"pid {holder.pid}" in line
        assert sorted(p.name for p in run.iterdir()) == before, "nothing written into the held folder"
        # an output elsewhere is not the run's folder: the student may be evaluated while the run goes on
        assert main(args + ["--output", str(tmp_path / "elsewhere")]) == 0
        assert (tmp_path / "elsewhere" / "eval.json").is_file()
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    assert main(args) == 0, "once the run has ended"
    assert (run / "eval-student_best-val" / "eval.json").is_file()
    assert read_marker(run)["kind"] == "distill"



def test_a_runs_final_outputs_never_leave_a_summary_older_than_its_students(tmp_path):
    """A resumed run that dies while writing its final outputs (here: its best student does not rebuild)
    leaves no summary.json describing the earlier, shorter run beside the newer student_last."""
    import json

    import numpy as np
    import ray.train

    from ega_ray.config import parse_config
    from ega_ray.driver.outputs import write_distill_outputs
    from ega_ray.driver.preflight import PreparedData
    from ega_ray.worker.common import STATE_FILE

    out = tmp_path / "run"
    cfg = parse_config({
        "data": {"train": "t", "test": "v", "image_size": META["image_size"]}, "teacher": {"name": "ssl"},
        "student": {"name": "resnet8"}, "distill": {"embed_dim": META["embed_dim"]},
        "run": {"name": "r", "output": str(out)},
    })  # fmt: skip
    data = PreparedData(3, np.ones(10, bool), np.arange(10), 10, 2, 3, None, {"split": "carved"})
    row = {"train_loss": 1.0, "validation_top1": 50.0, "test_top1": 40.0, "test_top5": 90.0, "test_teacher_top1": 30.0}

    def checkpoint(epoch: int, weights: dict) -> ray.train.Checkpoint:
        folder = tmp_path / f"checkpoint-{epoch}-{len(weights)}"
        folder.mkdir()
        history = [{"epoch": e, **row} for e in range(1, epoch + 1)]
        state = {"student": weights, "num_classes": 3, "epoch": epoch, "history": history, "best": {"epoch": epoch}}
        torch.save(state, folder / STATE_FILE)
        return ray.train.Checkpoint.from_directory(str(folder))

    def result(last: ray.train.Checkpoint, best: ray.train.Checkpoint) -> ray.train.Result:
        return ray.train.Result(metrics={}, checkpoint=last, error=None, path=str(out), best_checkpoints=[(best, row)])

    weights = student().state_dict()
    with claim(out, "distill"):
        two = checkpoint(2, weights)
        write_distill_outputs(cfg, data, result(two, two), out, 1.0, deployable=False)
        assert json.loads((out / "summary.json").read_text())["epochs"] == 2
        four, broken = checkpoint(4, weights), checkpoint(4, {"nonsense": torch.zeros(1)})
        with pytest.raises(RuntimeError):
            write_distill_outputs(cfg, data, result(four, broken), out, 1.0, deployable=False)
        assert load_student(out / "student_last.pt")[1]["epoch"] == 4
        assert not (out / "summary.json").exists(), "no summary describing epoch 2 beside an epoch-4 student"
        write_distill_outputs(cfg, data, result(four, four), out, 1.0, deployable=False)
    assert json.loads((out / "summary.json").read_text())["epochs"] == 4
    assert written_here(out / "student_best.pt") and written_here(out / "student_last.safetensors")
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_a_kill_between_the_two_renames_of_a_folder_swap_is_undone_by_the_next_run(tmp_path, monkeypatch):
    """replace_dir moves the old folder aside, then the new one in; a kill between the two leaves no folder
    and a .<name>.old-*: the next rebuild puts it back (the folder as it was) before anything else, and drops
    the ones left after a finished swap; one a live swap just moved aside is left alone."""
    from ega_ray import run_folder

    dest = tmp_path / "data"
    with rebuild(dest, "prepare", flag="--out") as tmp:
        (tmp / "split.txt").write_text("80 rows")
    aside = tmp_path / ".data.old-0a1b2c3d"
    dest.rename(aside)  # killed between the two renames: the folder is gone, its content aside
    young = remove_stale_temporaries(dest)  # seconds after the move it may be a live swap's own
    assert young == [] and aside.is_dir() and not dest.exists()
    monkeypatch.setattr(run_folder, "STALE_AFTER_S", 0.0)  # the kill was long ago
    with pytest.raises(RuntimeError), rebuild(dest, "prepare", flag="--out"):
        raise RuntimeError("the rebuild fails")
    assert (dest / "split.txt").read_text() == "80 rows" and not aside.exists()  # put back, kept by the failure
    after = tmp_path / ".data.old-4e5f6a7b"  # left by a kill after the new folder was in place
    after.mkdir()
    assert remove_stale_temporaries(dest) == [after]
    assert not after.exists() and (dest / "split.txt").is_file()
