"""Relational Knowledge Distillation (RKD): distance and angle.

Park, Kim, Lu, Cho. "Relational Knowledge Distillation." CVPR 2019.

For embeddings x_1..x_B (teacher t, student s), with μ the mean distance over pairs i ≠ j:

    ψ_D(x_i, x_j) = ‖x_i − x_j‖ / μ
    ψ_A(x_i, x_j, x_k) = ⟨ (x_i − x_j)/‖x_i − x_j‖ , (x_k − x_j)/‖x_k − x_j‖ ⟩
    L = w_D · mean_{i≠j} huber(ψ_D(s) − ψ_D(t)) + w_A · mean_{i,j,k} huber(ψ_A(s) − ψ_A(t))

with Huber = smooth-L1 (β = 1); w_D = 25, w_A = 50 as in the paper and CRD's repository. The relations span
the global batch under DDP (gathered as for EGA's graph), so every rank computes the whole batch's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ega_ray.losses.base import Distiller, check_pair
from ega_ray.losses.distributed import gather_global


def normalized_distances(x: Tensor) -> Tensor:
    d = torch.cdist(x, x)
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return d / d[off].mean().clamp_min(1e-12)


def angles(x: Tensor) -> Tensor:
    """(B, B, B): entry (j, i, k) is the cosine of the angle at x_j between x_i and x_k."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # e[j, i] = unit(x_i − x_j)
    return torch.bmm(e, e.transpose(1, 2))


class RKDLoss(Distiller):
    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, global_batch: bool = True) -> None:
        super().__init__()
        if distance_weight < 0 or angle_weight < 0:
            raise ValueError(f"RKD weights must be >= 0, got {distance_weight}, {angle_weight}")
        self.distance_weight, self.angle_weight, self.global_batch = distance_weight, angle_weight, global_batch

    def forward(self, teacher_emb: Tensor, student_emb: Tensor, **_: Tensor | None) -> Tensor:
        check_pair("RKD", teacher_emb, student_emb)
        if self.global_batch:
            teacher_emb, student_emb = gather_global(teacher_emb), gather_global(student_emb)
        t, s = teacher_emb.float(), student_emb.float()
        off = ~torch.eye(len(t), dtype=torch.bool, device=t.device)
        with torch.no_grad():
            d_t, a_t = normalized_distances(t), angles(t)
        dist = F.smooth_l1_loss(normalized_distances(s)[off], d_t[off])
        angle = F.smooth_l1_loss(angles(s), a_t)
        return self.distance_weight * dist + self.angle_weight * angle
