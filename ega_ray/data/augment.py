"""Batched augmentation on the worker's device, on uint8 NHWC batches (no per-image PIL work).

Student view: random crop of the zero-padded image + horizontal flip, scaled to [0, 1], resized to the
student's input size if it differs, normalized. Teacher view (the EGA recipe): an *independent* crop and
flip of the same image, resized to the teacher's input size with its interpolation (or resized larger and
center-cropped to it, where the teacher's weights say so), normalized with the teacher's statistics.
Evaluation views skip crop and flip. A training row's crop and flip are drawn from (seed, epoch, view,
row index) (``ViewMaker.set_epoch``, :func:`row_uniforms`), not from a generator's position in a stream:
the same row gets the same view in any batch, on any worker, and again in a resumed epoch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from ega_ray.config import Config
    from ega_ray.models.teachers.base import TeacherSpec


MASK32 = 0xFFFFFFFF
STUDENT_STREAM, TEACHER_STREAM = 0, 1  # the two views of a row draw from different streams


def hash32(x: Tensor | int) -> Tensor | int:
    """A 32-bit integer hash (lowbias32) of each element of an int64 tensor (or of an int), elementwise.

    Products wrap in int64; only their low 32 bits are kept, which wrapping leaves exact."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def row_uniforms(index: Tensor, seed: int, epoch: int, stream: int, count: int) -> Tensor:
    """(B, ``count``) float32 draws in [0, 1), each a pure function of (seed, epoch, stream, row index, j):
    a row gets the same augmentation whatever batch, position, worker or device it is in, and a resumed
    epoch draws what the uninterrupted one drew. Vectorised: a few integer ops per draw on the device."""
    # each stage adds an odd constant: lowbias32 maps 0 to 0, and seed 0, epoch 0, row 0 must not be all zeros
    key = hash32(hash32(hash32((seed & MASK32) + 0x9E3779B9) ^ (seed >> 32)) + epoch * 0x85EBCA6B + 0x27D4EB2F)
    key = hash32(key + stream * 0xC2B2AE35 + 0x165667B1)
    row = hash32(hash32((index.long() & MASK32) + key) ^ (index.long() >> 32))  # (B,)
    j = torch.arange(count, device=index.device, dtype=torch.long)
    h = hash32(hash32(row[:, None] + j * 0x9E3779B9 + 0x7F4A7C15) ^ key)
    return h.to(torch.float64).div_(2.0**32).float()


def random_crop_flip(
    x: Tensor, pad: int, flip: bool, generator: torch.Generator | None = None, draws: Tensor | None = None
) -> Tensor:
    """Per-sample random crop (after zero padding by ``pad``) and horizontal flip of an NCHW batch; from
    ``draws`` ((N, 3) uniforms in [0, 1): row offset, column offset, flip) when given, else from ``generator``."""
    n, c, h, w = x.shape
    dev = x.device
    if draws is None:
        draws = torch.rand(n, 3, device=dev, generator=generator)
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = (draws[:, 0] * (2 * pad + 1)).long().clamp_(max=2 * pad)
        ox = (draws[:, 1] * (2 * pad + 1)).long().clamp_(max=2 * pad)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = xp[
            torch.arange(n, device=dev)[:, None, None, None],
            torch.arange(c, device=dev)[None, :, None, None],
            rows,
            cols,
        ]
    if flip:
        mirror = draws[:, 2] < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def to_unit_float(images_nhwc: Tensor) -> Tensor:
    """uint8 NHWC → float32 NCHW in [0, 1]."""
    return images_nhwc.permute(0, 3, 1, 2).float().div_(255.0)


def resize(x: Tensor, size: int, interpolation: str) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    mode = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}.get(interpolation, "bilinear")
    # antialias when shrinking, as PIL does; without it a 2x downscale aliases thin strokes
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": size < x.shape[-1]}
    out = F.interpolate(x, size=(size, size), mode=mode, **kwargs)
    return out.clamp_(0.0, 1.0) if mode == "bicubic" else out


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central ``size`` x ``size`` window, placed as torchvision's CenterCrop places it."""
    top, left = round((x.shape[-2] - size) / 2.0), round((x.shape[-1] - size) / 2.0)
    return x[..., top : top + size, left : left + size]


