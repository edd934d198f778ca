"""Probabilistic Knowledge Transfer (PKT).

Passalis, Tefas. "Learning Deep Representations with Probabilistic Knowledge Transfer." ECCV 2018.

Cosine similarities between the embeddings of a batch become conditional distributions:

    K_ij = (cos(x_i, x_j) + 1) / 2,     p_{j|i} = K_ij / Σ_j K_ij      (teacher: p, student: q)
    L = mean_{i,j} p_{j|i} · log( (p_{j|i} + ε) / (q_{j|i} + ε) )         ε = 1e-7

(mean over all B² entries, as in CRD's repository, whose weight 30,000 is the reference β). The
distributions span the global batch under DDP.
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

EPS = 1e-7


def similarity_distribution(x: Tensor) -> Tensor:
    x = F.normalize(x.float(), p=2, dim=1, eps=EPS)
    k = (x @ x.T + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


class PKTLoss(Distiller):
    search_space: ClassVar[dict[str, dict]] = {"distill.beta": {"type": "loguniform", "low": 3000.0, "high": 300000.0}}
    default_beta = 30000.0

    @classmethod
    def from_config(cls, d: DistillConfig, num_samples: int, seed: int) -> PKTLoss:
        return cls(d.global_graph)

    def __init__(self, global_batch: bool = True) -> None:
        """The loss as configured.

        Args:
            global_batch: gather every rank's rows first (all_gather with gradients), so the loss is the global
                batch's, as on one process.
        """
        super().__init__()
        self.global_batch = global_batch

    def forward(self, teacher_emb: Tensor, student_emb: Tensor, **_: Tensor | None) -> Tensor:
        check_pair("PKT", teacher_emb, student_emb)
        if self.global_batch:
            teacher_emb, student_emb = gather_global(teacher_emb), gather_global(student_emb)
        p, q = similarity_distribution(teacher_emb), similarity_distribution(student_emb)
        return torch.mean(p * torch.log((p + EPS) / (q + EPS)))
