"""The EGA paper's training loop as its public code runs it: the baseline every speed figure in bench/ is a ratio to.

One step, as the paper's code (Ma, Chen, Akata, BMVC 2022) does it:

- **data**: uint8 CIFAR-sized images through a torch DataLoader (batch 64, shuffled, 8 loader workers or the
  machine's cores if fewer, pinned memory on a GPU). Each loader worker makes two *independent* views of every
  image with PIL: the student's (RandomCrop 32 with padding 4, horizontal flip, ToTensor, CIFAR-100
  normalisation) and the teacher's (RandomCrop 32 with padding 4, bicubic resize to 224, horizontal flip,
  ToTensor, CLIP normalisation);
- **teacher**: a frozen image tower of OpenAI CLIP ViT-B/32's architecture (open_clip's ``ViT-B-32-quickgelu``,
  QuickGELU included; random weights) run under ``no_grad``, in fp16 on a GPU and fp32 on CPU: what OpenAI
  CLIP's ``clip.load``, which the paper's code calls, gives (half-precision weights on cuda; ``encode_image``
  casts its input to them). Its trainable head (512 → 256 → classes) has its own SGD (lr 0.01, momentum 0.9,
  weight decay 5e-4);
- **student**: resnet8x4 (the CRD/EGA repositories' network, from this project's registry) and its head
  (256 → 256 → classes), fp32, SGD lr 0.05, momentum 0.9, weight decay 5e-4;
- **loss**: the student's CE + EGA (node 0.8, edge 0.24: the paper's hard graph, the Pearson correlation of the
  stacked teacher and student embeddings) and the teacher head's CE. As in the paper's code, one backward of
  the student's loss (keeping the graph), the teacher head's gradients zeroed, then its CE's backward: the
  teacher head learns from its own CE only.

``seed_throughput`` returns images per second after a warm-up (the loader workers' start and the first steps
are not counted). Weights are random: the arithmetic and the data path are what is timed.

    python bench/seed_loop.py --device cuda --seconds 20
    from seed_loop import seed_throughput     # bench/throughput.py: the ratio's denominator
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn

from ega_ray.constants import CLIP_MEAN, CLIP_STD
from ega_ray.models import build_student
from ega_ray.models.heads import EmbeddingHead

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # the CRD/EGA repositories' CIFAR-100 statistics
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
TEACHER_SIZE = 224


def student_transform() -> T.Compose:
    return T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
    )


def teacher_transform() -> T.Compose:
    return T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.Resize(TEACHER_SIZE, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


class TwoViews(torch.utils.data.Dataset):
    """uint8 (N, 32, 32, 3) images and labels → (student view, teacher view, label), each view drawn on its own."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.student, self.teacher = student_transform(), teacher_transform()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = Image.fromarray(self.images[i])
        return self.student(image), self.teacher(image), int(self.labels[i])


def default_workers() -> int:
    """The paper's 8 loader workers, or the machine's cores if fewer."""
    return min(8, os.cpu_count() or 1)


def make_loader(
    images: np.ndarray, labels: np.ndarray, device: torch.device, batch: int = 64, workers: int | None = None
) -> torch.utils.data.DataLoader:
    workers = default_workers() if workers is None else workers
    return torch.utils.data.DataLoader(
        TwoViews(images, labels),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,  # every timed step has the full batch (and BatchNorm never sees a batch of one)
        # a short benchmark epoch must not restart the workers every few steps, as a 782-step one does not
        persistent_workers=workers > 0,
    )