class ViewMaker:
    """Makes the student's and the teacher's views of a uint8 NHWC batch on one device.

    ``teacher`` is the teacher's spec (input size, interpolation, statistics); without it (the teacher
    runs elsewhere) only student views are made.
    """

    def __init__(
        self,
        *,
        pad: int,
        flip: bool,
        student_size: int,
        student_mean,
        student_std,
        device: torch.device,
        teacher: TeacherSpec | None = None,
        seed: int = 0,
    ) -> None:
        self.pad, self.flip, self.student_size, self.teacher_spec = pad, flip, student_size, teacher
        as_t = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)  # noqa: E731
        self.s_mean, self.s_std = as_t(student_mean), as_t(student_std)
        if teacher is not None:
            self.t_mean, self.t_std = as_t(teacher.mean), as_t(teacher.std)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.key: tuple[int, int] | None = None  # (seed, epoch) of row-keyed training views, once set

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device, teacher: TeacherSpec | None = None) -> ViewMaker:
        a = cfg.augment
        return cls(
            pad=a.pad,
            flip=a.flip,
            student_size=cfg.data.image_size,
            student_mean=a.student_mean,
            student_std=a.student_std,
            device=device,
            teacher=teacher,
            seed=cfg.run.seed,
        )

    def reseed(self, seed: int) -> None:
        """Restart the stream generator (the draws of views made without row indices)."""
        self.generator.manual_seed(seed)

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Key the training views of rows given with their ``index`` by (``seed``, ``epoch``, index)."""
        self.key = (seed, epoch)

    def _draws(self, x: Tensor, index: Tensor | None, stream: int) -> Tensor | None:
        if index is None or self.key is None:
            return None  # the stream generator's draws
        return row_uniforms(index.to(x.device), *self.key, stream, 3)

    def student(self, images: Tensor, train: bool, index: Tensor | None = None) -> Tensor:
        """The student's view; a training view keyed by each row's ``index`` when given (see ``set_epoch``)."""
        x = to_unit_float(images)
        if train:
            x = random_crop_flip(x, self.pad, self.flip, self.generator, self._draws(x, index, STUDENT_STREAM))
        return (resize(x, self.student_size, "bilinear") - self.s_mean) / self.s_std

    def teacher(self, images: Tensor, train: bool, index: Tensor | None = None) -> Tensor:
        """The teacher's view; a training view keyed by each row's ``index`` when given (see ``set_epoch``)."""
        spec = self.teacher_spec
        if spec is None:
            raise RuntimeError("this ViewMaker was built without a teacher spec")
        x = to_unit_float(images)
        if train:
            x = random_crop_flip(x, self.pad, self.flip, self.generator, self._draws(x, index, TEACHER_STREAM))
        if spec.resize_size is None:
            x = resize(x, spec.input_size, spec.interpolation)
        else:
            x = center_crop(resize(x, spec.resize_size, spec.interpolation), spec.input_size)
        return (x - self.t_mean) / self.t_std


def simclr_view(
    x: Tensor,
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = (0.35, 1.0),
    max_rotation_deg: float = 15.0,
    flip: bool = True,
    jitter: float = 0.4,
) -> Tensor:
    """A SimCLR-style random view of a float NCHW batch in [0, 1], all in one batched kernel:
    random resized crop (area ``scale``) with a small rotation, optional flip, brightness/contrast jitter."""
    n, dev = x.shape[0], x.device
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, device=dev, generator=generator)  # noqa: E731
    side = u(*scale).sqrt()  # crop side relative to the image
    angle = torch.deg2rad(u(-max_rotation_deg, max_rotation_deg))
    sign = (
        torch.where(torch.rand(n, device=dev, generator=generator) < 0.5, -1.0, 1.0)
        if flip
        else torch.ones(n, device=dev)
    )
    cos, sin = angle.cos() * side, angle.sin() * side
    shift = 1.0 - side
    theta = torch.stack(
        [
            torch.stack([cos * sign, -sin, u(-1, 1) * shift], 1),
            torch.stack([sin * sign, cos, u(-1, 1) * shift], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brightness = u(1 - jitter, 1 + jitter)[:, None, None, None]
    contrast = u(1 - jitter, 1 + jitter)[:, None, None, None]
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean * brightness).clamp_(0.0, 1.0)
