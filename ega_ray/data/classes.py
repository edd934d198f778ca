"""The classes of a dataset, checked where a mismatch would otherwise pass as a plausible result: a dataset
of fewer than two classes (``ega-ray prepare``, a run's splits) and a split evaluated by a student trained
on other classes (``ega-ray eval``).

A prepared split's class names are in the ``prepare.json`` beside it (``OUT/prepare.json`` for
``OUT/<split>``), which ``ega-ray prepare`` writes; a student records the names of the classes it was
trained on (``class_names`` in its metadata, ``ega_ray.export``) when its training split had them.
Imports neither torch nor Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ega_ray.errors import DataError
from ega_ray.uris import is_uri

MIN_CLASSES = 2  # what a classifier needs; one class trains a model that is always right and learns nothing
SHOWN = 3  # names or differences a message lists before "…"

# How ``match_classes`` related a split's classes to the student's (eval.json's ``class_check``)
CHECKED_BY_NAMES = "names"  # both record names, and they are the same, in the same order
CHECKED_BY_COUNT = "count"  # the split's prepare.json has as many classes; the student records no names
CHECKED_BY_LABELS = "labels"  # the split records no names: only its labels are known to be the student's classes


def distinct_labels(labels: np.ndarray) -> np.ndarray:
    """The classes present among the labeled rows (−1 = unlabeled is left out), sorted."""
    return np.unique(labels[labels >= 0])


def fewer_than_two(labels: np.ndarray, where: str) -> str | None:
    """Why the labeled rows of ``where`` cannot train or test a classifier (None when they hold at least two
    classes, or no labeled row at all: that case has its own message where it matters)."""
    present = distinct_labels(labels)
    if len(present) == 1:
        return (
            f"{where} has labeled rows of one class only (label {int(present[0])}); a classifier needs at least "
            f"{MIN_CLASSES} classes"
        )
    return None


def too_few_names(classes: list[str] | None, where: str) -> str | None:
    """Why a dataset whose format lists ``classes`` cannot train a classifier (None: at least two, or unknown)."""
    if classes is not None and len(classes) < MIN_CLASSES:
        listed = f" ({_shown(classes)})" if classes else ""
        return f"{where} has {len(classes)} class{listed}; a classifier needs at least {MIN_CLASSES} classes"
    return None


def _shown(names: list[str]) -> str:
    more = ", …" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def prepared_class_names(split_path: str) -> list[str] | None:
    """The class names that ``ega-ray prepare`` recorded for the split at ``split_path`` (in the prepare.json
    beside it, which must list the split), or None: a URI, a split written otherwise, names not recorded.

    Args:
        split_path: a split's local folder (resolved) or a URI.

    Returns:
        The names, in label order, or None.
    """
    if is_uri(split_path):
        return None
    folder = Path(split_path.rstrip("/"))
    try:
        report = json.loads((folder.parent / "prepare.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or folder.name not in (report.get("splits") or {}):
        return None
    classes = report.get("classes")
    if isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes):
        return classes
    return None


def trained_class_names(train_path: str, num_classes: int) -> list[str] | None:
    """What a student trained on split ``train_path`` with ``num_classes`` classes records as its class names:
    the split's prepared names when they are as many (``data.num_classes`` may add classes no name covers)."""
    names = prepared_class_names(train_path)
    return names if names is not None and len(names) == num_classes else None


def match_classes(
    flag: str, path: str, labels: np.ndarray, num_classes: int, student_names: list[str] | None
) -> tuple[list[str] | None, str]:
    """Check that split ``path``'s classes are the student's: the same number and, where both record them,
    the same names in the same order; every label within ``0..num_classes−1`` (or −1).

    Args:
        flag: the option that named the split, for messages (``--data``).
        path: the split (resolved).
        labels: its label column.
        num_classes: the student's classes.
        student_names: the names the student recorded, or None.

    Returns:
        The class names (the student's, else the split's; None when neither records them) and how the classes
        were matched (``CHECKED_BY_NAMES``, ``CHECKED_BY_COUNT`` or ``CHECKED_BY_LABELS``).

    Raises:
        DataError: one line naming the split and how its classes differ from the student's.
    """
    split_names = prepared_class_names(path)
    refuse = "; evaluate the student on a split of the dataset it was trained on"
    if split_names is not None and len(split_names) != num_classes:
        raise DataError(
            f"{flag}: {path!r} is a {len(split_names)}-class dataset ({_shown(split_names)}, per its prepare.json) "
            f"but the student has {num_classes} classes{refuse}"
        )
    if split_names is not None and student_names is not None and split_names != student_names:
        differ = [
            f"class {i} is {a!r} here, {b!r} to the student"
            for i, (a, b) in enumerate(zip(split_names, student_names, strict=True))
            if a != b
        ]
        reordered = " (the same names in another order)" if sorted(split_names) == sorted(student_names) else ""
        more = f" and {len(differ) - SHOWN} more" if len(differ) > SHOWN else ""
        raise DataError(
            f"{flag}: {path!r} names its classes otherwise than the student{reordered}: "
            f"{'; '.join(differ[:SHOWN])}{more}{refuse}"
        )
    if labels.max() >= num_classes:
        raise DataError(
            f"{flag}: {path!r} has label {int(labels.max())}, beyond the student's {num_classes} classes "
            f"(0..{num_classes - 1}){refuse}"
        )
    if split_names is None:
        return student_names, CHECKED_BY_LABELS
    return split_names, CHECKED_BY_NAMES if student_names is not None else CHECKED_BY_COUNT
