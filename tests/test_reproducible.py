"""Reproducible runs (``run.deterministic``): the per-row randomness and the row-to-rank assignment as pure
functions, then real Ray runs: the same config and seed twice give the same metrics.csv (times and
throughputs aside) and bit-identical student weights in every teacher mode with 1 and 2 workers, another
seed gives another run, and a run interrupted after epoch 1 and resumed ends as the uninterrupted one (its
folder then refuses other settings and trains on when given more epochs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.train import TrainingFailedError

from ega_ray.config import load_config
from ega_ray.data.augment import ViewMaker, row_uniforms
from ega_ray.data.epoch_rows import EpochRows, epoch_order, rank_rows
from ega_ray.driver.launch import run_distill
from ega_ray.driver.preflight import resolve

REPO = Path(__file__).resolve().parents[1]
SHORT = ["optim.epochs=2", "optim.max_steps_per_epoch=3", "run.progress_bar=false"]


# --- pure: per-row augmentation ------------------------------------------------------------------------


def views() -> ViewMaker:
    return ViewMaker(
        pad=4, flip=True, student_size=32, student_mean=(0.5,) * 3, student_std=(0.25,) * 3, device=torch.device("cpu")
    )


def test_a_rows_view_depends_on_seed_epoch_and_index_only():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=gen)
    index = torch.arange(100, 116)
    v = views()
    v.set_epoch(7, 2)
    whole = v.student(images, True, index=index)
    # another batch composition and order, another ViewMaker whose stream generator has moved on
    w = views()
    w.reseed(123)
    w.student(images, True)  # draws from the stream generator, not from the keyed draws
    w.set_epoch(7, 2)
    order = torch.randperm(16, generator=gen)
    part = w.student(images[order[:5]], True, index=index[order[:5]])
    assert torch.equal(part, whole[order[:5]])
    v.set_epoch(8, 2)
    assert not torch.equal(v.student(images, True, index=index), whole), "another seed, other views"
    v.set_epoch(7, 3)
    assert not torch.equal(v.student(images, True, index=index), whole), "another epoch, other views"


def test_row_uniforms_are_uniform_and_separate_streams():
    index = torch.arange(50_000)
    u = row_uniforms(index, 0, 0, 0, 3)
    assert u.shape == (50_000, 3) and 0 <= float(u.min()) and float(u.max()) < 1
    assert torch.allclose(u.mean(0), torch.full((3,), 0.5), atol=0.01)
    assert torch.equal(u, row_uniforms(index, 0, 0, 0, 3))
    other = row_uniforms(index, 0, 0, 1, 3)  # the teacher's view of the same row: an independent draw
    assert abs(float(torch.corrcoef(torch.stack([u[:, 0], other[:, 0]]))[0, 1])) < 0.02


# --- pure: rows per rank -------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_rows_are_disjoint_equal_complete_and_deterministic(world):
    n, per_rank = 1437, 1437 // world
    ranks = [rank_rows(n, 5, 1, r, world, per_rank) for r in range(world)]
    assert all(len(r) == per_rank for r in ranks)
    together = np.concatenate(ranks)
    assert len(np.unique(together)) == len(together), "disjoint"
    assert len(together) == n - n % world, "every row but the remainder"
    assert all(np.array_equal(a, rank_rows(n, 5, 1, r, world, per_rank)) for r, a in enumerate(ranks))
    assert not np.array_equal(ranks[0], rank_rows(n, 5, 2, 0, world, per_rank)), "another epoch, another order"
    assert not np.array_equal(ranks[0], rank_rows(n, 6, 1, 0, world, per_rank)), "another seed, another order"
    with pytest.raises(ValueError, match="cannot give"):
        rank_rows(n, 5, 1, 0, world, -(-n // world) + 1)  # more than any rank has
    assert sorted(epoch_order(n, 5, 1)) == list(range(n))


@pytest.mark.parametrize("keep_bytes", [0, 1 << 30])
def test_epoch_rows_do_not_depend_on_the_order_rows_arrive_in(keep_bytes):
    """The rows trained on are the training split less a carved validation split: their ``index`` values are
    not 0..n-1; a rank's rows are the epoch's permutation of their positions, whatever order they arrive in."""
    n, total = 300, 360
    indices = np.sort(np.random.default_rng(1).permutation(total)[:n])  # 60 rows carved out
    images = np.random.default_rng(0).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    table = {"image": images, "label": np.arange(n) % 10, "index": indices}

    def stream(seed: int):
        def read():
            order = np.random.default_rng(seed).permutation(n)  # blocks and rows in another order per pass
            for start in range(0, n, 37):
                rows = order[start : start + 37]
                yield {k: v[rows] for k, v in table.items()}

        return read

    a = EpochRows(stream(1), indices, rank=1, world=2, seed=3, keep_bytes=keep_bytes)
    b = EpochRows(stream(2), indices[::-1], rank=1, world=2, seed=3, keep_bytes=keep_bytes)
    for epoch in range(3):
        got_a, got_b = list(a.batches(epoch, 16, 4)), list(b.batches(epoch, 16, 4))
        assert len(got_a) == 4 and all(len(x["index"]) == 16 for x in got_a)
        for x, y in zip(got_a, got_b, strict=True):
            assert all(np.array_equal(x[k], y[k]) for k in table)
            position = np.searchsorted(indices, x["index"])
            assert np.array_equal(x["image"], images[position]), "each row's columns travel together"
        want = indices[rank_rows(n, 3, epoch, 1, 2, 64)]
        assert np.array_equal(np.concatenate([x["index"] for x in got_a]), want)
    assert a.passes == (1 if keep_bytes else 3), "a small split is read once and kept"
    stray = EpochRows(stream(1), indices[1:], rank=0, world=1, seed=3, keep_bytes=keep_bytes)
    with pytest.raises(ValueError, match="not among the rows trained on"):
        list(stray.batches(0, 16, 1))


# --- Ray: two runs, another seed, an interrupted run ---------------------------------------------------


def config(out: Path, teacher: tuple[Path, Path | None], mode: str, workers: int, *more: str):
    """The smoke config, short, with this teacher (its weights file and, for the cached mode, its cache)."""
    weights, cache = teacher
    extra = [f"teacher.cache={cache}"] if mode == "cached" else []
    return load_config(
        REPO / "configs" / "smoke.yaml",
        [f"run.output={out}", f"teacher.weights={weights}", f"teacher.mode={mode}", *extra,
         f"scaling.num_workers={workers}", *SHORT, *more],
    )  # fmt: skip


def outcome(run_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """metrics.csv without its time and throughput columns, and the last student's weights."""
    with open(run_dir / "metrics.csv") as f:
        rows = [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in csv.DictReader(f)]
    state = torch.load(run_dir / "student_last.pt", weights_only=True)
    return rows, state["state_dict"] if "state_dict" in state else state


