"""The validation split carved from the training split: the rows that select (the best epoch, Tune's trials,
the benchmark's tuned settings), held out of training so that the test split is only ever reported on.

Pure functions of the split's ``index`` and ``label`` columns (no torch, no Ray): the same rows, fraction
and seed always carve the same validation rows, whatever order the rows are stored in.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def carve_validation(labels: np.ndarray, index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The ``index`` values (sorted) of the validation rows carved from a training split.

    Stratified: of each class's ``n`` labeled rows, ``round(fraction·n)`` are drawn with ``seed``, at least
    one (every class is represented) and at most ``n − 1`` (every class keeps a training row). Unlabeled
    rows (label −1) stay in training: a validation row needs its label.

    Args:
        labels: the split's labels (−1 = unlabeled), one per row.
        index: the split's ``index`` column, one per row (unique).
        fraction: the share of each class's labeled rows to carve, in (0, 1).
        seed: the draw's seed (``data.validation_seed``).

    Returns:
        The carved rows' ``index`` values, sorted.

    Raises:
        ValueError: no labeled row, or a class with fewer than two labeled rows (it cannot be on both sides).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"data.validation_fraction must be in (0, 1), got {fraction}")
    order = np.argsort(index, kind="stable")  # the stored row order must not change the draw
    labels, index = np.asarray(labels)[order], np.asarray(index)[order]
    classes = np.unique(labels[labels >= 0])
    if len(classes) == 0:
        raise ValueError("data.train has no labeled row to carve a validation split from")
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in classes:
        members = index[labels == cls]
        n = len(members)
        if n < 2:
            raise ValueError(
                f"data.train: class {cls} has {n} labeled row; carving a validation split needs at least 2 per "
                f"class (one for each side): give an explicit data.validation split"
            )
        k = min(n - 1, max(1, int(np.floor(fraction * n + 0.5))))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def index_mask(values: np.ndarray, size: int) -> np.ndarray:
    """A boolean array of ``size`` over index values, True at ``values``."""
    mask = np.zeros(size, dtype=bool)
    mask[values] = True
    return mask


def validation_record(
    carved: np.ndarray | None, labels: np.ndarray, index: np.ndarray, source: str, fraction: float, seed: int
) -> dict[str, Any]:
    """What ``validation_rows.json`` records: where the validation split comes from, its rows per class and,
    when carved, the fraction, the seed and the carved rows' ``index`` values in the training split.

    Args:
        carved: the carved rows' index values (:func:`carve_validation`), or None for an explicit split.
        labels: the labels of the split the rows are in (data.train when carved, else data.validation).
        index: that split's ``index`` column.
        source: that split's path.
        fraction: data.validation_fraction (recorded when carved).
        seed: data.validation_seed (recorded when carved).

    Returns:
        A JSON-serialisable dict.
    """
    if carved is None:
        values, counts = np.unique(labels, return_counts=True)
        return {
            "split": "data.validation",
            "path": source,
            "rows": int(len(labels)),
            "rows_per_class": {str(int(c)): int(n) for c, n in zip(values, counts, strict=True)},
        }
    chosen = index_mask(carved, int(index.max()) + 1)[index]
    values, counts = np.unique(labels[chosen], return_counts=True)
    return {
        "split": "carved from data.train",
        "path": source,
        "fraction": fraction,
        "seed": seed,
        "rows": int(len(carved)),
        "rows_per_class": {str(int(c)): int(n) for c, n in zip(values, counts, strict=True)},
        "index": [int(i) for i in carved],
    }
