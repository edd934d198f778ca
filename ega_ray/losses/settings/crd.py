"""CRD's settings (``distill.crd``): its scores' temperature and its memory; the math is in ``losses/crd.py``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ega_ray.losses.settings import MethodSettings


class CRDSettings(MethodSettings):
    temperature: float = Field(0.07, gt=0, description="temperature of its scores")
    negatives: int = Field(
        16384,
        ge=1,
        description="noise rows per anchor, drawn uniformly (with replacement) from the slots negatives_from "
        "allows (capped at the memory size − 1)",
    )
    negatives_from: Literal["other_class", "any"] = Field(
        "other_class",
        description="other_class: an anchor's noise from the memory slots of other classes only, as CRD's "
        "CIFAR-100 recipe does (a slot's class is that of the row it last received; slots holding an unlabeled "
        "row or nothing yet, and anchors without a label, take part in every draw); any: from every slot",
    )
    momentum: float = Field(0.5, ge=0, lt=1, description="memory update M ← normalize(m·M + (1−m)·z)")
    bank: Literal["dataset", "queue"] = Field(
        "dataset",
        description="dataset: one memory slot per training row (the paper; 2 × rows × embed_dim floats on every "
        "GPU); queue: a FIFO of the last queue_size embeddings, for datasets too large for that",
    )
    queue_size: int = Field(16384, ge=2, description="with bank: queue, rows per side")
