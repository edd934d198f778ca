"""Teachers load from local files (randomly initialised weights saved here; nothing downloads)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torchvision

from ega_ray.config import CLIP_MEAN
from ega_ray.constants import IMAGENET_MEAN, IMAGENET_STD
from ega_ray.models import build_student, build_teacher
from ega_ray.models.teachers.base import sha256_of
from ega_ray.models.teachers.ssl_teacher import save_ssl_teacher
from ega_ray.models.teachers.torchvision_teacher import hub_weights, spec_from_weights


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_frozen(teacher) -> None:
    teacher.train()
    assert not teacher.training and not teacher.encoder.training
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "vitb32.pt"
    torch.save(model.state_dict(), path)  # a full CLIP state dict, as open_clip checkpoints are
    return path, model.visual


@pytest.mark.heavy
def test_open_clip_teacher_from_a_local_file(clip_file):
    path, visual = clip_file
    teacher = build_teacher("open_clip:ViT-B-32", weights=str(path))
    assert same_weights(teacher.encoder, visual)
    spec = teacher.spec
    assert (spec.embed_dim, spec.input_size, spec.interpolation) == (512, 224, "bicubic")
    assert spec.mean == pytest.approx(CLIP_MEAN)
    assert_frozen(teacher)
    out = teacher(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 512) and out.dtype == torch.float32


@pytest.mark.heavy
def test_open_clip_teacher_checks_sha256(clip_file):
    path, _ = clip_file
    assert build_teacher("open_clip:ViT-B-32", weights=str(path), sha256=sha256_of(path)) is not None
    with pytest.raises(ValueError, match="SHA-256"):
        build_teacher("open_clip:ViT-B-32", weights=str(path), sha256="0" * 64)


def test_open_clip_unknown_model_is_named():
    with pytest.raises(KeyError, match="ViT-Q-99"):
        build_teacher("open_clip:ViT-Q-99")


def test_timm_teacher_from_a_local_file(tmp_path):
    model = timm.create_model("resnet18", pretrained=False)  # with its classifier, as hub files are
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    teacher = build_teacher("timm:resnet18", weights=str(tmp_path / "r18.pth"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in teacher.encoder.state_dict().items())
    assert teacher.spec.embed_dim == 512 and teacher.spec.input_size == 224
    assert teacher(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    assert_frozen(teacher)


def test_torchvision_teacher_from_a_local_file(tmp_path):
    model = torchvision.models.resnet18(weights=None)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    teacher = build_teacher("torchvision:resnet18", weights=str(tmp_path / "r18.pth"))
    assert torch.equal(teacher.encoder.conv1.weight, model.conv1.weight)
    assert teacher(torch.randn(2, 3, 64, 64)).shape == (2, 512)


@pytest.mark.parametrize(
    ("model", "tag", "view"),
    [  # (input size, resize size, interpolation, mean, std) as torchvision's metadata declares them
        ("resnet50", "IMAGENET1K_V1", (224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD)),
        ("resnet50", "DEFAULT", (224, 232, "bilinear", IMAGENET_MEAN, IMAGENET_STD)),
        ("swin_t", "IMAGENET1K_V1", (224, 232, "bicubic", IMAGENET_MEAN, IMAGENET_STD)),
        ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", (384, None, "bicubic", IMAGENET_MEAN, IMAGENET_STD)),
        ("efficientnet_v2_l", "IMAGENET1K_V1", (480, None, "bicubic", (0.5,) * 3, (0.5,) * 3)),
    ],
)
def test_torchvision_hub_weights_give_the_view_of_their_own_transforms(model, tag, view):
    """The spec a hub teacher gets, from the weights' metadata (the builder reads it before downloading)."""
    spec = spec_from_weights(hub_weights(model, tag), embed_dim=7)
    assert (spec.input_size, spec.resize_size, spec.interpolation) == view[:3]
    assert spec.mean == pytest.approx(view[3]) and spec.std == pytest.approx(view[4]) and spec.embed_dim == 7


def test_a_local_torchvision_file_takes_the_view_of_the_weights_its_name_tags(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None)
    torch.save(model.state_dict(), tmp_path / "b0.pth")
    plain = build_teacher("torchvision:efficientnet_b0", weights=str(tmp_path / "b0.pth")).spec
    assert (plain.input_size, plain.resize_size, plain.interpolation, plain.mean) == (
        224,
        None,
        "bilinear",
        IMAGENET_MEAN,
    )
    teacher = build_teacher("torchvision:efficientnet_b0.IMAGENET1K_V1", weights=str(tmp_path / "b0.pth"))
    assert (teacher.spec.input_size, teacher.spec.resize_size, teacher.spec.interpolation) == (224, 256, "bicubic")
    assert torch.equal(teacher.encoder.features[0][0].weight, model.features[0][0].weight)
    assert teacher.name == "torchvision:efficientnet_b0.IMAGENET1K_V1" and teacher.spec.embed_dim == 1280


