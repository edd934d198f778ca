"""What every distiller takes and returns.

A distiller compares the teacher's and the student's embeddings in the joint space (both B × d) and
returns a scalar. Some methods need more of the batch; they receive it by keyword, and ignore what they
do not use:

- ``labels`` (B,): class labels, −1 for unlabeled rows (NCE, CCL),
- ``index`` (B,): the rows' dataset indices (CRD's memory bank),
- ``teacher_logits``, ``student_logits`` (B × C): the teacher head's and the student's logits (KD, CCL).

The teacher's inputs arrive detached: the teacher head learns from its own cross-entropy only.
``default_gamma`` / ``default_beta`` are the weights of cross-entropy and distiller that the method's
reference recipe uses (CRD's repository for the baselines); ``ega-ray benchmark`` applies them.
"""

from __future__ import annotations

from torch import Tensor, nn


class Distiller(nn.Module):
    default_gamma: float = 1.0
    default_beta: float = 1.0

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
