"""Any torchvision classification model as a teacher (``torchvision:NAME``), classifier removed.

``weights``: a torchvision weights name such as ``DEFAULT`` or ``IMAGENET1K_V2`` (downloads; only where the
machine has network), or a local state-dict file; ``null``: random initialisation.

The teacher's view is the one the weights declare in their own transforms (``weights.transforms()``, an
``ImageClassification``): resized to ``resize_size``, center-cropped to ``crop_size``, with their
``interpolation``, ``mean`` and ``std``. Many say bicubic (EfficientNet, Swin, MaxViT, the SWAG ViTs and
RegNets), some other sizes or statistics (EfficientNetV2-L: 480 px, mean and std 0.5). A local file is only
tensors and cannot say which weights it holds: it gets 224 px, bilinear and ImageNet statistics, unless the
name carries the tag of the weights it was saved from, ``torchvision:NAME.TAG`` (e.g.
``torchvision:swin_t.IMAGENET1K_V1``), whose transforms are then used. Reading a tag's transforms reads
torchvision's metadata only: nothing downloads.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ega_ray.constants import IMAGENET_MEAN, IMAGENET_STD
from ega_ray.models.students.torchvision_models import torchvision_backbone
from ega_ray.models.teachers.base import (
    Teacher,
    TeacherSpec,
    load_weights_file,
)
from ega_ray.models.weights import is_weights_file

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

# the interpolations ega_ray.data.augment.resize implements
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def hub_weights(model_name: str, tag: str) -> WeightsEnum:
    """torchvision's weights ``tag`` (``DEFAULT``, ``IMAGENET1K_V2``, ...) of ``model_name``: metadata only."""
    import torchvision  # here: importing it takes seconds, and only this family needs it

    if model_name not in torchvision.models.list_models():
        raise KeyError(f"unknown torchvision model {model_name!r}; see torchvision.models.list_models()")
    enum = torchvision.models.get_model_weights(model_name)
    if tag not in enum.__members__:
        raise KeyError(f"torchvision model {model_name!r} has no weights {tag!r}; known: {', '.join(enum.__members__)}")
    return enum[tag]


def spec_from_weights(weights: WeightsEnum | None, embed_dim: int) -> TeacherSpec:
    """The view ``weights`` declare in their transforms; 224 px, bilinear, ImageNet statistics without weights."""
    if weights is None:
        return TeacherSpec(embed_dim, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    t = weights.transforms()
    if not all(hasattr(t, a) for a in ("crop_size", "resize_size", "interpolation", "mean", "std")):
        raise ValueError(f"torchvision weights {weights}: their transforms ({type(t).__name__}) are not a classifier's")
    interpolation = t.interpolation.value
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"torchvision weights {weights}: {interpolation} resizing is not implemented here")
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    if resize < crop:
        raise ValueError(f"torchvision weights {weights}: resize size {resize} below crop size {crop}")
    mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return TeacherSpec(embed_dim, crop, interpolation, mean, std, resize_size=resize if resize > crop else None)


def _hint_for(model_name: str, path: str) -> None:
    """Warn when a local file has the name of one of torchvision's downloads but no tag says so."""
    import torchvision

    for w in torchvision.models.get_model_weights(model_name):
        if w.url.rsplit("/", 1)[-1] == Path(path).name:
            warnings.warn(
                f"teacher torchvision:{model_name}: {Path(path).name} is the file of torchvision's {w}; its "
                f"preprocessing is used only when named: teacher.name torchvision:{model_name}.{w.name}",
                stacklevel=3,
            )


def torchvision_teacher(name: str, weights: str | None = None, sha256: str | None = None) -> Teacher:
    model_name, dot, tag = name.partition(".")
    local = weights is not None and is_weights_file(weights)
    hub = None if (weights is None or local) else hub_weights(model_name, weights)  # before any download
    named = hub_weights(model_name, tag) if dot else None
    if named is not None and hub is not None and named != hub:
        raise ValueError(f"teacher torchvision:{name}: the name says {named}, teacher.weights {hub}")
    backbone = torchvision_backbone(model_name, weights=hub)
    if local:
        state = load_weights_file(weights, sha256)
        own = backbone.state_dict()
        backbone.load_state_dict({k: v for k, v in state.items() if k in own})
        if named is None:
            _hint_for(model_name, weights)
    return Teacher(backbone, spec_from_weights(hub or named, backbone.feat_dim), f"torchvision:{name}")
