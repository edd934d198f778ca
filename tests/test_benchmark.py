"""`ega-ray benchmark` end to end on the smoke config: two methods (CRD and the CE-only student), one seed,
through Ray Tune, with reference weights and after the same 1-trial search per method; its results files;
a resume of the finished benchmark; bad method lists."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import pytest

from ega_ray.config import ConfigError, load_config, parse_config
from ega_ray.tune.benchmark import run_benchmark
from ega_ray.tune.methods import best_trial, method_config, method_space, parse_methods, tuned_choice

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_benchmark_runs_each_method_and_writes_its_table(tmp_path, local_ray):
    """One small end-to-end benchmark (CRD and the CE-only student it always adds, one seed, a 1-trial search
    each): the Tune phases, the run folders, the files and a resume. Each method's run config and search space,
    the tuned choice and the tables are pure functions, tested below and in test_stats.py on synthetic rows."""
    # one worker, one epoch of 4 steps: the test is about what runs and what is written, not accuracy
    short = ["optim.epochs=1", "optim.milestones=[1]", "optim.max_steps_per_epoch=4", "scaling.num_workers=1"]
    cfg = load_config(REPO / "configs" / "smoke.yaml", short)
    out = tmp_path / "bench"
    rows = run_benchmark(cfg, ["crd"], seeds=1, output=out, tune_trials=1)
    assert [(r["method"], r["variant"]) for r in rows] == [
        ("crd", "reference"), ("ce", "reference"), ("crd", "tuned"), ("ce", "tuned")
    ]  # fmt: skip
    with open(out / "results.csv") as f:
        saved = list(csv.DictReader(f))
    assert [(r["method"], r["variant"], r["seed"], r["epochs"], r["status"]) for r in saved] == [
        (m, v, "0", "1", "finished") for v in ("reference", "tuned") for m in ("crd", "ce")
    ]
    table = (out / "results.md").read_text()
    for label in ("| crd |", "| CE only (no teacher) |", "| teacher head", "the same search budget, 1 trial"):
        assert label in table, table
    # every method searched its own knobs and the lr (sampled from method_space, tested below); its tuned runs
    # use the best trial's values if that trial beat the reference settings' seed-0 run, else the reference
    # settings, which are not rerun
    searched = [load_config(p) for p in sorted((out / "trials").glob("tune-crd-*/config.yaml"))]
    assert len(searched) == 1 and searched[0].distill.method == "crd"
    assert 0.03 <= searched[0].distill.crd.temperature <= 0.3 and 0.0125 <= searched[0].optim.lr <= 0.2
    assert searched[0].optim.lr != cfg.optim.lr, "the trial ran the lr it sampled, not the reference's"
    tuned_settings = json.loads((out / "tuned_settings.json").read_text())
    best, seed0 = tuned_settings["best"], tuned_settings["seed0_validation_top1"]
    for method in ("crd", "ce"):
        reference = [r for r in rows if (r["method"], r["variant"]) == (method, "reference")]
        tuned = [r for r in rows if (r["method"], r["variant"]) == (method, "tuned")]
        assert seed0[method]["reference"] == reference[0]["validation_top1_at_selected"]  # chosen on validation
        assert {"test_top1_at_selected", "test_top1_last"} <= set(reference[0])
        searched_knobs = set(method_space(method))
        assert set(best[method]) == (searched_knobs if seed0[method]["search"] > seed0[method]["reference"] else set())
        folder = out / "trials" / f"{method}-tuned-seed0"
        if best[method]:  # new settings: the seeds ran again with them
            ran = load_config(folder / "config.yaml").model_dump()
            ran_values = {k: functools.reduce(lambda node, part: node[part], k.split("."), ran) for k in best[method]}
            assert ran_values == pytest.approx(best[method])  # dotted paths: distill.crd.temperature, optim.lr
        else:  # the reference settings: their runs are the tuned rows
            assert not folder.exists() and tuned == [r | {"variant": "tuned"} for r in reference]
        run = load_config(out / "trials" / f"{method}-seed0" / "config.yaml")  # its method and reference weights
        assert (run.distill.method, run.distill.gamma, run.distill.beta) == (
            ("crd", 1.0, 0.8) if method == "crd" else ("ega", 1.0, 0.0)
        )
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    # resuming a finished benchmark trains nothing again and reports the same runs
    again = run_benchmark(None, [], seeds=0, output=out, resume=True)
    assert again == rows and json.loads((out / "tuned_settings.json").read_text())["best"] == best


def test_each_method_runs_with_its_reference_weights_and_searches_its_own_knobs(tmp_path) -> None:
    weights = {"method": "ega", "gamma": 1.0, "beta": 2.0, "alpha": 0.5}
    base = {"distill": weights, "optim": {"lr": 0.05}, "run": {"storage": None}}
    ce = method_config(base, "ce", 3, tmp_path)  # the CE-only student: the loop without its distiller
    assert (ce["distill"]["beta"], ce["distill"]["method"], ce["run"]["seed"]) == (0.0, "ega", 3)
    assert ce["run"]["name"] == "ce-seed3"
    crd = method_config(base, "crd", 0, tmp_path)
    assert (crd["distill"]["gamma"], crd["distill"]["beta"], crd["distill"]["alpha"]) == (1.0, 0.8, 0.0)
    ega = method_config(base, "ega", 0, tmp_path)  # EGA keeps the config's own weights
    assert (ega["distill"]["beta"], ega["distill"]["alpha"]) == (2.0, 0.5)
    mine = method_config(base, "pkt", 0, tmp_path, reference_weights=False)
    assert (mine["distill"]["gamma"], mine["distill"]["beta"]) == (1.0, 2.0)
    tuned = method_config(base, "crd", 1, tmp_path, params={"optim.lr": 0.1}, name="crd-tuned-seed1")
    assert (tuned["optim"]["lr"], tuned["run"]["name"]) == (0.1, "crd-tuned-seed1")
    assert set(method_space("ce")) == {"optim.lr"}
    assert set(method_space("crd")) == {"distill.crd.temperature", "distill.beta", "optim.lr"}
    # a dumped EGA config (its ega settings, its search space) becomes a CRD run that searches CRD's own
    dumped = load_config(REPO / "configs" / "smoke.yaml").model_dump(mode="json")
    assert "ega" in dumped["distill"] and "distill.ega.temperature" in dumped["tune"]["space"]
    searched = parse_config(method_config(dumped, "crd", 0, tmp_path, params={"distill.crd.temperature": 0.1}))
    assert (searched.distill.method, searched.distill.crd.temperature, searched.distill.ega) == ("crd", 0.1, None)
    assert not any(key.startswith("distill.ega.") for key in searched.tune.space)


def test_tuned_settings_are_the_reference_unless_a_trial_beat_it() -> None:
    found = {"optim.lr": 0.1}
    assert tuned_choice(91.0, found, 90.0) == found
    assert tuned_choice(90.0, found, 90.0) == {}  # a tie keeps the reference: the smaller change
    assert tuned_choice(39.4, found, 90.0) == {}
    assert tuned_choice(None, {}, 90.0) == {}  # every trial diverged: the reference
    assert tuned_choice(39.4, found, None) == found  # the reference's seed-0 run diverged


def test_a_diverged_search_trial_is_never_the_best() -> None:
    fast, slow = {"optim.lr": 1e3}, {"optim.lr": 0.05}
    # the diverged trial's earlier epochs scored higher: it is still not chosen
    assert best_trial([(None, "a", fast), (61.0, "b", slow)]) == (61.0, slow)
    assert best_trial([(None, "a", fast), (None, "b", slow)]) == (None, {})
    assert best_trial([(61.0, "c", fast), (61.0, "b", slow)]) == (61.0, slow)  # a tie: the first trial by id


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty"), ("ega,fitnet", "unknown method 'fitnet'"), ("kd,kd", "names a method twice")],
)
def test_bad_method_lists_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_methods(text)


def test_benchmark_resume_needs_a_benchmark(tmp_path):
    with pytest.raises(ConfigError, match="holds no `ega-ray benchmark` to resume"):
        run_benchmark(None, [], seeds=0, output=tmp_path, resume=True)


def test_results_files_keep_one_row_per_run_and_leave_diverged_runs_out(tmp_path) -> None:
    """write_results on synthetic rows (no Ray): a diverged run is a row with its status and no scores, named
    in results.md, out of its method's mean; the plot is drawn from the finished runs."""
    from test_stats import ROWS

    from ega_ray.config import parse_config
    from ega_ray.tune.benchmark import summary_rows, write_results

    cfg = parse_config({"data": {"train": "t", "test": "v"}})
    write_results(ROWS, cfg, ["ega", "kd", "ce"], tmp_path, wall_s=3.0)
    with open(tmp_path / "results.csv") as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == len(ROWS) and [r["status"] for r in saved].count("diverged") == 1
    kd1 = next(r for r in saved if (r["method"], r["seed"]) == ("kd", "1"))
    assert (kd1["status"], kd1["test_top1_at_selected"], kd1["test_top1_last"]) == ("diverged", "", "")
    table = (tmp_path / "results.md").read_text()
    assert "| kd | 2 of 3 (1 diverged) | 92.50 ± 0.71 |" in table and "- kd, seed 1: diverged (" in table
    assert dict((m, best) for m, best, _ in summary_rows(ROWS, ["kd"]))["kd"] == [93.0, 92.0]
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
