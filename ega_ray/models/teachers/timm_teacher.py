"""Any timm image model as a teacher (``timm:NAME``), its pooled feature as the embedding.

``weights``: a local state dict file, or ``hub`` for timm's pretrained weights (needs network).
"""

from __future__ import annotations

from ega_ray.models.teachers.base import Teacher, TeacherSpec, load_weights_file


def timm_teacher(model_name: str, weights: str | None = None, sha256: str | None = None) -> Teacher:
    import timm  # here: importing it takes seconds, and only this family needs it

    if not timm.is_model(model_name):
        raise KeyError(f"unknown timm model {model_name!r}; see timm.list_models()")
    model = timm.create_model(model_name, pretrained=weights == "hub", num_classes=0)
    if weights not in (None, "hub"):
        state = load_weights_file(weights, sha256)
        head_keys = {k for k in state if k not in model.state_dict()}
        model.load_state_dict({k: v for k, v in state.items() if k not in head_keys})
    cfg = timm.data.resolve_data_config({}, model=model)
    spec = TeacherSpec(model.num_features, int(cfg["input_size"][-1]), cfg["interpolation"], cfg["mean"], cfg["std"])
    return Teacher(model, spec, f"timm:{model_name}")
