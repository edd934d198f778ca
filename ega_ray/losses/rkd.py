"""Relational Knowledge Distillation (RKD): distance and angle.

Park, Kim, Lu, Cho. "Relational Knowledge Distillation." CVPR 2019; computed as CRD's repository does
(``distiller_zoo/RKD.py`` of github.com/HobbitLong/RepDistiller), the reference of the baseline table.

For embeddings x_1..x_B (teacher t, student s), with μ the mean distance over the B(B−1) pairs i ≠ j:

    ψ_D(x_i, x_j) = ‖x_i − x_j‖ / μ        (0 on the diagonal)
    ψ_A(x_i, x_j, x_k) = ⟨ (x_i − x_j)/‖x_i − x_j‖ , (x_k − x_j)/‖x_k − x_j‖ ⟩      (0 where i = j or k = j)
    L = w_D · (1/B²) Σ_{i,j} huber(ψ_D(s) − ψ_D(t)) + w_A · (1/B³) Σ_{i,j,k} huber(ψ_A(s) − ψ_A(t))

with Huber = smooth-L1 (β = 1); w_D = 25, w_A = 50 as in the paper and CRD's repository. Both means run
over every entry, the diagonal included (it is 0 on both sides), as in that repository: the distance term
is the sum over the B(B−1) pairs divided by B². The teacher's relations carry no gradient. The relations
span the global batch under DDP (gathered as for EGA's graph), so every rank computes the whole batch's
loss. Computed in float32 (float64 inputs stay float64), also under bf16 autocast.

One difference in rounding only: the repository computes distances as √max(‖a‖² + ‖b‖² − 2a·b, 10⁻¹²),
this file as ``torch.cdist``; both are the Euclidean distance, and the ÷μ normalisation is the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ega_ray.losses.base import Distiller, check_pair
from ega_ray.losses.distributed import gather_global

if TYPE_CHECKING:
    from ega_ray.config import DistillConfig


def normalized_distances(x: Tensor) -> Tensor:
    d = torch.cdist(x, x)
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return d / d[off].mean().clamp_min(1e-12)


def angles(x: Tensor) -> Tensor:
    """(B, B, B): entry (j, i, k) is the cosine of the angle at x_j between x_i and x_k."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # e[j, i] = unit(x_i − x_j)
    return torch.bmm(e, e.transpose(1, 2))


class RKDLoss(Distiller):
    search_space: ClassVar[dict[str, dict]] = {
        "distill.rkd.distance_weight": {"type": "loguniform", "low": 2.5, "high": 250.0},
        "distill.rkd.angle_weight": {"type": "loguniform", "low": 5.0, "high": 500.0},
    }

    @classmethod
    def from_config(cls, d: DistillConfig, num_samples: int, seed: int) -> RKDLoss:
        return cls(d.rkd.distance_weight, d.rkd.angle_weight, d.global_graph)

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, global_batch: bool = True) -> None:
        """The loss as configured; a bad value is a ValueError naming it.

        Args:
            distance_weight: weight of the distance term (>= 0).
            angle_weight: weight of the angle term (>= 0).
            global_batch: gather every rank's rows first (all_gather with gradients), so the loss is the global
                batch's, as on one process.
        """
        super().__init__()
        if distance_weight < 0 or angle_weight < 0:
            raise ValueError(f"RKD weights must be >= 0, got {distance_weight}, {angle_weight}")
        self.distance_weight, self.angle_weight, self.global_batch = distance_weight, angle_weight, global_batch

    def forward(self, teacher_emb: Tensor, student_emb: Tensor, **_: Tensor | None) -> Tensor:
        check_pair("RKD", teacher_emb, student_emb)
        if self.global_batch:
            teacher_emb, student_emb = gather_global(teacher_emb), gather_global(student_emb)
        with torch.autocast(device_type=student_emb.device.type, enabled=False):
            return self._loss(teacher_emb, student_emb)

    def _loss(self, teacher_emb: Tensor, student_emb: Tensor) -> Tensor:
        dtype = torch.promote_types(torch.promote_types(teacher_emb.dtype, student_emb.dtype), torch.float32)
        t, s = teacher_emb.to(dtype), student_emb.to(dtype)
        off = ~torch.eye(len(t), dtype=torch.bool, device=t.device)
        with torch.no_grad():
            d_t, a_t = normalized_distances(t), angles(t)
        # mean over all B² entries; the diagonal (0 − 0) adds nothing to the sum, so only pairs are summed
        dist = F.smooth_l1_loss(normalized_distances(s)[off], d_t[off], reduction="sum") / len(t) ** 2
        angle = F.smooth_l1_loss(angles(s), a_t)
        return self.distance_weight * dist + self.angle_weight * angle
