"""NCE's settings (``distill.nce``); the math is in ``losses/nce.py``."""

from __future__ import annotations

from pydantic import Field

from ega_ray.losses.settings import MethodSettings


class NCESettings(MethodSettings):
    temperature: float = Field(0.1, gt=0, description="temperature of the student–teacher cosine similarities")