def test_torchvision_tags_are_checked_before_anything_downloads(tmp_path):
    with pytest.raises(
        ValueError, match="the name says ResNet50_Weights.IMAGENET1K_V1, teacher.weights ResNet50_Weights.IMAGENET1K_V2"
    ):
        build_teacher("torchvision:resnet50.IMAGENET1K_V1", weights="IMAGENET1K_V2")
    with pytest.raises(KeyError, match="no weights 'IMAGENET9K'; known: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        build_teacher("torchvision:resnet50.IMAGENET9K")
    with pytest.raises(KeyError, match="unknown torchvision model 'resnet5O'"):
        build_teacher("torchvision:resnet5O", weights="DEFAULT")
    assert build_teacher("torchvision:resnet18.DEFAULT").spec.resize_size == 256  # null weights: random init


def test_a_file_named_as_torchvision_names_its_download_gets_a_hint(tmp_path):
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    torch.save(model.state_dict(), path)
    with pytest.warns(UserWarning, match="teacher.name torchvision:resnet18.IMAGENET1K_V1"):
        build_teacher("torchvision:resnet18", weights=str(path))


def test_ssl_teacher_round_trip(tmp_path):
    backbone = build_student("resnet8")
    save_ssl_teacher(tmp_path / "t.pt", "resnet8", backbone, 32, (0.5,) * 3, (0.25,) * 3, knn_top1=91.5)
    teacher = build_teacher("ssl", weights=str(tmp_path / "t.pt"))
    assert same_weights(teacher.encoder, backbone)
    assert teacher.spec.input_size == 32 and teacher.spec.mean == (0.5,) * 3
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert_frozen(teacher)


def test_weights_are_loaded_weights_only(tmp_path):
    torch.save({"state_dict": argparse.Namespace(x=1)}, tmp_path / "evil.pt")  # arbitrary pickled object
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported"):
        build_teacher("ssl", weights=str(tmp_path / "evil.pt"))


def test_ssl_teacher_rejects_other_files(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an ega-ray SSL teacher"):
        build_teacher("ssl", weights=str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError):
        build_teacher("ssl", weights=str(tmp_path / "missing.pt"))


@pytest.mark.heavy
@pytest.mark.parametrize(("name", "width"), [("RN50", 1024), ("RN101", 512), ("ViT-B-32", 512), ("ViT-B-16", 512)])
def test_the_papers_clip_teachers_build_and_embed(name, width, tmp_path):
    torch.manual_seed(0)
    visual = open_clip.create_model(name, pretrained=None).visual
    torch.save(visual.state_dict(), tmp_path / "visual.pt")  # the image tower alone also loads
    teacher = build_teacher(f"open_clip:{name}", weights=str(tmp_path / "visual.pt"))
    assert teacher.spec.embed_dim == width and teacher.spec.input_size == 224
    assert teacher(torch.randn(1, 3, 224, 224)).shape == (1, width)


# --- RepDistiller / mdistiller checkpoints ---------------------------------------------------------------
# Their parameter names, written from their model code (RepDistiller models/resnet.py, resnetv2.py, vgg.py;
# mdistiller/models/cifar/ holds the same modules), in the order their modules register them, and the
# containers their training scripts save. Nothing here comes from the loader under test.


def _conv(name: str, bias: bool = False) -> list[str]:
    return [f"{name}.weight"] + ([f"{name}.bias"] if bias else [])


def _bn(name: str) -> list[str]:
    return [f"{name}.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def their_cifar_resnet(n: int, wide: bool) -> tuple[list[str], str]:
    """models/resnet.py: conv1, bn1, layer1-3 of n BasicBlocks, fc. A block's ``downsample`` (1x1 conv, BN)
    exists where the stride or the width changes: layer2.0 and layer3.0, and layer1.0 of the x4 nets (32 → 64)."""
    keys = _conv("conv1") + _bn("bn1")
    for stage in (1, 2, 3):
        for j in range(n):
            b = f"layer{stage}.{j}"
            keys += _conv(f"{b}.conv1") + _bn(f"{b}.bn1") + _conv(f"{b}.conv2") + _bn(f"{b}.bn2")
            if j == 0 and (stage > 1 or wide):
                keys += _conv(f"{b}.downsample.0") + _bn(f"{b}.downsample.1")
    return keys, "fc"


def their_resnet50() -> tuple[list[str], str]:
    """models/resnetv2.py ResNet50: conv1, bn1, layer1-4 of 3, 4, 6, 3 Bottlenecks (the first with a
    ``shortcut`` conv-BN), linear."""
    keys = _conv("conv1") + _bn("bn1")
    for stage, n in enumerate((3, 4, 6, 3), 1):
        for j in range(n):
            b = f"layer{stage}.{j}"
            for i in (1, 2, 3):
                keys += _conv(f"{b}.conv{i}") + _bn(f"{b}.bn{i}")
            if j == 0:
                keys += _conv(f"{b}.shortcut.0") + _bn(f"{b}.shortcut.1")
    return keys, "linear"


def their_vgg13() -> tuple[list[str], str]:
    """models/vgg.py vgg13_bn: block0-4 of [conv, BN, ReLU, conv, BN] (the last ReLU cut), convs with a bias;
    classifier."""
    keys: list[str] = []
    for i in range(5):
        keys += (
            _conv(f"block{i}.0", bias=True) + _bn(f"block{i}.1") + _conv(f"block{i}.3", bias=True) + _bn(f"block{i}.4")
        )
    return keys, "classifier"


THEIR_MODELS = {
    "resnet8x4": (lambda: their_cifar_resnet(1, wide=True), "resnet8x4"),
    "resnet20": (lambda: their_cifar_resnet(3, wide=False), "resnet20"),
    "resnet56": (lambda: their_cifar_resnet(9, wide=False), "resnet56"),
    "vgg13": (their_vgg13, "vgg13"),
    "ResNet50": (their_resnet50, "resnet50"),
}


def their_model(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Our backbone (BatchNorm made non-trivial) and its state dict under their names, with a 100-class head."""
    keys_of, student = THEIR_MODELS[name]
    torch.manual_seed(seed)
    model = build_student(student).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0), m.num_batches_tracked.fill_(7)
    keys, head = keys_of()
    ours = model.state_dict()
    assert len(keys) == len(ours)
    state = dict(zip(keys, (v.clone() for v in ours.values()), strict=True))
    state |= {f"{head}.weight": torch.randn(100, model.feat_dim), f"{head}.bias": torch.randn(100)}
    return model, state


SGD_STATE = {  # what optimizer.state_dict() holds: plain values and tensors
    "state": {0: {"momentum_buffer": torch.zeros(3)}},
    "param_groups": [{"lr": 0.0005, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False, "params": [0]}],
}
REPDISTILLER_OPTIONS = argparse.Namespace(  # train_teacher.py's parse_option(), as <NAME>_last.pth holds it
    print_freq=100, batch_size=64, epochs=240, learning_rate=0.05, lr_decay_epochs=[150, 180, 210],
    lr_decay_rate=0.1, weight_decay=5e-4, momentum=0.9, model="resnet8x4", dataset="cifar100", trial=0,
    model_path="./save/models", model_name="resnet8x4_cifar100_lr_0.05_decay_0.0005_trial_0",
)  # fmt: skip


def layouts(state: dict) -> dict[str, dict]:
    return {
        # RepDistiller train_teacher.py: ckpt_epoch_N.pth (the published teachers), <NAME>_best.pth, <NAME>_last.pth
        "repdistiller ckpt_epoch": {
            "epoch": 240,
            "model": state,
            "accuracy": torch.tensor(79.42),
            "optimizer": SGD_STATE,
        },
        "repdistiller best": {"epoch": 231, "model": state, "best_acc": torch.tensor(79.6), "optimizer": SGD_STATE},
        "repdistiller last": {"opt": REPDISTILLER_OPTIONS, "model": state, "optimizer": SGD_STATE},
        # mdistiller's trainer: latest / best / epoch_N (the DataParallel distiller) and student_best
        "mdistiller best": {
            "epoch": 240,
            "model": {f"module.student.{k}": v for k, v in state.items()}
            | {"module.teacher.conv1.weight": torch.zeros(8, 3, 3, 3)},
            "optimizer": SGD_STATE,
            "best_acc": 76.32,
        },
        "mdistiller student_best": {"model": state},
        "bare state dict": state,
        # PyTorch 0.4.0 (which RepDistiller was tested with) wrote no num_batches_tracked
        "without num_batches_tracked": {"model": {k: v for k, v in state.items() if "num_batches" not in k}},
    }


@pytest.fixture(scope="module")
def resnet8x4_theirs():
    return their_model("resnet8x4")


@pytest.mark.parametrize("layout", list(layouts({})))
def test_repdistiller_and_mdistiller_checkpoints_load(layout, resnet8x4_theirs, tmp_path):
    model, state = resnet8x4_theirs
    torch.save(layouts(state)[layout], tmp_path / "ckpt.pth")
    family = "mdistiller" if layout.startswith("mdistiller") else "repdistiller"
    teacher = build_teacher(f"{family}:resnet8x4", weights=str(tmp_path / "ckpt.pth"))
    assert teacher.name == f"{family}:resnet8x4"
    got, want = teacher.encoder.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want if "num_batches" not in k or "without" not in layout)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(x), model(x))
    spec = teacher.spec
    assert (spec.embed_dim, spec.input_size, spec.interpolation) == (256, 32, "bilinear")
    assert spec.mean == (0.5071, 0.4867, 0.4408) and spec.std == (0.2675, 0.2565, 0.2761)
    assert_frozen(teacher)


@pytest.mark.parametrize(
    ("name", "feat_dim"),
    [("repdistiller:resnet20", 64), ("repdistiller:vgg13", 512),
     pytest.param("mdistiller:resnet50", 2048, marks=pytest.mark.heavy)],  # fmt: skip
)
def test_each_shared_architecture_maps_back_exactly(name, feat_dim, tmp_path):
    family, theirs = name.split(":")
    model, state = their_model({"resnet50": "ResNet50"}.get(theirs, theirs))
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(70.0)}, tmp_path / "t.pth")
    teacher = build_teacher(name, weights=str(tmp_path / "t.pth"))
    assert same_weights(teacher.encoder, model) and teacher.spec.embed_dim == feat_dim
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(x), model(x))


def test_a_published_teacher_in_the_legacy_file_format_loads(resnet8x4_theirs, tmp_path):
    """The published teachers (2019) predate PyTorch 1.6's zip format."""
    model, state = resnet8x4_theirs
    ckpt = {"epoch": 240, "model": state, "accuracy": torch.tensor(79.42), "optimizer": SGD_STATE}
    torch.save(ckpt, tmp_path / "ckpt_epoch_240.pth", _use_new_zipfile_serialization=False)
    teacher = build_teacher("repdistiller:resnet8x4", weights=str(tmp_path / "ckpt_epoch_240.pth"))
    assert same_weights(teacher.encoder, model)


class Options:  # a class of the file's own: unpickling it would import and run code
    def __init__(self) -> None:
        self.model = "resnet8x4"


@pytest.mark.parametrize(
    "extra",
    # os.system: what a crafted checkpoint names to run a command (print may be patched by Ray in this process)
    [os.system, Options(), argparse.Namespace(model="resnet8x4", hook=os.system)],
    ids=["function", "class instance", "function inside the allowed Namespace"],
)
def test_repdistiller_files_holding_other_objects_are_refused(extra, resnet8x4_theirs, tmp_path):
    _, state = resnet8x4_theirs
    torch.save({"opt": extra, "model": state}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="hold Python objects a weights-only load refuses") as err:
        build_teacher("repdistiller:resnet8x4", weights=str(tmp_path / "evil.pth"))
    assert "\n" not in str(err.value)


def test_a_checkpoint_of_another_architecture_is_refused_naming_what_differs(tmp_path):
    _, state = their_model("resnet56")
    torch.save({"opt": argparse.Namespace(model="resnet56"), "model": state}, tmp_path / "r56.pth")
    with pytest.raises(ValueError) as err:
        build_teacher("repdistiller:resnet32", weights=str(tmp_path / "r56.pth"))
    msg = str(err.value)
    assert "\n" not in msg and "r56.pth" in msg and "{model, opt}" in msg and "does not hold a resnet32" in msg
    assert "unexpected keys 144 (layer1.5.bn1.bias" in msg and "it matches repdistiller:resnet56" in msg
    assert "options say model 'resnet56'" in msg
    resnet8x4 = their_model("resnet8x4")[1]
    resnet8x4["layer1.0.conv1.weight"] = torch.zeros(64, 32, 5, 5)
    torch.save(resnet8x4, tmp_path / "wrong_shape.pth")
    with pytest.raises(
        ValueError,
        match=r"another shape \(file vs here\) 1 \(layer1.0.conv1.weight \(64, 32, 5, 5\) vs \(64, 32, 3, 3\)\)",
    ):
        build_teacher("mdistiller:resnet8x4", weights=str(tmp_path / "wrong_shape.pth"))


def test_architectures_ega_ray_lacks_or_computes_differently_are_refused(tmp_path):
    with pytest.raises(ValueError, match="ReLU after the depthwise"):
        build_teacher("repdistiller:ShuffleV1", weights=str(tmp_path / "x.pth"))
    with pytest.raises(ValueError, match="no Wide ResNet"):
        build_teacher("mdistiller:wrn_40_2", weights=str(tmp_path / "x.pth"))
    with pytest.raises(KeyError, match="supported: resnet8, "):
        build_teacher("repdistiller:densenet", weights=str(tmp_path / "x.pth"))
    with pytest.raises(ValueError, match="needs teacher.weights"):
        build_teacher("repdistiller:resnet32x4")


def test_zoo_points_a_repdistiller_checkpoint_to_its_family(resnet8x4_theirs, tmp_path):
    _, state = resnet8x4_theirs
    torch.save({"epoch": 240, "model": state}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="name the teacher repdistiller:NAME"):
        build_teacher("zoo:resnet8x4", weights=str(tmp_path / "ckpt.pth"))
