"""The distillation loop that runs on every Ray Train worker (``train_func_per_worker``).

Read top to bottom: ``build_parts`` (models, optimizers, distiller), ``train_step`` (one step, also timed
without Ray by bench/throughput.py), then ``train_func_per_worker``: restore → for each epoch: train on this
worker's shard, evaluate, report metrics with a checkpoint. Loss of one step:

    student:  γ·CE(student logits, y) + β·distiller(teacher emb, student emb, …) + α·KD(teacher logits, student logits)
    teacher head (its own optimizer, lr 0.01):  CE(teacher-head logits, y)

The teacher's embedding is detached inside the distiller, so the teacher head learns from its own CE only
(as in the EGA code, which zeroes the distiller's gradient on the teacher head before its own step).
Rows whose label is −1 (the unlabeled part of a reduced label budget) count in the distiller and KD only.
The teacher's embedding comes from the teacher on its own view (``online``) or with the batch, computed by
a Ray Data stage (``pipeline``) or looked up in a K-view cache (``cached``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import nn

from ega_ray.config import Config, DistillConfig
from ega_ray.data.augment import ViewMaker
from ega_ray.data.teacher_stage import TEACHER_EMB, view_for
from ega_ray.losses import DISTILLERS, KDLoss
from ega_ray.models import EmbeddingHead, StudentClassifier, Teacher, build_student, build_teacher
from ega_ray.train.common import (
    Progress,
    StepTimer,
    all_reduce_sum,
    epoch_seed,
    load_state,
    maybe_compile,
    maybe_inject_failure,
    peak_gpu_memory_gib,
    report,
    seed_everything,
    torch_threads,
    unwrap,
)

EVAL_BATCH = 256
PIPELINE_SHUFFLE_BATCHES = 4


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over labeled rows (label ≥ 0); 0 (still in the graph, for DDP) when none is labeled."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp_min(1)


def build_distiller(cfg: Config, num_samples: int) -> nn.Module:
    return DISTILLERS.build(cfg.distill.method, d=cfg.distill, num_samples=num_samples, seed=cfg.run.seed)


@dataclass
class Parts:
    """What one training step touches. Built by :func:`build_parts` the same way in a Ray Train worker and
    in ``bench/throughput.py``'s loop without Ray, so that the two time the same step."""

    student_net: nn.Module  # student + its head (DDP under Ray Train): evaluation and checkpoints use it
    train_student: nn.Module  # the forward that trains: the same module, compiled when optim.compile
    t_head: nn.Module  # the teacher's trainable projection and classifier
    teacher: Teacher | None  # the frozen teacher (online mode only)
    distiller: nn.Module
    kd: KDLoss
    opt_s: torch.optim.Optimizer
    opt_t: torch.optim.Optimizer
    sched_s: torch.optim.lr_scheduler.LRScheduler
    sched_t: torch.optim.lr_scheduler.LRScheduler
    views: ViewMaker
    autocast: torch.autocast
    memory_format: torch.memory_format