def assert_same(a: tuple, b: tuple, what: str) -> None:
    (rows_a, weights_a), (rows_b, weights_b) = a, b
    assert rows_a == rows_b, f"{what}: metrics differ"
    tensors = {k for k, v in weights_a.items() if isinstance(v, torch.Tensor)}
    assert tensors and tensors == {k for k, v in weights_b.items() if isinstance(v, torch.Tensor)}
    different = [k for k in sorted(tensors) if not torch.equal(weights_a[k], weights_b[k])]
    assert not different, f"{what}: weights differ in {different[:5]}"


@pytest.fixture(scope="session")
def runs(shared_outputs, local_ray):
    """Each (mode, workers) run once per session (tests/conftest.py's shared outputs: whichever pytest-xdist
    process needs it first runs it), as (metrics without times, last weights)."""
    done = {}

    def get(mode: str, workers: int, teacher: tuple[Path, Path | None]) -> tuple:
        if (mode, workers) not in done:

            def make(folder: Path) -> None:
                run_distill(config(folder, teacher, mode, workers), trial=True)

            done[mode, workers] = outcome(shared_outputs.get(f"reproducible-{mode}-{workers}", make)[0])
        return done[mode, workers]

    return get


@pytest.fixture
def teacher(request, teacher_resnet8) -> tuple[Path, Path | None]:
    """The teacher weights file, and its 2-view cache when the test runs the cached mode (built on first use)."""
    cached = getattr(request.node, "callspec", None) and request.node.callspec.params.get("mode") == "cached"
    return teacher_resnet8, request.getfixturevalue("teacher_cache_2_views")[0] if cached else None


# (online, 2 workers) is run a second time by the next test: its interrupted and resumed run must end with the
# same metrics and weights as the shared first run, a stronger check than a second uninterrupted run
SECOND_RUNS = [(mode, w) for mode in ("online", "cached", "pipeline") for w in (2, 1) if (mode, w) != ("online", 2)]


@pytest.mark.ray
@pytest.mark.parametrize(("mode", "workers"), SECOND_RUNS)
def test_the_same_run_twice_gives_the_same_metrics_and_weights(tmp_path, teacher, runs, mode, workers):
    first = runs(mode, workers, teacher)
    run_distill(config(tmp_path / "again", teacher, mode, workers), trial=True)
    assert_same(first, outcome(tmp_path / "again"), f"{mode} with {workers} worker(s)")
    rows = first[0]  # the teacher head scored, whichever mode gave it its embeddings
    assert [int(r["epoch"]) for r in rows] == [1, 2] and 0.0 <= float(rows[-1]["test_teacher_top1"]) <= 100.0


