"""Logit distillation (KD).

Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network." NIPS workshop 2015.

    L = τ² · KL( softmax(z_t / τ) ‖ softmax(z_s / τ) )       (batch mean)

The τ² factor keeps the gradient scale independent of the temperature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ega_ray.losses.base import Distiller, need

if TYPE_CHECKING:
    from ega_ray.config import DistillConfig


class KDLoss(nn.Module):
    def __init__(self, temperature: float = 4.0) -> None:
        """The loss as configured; a bad value is a ValueError naming it.

        Args:
            temperature: the softmax temperature T (> 0); the loss is scaled by T².
        """
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
        tau = self.temperature
        log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
        log_p_s = F.log_softmax(student_logits.float() / tau, dim=1)
        return tau * tau * F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


class LogitKD(Distiller):
    """KD as the distiller (``distill.method: kd``): the teacher head's logits are the soft targets.

    The reference recipe (CRD's repository) weighs it 0.9 against 0.1 cross-entropy."""

    search_space: ClassVar[dict[str, dict]] = {
        "distill.kd_temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
        "distill.beta": {"type": "uniform", "low": 0.1, "high": 2.0},
    }

    default_gamma, default_beta = 0.1, 0.9

    @classmethod
    def from_config(cls, d: DistillConfig, num_samples: int, seed: int) -> LogitKD:
        return cls(d.kd_temperature)

    def __init__(self, temperature: float = 4.0) -> None:
        """The loss as configured; a bad value is a ValueError naming it.

        Args:
            temperature: the softmax temperature T of :class:`KDLoss` (> 0).
        """
        super().__init__()
        self.kd = KDLoss(temperature)

    def forward(
        self,
        teacher_emb: Tensor,
        student_emb: Tensor,
        *,
        teacher_logits: Tensor | None = None,
        student_logits: Tensor | None = None,
        **_: Tensor | None,
    ) -> Tensor:
        return self.kd(need("kd", "teacher_logits", teacher_logits), need("kd", "student_logits", student_logits))
