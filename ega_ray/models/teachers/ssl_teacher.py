"""This project's own self-supervised teacher (``ssl``): a student-registry backbone pretrained with
SimCLR by ``ega-ray pretrain-teacher``, loaded from the checkpoint file that command writes."""

from __future__ import annotations

from pathlib import Path

import torch

from ega_ray.disk import write_with
from ega_ray.models.students import build_student
from ega_ray.models.teachers.base import Teacher, TeacherSpec, load_weights_file

SSL_FORMAT = "ega-ray-ssl-teacher/1"


def save_ssl_teacher(
    path: str | Path,
    arch: str,
    backbone: torch.nn.Module,
    input_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    **extra: float | int | str,
) -> None:
    """Write a teacher checkpoint that ``ssl`` loads (weights-only loadable: tensors and plain values)."""
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    payload = {
        "format": SSL_FORMAT,
        "arch": arch,
        "state_dict": state,
        "input_size": input_size,
        "mean": list(mean),
        "std": list(std),
        **extra,
    }
    needed = 2 * sum(v.numel() * v.element_size() for v in state.values()) + (1 << 20)
    write_with(path, lambda tmp: torch.save(payload, tmp), needed)


def ssl_teacher(weights: str | None = None, sha256: str | None = None) -> Teacher:
    if weights is None:
        raise ValueError("teacher 'ssl' needs teacher.weights: the file written by `ega-ray pretrain-teacher`")
    ckpt = load_weights_file(weights, sha256)
    if ckpt.get("format") != SSL_FORMAT:
        raise ValueError(f"{weights!r} is not an ega-ray SSL teacher checkpoint (format {ckpt.get('format')!r})")
    backbone = build_student(ckpt["arch"])
    backbone.load_state_dict(ckpt["state_dict"])
    spec = TeacherSpec(backbone.feat_dim, int(ckpt["input_size"]), "bilinear", tuple(ckpt["mean"]), tuple(ckpt["std"]))
    return Teacher(backbone, spec, f"ssl:{ckpt['arch']}")
