"""CIFAR-100 teachers trained with RepDistiller or mdistiller: ``repdistiller:NAME`` and ``mdistiller:NAME``.

RepDistiller is the code of CRD (Tian et al., "Contrastive Representation Distillation", ICLR 2020);
mdistiller that of DKD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022). mdistiller's CIFAR
models are RepDistiller's (same modules, same parameter names; only what ``forward`` returns differs), and
the CIFAR-100 teachers both publish are the same files, ``<NAME>_vanilla/ckpt_epoch_240.pth``. So the two
names load the same files through the same key table; the family only names the teacher in messages.

``NAME`` is the model's name in their ``model_dict`` (matched without regard to case); the backbone is the
student-registry model with the same layers, loaded with the checkpoint's weights, its classifier dropped:

========================================== =========== ===================================================
theirs                                      ours        their parameter names → ours
========================================== =========== ===================================================
resnet8 … resnet110, resnet8x4, resnet32x4  same name   ``conv1``/``bn1`` → ``stem.0``/``stem.1``; block J of
(``models/resnet.py``)                                  ``layerS`` → ``layers.K`` (K counts blocks over stages);
                                                        ``downsample.0/1`` → ``shortcut.0/1``; ``fc`` dropped
ResNet50 (``models/resnetv2.py``)           resnet50    as above (their shortcut is already ``shortcut``);
                                                        ``linear`` dropped
vgg13 (``models/vgg.py``, ``vgg13_bn``)     vgg13       ``blockI.N`` → ``groups.I.N``; ``classifier`` dropped
========================================== =========== ===================================================

Refused, with the reason (``REFUSED``): ShuffleV1 has this project's parameter names and shapes but computes
something else (a ReLU after the depthwise convolution's BatchNorm, which ega-ray's ShuffleNet V1 does not
have), so its weights would load and give wrong features; the Wide ResNets, vgg8/11/16/19, MobileNetV2,
ShuffleV2 and mdistiller's CIFAR ResNet18 have no backbone here.

The files are what their training scripts write, loaded weights-only with one class admitted besides
tensors and plain containers: ``argparse.Namespace``, RepDistiller's run options in ``<NAME>_last.pth``.

- RepDistiller ``train_teacher.py`` / ``train_student.py``: ``{'epoch', 'model', 'accuracy' or 'best_acc',
  'optimizer'}`` (``ckpt_epoch_N.pth``, ``<NAME>_best.pth``: the published teachers are of this kind) and
  ``{'opt', 'model', 'optimizer'}`` (``<NAME>_last.pth``).
- mdistiller's trainer: ``{'epoch', 'model', 'optimizer', 'best_acc'}`` whose ``model`` is the
  DataParallel-wrapped distiller (``module.student.*``, ``module.teacher.*``, …): the *student's* weights are
  taken (for a plain training run, the model trained); and ``{'model'}`` (``student_best``, ``student_latest``).
- A bare state dict in their parameter names.

Every backbone parameter and buffer must come from the file with its exact shape, and every file key other
than the classifier's must be used; otherwise the load stops naming the file, its layout and what differs
(and which of these architectures the file does match). Only ``num_batches_tracked`` may be absent (files
of PyTorch 0.4.0, which RepDistiller was tested with, have none; inference does not use it).

Input: 32 px, the size they were trained at, normalized with the CIFAR-100 statistics of their
``dataset/cifar100.py``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ega_ray.constants import CIFAR100_MEAN, CIFAR100_STD
from ega_ray.models.students import build_student
from ega_ray.models.teachers.base import Teacher, TeacherSpec, load_weights_file

INPUT_SIZE = 32
# what their checkpoints hold besides tensors and plain containers: RepDistiller's options (plain values)
ALLOWED_CLASSES = (argparse.Namespace,)


@dataclass(frozen=True)
class Arch:
    """One of their architectures: our student of the same layers, and how their names differ."""

    student: str  # the student-registry name
    head: str  # their classifier module, dropped
    stages: tuple[int, ...] = ()  # ResNets: blocks per stage
    projection: str = "downsample"  # ResNets: their name of a block's 1x1 conv-BN shortcut


def _cifar_resnet(depth: int, wide: bool = False) -> Arch:
    n = (depth - 2) // 6
    return Arch(f"resnet{depth}{'x4' if wide else ''}", "fc", (n, n, n))


ARCHS: dict[str, Arch] = {
    **{f"resnet{d}": _cifar_resnet(d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _cifar_resnet(8, wide=True),
    "resnet32x4": _cifar_resnet(32, wide=True),
    "ResNet50": Arch("resnet50", "linear", (3, 4, 6, 3), projection="shortcut"),
    "vgg13": Arch("vgg13", "classifier"),
}

_NO_BACKBONE = "ega-ray has no {} backbone"
REFUSED: dict[str, str] = {
    "ShuffleV1": "its parameters have the names and shapes of ega-ray's shufflenet_v1, but it applies a ReLU "
    "after the depthwise convolution's BatchNorm, which ega-ray's (like the ShuffleNet paper) does not, so its "
    "weights would load and compute other features",
    **{f"wrn_{d}_{w}": _NO_BACKBONE.format("Wide ResNet") for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f"vgg{d}": "ega-ray's VGG backbone is vgg13 only" for d in (8, 11, 16, 19)},
    "MobileNetV2": _NO_BACKBONE.format("MobileNetV2"),
    "ShuffleV2": _NO_BACKBONE.format("ShuffleNetV2"),
    "ResNet18": _NO_BACKBONE.format("CIFAR ResNet-18"),
}


def their_key(arch: Arch, ours: str) -> str:
    """The name RepDistiller's / mdistiller's model gives the parameter or buffer that ours calls ``ours``."""
    if not arch.stages:  # VGG: their blockI is a Sequential with our groups.I's indices (conv, BN, ReLU, ...)
        return re.sub(r"^groups\.(\d+)\.", r"block\1.", ours)
    if m := re.fullmatch(r"stem\.([01])\.(.+)", ours):
        return f"{('conv1', 'bn1')[int(m[1])]}.{m[2]}"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", ours)
    if m is None:
        raise RuntimeError(f"no RepDistiller name for {arch.student} parameter {ours!r}")
    block, rest = int(m[1]), m[2]
    stage = 0
    while block >= arch.stages[stage]:
        block -= arch.stages[stage]
        stage += 1
    if rest.startswith("shortcut."):
        rest = arch.projection + rest.removeprefix("shortcut")
    return f"layer{stage + 1}.{block}.{rest}"


def key_table(arch: Arch, backbone: nn.Module) -> dict[str, str]:
    """Their name → ours, for every parameter and buffer of ``backbone``."""
    return {their_key(arch, k): k for k in backbone.state_dict()}


def _resolve(family: str, name: str) -> tuple[str, Arch]:
    """Their canonical model name and its Arch; an error saying why for a refused or unknown name."""
    canonical = {k.lower(): k for k in (*ARCHS, *REFUSED)}.get(name.lower())
    if canonical in REFUSED:
        raise ValueError(f"teacher {family}:{canonical} is not supported: {REFUSED[canonical]}")
    if canonical is None:
        raise KeyError(f"unknown {family} model {name!r}; supported: {', '.join(ARCHS)}")
    return canonical, ARCHS[canonical]


def unwrap(ckpt: dict, where: str) -> tuple[dict[str, Tensor], str]:
    """The model's state dict inside one of their checkpoints, and the layout it was found in (for messages)."""
    if isinstance(ckpt.get("model"), dict):
        state, layout = ckpt["model"], "{" + ", ".join(sorted(map(str, ckpt))) + "}"
    elif ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        state, layout = ckpt, "a bare state dict"
    else:
        keys = ", ".join(sorted(map(str, ckpt))[:8])
        raise ValueError(f"{where}: no state dict under 'model' nor a bare state dict (top-level keys: {keys})")
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{where} ({layout}): the state dict holds entries that are not named tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel-wrapped model
        state, layout = {k.removeprefix("module."): v for k, v in state.items()}, layout + ", 'module.' keys"
    if any(k.startswith("student.") for k in state):  # mdistiller's distiller: keep the student
        state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
        layout += " (mdistiller's distiller: its student's weights)"
    return state, layout


