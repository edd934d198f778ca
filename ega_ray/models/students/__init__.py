"""Student backbones by name: every entry returns the pooled, flattened feature of width ``model.feat_dim``.

The table below is the registry (see ``ega_ray.registry``): a new student is its family file plus a line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ega_ray.registry import Registry

if TYPE_CHECKING:
    from torch import nn

_CIFAR = "ega_ray.models.students.cifar_resnet"
STUDENTS: Registry[nn.Module] = Registry(
    "student",
    {
        "resnet8": f"{_CIFAR}:resnet8",
        "resnet14": f"{_CIFAR}:resnet14",
        "resnet20": f"{_CIFAR}:resnet20",
        "resnet32": f"{_CIFAR}:resnet32",
        "resnet44": f"{_CIFAR}:resnet44",
        "resnet56": f"{_CIFAR}:resnet56",
        "resnet110": f"{_CIFAR}:resnet110",
        "resnet8x4": f"{_CIFAR}:resnet8x4",
        "resnet32x4": f"{_CIFAR}:resnet32x4",
        "resnet50": "ega_ray.models.students.resnet50:resnet50",
        "vgg13": "ega_ray.models.students.vgg:vgg13",
        "shufflenet_v1": "ega_ray.models.students.shufflenet:shufflenet_v1",
        "torchvision:*": "ega_ray.models.students.torchvision_models:torchvision_backbone",
    },
)

__all__ = ["STUDENTS", "build_student"]


def build_student(name: str, **kwargs: Any) -> nn.Module:
    """Build the student registered as ``name`` (``torchvision:<name>`` for any torchvision model)."""
    return STUDENTS.build(name, **kwargs)
