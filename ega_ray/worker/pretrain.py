"""Self-supervised teacher pretraining (SimCLR) on Ray Train: ``ega-ray pretrain-teacher``.

Each worker reads its shard, makes two random views of every image on its device, and minimises
NT-Xent over the global batch (negatives gathered from all ranks). No labels are used for training;
the frozen backbone's kNN top-1 on the validation split (cosine, k neighbours among the training images)
is the report card. The driver turns the last checkpoint into a teacher file that ``ssl`` loads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from ega_ray.config import Config
from ega_ray.data.augment import resize, simclr_view, to_unit_float
from ega_ray.losses.ntxent import NTXentLoss
from ega_ray.models import build_student
from ega_ray.worker.common import (
    Checkpointed,
    all_reduce_sum,
    end_epoch,
    epoch_seed,
    peak_gpu_memory_gib,
    restore_run,
    start_worker,
    unwrap,
)
from ega_ray.worker.divergence import NonFiniteWatch, stop_on_divergence


class SimCLRNet(nn.Module):
    def __init__(self, backbone: nn.Module, proj_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        w = backbone.feat_dim
        self.projector = nn.Sequential(nn.Linear(w, w), nn.ReLU(inplace=True), nn.Linear(w, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def teacher_input_size(cfg: Config) -> int:
    return cfg.pretrain.image_size or cfg.data.image_size


@torch.no_grad()
def embed_all(backbone: nn.Module, data, cfg: Config, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    size = teacher_input_size(cfg)
    for batch in data.iter_torch_batches(batch_size=512, device=device):
        x = resize(to_unit_float(batch["image"]), size, "bilinear")
        x = normalize(x, cfg.augment.student_mean, cfg.augment.student_std)
        feats.append(backbone(x).float().cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def knn_top1(backbone: nn.Module, train_data, val_data, cfg: Config, device: torch.device) -> float:
    """kNN top-1 (%) of frozen features on ``val_data`` (the run's test split): cosine distance,
    distance-weighted vote of k training neighbours. Nothing is selected on it."""
    backbone.eval()
    x_tr, y_tr = embed_all(backbone, train_data, cfg, device)
    x_va, y_va = embed_all(backbone, val_data, cfg, device)
    labeled = y_tr >= 0
    knn = KNeighborsClassifier(
        n_neighbors=min(cfg.pretrain.knn_k, int(labeled.sum())), metric="cosine", weights="distance"
    )
    knn.fit(x_tr[labeled], y_tr[labeled])
    return 100.0 * float((knn.predict(x_va) == y_va).mean())


@stop_on_divergence
def pretrain_func_per_worker(config: dict[str, Any]) -> None:
    cfg = Config.model_validate(config["cfg"])
    p = cfg.pretrain
    rank, world, device = start_worker(cfg, deterministic=False)  # SimCLR's views are drawn per worker

    net = ray.train.torch.prepare_model(SimCLRNet(build_student(p.arch), p.proj_dim))
    opt = torch.optim.SGD(net.parameters(), lr=p.lr * p.batch_size / 256, momentum=0.9, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs)
    loss_fn = NTXentLoss(p.temperature)
    gen = torch.Generator(device=device)

    saved = Checkpointed({"net": unwrap(net), "opt": opt, "sched": sched})  # what a checkpoint holds
    run = restore_run(saved)
    start_epoch, history, restarts = run.epoch, run.history, run.restarts

    shard = ray.train.get_dataset_shard("train")
    knn_train, knn_test = ray.train.get_dataset_shard("knn_train"), ray.train.get_dataset_shard("test")
    mean, std = cfg.augment.student_mean, cfg.augment.student_std
    size = teacher_input_size(cfg)
    watch = NonFiniteWatch(["ntxent"], device)

    for epoch in range(start_epoch, p.epochs):
        gen.manual_seed(epoch_seed(cfg.run.seed, epoch, rank))
        net.train()
        total, steps = 0.0, 0
        watch.reset()
        for batch in shard.iter_torch_batches(
            batch_size=p.batch_size // world,
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            device=device,
        ):
            x = resize(to_unit_float(batch["image"]), size, "bilinear")
            za = net(normalize(simclr_view(x, gen, flip=cfg.augment.flip), mean, std))
            zb = net(normalize(simclr_view(x, gen, flip=cfg.augment.flip), mean, std))
            loss = loss_fn(za, zb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
            watch.observe(loss.detach()[None])
            if watch.due(steps):
                watch.raise_if_diverged(epoch + 1, opt.param_groups[0]["lr"], "pretrain.lr")
        lr = opt.param_groups[0]["lr"]
        watch.observe_weights(net.parameters())  # before the epoch is reported or checkpointed
        watch.raise_if_diverged(epoch + 1, lr, "pretrain.lr")
        sched.step()
        if steps == 0:
            raise RuntimeError(f"the training split is smaller than pretrain.batch_size {p.batch_size}")
        metrics = {
            "epoch": epoch + 1,
            "train_loss": all_reduce_sum([total / steps], device)[0] / world,
            "lr": lr,
            "gpu_mem_peak_gib": all_reduce_sum([peak_gpu_memory_gib(device)], device, op="max")[0],  # 0 on CPU
            "restarts": restarts,
        }
        last = epoch + 1 == p.epochs
        if rank == 0 and (last or (epoch + 1) % 5 == 0):
            metrics["knn_top1"] = knn_top1(unwrap(net).backbone, knn_train, knn_test, cfg, device)
        history.append(metrics)
        end_epoch(cfg, epoch + 1, metrics, saved.state(epoch=epoch + 1, history=history, restarts=restarts))