def _options(ckpt: dict) -> str:
    """What RepDistiller's saved options say the model is, if the file has them."""
    opt = ckpt.get("opt")
    model = getattr(opt, "model", None) or getattr(opt, "model_s", None)
    return f"; its options say model {model!r}" if isinstance(model, str) else ""


def _matching(state: dict[str, Tensor], family: str) -> str:
    """Which supported architectures the file's keys and shapes do match, as a hint for a message."""
    found = []
    for name, arch in ARCHS.items():
        with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised for real
            own = build_student(arch.student).state_dict()
        table = {their_key(arch, k): v.shape for k, v in own.items()}
        body = {k: v.shape for k, v in state.items() if not k.startswith(arch.head + ".")}
        if body.keys() <= table.keys() and all(table[k] == s for k, s in body.items()):
            if all(k in body or k.endswith("num_batches_tracked") for k in table):
                found.append(f"{family}:{name}")
    return f"; it matches {' and '.join(found)}" if found else ""


def _examples(keys: list[str]) -> str:
    return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"


def load_into(backbone: nn.Module, arch: Arch, state: dict[str, Tensor], where: str) -> None:
    """Copy their ``state`` into ``backbone``, every key mapped and every shape equal, or stop saying what
    differs (in their names) in one line."""
    table = key_table(arch, backbone)
    own = backbone.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(arch.head + ".")}
    unexpected = sorted(body.keys() - table.keys())
    missing = sorted(k for k in table.keys() - body.keys() if not k.endswith("num_batches_tracked"))
    shapes = [
        f"{k} {tuple(body[k].shape)} vs {tuple(own[table[k]].shape)}"
        for k in sorted(body.keys() & table.keys())
        if body[k].shape != own[table[k]].shape
    ]
    if unexpected or missing or shapes:
        diffs = [
            f"{what} {_examples(keys)}"
            for what, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("keys of another shape (file vs here)", shapes),
            )
            if keys
        ]
        raise ValueError(f"{where} does not hold a {arch.student}: {'; '.join(diffs)}")
    result = backbone.load_state_dict({table[k]: v for k, v in body.items()}, strict=False)
    assert not result.unexpected_keys and all(k.endswith("num_batches_tracked") for k in result.missing_keys)


