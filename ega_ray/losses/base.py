"""What every distiller takes and returns.

A distiller compares the teacher's and the student's embeddings in the joint space (both B × d) and
returns a scalar. Some methods need more of the batch; they receive it by keyword, and ignore what they
do not use:

- ``labels`` (B,): class labels, −1 for unlabeled rows (NCE, CCL),
- ``index`` (B,): the rows' dataset indices (CRD's memory bank),
- ``teacher_logits``, ``student_logits`` (B × C): the teacher head's and the student's logits (KD, CCL).

The teacher's inputs arrive detached: the teacher head learns from its own cross-entropy only.
``default_gamma`` / ``default_beta`` are the weights of cross-entropy and distiller that the method's
reference recipe uses (CRD's repository for the baselines); ``ega-ray benchmark`` applies them. Each
distiller builds itself from the config (``from_config``) and is registered by name in
``ega_ray.losses.DISTILLERS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from ega_ray.config import DistillConfig


class Distiller(nn.Module):
    default_gamma: float = 1.0
    default_beta: float = 1.0
    # the method's own knobs (config field → tune.space entry), searched by `ega-ray benchmark --tune-trials`
    search_space: ClassVar[dict[str, dict]] = {}

    @classmethod
    def from_config(cls, d: DistillConfig, num_samples: int, seed: int) -> Distiller:
        """The distiller that the ``distill`` section describes; ``num_samples``: the number of training rows
        (a per-row memory's size), ``seed``: the run's seed (a memory's initialisation, noise draws)."""
        raise NotImplementedError

    def forward(
        self,
        teacher_emb: Tensor,
        student_emb: Tensor,
        *,
        labels: Tensor | None = None,
        index: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        student_logits: Tensor | None = None,
    ) -> Tensor:
        raise NotImplementedError


def check_pair(name: str, teacher: Tensor, student: Tensor) -> None:
    if teacher.shape != student.shape or teacher.dim() != 2:
        raise ValueError(
            f"{name} needs two (B, d) tensors of one shape, got {tuple(teacher.shape)} and {tuple(student.shape)}"
        )


def need(name: str, what: str, value: Tensor | None) -> Tensor:
    if value is None:
        raise ValueError(f"{name} needs {what}")
    return value
