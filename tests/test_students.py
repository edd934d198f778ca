"""Shape, registry and parameter-count checks for the student backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ega_ray.models.students import STUDENTS, build_student

LOCAL_NAMES = [n for n in STUDENTS.names() if not n.endswith(":*")]


def _features(model: nn.Module, size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", LOCAL_NAMES)
def test_student_feature_shape(name: str) -> None:
    model = build_student(name)
    assert isinstance(model.feat_dim, int)
    out = _features(model, 32)
    assert out.shape == (2, model.feat_dim)
    assert torch.isfinite(out).all()


FEAT_DIMS = {
    "resnet8": 64,
    "resnet110": 64,
    "resnet8x4": 256,
    "resnet32x4": 256,
    "vgg13": 512,
    "shufflenet_v1": 960,
    "resnet50": 2048,
}


@pytest.mark.parametrize(("name", "feat_dim"), FEAT_DIMS.items())
def test_feat_dims(name: str, feat_dim: int) -> None:
    assert build_student(name).feat_dim == feat_dim


@pytest.mark.parametrize(("name", "feat_dim"), [("resnet18", 512), ("mobilenet_v3_small", 1024)])
def test_torchvision_student(name: str, feat_dim: int) -> None:
    model = build_student(f"torchvision:{name}")
    assert model.feat_dim == feat_dim
    out = _features(model, 64)
    assert out.shape == (2, feat_dim)
    assert torch.isfinite(out).all()


def test_torchvision_student_keeps_torchvision_state_dict_keys() -> None:
    keys = set(build_student("torchvision:resnet18").state_dict())
    assert "conv1.weight" in keys
    assert not any(k.startswith("fc.") for k in keys)


@pytest.mark.parametrize("name", ["resnet9000", "torchvision:not_a_model"])
def test_unknown_name_raises(name: str) -> None:
    with pytest.raises(KeyError, match=name.partition(":")[2] or name):
        build_student(name)


def test_parameter_counts_match_papers() -> None:
    assert 1.1e6 <= _params(build_student("resnet8x4")) <= 1.4e6
    assert 0.07e6 <= _params(build_student("resnet8")) <= 0.09e6


def test_compile_is_used_when_possible_and_falls_back_to_eager(monkeypatch, caplog) -> None:
    import sys

    from ega_ray.worker.common import maybe_compile

    cpu = torch.device("cpu")
    model = torch.nn.Linear(4, 2)
    assert maybe_compile(model, False, cpu, "student") is model
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with caplog.at_level("WARNING"):
        assert maybe_compile(model, True, cpu, "student") is model
    assert "running the student eagerly: no C++ compiler ('no-such-compiler-here')" in caplog.text
    monkeypatch.setenv("CXX", sys.executable)  # an executable that exists: compiling is possible (and lazy)
    compiled = maybe_compile(model, True, cpu, "student")
    assert compiled is not model and compiled._orig_mod is model
