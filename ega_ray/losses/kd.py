"""Logit distillation (KD).

Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network." NIPS workshop 2015.

    L = τ² · KL( softmax(z_t / τ) ‖ softmax(z_s / τ) )       (batch mean)

The τ² factor keeps the gradient scale independent of the temperature.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class KDLoss(nn.Module):
    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
        tau = self.temperature
        log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
        log_p_s = F.log_softmax(student_logits.float() / tau, dim=1)
        return tau * tau * F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
