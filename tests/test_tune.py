"""Ray Tune search end to end on the smoke config: a search interrupted mid-way (Ctrl-C) and resumed,
its outputs (trials.csv, best.yaml, plots), and the search-space errors refused before Ray starts."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ega_ray.config import ConfigError, load_config, parse_config
from ega_ray.errors import OutputFolderError
from ega_ray.tune.experiment import record_state, state_digests, verify_state
from ega_ray.tune.search import run_search

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_an_interrupted_search_chooses_nothing_and_resumes(tmp_path, local_ray):
    """Ctrl-C once a trial has finished: the command stops there (exit 130, one line) and chooses nothing from
    the unfinished search (Ray Tune's own handler would end the trials as if finished and return them).
    ``--resume`` then finishes it from the saved state and checkpoints."""
    out = tmp_path / "search"
    cmd = [
        sys.executable,
        "-m",
        "ega_ray.cli",
        "tune",
        "--config",
        str(REPO / "configs" / "smoke.yaml"),
        "--num-samples",
        "2",
        "--output",
        str(out),
        "--set",
        "optim.epochs=2",
        "--set",
        "optim.max_steps_per_epoch=6",  # the search and its resume are the test, not the epochs' length
        "--set",
        "scaling.num_workers=1",
        "--set",
        "tune.max_concurrent=1",
        "--set",
        "tune.grace_period=2",
        "--set",
        "tune.search=optuna",  # the optional extra's searcher (in dev), resumed with its state
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "driver.log"
    with open(log, "w") as stderr:
        # SIGINT's default action restored for the driver: a suite started in the background (`make test &`)
        # passes SIGINT ignored to its children, and Python then never raises KeyboardInterrupt
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    try:
        deadline = time.time() + 400
        while not list(out.glob("trials/*/summary.json")):
            assert proc.poll() is None, "the search ended before it could be interrupted"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(2)
        first = next(out.glob("trials/*/summary.json")).parent
        proc.send_signal(signal.SIGINT)  # Ctrl-C, to the driver alone
        assert proc.wait(timeout=180) == 130, log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its local Ray outlived it
        proc.wait()
    ours = [line for line in log.read_text().splitlines() if line.startswith("ega-ray:")]
    want = f"ega-ray: interrupted: {out / 'search'} stopped before its trials ended; nothing was chosen; continue "
    assert len(ours) == 1 and ours[0] == f"{want}with --resume --output {out}", ours
    assert not (out / "trials.csv").exists() and not (out / "best.yaml").exists()

    # state that ega-ray did not write is refused before anything is unpickled or Ray is started
    tuner_pkl = out / "search" / "tuner.pkl"
    genuine = tuner_pkl.read_bytes()
    for plant, restore in (
        (
            lambda: (out / "search" / "evil.pkl").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR."),
            lambda: (out / "search" / "evil.pkl").unlink(),
        ),
        (lambda: tuner_pkl.write_bytes(genuine + b"\n"), lambda: tuner_pkl.write_bytes(genuine)),
    ):
        plant()
        with pytest.raises(OutputFolderError, match=r"did not write \(search/(evil|tuner)\.pkl\)"):
            run_search(None, out, resume=True)
        restore()
    assert not (REPO / "pwned").exists() and not (out / "pwned").exists()
    with pytest.raises(OutputFolderError, match=r"holds an earlier `ega-ray tune`; continue it with --resume"):
        run_search(load_config(REPO / "configs" / "smoke.yaml"), out)

    best = run_search(None, out, resume=True)
    assert list((out / "search").glob("searcher-state-*.pkl")), "OptunaSearch saved no state"
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and best["trials"] == 2
    scores = ("selected_epoch", "validation_top1_at_selected", "test_top1_at_selected", "test_top1_last")
    for column in ("temperature", "node_weight", "edge_weight", "lr", *scores, "epochs", "status"):
        assert column in rows[0]
    assert all(r["status"] == "COMPLETED" and r["epochs"] == "2" for r in rows), rows
    with open(first / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    # a finished trial may be rescheduled (the kill came before Tune recorded it) but trains no epoch again
    assert [(h["epoch"], h["restarts"]) for h in history] == [("1", "0"), ("2", "0")]
    # the best trial is the best on the validation split, whatever the test split says
    assert best["validation_top1_at_selected"] == max(float(r["validation_top1_at_selected"]) for r in rows)
    with open(out / "trials" / best["trial_id"] / "metrics.csv") as f:
        at = list(csv.DictReader(f))[best["selected_epoch"] - 1]
    assert best["test_top1_at_selected"] == pytest.approx(float(at["test_top1"]))
    winner = yaml.safe_load((out / "best.yaml").read_text())
    assert winner["distill"]["ega"]["node_weight"] == pytest.approx(best["node_weight"])
    assert winner["optim"]["lr"] == pytest.approx(best["lr"])
    assert load_config(out / "best.yaml").run.name == "best", "best.yaml is a ready-to-run config"
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.ray
def test_a_diverged_trial_ends_alone_and_is_never_the_best(tmp_path, local_ray):
    """A grid over the lr, one of them absurd: that trial ends as DIVERGED in trials.csv and on search.png,
    the other finishes, and best.yaml is the finished one."""
    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    raw["optim"] |= {"epochs": 1, "milestones": [1], "max_steps_per_epoch": 6}
    raw["scaling"]["num_workers"] = 1
    raw["tune"] = {"space": {"optim.lr": {"type": "grid", "values": [0.05, 1e8]}}, "num_samples": 1}
    out = tmp_path / "search"
    best = run_search(parse_config(raw), out)
    with open(out / "trials.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["lr"]))
    assert [(float(r["lr"]), r["status"]) for r in rows] == [(0.05, "COMPLETED"), (1e8, "DIVERGED")], rows
    key = "validation_top1_at_selected"
    assert rows[1][key] == "nan" and float(rows[0][key]) == best[key]
    assert best["lr"] == 0.05 and load_config(out / "best.yaml").optim.lr == 0.05
    assert not list((out / "trials" / rows[1]["trial_id"]).glob("student_*"))  # nothing of it exported
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"


def test_a_trial_that_failed_before_reporting_is_an_error_row(tmp_path):
    """Ray Tune gives such a trial no config and no metrics: trials.csv still lists it, as an error with no
    epoch and no score, instead of the report failing on it."""
    from ray.tune import Result

    from ega_ray.tune.report import trial_rows

    cfg = parse_config(_raw(**{"optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.1}}))
    failed = Result(metrics=None, checkpoint=None, error=RuntimeError("the trial's node died"),
                    path=str(tmp_path / "search" / "search_trial_ab12cd34_1_optim.lr=0.05"))  # fmt: skip
    ((row, params, history),) = trial_rows([failed], cfg, tmp_path)
    assert (row["trial_id"], row["status"], row["epochs"], params, history) == ("ab12cd34_1", "ERROR", 0, {}, None)
    assert math.isnan(row["validation_top1_at_selected"])


def _raw(**space) -> dict:
    return {"data": {"train": "t", "test": "v"}, "tune": {"space": space}}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"distill.temprature": {"type": "loguniform", "low": 0.1, "high": 1.0}}, r"'distill.temprature' is not a"),
        ({"run.seed": {"type": "choice", "values": [1, 2]}}, r"'run.seed' is not a searchable"),
        ({"distill.ega.node_weight": {"type": "uniform", "low": 1.0, "high": 1.0}}, r"node_weight: empty range"),
        ({"distill.ega.edge_weight": {"type": "choice", "values": []}}, r"edge_weight: choice needs a non-empty"),
        ({"distill.ega.temperature": {"type": "uniform", "low": 0.0, "high": 1.0}}, r"temperature: value 0.0 is not"),
        ({"distill.ega.temperature": {"type": "loguniform", "low": -1, "high": 1.0}}, r"temperature: loguniform needs"),
        ({"distill.ega.node_weight": {"type": "uniform", "low": -1, "high": 1.0}}, r"node_weight: value -1"),
        ({"distill.temperature": {"type": "uniform", "low": 0.1, "high": 1.0}}, r"moved to distill\.ega\.temperature"),
        ({"distill.crd.temperature": {"type": "uniform", "low": 0.1, "high": 1.0}}, r"only for distill.method 'ega'"),
    ],
)
def test_bad_search_spaces_name_the_entry(space, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_raw(**space))


@pytest.mark.heavy
def test_search_space_errors_stop_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_raw(**{"distill.ega.temperature": {"type": "uniform", "low": -0.5, "high": 1.0}})))
    proc = subprocess.run(
        [sys.executable, "-m", "ega_ray.cli", "tune", "--config", str(bad), "--output", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "tune.space.distill.ega.temperature" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr and not (tmp_path / "o").exists()


def test_resume_accepts_only_state_files_it_recorded(tmp_path):
    """The guard on its own: the digest history in the marker, checked against the files in storage."""
    from ega_ray.run_folder import claim

    out, exp = tmp_path / "search", tmp_path / "search" / "search"
    with claim(out, "tune", record={"path": str(out)}):
        exp.mkdir()
        (exp / "tuner.pkl").write_bytes(b"v1")
        (exp / "trial_1").mkdir()
        (exp / "trial_1" / "result.json").write_text("{}")  # data, not state: not recorded, not checked
        record_state(out, state_digests(str(exp)))
        (exp / "tuner.pkl").write_bytes(b"v2")  # Tune rewrites its state as the experiment runs
        record_state(out, state_digests(str(exp)))
    assert set(state_digests(str(exp))) == {"search/tuner.pkl"}
    verify_state(out, str(exp))
    (exp / "tuner.pkl").write_bytes(b"v1")  # storage may lag behind: an older recorded version is fine
    verify_state(out, str(exp))
    (exp / "trial_1" / "error.pkl").write_bytes(b"planted")
    with pytest.raises(OutputFolderError, match=r"did not write \(search/trial_1/error\.pkl\)"):
        verify_state(out, str(exp))


def test_a_trial_is_scored_at_the_epoch_its_validation_split_selected():
    import math

    import pandas as pd

    from ega_ray.tune.report import trial_scores

    # the test split peaks at epoch 2, the validation split at epoch 3 (tied at 4: the first one counts)
    history = pd.DataFrame(
        {"epoch": [1, 2, 3, 4], "validation_top1": [50.0, 60.0, 70.0, 70.0], "test_top1": [40.0, 80.0, 65.0, 66.0]}
    )
    assert trial_scores(history) == {
        "selected_epoch": 3,
        "validation_top1_at_selected": 70.0,
        "test_top1_at_selected": 65.0,
        "test_top1_last": 66.0,
    }
    assert all(math.isnan(v) for v in trial_scores(None).values())


def test_a_trial_copies_its_run_folder_beside_its_checkpoints_only_when_they_are_remote(tmp_path):
    from ega_ray.tune.experiment import copy_folder, run_folder_copy, trial_config

    def trial(storage: str | None):
        base = parse_config({"data": {"train": "t", "test": "v"}, "run": {"storage": storage}})
        return parse_config(trial_config(base.model_dump(mode="json"), Path("/runs/search"), "41ef5_00000"))

    bucket = "s3://bucket/ega-ray?endpoint_override=10.0.0.5:9000&scheme=http"
    # beside the trial's checkpoints (<storage>/<search folder>/trials/<id>), the server's query kept
    assert run_folder_copy(trial(bucket)) == (
        "s3://bucket/ega-ray/search/trials/41ef5_00000/run_folder?endpoint_override=10.0.0.5:9000&scheme=http"
    )
    assert run_folder_copy(trial("/mnt/shared/ckpt")) is None and run_folder_copy(trial(None)) is None

    folder = tmp_path / "run"
    (folder / "tensorboard").mkdir(parents=True)
    (folder / "metrics.csv").write_text("epoch\n1\n")
    (folder / "tensorboard" / "events").write_bytes(b"\0")
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "metrics.csv").write_text("an older copy")
    copy_folder(folder, (tmp_path / "copy").as_uri())  # any pyarrow URI: here a local one
    assert (tmp_path / "copy" / "metrics.csv").read_text() == "epoch\n1\n"
    assert (tmp_path / "copy" / "tensorboard" / "events").read_bytes() == b"\0"
