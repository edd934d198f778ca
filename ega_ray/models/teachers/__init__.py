"""Frozen teachers by name: ``open_clip:ViT-B-32``, ``timm:NAME``, ``torchvision:NAME``, ``ssl``, ``zoo:NAME``."""

from ega_ray.models.teachers import (  # noqa: F401 - each module registers its family
    open_clip_teacher,
    ssl_teacher,
    timm_teacher,
    torchvision_teacher,
    zoo_teacher,
)
from ega_ray.models.teachers.base import TEACHERS, Teacher, TeacherSpec, load_weights_file


def build_teacher(name: str, weights: str | None = None, sha256: str | None = None) -> Teacher:
    return TEACHERS.build(name, weights=weights, sha256=sha256)


__all__ = ["TEACHERS", "Teacher", "TeacherSpec", "build_teacher", "load_weights_file"]