def _teacher(family: str, name: str, weights: str | None, sha256: str | None) -> Teacher:
    canonical, arch = _resolve(family, name)
    if weights is None:
        raise ValueError(
            f"teacher {family}:{canonical} needs teacher.weights: a checkpoint file written by {family} "
            f"(e.g. its published {canonical}_vanilla/ckpt_epoch_240.pth)"
        )
    ckpt = load_weights_file(weights, sha256, allow=ALLOWED_CLASSES)
    where = f"teacher {family}:{canonical}: {str(Path(weights))!r}"
    state, layout = unwrap(ckpt, where)
    backbone = build_student(arch.student)
    try:
        load_into(backbone, arch, state, f"{where} ({layout})")
    except ValueError as err:
        raise ValueError(f"{err}{_matching(state, family)}{_options(ckpt)}") from None
    spec = TeacherSpec(backbone.feat_dim, INPUT_SIZE, "bilinear", CIFAR100_MEAN, CIFAR100_STD)
    return Teacher(backbone, spec, f"{family}:{canonical}")


def repdistiller_teacher(name: str, weights: str | None = None, sha256: str | None = None) -> Teacher:
    """A CIFAR-100 model trained with RepDistiller (https://github.com/HobbitLong/RepDistiller)."""
    return _teacher("repdistiller", name, weights, sha256)


def mdistiller_teacher(name: str, weights: str | None = None, sha256: str | None = None) -> Teacher:
    """A CIFAR-100 model trained with mdistiller (https://github.com/megvii-research/mdistiller)."""
    return _teacher("mdistiller", name, weights, sha256)