def teacher_dtype(device: torch.device) -> torch.dtype:
    """The frozen teacher's dtype as ``clip.load`` gives it: fp16 on cuda, fp32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass
class SeedParts:
    teacher: nn.Module  # frozen, eval, in teacher_dtype(device)
    student: nn.Module  # resnet8x4: images → 256-d feature
    s_head: EmbeddingHead  # 256 → 256 → classes
    t_head: EmbeddingHead  # 512 → 256 → classes
    opt_s: torch.optim.SGD
    opt_t: torch.optim.SGD
    t_dtype: torch.dtype


def build_seed_parts(device: torch.device, num_classes: int = 100) -> SeedParts:
    t_dtype = teacher_dtype(device)
    teacher = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).visual
    teacher = teacher.eval().requires_grad_(False).to(device=device, dtype=t_dtype)
    student = build_student("resnet8x4").to(device)
    s_head = EmbeddingHead(student.feat_dim, 256, num_classes).to(device)
    t_head = EmbeddingHead(teacher.output_dim, 256, num_classes).to(device)
    sgd = {"momentum": 0.9, "weight_decay": 5e-4}
    opt_s = torch.optim.SGD([*student.parameters(), *s_head.parameters()], lr=0.05, **sgd)
    opt_t = torch.optim.SGD(t_head.parameters(), lr=0.01, **sgd)
    return SeedParts(teacher, student, s_head, t_head, opt_s, opt_t, t_dtype)


def ega_loss(ft: torch.Tensor, fs: torch.Tensor, node_weight: float = 0.8, edge_weight: float = 0.24) -> torch.Tensor:
    """The paper's EGA loss: ‖C_ts − I‖_F · node + ‖C_tt − C_ss‖_F · edge, C the Pearson graph of [ft; fs]."""
    z = torch.cat([ft, fs])
    z = z - z.mean(dim=1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True)
    c = z @ z.t()
    b = ft.shape[0]
    eye = torch.eye(b, device=c.device, dtype=c.dtype)
    return node_weight * torch.norm(c[:b, b:] - eye) + edge_weight * torch.norm(c[:b, :b] - c[b:, b:])


def seed_step(p: SeedParts, x_s: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step on a batch already on the device: student view ``x_s``, teacher view ``x_t``, labels ``y``."""
    with torch.no_grad():
        feat_t = p.teacher(x_t.to(p.t_dtype)).float()
    emb_s, logits_s = p.s_head(p.student(x_s))
    emb_t, logits_t = p.t_head(feat_t)
    ce = F.cross_entropy(logits_s, y)
    ega = ega_loss(emb_t, emb_s)
    loss = ce + ega
    loss_t = F.cross_entropy(logits_t, y)
    p.opt_s.zero_grad()
    loss.backward(retain_graph=True)  # EGA's gradient reaches the teacher head too ...
    p.opt_t.zero_grad()  # ... and is dropped here: the teacher head learns from its own CE
    loss_t.backward()
    p.opt_t.step()
    p.opt_s.step()
    losses = {"loss": loss, "ce": ce, "ega": ega, "teacher_ce": loss_t}
    return {k: v.detach() for k, v in losses.items()} | {"feat_t": feat_t}


def seed_throughput(
    images: np.ndarray,
    labels: np.ndarray,
    device: str = "cuda",
    batch: int = 64,
    workers: int | None = None,
    seconds: float = 20.0,
    warmup_steps: int = 10,
    num_classes: int = 100,
) -> float:
    """Images per second of the paper's loop on uint8 ``images`` (N, 32, 32, 3) and ``labels``, counted from
    the end of the ``warmup_steps``-th step for at least ``seconds`` (at least one step)."""
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    p = build_seed_parts(dev, num_classes)
    loader = make_loader(images, labels, dev, batch, workers)
    steps, counted, t0 = 0, 0, None
    while True:
        for x_s, x_t, y in loader:
            seed_step(p, x_s.to(dev), x_t.to(dev), y.to(dev))
            steps += 1
            if steps == warmup_steps:
                sync()
                t0 = time.perf_counter()
            elif steps > warmup_steps:
                counted += len(y)
                if time.perf_counter() - t0 >= seconds:
                    sync()
                    return counted / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--n", type=int, default=50_000, help="random CIFAR-shaped images")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (a.n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, a.n)
    ips = seed_throughput(x, y, a.device, a.batch, a.workers, a.seconds, a.warmup_steps)
    print(json.dumps({"seed_img_per_s": round(ips, 1), "device": a.device, "batch": a.batch, "workers": a.workers}))


if __name__ == "__main__":
    main()