@pytest.mark.ray
def test_another_seed_gives_another_run_and_a_resumed_run_ends_as_the_uninterrupted_one(tmp_path, teacher, runs):
    reference = runs("online", 2, teacher)
    run_distill(config(tmp_path / "seed1", teacher, "online", 2, "run.seed=1"), trial=True)
    rows, weights = outcome(tmp_path / "seed1")
    assert rows[0]["train_loss"] != reference[0][0]["train_loss"]
    assert not all(torch.equal(weights[k], reference[1][k]) for k in weights if isinstance(weights[k], torch.Tensor))

    run_dir = tmp_path / "resumed"
    cfg = config(run_dir, teacher, "online", 2, "run.fail_after_epoch=1", "run.max_failures=0")
    with pytest.raises(TrainingFailedError):
        run_distill(cfg, trial=True)
    # recorded as the run went, not when it ended: the failed run left its first epoch and its checkpoint
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == [1]
    first = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(first) == 1, "the failed run keeps the checkpoint of epoch 1"
    state = torch.load(first[0] / "state.pt", weights_only=True)
    assert state["epoch"] == 1

    summary = run_distill(cfg, trial=True)  # the same folder: resumes (the injected failure fires only once)
    rows, weights = outcome(run_dir)
    assert [(r["epoch"], r["restarts"]) for r in rows] == [("1", "0"), ("2", "1")], "no epoch lost or counted twice"
    assert float(rows[0]["train_loss"]) == pytest.approx(state["history"][0]["train_loss"])
    assert_same(reference, ([r | {"restarts": "0"} for r in rows], weights), "interrupted after epoch 1 and resumed")
    check_interrupted_run_folder(cfg, teacher, run_dir, state, summary)


def check_interrupted_run_folder(cfg, teacher: tuple, run_dir: Path, state: dict, summary: dict) -> None:
    """What an interrupted and resumed run folder holds and accepts: other settings refused before anything is
    written (another validation split too), more epochs resumed, every epoch once in TensorBoard, the protocol's
    splits and scores, and the latest checkpoint as Ray Train registered it."""
    from test_tracking import read_scalars

    from ega_ray.errors import OutputFolderError
    from ega_ray.worker.common import latest_state

    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    other = {"distill.method=kd": r"distill.method: \"ega\" → \"kd\"",
             "data.validation_seed=1": "data.validation_seed: 0 → 1"}  # another validation split  # fmt: skip
    for setting, change in other.items():
        with pytest.raises(OutputFolderError, match=rf"holds a run with other settings \({change}\)"):
            run_distill(config(run_dir, teacher, "online", 2, setting), trial=True)
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    assert summary["epochs"] == 2
    summary = run_distill(config(run_dir, teacher, "online", 2, "optim.epochs=3"), trial=True)
    assert summary["epochs"] == 3
    assert [(int(r["epoch"]), int(r["restarts"])) for r in read_metrics(run_dir)] == [(1, 0), (2, 1), (3, 2)]
    assert [step for step, _ in read_scalars(run_dir / "tensorboard")["validation/top1"]] == [1, 2, 3]
    check_selection_and_splits(cfg, run_dir, summary)
    # the latest checkpoint is the one Ray Train registered, not the newest-looking folder on disk
    stray = run_dir / "checkpoint_2099-12-31_23-59-59.999999"
    stray.mkdir()
    torch.save({**state, "epoch": 999}, stray / "state.pt")
    assert latest_state(str(run_dir.parent), run_dir.name)["epoch"] == 3


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def check_selection_and_splits(cfg, run_dir: Path, summary: dict) -> None:
    """The protocol (docs/method.md): the recorded validation rows are apart from the test split and from the
    rows the workers train on, and summary.json reports the test split at the epoch validation selected."""
    import numpy as np
    import pyarrow.parquet as pq

    from ega_ray.driver.launch import decoded_splits
    from ega_ray.driver.preflight import prepare_data

    resolved = resolve(cfg)
    recorded = json.loads((run_dir / "validation_rows.json").read_text())
    carved = set(recorded["index"])
    assert recorded["split"] == "carved from data.train" and recorded["path"] == resolved.data.train
    assert len(carved) == recorded["rows"] == summary["validation_rows"] > 0
    assert len(recorded["rows_per_class"]) == 10, "every class is in the validation split"
    train = pq.read_table(resolved.data.train).to_pydict()
    test_images = set(pq.read_table(resolved.data.test).to_pydict()["image"])
    validation_images = {im for im, i in zip(train["image"], train["index"], strict=True) if i in carved}
    assert len(validation_images) == len(carved) and not validation_images & test_images
    # the training split the workers get (the same function run_distill hands to Ray Train) lacks them
    trained, evals, _ = decoded_splits(resolved, prepare_data(resolved))
    trained_index = set(np.concatenate([b["index"] for b in trained.iter_batches(batch_format="numpy")]).tolist())
    assert not trained_index & carved and len(trained_index) + len(carved) == len(train["index"])
    assert set(np.concatenate([b["index"] for b in evals["validation"].iter_batches()]).tolist()) == carved

    rows = read_metrics(run_dir)
    validation = [float(r["validation_top1"]) for r in rows]
    selected = int(np.argmax(validation)) + 1  # the first best validation epoch
    assert summary["selected_epoch"] == selected and summary["selected_by"] == "validation_top1"
    assert summary["validation_top1_at_selected"] == pytest.approx(validation[selected - 1])
    assert summary["test_top1_at_selected"] == pytest.approx(float(rows[selected - 1]["test_top1"]))
    assert summary["test_top1_last"] == pytest.approx(float(rows[-1]["test_top1"]))
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert not any(k.startswith(("best_", "val_")) for k in summary), "every score names its split"
    assert summary["checkpoints"] == str(run_dir)  # run.storage unset: beside the run folder, and it says so
