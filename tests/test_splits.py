"""The validation split carved from the training split (``ega_ray.data.splits`` and the driver's
``prepare_data``): stratified, seeded, deterministic, disjoint from what is trained on. No Ray here."""

from __future__ import annotations

import numpy as np
import pytest

from ega_ray.config import ConfigError, load_config
from ega_ray.data.splits import carve_validation, index_mask, validation_record
from ega_ray.driver.preflight import prepare_data, resolve


def _split(counts: dict[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """labels with ``counts[c]`` rows of class c, in a shuffled order; index 0..N−1 shuffled too."""
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    return labels[order], rng.permutation(len(labels))


def test_carving_is_stratified_with_each_class_represented():
    labels, index = _split({0: 100, 1: 40, 2: 7, 3: 2})
    carved = carve_validation(labels, index, 0.1, seed=0)
    by_index = dict(zip(index.tolist(), labels.tolist(), strict=True))
    per_class = np.bincount([by_index[i] for i in carved], minlength=4)
    assert per_class.tolist() == [10, 4, 1, 1]  # round(0.1·n), at least one per class
    assert len(set(carved.tolist())) == len(carved) and (np.diff(carved) > 0).all()


def test_carving_keeps_a_training_row_of_every_class_and_skips_unlabeled_rows():
    labels, index = _split({0: 2, 1: 3, -1: 50})
    carved = carve_validation(labels, index, 0.9, seed=1)
    by_index = dict(zip(index.tolist(), labels.tolist(), strict=True))
    carved_labels = sorted(by_index[i] for i in carved)
    assert carved_labels == [0, 1, 1]  # at most n − 1 per class; never an unlabeled row
    rest = [by_index[i] for i in set(index.tolist()) - set(carved.tolist())]
    assert {0, 1} <= set(rest)


def test_carving_is_deterministic_whatever_the_row_order_and_depends_on_the_seed():
    labels, index = _split({0: 60, 1: 60, 2: 60})
    first = carve_validation(labels, index, 0.2, seed=3)
    order = np.random.default_rng(9).permutation(len(labels))
    assert np.array_equal(first, carve_validation(labels[order], index[order], 0.2, seed=3))
    assert not np.array_equal(first, carve_validation(labels, index, 0.2, seed=4))
    assert len(carve_validation(labels, index, 0.5, seed=3)) == 90


def test_carving_refuses_a_class_too_small_and_a_split_without_labels():
    labels, index = _split({0: 10, 1: 1})
    with pytest.raises(ValueError, match=r"^data\.train: class 1 has 1 labeled row; .* at least 2 per class"):
        carve_validation(labels, index, 0.1, seed=0)
    with pytest.raises(ValueError, match="no labeled row"):
        carve_validation(np.full(5, -1), np.arange(5), 0.1, seed=0)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\)"):
        carve_validation(labels, index, 1.0, seed=0)


def test_record_lists_the_rows_and_their_classes():
    labels, index = _split({0: 20, 1: 10})
    carved = carve_validation(labels, index, 0.1, seed=0)
    record = validation_record(carved, labels, index, "/data/train", 0.1, 0)
    assert record["index"] == carved.tolist() and record["rows"] == 3
    assert record["rows_per_class"] == {"0": 2, "1": 1} and (record["fraction"], record["seed"]) == (0.1, 0)
    assert index_mask(carved, 30).sum() == 3


def test_prepare_data_removes_the_carved_rows_from_training_and_from_the_label_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("EGA_RAY_CACHE", str(tmp_path / "cache"))
    overrides = ["data.train=builtin:digits", "data.test=builtin:digits", "data.label_fraction=0.1"]
    cfg = resolve(load_config(None, overrides), check_teacher_file=False)
    data = prepare_data(cfg)
    carved = np.asarray(data.validation["index"])
    assert data.num_validation == len(carved) == 145 and data.num_train == 1437 - 145
    assert data.carved[carved].all() and data.carved.sum() == len(carved)
    assert not data.keep[carved].any(), "a validation row never lends its label to training"
    assert data.keep.sum() == 132  # the 10% label budget of the 1,292 rows left, per class rounded up
    assert (data.trained == ~data.carved).all()
    again = prepare_data(resolve(load_config(None, [*overrides, "run.seed=5"]), check_teacher_file=False))
    assert again.validation["index"] == data.validation["index"], "run.seed does not move the validation split"
    other = prepare_data(resolve(load_config(None, [*overrides, "data.validation_seed=1"]), check_teacher_file=False))
    assert other.validation["index"] != data.validation["index"]


def test_too_few_training_rows_left_for_a_batch(tmp_path, monkeypatch):
    from ega_ray.driver.preflight import check_distill

    monkeypatch.setenv("EGA_RAY_CACHE", str(tmp_path / "cache"))
    overrides = ["data.train=builtin:digits", "data.test=builtin:digits", "data.validation_fraction=0.95"]
    overrides += ["optim.batch_size=256", "distill.ega.graph_size=null", "teacher.name=zoo:resnet8"]
    cfg = resolve(load_config(None, overrides))
    with pytest.raises(ConfigError, match=r"^optim\.batch_size: 256 .* data\.train: \d+ rows trained on \(less the"):
        check_distill(cfg)


def test_the_summary_reports_test_at_the_epoch_validation_selected():
    from ega_ray.driver.outputs import selected_scores

    history = [
        {"epoch": e, "validation_top1": v, "test_top1": t, "test_top5": t + 5, "test_teacher_top1": 30.0 + e}
        for e, v, t in ((1, 50.0, 40.0), (2, 70.0, 65.0), (3, 60.0, 90.0))
    ]
    scores = selected_scores(history, selected_epoch=2)
    assert (scores["selected_epoch"], scores["validation_top1_at_selected"]) == (2, 70.0)
    assert (scores["test_top1_at_selected"], scores["test_top5_at_selected"]) == (65.0, 70.0)  # not test's best, 90
    assert (scores["test_top1_last"], scores["validation_top1_last"]) == (90.0, 60.0)
    assert scores["test_teacher_head_top1_at_selected"] == 32.0 and scores["selected_by"] == "validation_top1"
