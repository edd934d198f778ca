"""CCL: the EGA code's NCE plus a symmetric divergence between student and teacher-head logits.

The EGA paper's strongest baseline (Ma, Chen, Akata, BMVC 2022), as its code computes it
(``distiller_zoo/CCL.py`` of github.com/yccm/EGA: ``CCL()`` = ``nce(temperature=0.1)`` + ``JSDLoss(T=1)``).
With p_s, p_t the softmax of student and teacher-head logits at temperature T (default 1, the code's):

    SKL = ½ · T² · [ KL(p_t ‖ p_s) + KL(p_s ‖ p_t) ]          (batch mean; the code calls it JSD)
    L   = NCE(t, s; y, τ = 0.1) + SKL

NCE is ``nce.py``'s loss (softmax over the whole batch, same-class positives, other-class negatives),
with the same treatment of unlabeled rows: an unlabeled row's positive set is itself alone, every other
row is its negative (the EGA code has no unlabeled rows). The divergence is the symmetrised KL, as in
that code, not the Jensen–Shannon divergence to the mixture; it is per instance, so it needs no gather.
T is ``distill.ccl.logit_temperature``, separate from KD's ``distill.kd_temperature`` (4), which the code
does not use here; τ is ``distill.ccl.temperature``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ega_ray.losses.base import check_pair, need
from ega_ray.losses.nce import NCELoss

if TYPE_CHECKING:
    from ega_ray.config import DistillConfig


def symmetric_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    forward = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    backward = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")
    return 0.5 * temperature**2 * (forward + backward)


class CCLLoss(NCELoss):
    search_space: ClassVar[dict[str, dict]] = {
        "distill.ccl.temperature": {"type": "loguniform", "low": 0.03, "high": 0.5},
        "distill.ccl.logit_temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
        "distill.beta": {"type": "uniform", "low": 0.2, "high": 2.0},
    }

    @classmethod
    def from_config(cls, d: DistillConfig, num_samples: int, seed: int) -> CCLLoss:
        return cls(d.ccl.temperature, d.ccl.logit_temperature, d.global_graph)

    def __init__(self, temperature: float = 0.1, logit_temperature: float = 1.0, global_batch: bool = True) -> None:
        """The loss as configured; a bad value is a ValueError naming it.

        Args:
            temperature: temperature of the student–teacher cosine similarities (> 0).
            logit_temperature: temperature T of the symmetric KL between student and teacher-head logits (> 0).
            global_batch: gather every rank's rows first (all_gather with gradients), so the loss is the global
                batch's, as on one process.
        """
        super().__init__(temperature, global_batch)
        if logit_temperature <= 0:
            raise ValueError(f"CCL logit temperature must be > 0, got {logit_temperature}")
        self.logit_temperature = logit_temperature

    def forward(
        self,
        teacher_emb: Tensor,
        student_emb: Tensor,
        *,
        labels: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        student_logits: Tensor | None = None,
        **_: Tensor | None,
    ) -> Tensor:
        check_pair("CCL", teacher_emb, student_emb)
        nce = super().forward(teacher_emb, student_emb, labels=labels)
        t_logits = need("ccl", "teacher_logits", teacher_logits)
        s_logits = need("ccl", "student_logits", student_logits)
        with torch.autocast(device_type=s_logits.device.type, enabled=False):
            return nce + symmetric_kl(s_logits, t_logits, self.logit_temperature)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, logit_temperature={self.logit_temperature}"
