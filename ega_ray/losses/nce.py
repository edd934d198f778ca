"""NCE between student and teacher embeddings with class-level positives and negatives.

The contrastive baseline of the EGA paper (Ma, Chen, Akata, BMVC 2022), as its code computes it
(``distiller_zoo/NCE.py`` of github.com/yccm/EGA, called as ``NCELoss(temperature=0.1)(f_s, f_t, y)``).
With z = normalize(x), τ = 0.1 and ε = 1e−10:

    a_ij = z_s,i · z_t,j / τ
    p_ij = exp(a_ij) / Σ_k exp(a_ik)                    (softmax over every row k of the batch)
    P_i  = { j : y_j = y_i }   (i included),    N_i = { j : y_j ≠ y_i }
    L    = mean_i [ (1/|P_i|) Σ_{j∈P_i} −log(p_ij + ε) + (1/|N_i|) Σ_{j∈N_i} −log(1 − p_ij + ε) ]

Every same-class teacher embedding is a positive the student row should pick out of the batch, every
other-class one a negative whose probability it should push to 0.

Deliberate departures from that code (which trains with every label known):

- Unlabeled rows (label −1, from ``data.label_fraction`` < 1) belong to no class: an unlabeled row's
  positive set is itself alone (P_i = {i}) and every other row of the batch is its negative; an unlabeled
  row is a negative of every labeled row. (The EGA code would treat −1 as one more class.)
- A row with no negative in the batch (N_i = ∅: the whole batch shares its class) gets 0 for the negative
  term, where the code divides 0 by 0 (NaN).

The loss is computed in float32 (float64 inputs stay float64), also under bf16 autocast. Under DDP
(``global_batch=True``) embeddings and labels are gathered, so the softmax, P_i and N_i span the global
batch and every rank computes the whole batch's loss (gradients flow back to each rank's own rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ega_ray.losses.base import Distiller, check_pair, need
from ega_ray.losses.distributed import gather_global

if TYPE_CHECKING:
    from ega_ray.config import DistillConfig

EPS = 1e-10


def class_nce(teacher: Tensor, student: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """The EGA code's NCE (module docstring) on one batch; ``labels`` (B,) with −1 for unlabeled rows."""
    dtype = torch.promote_types(torch.promote_types(teacher.dtype, student.dtype), torch.float32)
    z_t, z_s = F.normalize(teacher.to(dtype), dim=1), F.normalize(student.to(dtype), dim=1)
    p = torch.softmax(z_s @ z_t.T / temperature, dim=1)
    labels = labels.to(p.device)
    positive = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    positive.fill_diagonal_(True)  # an unlabeled row's only positive is itself
    negative = ~positive
    pos = torch.where(positive, -torch.log(p + EPS), 0).sum(1) / positive.sum(1)
    neg = torch.where(negative, -torch.log(1 - p + EPS), 0).sum(1) / negative.sum(1).clamp_min(1)
    return (pos + neg).mean()


class NCELoss(Distiller):
    search_space: ClassVar[dict[str, dict]] = {
        "distill.nce.temperature": {"type": "loguniform", "low": 0.03, "high": 0.5},
        "distill.beta": {"type": "uniform", "low": 0.2, "high": 2.0},
    }

    @classmethod
    def from_config(cls, d: DistillConfig, num_samples: int, seed: int) -> NCELoss:
        return cls(d.nce.temperature, d.global_graph)

    def __init__(self, temperature: float = 0.1, global_batch: bool = True) -> None:
        """The loss as configured; a bad value is a ValueError naming it.

        Args:
            temperature: temperature of the student–teacher cosine similarities (> 0).
            global_batch: gather every rank's rows first (all_gather with gradients), so the loss is the global
                batch's, as on one process.
        """
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
        with torch.autocast(device_type=student_emb.device.type, enabled=False):
            return class_nce(teacher_emb, student_emb, labels, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, global_batch={self.global_batch}"