def build_parts(
    cfg: Config,
    device: torch.device,
    num_classes: int,
    teacher_dim: int,
    num_indices: int,
    prepare: Callable[[nn.Module], nn.Module] = lambda m: m,
) -> Parts:
    """Models, optimizers and the distiller of a run on ``device`` (``prepare``: Ray Train's prepare_model)."""
    dtype = cfg.optim.compute_dtype(device)  # bf16 where optim.precision asks for it, else float32
    teacher = None
    if cfg.teacher.mode == "online":
        teacher = build_teacher(cfg.teacher.name, cfg.teacher.weights, cfg.teacher.sha256).to_device(device, dtype)
    o = cfg.optim
    channels_last = o.channels_last if o.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    student = build_student(cfg.student.name).to(memory_format=memory_format)
    s_head = EmbeddingHead(student.feat_dim, cfg.distill.embed_dim, num_classes)
    t_head = EmbeddingHead(
        teacher_dim, cfg.distill.embed_dim, num_classes, standardize=cfg.distill.standardize_teacher_features
    )
    student_net, t_head = prepare(StudentClassifier(student, s_head).to(device)), prepare(t_head.to(device))
    train_student = maybe_compile(student_net, o.compile, device, "student")
    if teacher is not None:
        teacher.encoder = maybe_compile(teacher.encoder, o.compile, device, "teacher")
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel per step for all parameters
    sgd = {"momentum": o.momentum, "weight_decay": o.weight_decay, **fused}
    opt_s = torch.optim.SGD(student_net.parameters(), lr=o.scaled_lr(o.lr), **sgd)
    opt_t = torch.optim.SGD(t_head.parameters(), lr=o.scaled_lr(o.teacher_head_lr), **sgd)
    return Parts(
        student_net=student_net,
        train_student=train_student,
        t_head=t_head,
        teacher=teacher,
        # the distiller may hold state (CRD's memory): identical on every rank, saved in every checkpoint
        distiller=build_distiller(cfg, num_indices).to(device),
        kd=KDLoss(cfg.distill.kd_temperature),
        opt_s=opt_s,
        opt_t=opt_t,
        sched_s=torch.optim.lr_scheduler.LambdaLR(opt_s, o.lr_factor),
        sched_t=torch.optim.lr_scheduler.LambdaLR(opt_t, o.lr_factor),
        views=ViewMaker.from_config(cfg, device, teacher.spec if teacher is not None else None),
        autocast=torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16),
        memory_format=memory_format,
    )


