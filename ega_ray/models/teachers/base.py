"""The frozen-teacher wrapper and weight loading shared by every teacher family."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ega_ray.models.weights import sha256_of


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher expects of its input, and the width of what it returns.

    The teacher's view of an image: resized to ``input_size`` with ``interpolation``, or, with ``resize_size``,
    resized to that and center-cropped to ``input_size`` (torchvision's evaluation transform); then
    normalized with ``mean`` and ``std``.
    """

    embed_dim: int
    input_size: int
    interpolation: str  # "bicubic" | "bilinear" | "nearest"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_size: int | None = None


class Teacher(nn.Module):
    """A frozen image encoder: normalized images at ``spec.input_size`` in, (B, embed_dim) embeddings out.

    Always in eval mode with gradients off; ``train()`` is a no-op so that a parent's ``.train()`` cannot
    switch BatchNorm/Dropout of the frozen network back on.
    """

    def __init__(self, encoder: nn.Module, spec: TeacherSpec, name: str) -> None:
        super().__init__()
        self.encoder, self.spec, self.name = encoder, spec, name
        self.encoder.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002 - frozen on purpose
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        param = next(self.encoder.parameters())
        return self.encoder(x.to(param.dtype)).float()

    def to_device(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Teacher:
        """Move to ``device`` with weights in ``dtype`` (bf16 halves the frozen network's memory and time;
        nothing here is trained). Embeddings come out as float32 either way."""
        return self.to(device=device, dtype=dtype)


def load_weights_file(path: str | Path, sha256: str | None = None, allow: Sequence[type] = ()) -> dict:
    """Load a weights file safely: safetensors, or torch.load(weights_only=True); check SHA-256 if given.

    ``allow``: classes a teacher family's files are known to hold besides tensors and plain containers
    (RepDistiller's ``argparse.Namespace``), admitted by the weights-only unpickler for this load only. List
    only classes whose unpickling runs no code of the file's choosing: their contents are still unpickled
    under the same restrictions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file {str(path)!r} does not exist")
    if sha256 is not None:
        actual = sha256_of(path)
        if actual.lower() != sha256.lower():
            raise ValueError(f"teacher weights {str(path)!r}: SHA-256 {actual} does not match teacher.sha256 {sha256}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals(list(allow)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own advice (allowlist the class) is not ours to give: a checkpoint's objects can run code
        refused = str(err).split("WeightsUnpickler error: ")[-1].splitlines()[0].split(" was not an allowed")[0]
        raise ValueError(
            f"teacher weights {str(path)!r} hold Python objects a weights-only load refuses ({refused}); "
            "save a state dict (tensors only) or a .safetensors file instead"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"teacher weights {str(path)!r}: expected a state dict, got {type(obj).__name__}")
    return obj


def strip_prefix(state: dict, prefix: str) -> dict:
    """Keys under ``prefix`` without it, when any key has it; the dict unchanged otherwise."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state
