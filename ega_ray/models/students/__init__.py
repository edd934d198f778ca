"""Student backbones: every entry returns the pooled, flattened feature of width ``model.feat_dim``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ega_ray.models.students import cifar_resnet, resnet50, shufflenet, torchvision_models, vgg  # noqa: F401
from ega_ray.models.students.registry import STUDENTS

__all__ = ["STUDENTS", "build_student"]


def build_student(name: str, **kwargs: Any) -> nn.Module:
    """Build the student registered as ``name`` (``torchvision:<name>`` for any torchvision model)."""
    return STUDENTS.build(name, **kwargs)
