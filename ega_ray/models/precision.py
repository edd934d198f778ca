"""The compute dtype of a run on a device (``optim.precision``): the student's autocast region and the frozen
teacher's weights."""

from __future__ import annotations

import torch

from ega_ray.errors import ConfigError


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``bf16``: bfloat16 (an error on a GPU without it); ``fp32``: float32; ``auto``: bf16 on GPUs that have
    it, float32 elsewhere (CPUs included, whatever they support)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if precision == "auto":
            return torch.float32
        raise ConfigError(f"optim.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}")
    return torch.bfloat16
