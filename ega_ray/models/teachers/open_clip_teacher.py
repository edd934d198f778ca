"""CLIP image towers from open_clip (RN50, RN101, ViT-B-32, ViT-B-16, … — the EGA paper's teachers).

Radford et al. "Learning Transferable Visual Models From Natural Language Supervision." ICML 2021.

``weights`` is a local file (a full CLIP state dict, or the image tower's alone) or an open_clip
pretrained tag such as ``openai`` (downloads; only where the machine has network).
"""

from __future__ import annotations

from ega_ray.models.teachers.base import (
    Teacher,
    TeacherSpec,
    load_weights_file,
    strip_prefix,
)
from ega_ray.models.weights import is_weights_file


def open_clip_teacher(model_name: str, weights: str | None = None, sha256: str | None = None) -> Teacher:
    import open_clip  # here: importing it takes seconds, and only this family needs it

    if model_name not in open_clip.list_models():
        raise KeyError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    local = weights is not None and is_weights_file(weights)
    model = open_clip.create_model(model_name, pretrained=None if (local or weights is None) else weights)
    visual = model.visual
    if local:
        visual.load_state_dict(strip_prefix(load_weights_file(weights, sha256), "visual."))
    cfg = visual.preprocess_cfg
    size = cfg["size"][0] if isinstance(cfg["size"], tuple) else cfg["size"]
    spec = TeacherSpec(visual.output_dim, int(size), cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"]))
    return Teacher(visual, spec, f"open_clip:{model_name}")
