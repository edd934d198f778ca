"""RKD's settings (``distill.rkd``): the weights of its two terms; the math is in ``losses/rkd.py``."""

from __future__ import annotations

from pydantic import Field

from ega_ray.losses.settings import MethodSettings


class RKDSettings(MethodSettings):
    distance_weight: float = Field(25.0, ge=0, description="weight of the distance term")
    angle_weight: float = Field(50.0, ge=0, description="weight of the angle term")
