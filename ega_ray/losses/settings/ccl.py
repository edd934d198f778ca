"""CCL's settings (``distill.ccl``): its NCE's and its logit term's temperatures; the math is in ``losses/ccl.py``."""

from __future__ import annotations

from pydantic import Field

from ega_ray.losses.settings import MethodSettings


class CCLSettings(MethodSettings):
    temperature: float = Field(0.1, gt=0, description="temperature of its NCE's student–teacher cosine similarities")
    logit_temperature: float = Field(
        1.0,
        gt=0,
        description="temperature T of its symmetric KL between student and teacher-head logits (scaled by T²); "
        "1 as in the EGA code, independent of distill.kd_temperature",
    )
