"""Frozen teachers by name: ``open_clip:ViT-B-32``, ``timm:NAME``, ``torchvision:NAME``, ``ssl``, ``zoo:NAME``,
``repdistiller:NAME`` and ``mdistiller:NAME``.

The table below is the registry (see ``ega_ray.registry``): a new teacher family is its file plus a line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ega_ray.registry import Registry

if TYPE_CHECKING:
    from ega_ray.models.teachers.base import Teacher

TEACHERS: Registry[Teacher] = Registry(
    "teacher",
    {
        "open_clip:*": "ega_ray.models.teachers.open_clip_teacher:open_clip_teacher",
        "timm:*": "ega_ray.models.teachers.timm_teacher:timm_teacher",
        "torchvision:*": "ega_ray.models.teachers.torchvision_teacher:torchvision_teacher",
        "zoo:*": "ega_ray.models.teachers.zoo_teacher:zoo_teacher",
        "repdistiller:*": "ega_ray.models.teachers.repdistiller_teacher:repdistiller_teacher",
        "mdistiller:*": "ega_ray.models.teachers.repdistiller_teacher:mdistiller_teacher",
        "ssl": "ega_ray.models.teachers.ssl_teacher:ssl_teacher",
    },
)


def build_teacher(name: str, weights: str | None = None, sha256: str | None = None) -> Teacher:
    return TEACHERS.build(name, weights=weights, sha256=sha256)


__all__ = ["TEACHERS", "build_teacher"]
