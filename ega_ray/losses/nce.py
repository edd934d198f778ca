"""NCE between student and teacher embeddings over label-masked cosine similarities.

The contrastive baseline of the EGA paper (Ma, Chen, Akata, BMVC 2022), in its code's form: each student
embedding must pick its own teacher embedding out of the batch, and other rows of its class are not
counted as negatives. With z = normalize(x) and τ = 0.1:

    a_ij = z_s,i · z_t,j / τ
    M_i  = { i } ∪ { j : y_j ≠ y_i or y_i = −1 }          (unlabeled rows mask nothing but themselves)
    L    = mean_i −log( exp(a_ii) / Σ_{j ∈ M_i} exp(a_ij) )

Negatives span the global batch under DDP (embeddings and labels are gathered, as for EGA's graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ega_ray.losses.base import Distiller, check_pair, need
from ega_ray.losses.distributed import gather_global


def label_masked_nce(teacher: Tensor, student: Tensor, labels: Tensor, temperature: float) -> Tensor:
    z_t, z_s = F.normalize(teacher.float(), dim=1), F.normalize(student.float(), dim=1)
    logits = z_s @ z_t.T / temperature
    same_class = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    same_class.fill_diagonal_(False)  # the positive stays
    logits = logits.masked_fill(same_class, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


class NCELoss(Distiller):
    def __init__(self, temperature: float = 0.1, global_batch: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NCE temperature must be > 0, got {temperature}")
        self.temperature, self.global_batch = temperature, global_batch

    def forward(
        self, teacher_emb: Tensor, student_emb: Tensor, *, labels: Tensor | None = None, **_: Tensor | None
    ) -> Tensor:
        check_pair("NCE", teacher_emb, student_emb)
        labels = need("nce", "labels", labels)
        if self.global_batch:
            teacher_emb, student_emb, labels = map(gather_global, (teacher_emb, student_emb, labels))
        return label_masked_nce(teacher_emb, student_emb, labels, self.temperature)
