"""bench/seed_loop.py is the paper's step: two independent PIL views (student 32 px CIFAR-normalised, teacher
224 px bicubic CLIP-normalised), a frozen ViT-B/32-shaped teacher (fp32 on CPU, fp16 on a GPU), CE + EGA +
the teacher head's CE, and both optimizers stepping. CPU, tiny inputs, random weights, nothing downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from ega_ray.constants import CLIP_MEAN, CLIP_STD
from ega_ray.losses import EGALoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import seed_loop  # noqa: E402

CPU = torch.device("cpu")


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _expected_view(image: Image.Image, resize: bool, mean, std) -> torch.Tensor:
    """The view the recipe makes from the torch RNG's next draws: crop of the 4-padded image, (bicubic resize
    to 224), flip, ToTensor, normalise; the draws replayed by hand in the recipe's order."""
    padded = TF.pad(image, 4)
    i, j, h, w = T.RandomCrop.get_params(padded, (32, 32))
    x = TF.crop(padded, i, j, h, w)
    if resize:
        x = TF.resize(x, 224, interpolation=T.InterpolationMode.BICUBIC)
    if torch.rand(1) < 0.5:
        x = TF.hflip(x)
    return TF.normalize(TF.to_tensor(x), mean, std)


def _unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]


def test_two_independent_views_student_cifar_32_teacher_clip_224_bicubic() -> None:
    x, y = _images(6)
    ds = seed_loop.TwoViews(x, y)
    offsets_differ = False
    for k in range(len(ds)):
        torch.manual_seed(100 + k)
        s, t, label = ds[k]
        assert s.shape == (3, 32, 32) and t.shape == (3, 224, 224) and label == int(y[k])
        assert s.dtype == t.dtype == torch.float32
        torch.manual_seed(100 + k)
        image = Image.fromarray(x[k])
        exp_s = _expected_view(image, False, seed_loop.CIFAR100_MEAN, seed_loop.CIFAR100_STD)
        exp_t = _expected_view(image, True, CLIP_MEAN, CLIP_STD)  # the next draws: a crop of its own
        torch.testing.assert_close(s, exp_s)
        torch.testing.assert_close(t, exp_t)
        # the teacher's view is not the student's view upsampled: its crop and flip were drawn apart
        s_unit = _unnormalize(s, seed_loop.CIFAR100_MEAN, seed_loop.CIFAR100_STD)
        up = F.interpolate(s_unit[None], 224, mode="bicubic")[0]
        t_unit = _unnormalize(t, CLIP_MEAN, CLIP_STD)
        offsets_differ |= (up - t_unit).abs().mean().item() > 0.05
    assert offsets_differ
    # bicubic, not bilinear: the two resizes of one crop differ
    crop = Image.fromarray(x[0])
    assert not torch.equal(
        TF.to_tensor(TF.resize(crop, 224, interpolation=T.InterpolationMode.BICUBIC)),
        TF.to_tensor(TF.resize(crop, 224, interpolation=T.InterpolationMode.BILINEAR)),
    )


def test_loader_is_the_papers() -> None:
    x, y = _images(8)
    loader = seed_loop.make_loader(x, y, CPU)
    assert loader.batch_size == 64 and loader.num_workers == min(8, os.cpu_count() or 1)
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler)  # shuffled
    assert not loader.pin_memory  # pinned only where a GPU copies from it
    assert seed_loop.make_loader(x, y, torch.device("cuda"), workers=0).pin_memory
    assert seed_loop.teacher_dtype(torch.device("cuda")) == torch.float16  # clip.load's fp16 on a GPU
    assert seed_loop.teacher_dtype(CPU) == torch.float32


@pytest.mark.heavy
def test_step_is_the_recipe_and_both_optimizers_step() -> None:
    torch.manual_seed(0)
    p = seed_loop.build_seed_parts(CPU, num_classes=10)
    assert p.t_dtype == torch.float32 and not p.teacher.training
    assert all(not q.requires_grad and q.dtype == torch.float32 for q in p.teacher.parameters())
    assert p.teacher.output_dim == 512 and p.student.feat_dim == 256
    assert (p.s_head.proj.in_features, p.s_head.proj.out_features, p.s_head.classifier.out_features) == (256, 256, 10)
    assert (p.t_head.proj.in_features, p.t_head.proj.out_features, p.t_head.classifier.out_features) == (512, 256, 10)
    for opt, lr in ((p.opt_s, 0.05), (p.opt_t, 0.01)):
        g = opt.param_groups[0]
        assert (g["lr"], g["momentum"], g["weight_decay"]) == (lr, 0.9, 5e-4)
    x, y = _images(4)
    ds = seed_loop.TwoViews(x, y)
    x_s = torch.stack([ds[i][0] for i in range(4)])
    x_t = torch.stack([ds[i][1] for i in range(4)])
    labels = torch.from_numpy(y)

    teacher_before = [q.clone() for q in p.teacher.parameters()]
    student_before = [q.clone() for q in [*p.student.parameters(), *p.s_head.parameters()]]
    head_before = [q.clone() for q in p.t_head.parameters()]
    # what the step must compute, on copies taken before it
    with torch.no_grad():
        feat_t = p.teacher(x_t)
        emb_s, logits_s = p.s_head(p.student(x_s))
        emb_t, logits_t = p.t_head(feat_t)
    out = seed_loop.seed_step(p, x_s, x_t, labels)

    assert out["feat_t"].shape == (4, 512) and out["feat_t"].dtype == torch.float32
    ega = EGALoss(0.8, 0.24)(emb_t, emb_s)
    torch.testing.assert_close(out["ega"], ega, rtol=1e-4, atol=1e-5)  # the paper's hard graph, 0.8 / 0.24
    torch.testing.assert_close(out["ce"], F.cross_entropy(logits_s, labels), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss"], out["ce"] + out["ega"])
    torch.testing.assert_close(out["teacher_ce"], F.cross_entropy(logits_t, labels), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, p.teacher.parameters(), strict=True))
    after = [*p.student.parameters(), *p.s_head.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(student_before, after, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(head_before, p.t_head.parameters(), strict=True))


@pytest.mark.heavy
def test_teacher_head_learns_from_its_own_ce_only() -> None:
    """The distiller's gradient on the teacher head is dropped before its step (the paper's code)."""
    torch.manual_seed(0)
    p = seed_loop.build_seed_parts(CPU, num_classes=10)
    x_t = torch.randn(4, 3, 224, 224)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        feat_t = p.teacher(x_t)
    state = {k: v.clone() for k, v in p.t_head.state_dict().items()}
    seed_loop.seed_step(p, torch.randn(4, 3, 32, 32), x_t, labels)
    alone = seed_loop.EmbeddingHead(512, 256, 10)
    alone.load_state_dict(state)
    opt = torch.optim.SGD(alone.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    F.cross_entropy(alone(feat_t)[1], labels).backward()
    opt.step()
    for a, b in zip(alone.parameters(), p.t_head.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.heavy
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_throughput_counts_images_after_the_warm_up() -> None:
    x, y = _images(16)
    ips = seed_loop.seed_throughput(x, y, "cpu", batch=4, workers=0, seconds=0.01, warmup_steps=1, num_classes=10)
    assert 0 < ips < 1e4
