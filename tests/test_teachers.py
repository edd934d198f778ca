"""Teachers load from local files (randomly initialised weights saved here; nothing downloads)."""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch
import torchvision

from ega_ray.config import CLIP_MEAN
from ega_ray.models import build_student, build_teacher
from ega_ray.models.teachers.base import sha256_of
from ega_ray.models.teachers.ssl_teacher import save_ssl_teacher


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


def test_ssl_teacher_round_trip(tmp_path):
    backbone = build_student("resnet8")
    save_ssl_teacher(tmp_path / "t.pt", "resnet8", backbone, 32, (0.5,) * 3, (0.25,) * 3, knn_top1=91.5)
    teacher = build_teacher("ssl", weights=str(tmp_path / "t.pt"))
    assert same_weights(teacher.encoder, backbone)
    assert teacher.spec.input_size == 32 and teacher.spec.mean == (0.5,) * 3
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert_frozen(teacher)


def test_weights_are_loaded_weights_only(tmp_path):
    import argparse

    torch.save({"state_dict": argparse.Namespace(x=1)}, tmp_path / "evil.pt")  # arbitrary pickled object
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported"):
        build_teacher("ssl", weights=str(tmp_path / "evil.pt"))


def test_ssl_teacher_rejects_other_files(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an ega-ray SSL teacher"):
        build_teacher("ssl", weights=str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError):
        build_teacher("ssl", weights=str(tmp_path / "missing.pt"))


@pytest.mark.parametrize(("name", "width"), [("RN50", 1024), ("RN101", 512), ("ViT-B-32", 512), ("ViT-B-16", 512)])
def test_the_papers_clip_teachers_build_and_embed(name, width, tmp_path):
    torch.manual_seed(0)
    visual = open_clip.create_model(name, pretrained=None).visual
    torch.save(visual.state_dict(), tmp_path / "visual.pt")  # the image tower alone also loads
    teacher = build_teacher(f"open_clip:{name}", weights=str(tmp_path / "visual.pt"))
    assert teacher.spec.embed_dim == width and teacher.spec.input_size == 224
    assert teacher(torch.randn(1, 3, 224, 224)).shape == (1, width)
