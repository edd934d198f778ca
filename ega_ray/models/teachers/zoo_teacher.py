"""Any backbone of the student registry as a teacher (``zoo:NAME``, e.g. ``zoo:resnet32x4``).

For CRD-style setups with a CIFAR teacher, and for smoke tests: ``weights`` is a local state dict of the
backbone; without weights the teacher is randomly initialised (useful only to exercise the pipeline).
Checkpoints of RepDistiller or mdistiller load as ``repdistiller:NAME`` / ``mdistiller:NAME`` instead.
Input: the image at its stored size (32 px), CLIP statistics like the default student view.
"""

from __future__ import annotations

import warnings

from ega_ray.constants import CLIP_MEAN, CLIP_STD
from ega_ray.models.students import build_student
from ega_ray.models.teachers.base import (
    Teacher,
    TeacherSpec,
    load_weights_file,
    strip_prefix,
)


def zoo_teacher(arch: str, weights: str | None = None, sha256: str | None = None, input_size: int = 32) -> Teacher:
    backbone = build_student(arch)
    if weights is None:
        warnings.warn(f"teacher zoo:{arch} has no weights: randomly initialised", stacklevel=2)
    else:
        state = strip_prefix(load_weights_file(weights, sha256), "backbone.")
        try:
            backbone.load_state_dict(state)
        except RuntimeError:
            theirs = "model" in state or any(k.startswith(("layer1.", "block0.")) for k in state)
            if theirs and not arch.startswith("torchvision:"):
                raise ValueError(
                    f"teacher zoo:{arch}: {weights!r} is laid out as a RepDistiller / mdistiller checkpoint "
                    "(a 'model' entry, or layerN / blockN keys): name the teacher repdistiller:NAME or mdistiller:NAME"
                ) from None
            raise
    return Teacher(backbone, TeacherSpec(backbone.feat_dim, input_size, "bilinear", CLIP_MEAN, CLIP_STD), f"zoo:{arch}")
