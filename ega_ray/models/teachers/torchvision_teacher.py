"""Any torchvision classification model as a teacher (``torchvision:NAME``), classifier removed.

``weights``: a local state dict file, or a torchvision weights name such as ``DEFAULT`` or
``IMAGENET1K_V2`` (downloads; only where the machine has network).
"""

from __future__ import annotations

from ega_ray.constants import IMAGENET_MEAN, IMAGENET_STD
from ega_ray.models.students.torchvision_models import torchvision_backbone
from ega_ray.models.teachers.base import (
    Teacher,
    TeacherSpec,
    load_weights_file,
)
from ega_ray.models.weights import is_weights_file


def torchvision_teacher(model_name: str, weights: str | None = None, sha256: str | None = None) -> Teacher:
    import torchvision  # here: importing it takes seconds, and only this family needs it

    local = weights is not None and is_weights_file(weights)
    hub = None if (weights is None or local) else torchvision.models.get_model_weights(model_name)[weights]
    backbone = torchvision_backbone(model_name, weights=hub)
    if local:
        state = load_weights_file(weights, sha256)
        own = backbone.state_dict()
        backbone.load_state_dict({k: v for k, v in state.items() if k in own})
    size = hub.transforms().crop_size[0] if hub is not None else 224
    spec = TeacherSpec(backbone.feat_dim, int(size), "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    return Teacher(backbone, spec, f"torchvision:{model_name}")
