"""FitNet hints, on the projected embeddings.

Romero, Ballas, Kahou, Chassang, Gatta, Bengio. "FitNets: Hints for Thin Deep Nets." ICLR 2015.

    L = mean_{i,k} (s_ik − t_ik)²

FitNet regresses a student layer onto a teacher layer through a learned regressor; here the regressor is
the student's projection head and the hint is the teacher's projected embedding (both d-dimensional).
Per instance, so under DDP the mean of the ranks' losses is the global one (equal shards).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor

from ega_ray.losses.base import Distiller, check_pair

if TYPE_CHECKING:
    from ega_ray.config import DistillConfig


class HintLoss(Distiller):
    search_space: ClassVar[dict[str, dict]] = {"distill.beta": {"type": "loguniform", "low": 10.0, "high": 1000.0}}
    default_beta = 100.0  # CRD's repository

    @classmethod
    def from_config(cls, d: DistillConfig, num_samples: int, seed: int) -> HintLoss:
        return cls()

    def forward(self, teacher_emb: Tensor, student_emb: Tensor, **_: Tensor | None) -> Tensor:
        check_pair("hint", teacher_emb, student_emb)
        return F.mse_loss(student_emb.float(), teacher_emb.float())