def step_losses(
    p: Parts, d: DistillConfig, batch: dict[str, torch.Tensor], feat_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of one step on ``batch`` (uint8 images, labels, index) with the teacher's features
    ``feat_t``: (student loss, its CE, its distiller term, the teacher head's CE)."""
    labels = batch["label"]
    with p.autocast:
        emb_s, logits_s = p.train_student(
            p.views.student(batch["image"], train=True).contiguous(memory_format=p.memory_format)
        )
        emb_t, logits_t = p.t_head(feat_t)
    loss_ce = masked_cross_entropy(logits_s, labels)
    if d.beta > 0:
        loss_distill = p.distiller(
            emb_t.detach(),
            emb_s,
            labels=labels,
            index=batch["index"],
            teacher_logits=logits_t.detach(),
            student_logits=logits_s,
        )
    else:
        loss_distill = torch.zeros((), device=labels.device)
    loss = d.gamma * loss_ce + d.beta * loss_distill
    if d.alpha > 0:
        loss = loss + d.alpha * p.kd(logits_t.detach(), logits_s)
    return loss, loss_ce, loss_distill, masked_cross_entropy(logits_t, labels)


def train_step(p: Parts, d: DistillConfig, batch: dict[str, torch.Tensor], feat_t: torch.Tensor) -> torch.Tensor:
    """One optimisation step of the student and the teacher's head (see :func:`step_losses`); returns the
    detached (loss, ce, distill, teacher-head ce)."""
    losses = step_losses(p, d, batch, feat_t)
    p.opt_s.zero_grad(set_to_none=True)
    p.opt_t.zero_grad(set_to_none=True)
    (losses[0] + losses[3]).backward()
    p.opt_s.step()
    p.opt_t.step()
    return torch.stack([x.detach() for x in losses])


def restore_parts(p: Parts, state: dict[str, Any]) -> None:
    """Load a checkpoint's ``state`` (read with ``map_location="cpu"``) into ``p``, whichever device wrote it:
    tensors move to ``p``'s device, and each optimizer keeps the implementation chosen for this device (fused on
    GPUs), not the one saved with it: a run started on a GPU resumes on a CPU and the other way round."""
    unwrap(p.student_net).load_state_dict(state["student"])
    unwrap(p.t_head).load_state_dict(state["teacher_head"])
    if "distiller" in state:  # checkpoints from before distillers kept state hold none (EGA has none)
        p.distiller.load_state_dict(state["distiller"])
    for opt, key in ((p.opt_s, "opt_s"), (p.opt_t, "opt_t")):
        own = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
        opt.load_state_dict(state[key])
        for group, keep in zip(opt.param_groups, own, strict=True):
            group.update(keep)
    p.sched_s.load_state_dict(state["sched_s"])
    p.sched_t.load_state_dict(state["sched_t"])


def train_func_per_worker(config: dict[str, Any]) -> None:
    cfg = Config.model_validate(config["cfg"])
    num_classes: int = config["num_classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch_threads(cfg.scaling.cpus_per_worker)
    seed_everything(cfg.run.seed)  # identical initial weights on every rank

    # --- models: frozen teacher (online mode only), student + its head, the teacher's trainable head
    p = build_parts(
        cfg, device, num_classes, config["teacher_dim"], config["num_indices"], ray.train.torch.prepare_model
    )
    o, d, online = cfg.optim, cfg.distill, cfg.teacher.mode == "online"

    # --- restore
    start_epoch, history, best, restarts = 0, [], {"val_top1": -1.0, "epoch": 0}, 0
    state = load_state(ray.train.get_checkpoint())
    if state is not None:
        restore_parts(p, state)
        start_epoch, history, best = state["epoch"], state["history"], state["best"]
        restarts = state["restarts"] + 1  # how many times this run was restored from a checkpoint

    train_shard = ray.train.get_dataset_shard("train")
    per_worker = o.batch_size // world
    # the local shuffle buffer yields its first batch only once it holds this many rows: behind the pipeline's
    # teacher stage a large one would stall every epoch's start (its blocks come in random order instead)
    shuffle_buffer = cfg.data.shuffle_buffer
    if cfg.teacher.mode == "pipeline":
        shuffle_buffer = min(shuffle_buffer, PIPELINE_SHUFFLE_BATCHES * per_worker)
    kept_val: list[dict[str, torch.Tensor]] = []  # this worker's validation rows, kept after the first pass

    def my_val_batches():
        """This worker's share of the validation split (rows index % world == rank). A small split comes
        decoded with the run (``val_split``, through the object store) or is read through Ray Data once, and
        is then served from memory: a Ray Data pass starts a streaming executor, which costs seconds."""
        if kept_val:
            yield from kept_val
            return
        if config["val_split"] is not None:
            rows = {k: torch.from_numpy(np.array(v)) for k, v in ray.get(config["val_split"]).items()}  # writable
            starts = range(0, len(rows["label"]), EVAL_BATCH)
            source = ({k: v[i : i + EVAL_BATCH].to(device) for k, v in rows.items()} for i in starts)
        else:
            source = ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=EVAL_BATCH, device=device)
        for batch in source:
            mine = batch["index"] % world == rank
            batch = {k: v[mine] for k, v in batch.items()}
            if len(batch["label"]):
                yield batch
                if config["keep_val"]:
                    kept_val.append(batch)

    steps_per_epoch = min(config["num_train"] // o.batch_size, o.max_steps_per_epoch or config["num_train"])
    progress = Progress(f"distill {cfg.run.name}", o.epochs, start_epoch, steps_per_epoch, config["bar"])

    def teacher_features(batch: dict[str, torch.Tensor], epoch: int, train: bool) -> torch.Tensor:
        """Online: the teacher on its own view. Cached / pipeline: the embedding that came with the batch
        (cached: one of K views per image, chosen per epoch)."""
        if online:
            return p.teacher(p.views.teacher(batch["image"], train=train))
        emb = batch[TEACHER_EMB]
        if emb.shape[1] == 1:
            return emb[:, 0].float()
        chosen = view_for(batch["index"], epoch, cfg.run.seed, emb.shape[1])
        return emb[torch.arange(len(chosen), device=emb.device), chosen].float()

    for epoch in range(start_epoch, o.epochs):
        # --- train one epoch on this worker's shard
        p.views.reseed(epoch_seed(cfg.run.seed, epoch, rank))
        p.student_net.train()
        p.t_head.train()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, ce, distill, teacher-head ce
        steps, timer = 0, StepTimer(device)
        for step, batch in enumerate(
            train_shard.iter_torch_batches(
                batch_size=per_worker,
                drop_last=True,
                local_shuffle_buffer_size=shuffle_buffer or None,
                device=device,
                prefetch_batches=cfg.data.prefetch_batches,
                pin_memory=device.type == "cuda",  # faster, asynchronous host-to-device copies
            )
        ):
            if step == o.max_steps_per_epoch:
                break
            with torch.no_grad():
                feat_t = teacher_features(batch, epoch, train=True)
            losses = train_step(p, d, batch, feat_t)
            sums += losses.double()
            steps += 1
            timer.step()
            progress.step(epoch, step, losses[0])
        timer.stop()
        lr = p.opt_s.param_groups[0]["lr"]
        p.sched_s.step()
        p.sched_t.step()
        if steps == 0:
            raise RuntimeError(
                f"worker {rank} got no full batch of {per_worker} rows: the training split is "
                f"smaller than optim.batch_size {o.batch_size}"
            )

        # --- evaluate on the validation split (rows index % world == rank, summed over ranks)
        p.student_net.eval()
        p.t_head.eval()
        counts = [0.0, 0.0, 0.0, 0.0]  # student top-1, top-5, teacher-head top-1, rows
        with torch.no_grad(), p.autocast:
            for batch in my_val_batches():
                labels = batch["label"]
                _, logits_s = unwrap(p.student_net)(p.views.student(batch["image"], False))
                _, logits_t = unwrap(p.t_head)(teacher_features(batch, epoch, train=False))
                top5 = logits_s.float().topk(min(5, num_classes), dim=1).indices
                counts[0] += (top5[:, 0] == labels).sum().item()
                counts[1] += (top5 == labels[:, None]).any(1).sum().item()
                counts[2] += (logits_t.argmax(1) == labels).sum().item()
                counts[3] += len(labels)
        c1, c5, ct, n = all_reduce_sum(counts, device)
        loss_sums = all_reduce_sum((sums / steps).tolist(), device)
        img_per_s = all_reduce_sum([timer.images_per_s(per_worker)], device)[0]  # summed over workers
        gpu_mem = all_reduce_sum([peak_gpu_memory_gib(device)], device, op="max")[0]
        train_time = all_reduce_sum([timer.elapsed_s()], device, op="max")[0]
        gpu_util = all_reduce_sum([timer.mean_utilization()], device)[0] / world
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sums[0] / world,
            "train_ce": loss_sums[1] / world,
            "train_distill": loss_sums[2] / world,
            "train_teacher_ce": loss_sums[3] / world,
            "val_top1": 100.0 * c1 / n,
            "val_top5": 100.0 * c5 / n,
            "val_teacher_top1": 100.0 * ct / n,
            "lr": lr,
            "train_img_per_s": img_per_s,
            "train_img_per_s_per_worker": img_per_s / world,
            "train_time_s": train_time,  # the epoch's training part, waiting for data included
            "gpu_mem_peak_gib": gpu_mem,  # the largest over workers; 0 on CPU
            "gpu_util_pct": gpu_util,  # mean over workers and measured steps; 0 on CPU
            "restarts": restarts,
        }
        history.append(metrics)
        is_best = metrics["val_top1"] > best["val_top1"]
        if is_best:
            best = {"val_top1": metrics["val_top1"], "epoch": epoch + 1}
        metrics |= {"best_val_top1": best["val_top1"], "best_epoch": best["epoch"]}
        progress.epoch(epoch, metrics)

        # --- checkpoint every epoch: everything needed to resume exactly here
        state = {
            "epoch": epoch + 1,
            "history": history,
            "best": best,
            "num_classes": num_classes,
            "restarts": restarts,
            "student": unwrap(p.student_net).state_dict(),
            "teacher_head": unwrap(p.t_head).state_dict(),
            "distiller": p.distiller.state_dict(),
            "opt_s": p.opt_s.state_dict(),
            "opt_t": p.opt_t.state_dict(),
            "sched_s": p.sched_s.state_dict(),
            "sched_t": p.sched_t.state_dict(),
            "seed": cfg.run.seed,
        }
        report(metrics, state)
        maybe_inject_failure(epoch + 1, cfg.run.fail_after_epoch, cfg.output_dir)
