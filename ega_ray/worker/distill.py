"""The distillation loop that runs on every Ray Train worker (``train_func_per_worker``).

Read top to bottom: ``build_parts`` (models, optimizers, distiller), ``step_losses`` / ``train_step`` (one
step, also timed without Ray by bench/throughput.py), ``evaluate``, then ``train_func_per_worker``: restore →
for each epoch: train on this worker's shard, evaluate, report metrics with a checkpoint. Loss of one step:

    student:  γ·CE(student logits, y) + β·distiller(teacher emb, student emb, …) + α·KD(teacher logits, student logits)
    teacher head (its own optimizer, lr 0.01):  CE(teacher-head logits, y)

The teacher's embedding is detached inside the distiller, so the teacher head learns from its own CE only
(as in the EGA code, which zeroes the distiller's gradient on the teacher head before its own step).
Rows whose label is −1 (the unlabeled part of a reduced label budget) count in the distiller and KD only.
Where the teacher's features come from is the teacher mode's business (``ega_ray.teacher_modes``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import nn

from ega_ray.config import Config, DistillConfig
from ega_ray.data.augment import ViewMaker
from ega_ray.data.epoch_rows import EpochRows
from ega_ray.losses import build_distiller
from ega_ray.losses.kd import KDLoss
from ega_ray.models import build_student, build_teacher
from ega_ray.models.heads import EmbeddingHead, StudentClassifier
from ega_ray.models.precision import compute_dtype
from ega_ray.models.teachers.base import Teacher
from ega_ray.teacher_modes import TEACHER_MODES, TeacherMode
from ega_ray.worker.common import (
    Checkpointed,
    Progress,
    StepTimer,
    all_reduce_sum,
    end_epoch,
    epoch_seed,
    maybe_compile,
    peak_gpu_memory_gib,
    restore_run,
    seed_everything,
    start_worker,
    unwrap,
)
from ega_ray.worker.divergence import NonFiniteWatch, stop_on_divergence

EVAL_BATCH = 256
READ_BATCH = 4096  # rows per batch of the deterministic path's pass over the training split


@dataclass
class WorkerArgs:
    """What the driver hands every worker beside the config (``train_loop_config["args"]``)."""

    num_classes: int
    teacher_dim: int  # width of the teacher's features
    num_train: int  # training rows
    train_indices: np.ndarray  # their ``index`` values (the training split less a carved validation split)
    num_indices: int  # the size of a per-row memory (CRD): the largest index + 1
    keep_eval: bool  # the evaluation splits are small: keep this worker's rows in memory after the first pass
    eval_splits: dict[str, Any]  # split → ObjectRef of it decoded (sent from the driver), or None: a Ray Data shard
    progress_bar: bool
    teacher_servers: list = field(default_factory=list)  # a pipeline run's teacher actors


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """A numpy batch as tensors on ``device`` (pinned first on a GPU, for an asynchronous copy)."""
    pin = device.type == "cuda"
    return {
        k: (torch.from_numpy(v).pin_memory() if pin else torch.from_numpy(v)).to(device, non_blocking=pin)
        for k, v in batch.items()
    }


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over labeled rows (label ≥ 0); 0 (still in the graph, for DDP) when none is labeled."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp_min(1)


@dataclass
class Parts:
    """What one training step touches. Built by :func:`build_parts` the same way in a Ray Train worker and
    in ``bench/throughput.py``'s loop without Ray, so that the two time the same step."""

    student_net: nn.Module  # student + its head (DDP under Ray Train): evaluation and checkpoints use it
    train_student: nn.Module  # the forward that trains: the same module, compiled when optim.compile
    t_head: nn.Module  # the teacher's trainable projection and classifier
    teacher: Teacher | None  # the frozen teacher, when the mode runs it in the worker
    mode: TeacherMode  # where the teacher's features come from
    distiller: nn.Module
    kd: KDLoss
    opt_s: torch.optim.Optimizer
    opt_t: torch.optim.Optimizer
    sched_s: torch.optim.lr_scheduler.LRScheduler
    sched_t: torch.optim.lr_scheduler.LRScheduler
    views: ViewMaker
    autocast: torch.autocast
    memory_format: torch.memory_format
    teacher_servers: list = field(default_factory=list)  # a pipeline run's teacher actors (deterministic path)

    def checkpointed(self) -> Checkpointed:
        """Everything of the parts that a checkpoint holds (saved and restored from this one list)."""
        objects = {
            "student": unwrap(self.student_net),
            "teacher_head": unwrap(self.t_head),
            "distiller": self.distiller,  # may hold state (CRD's memory), identical on every rank
            "opt_s": self.opt_s,
            "opt_t": self.opt_t,
            "sched_s": self.sched_s,
            "sched_t": self.sched_t,
        }
        return Checkpointed(objects, optional=("distiller",))  # checkpoints from before distillers had state

    def features(self, batch: dict[str, torch.Tensor], epoch: int, seed: int, train: bool) -> torch.Tensor:
        with torch.no_grad():
            return self.mode.features(self, batch, epoch, seed, train)


def build_parts(
    cfg: Config,
    device: torch.device,
    num_classes: int,
    teacher_dim: int,
    num_indices: int,
    prepare: Callable[[nn.Module], nn.Module] = lambda m: m,
) -> Parts:
    """Models, optimizers and the distiller of a run on ``device`` (``prepare``: Ray Train's prepare_model)."""
    o, d = cfg.optim, cfg.distill
    dtype = compute_dtype(o.precision, device)  # bf16 where optim.precision asks for it, else float32
    mode = TEACHER_MODES[cfg.teacher.mode]
    teacher = None
    if mode.teacher_in_worker:
        teacher = build_teacher(cfg.teacher.name, cfg.teacher.weights, cfg.teacher.sha256).to_device(device, dtype)
        teacher.encoder = maybe_compile(teacher.encoder, o.compile, device, "teacher")
    channels_last = o.channels_last if o.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    student = build_student(cfg.student.name).to(memory_format=memory_format)
    s_head = EmbeddingHead(student.feat_dim, d.embed_dim, num_classes)
    t_head = EmbeddingHead(teacher_dim, d.embed_dim, num_classes, standardize=d.standardize_teacher_features)
    student_net, t_head = prepare(StudentClassifier(student, s_head).to(device)), prepare(t_head.to(device))
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel per step for all parameters
    sgd = {"momentum": o.momentum, "weight_decay": o.weight_decay, **fused}
    opt_s = torch.optim.SGD(student_net.parameters(), lr=o.scaled_lr(o.lr), **sgd)
    opt_t = torch.optim.SGD(t_head.parameters(), lr=o.scaled_lr(o.teacher_head_lr), **sgd)
    return Parts(
        student_net=student_net,
        train_student=maybe_compile(student_net, o.compile, device, "student"),
        t_head=t_head,
        teacher=teacher,
        mode=mode,
        distiller=build_distiller(d.method, d, num_samples=num_indices, seed=cfg.run.seed).to(device),
        kd=KDLoss(d.kd_temperature),
        opt_s=opt_s,
        opt_t=opt_t,
        sched_s=torch.optim.lr_scheduler.LambdaLR(opt_s, o.lr_factor),
        sched_t=torch.optim.lr_scheduler.LambdaLR(opt_t, o.lr_factor),
        views=ViewMaker.from_config(cfg, device, teacher.spec if teacher is not None else None),
        autocast=torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16),
        memory_format=memory_format,
    )


class StepLosses(NamedTuple):
    loss: torch.Tensor  # what the student minimises
    ce: torch.Tensor  # its cross-entropy
    distill: torch.Tensor  # its distiller term (0 when β = 0)
    teacher_ce: torch.Tensor  # the teacher head's cross-entropy (its own optimizer)
    kd: torch.Tensor  # its KD term, unweighted (0 when α = 0); last: older code reads the first four by position


WATCHED = ("ce", "distill", "kd", "teacher_ce", "loss")  # the divergence check's order: parts before their sum


def step_losses(p: Parts, d: DistillConfig, batch: dict[str, torch.Tensor], feat_t: torch.Tensor) -> StepLosses:
    """The forward of one step on ``batch`` (uint8 images, labels, index) with the teacher's features
    ``feat_t``."""
    labels = batch["label"]
    with p.autocast:
        emb_s, logits_s = p.train_student(
            p.views.student(batch["image"], train=True, index=batch["index"]).contiguous(memory_format=p.memory_format)
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
    loss_kd = torch.zeros((), device=labels.device)
    if d.alpha > 0:
        loss_kd = p.kd(logits_t.detach(), logits_s)
        loss = loss + d.alpha * loss_kd
    return StepLosses(loss, loss_ce, loss_distill, masked_cross_entropy(logits_t, labels), loss_kd)


def train_step(p: Parts, d: DistillConfig, batch: dict[str, torch.Tensor], feat_t: torch.Tensor) -> StepLosses:
    """One optimisation step of the student and the teacher's head (see :func:`step_losses`); returns the
    step's losses, detached."""
    losses = step_losses(p, d, batch, feat_t)
    p.opt_s.zero_grad(set_to_none=True)
    p.opt_t.zero_grad(set_to_none=True)
    (losses.loss + losses.teacher_ce).backward()
    p.opt_s.step()
    p.opt_t.step()
    return StepLosses(*(x.detach() for x in losses))


@torch.no_grad()
def evaluate(
    p: Parts, batches: Iterator[dict[str, torch.Tensor]], epoch: int, seed: int, num_classes: int
) -> tuple[float, float, float, float]:
    """(student top-1 hits, top-5 hits, teacher-head top-1 hits, rows) over this worker's ``batches``."""
    p.student_net.eval()
    p.t_head.eval()
    counts = [0.0, 0.0, 0.0, 0.0]
    with p.autocast:
        for batch in batches:
            labels = batch["label"]
            _, logits_s = unwrap(p.student_net)(p.views.student(batch["image"], False))
            _, logits_t = unwrap(p.t_head)(p.features(batch, epoch, seed, train=False))
            top5 = logits_s.float().topk(min(5, num_classes), dim=1).indices
            counts[0] += (top5[:, 0] == labels).sum().item()
            counts[1] += (top5 == labels[:, None]).any(1).sum().item()
            counts[2] += (logits_t.argmax(1) == labels).sum().item()
            counts[3] += len(labels)
    return tuple(counts)


class EvalRows:
    """This worker's share of an evaluation split (``validation`` or ``test``; rows index % world == rank).
    A small split comes decoded with the run (``eval_splits``, through the object store) or is read through
    Ray Data once, and is then served from memory: a Ray Data pass starts a streaming executor, which costs
    seconds."""

    def __init__(self, args: WorkerArgs, split: str, rank: int, world: int, device: torch.device) -> None:
        self.args, self.split, self.rank, self.world, self.device = args, split, rank, world, device
        self.kept: list[dict[str, torch.Tensor]] = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.kept:
            yield from self.kept
            return
        decoded = self.args.eval_splits[self.split]
        if decoded is not None:
            rows = {k: torch.from_numpy(np.array(v)) for k, v in ray.get(decoded).items()}  # writable
            starts = range(0, len(rows["label"]), EVAL_BATCH)
            source = ({k: v[i : i + EVAL_BATCH].to(self.device) for k, v in rows.items()} for i in starts)
        else:
            shard = ray.train.get_dataset_shard(self.split)
            source = shard.iter_torch_batches(batch_size=EVAL_BATCH, device=self.device)
        for batch in source:
            mine = batch["index"] % self.world == self.rank
            batch = {k: v[mine] for k, v in batch.items()}
            if len(batch["label"]):
                yield batch
                if self.args.keep_eval:
                    self.kept.append(batch)


def check_finite(p: Parts, watch: NonFiniteWatch, epoch: int) -> None:
    """Raise the DivergedError of the first non-finite loss of ``epoch`` (from 0), naming the lr that drove it."""
    teacher_lr = (p.opt_t.param_groups[0]["lr"], "optim.teacher_head_lr")
    watch.raise_if_diverged(epoch + 1, p.opt_s.param_groups[0]["lr"], "optim.lr", {"teacher_ce": teacher_lr})


@stop_on_divergence
def train_func_per_worker(config: dict[str, Any]) -> None:
    cfg, args = Config.model_validate(config["cfg"]), config["args"]
    o, d, seed = cfg.optim, cfg.distill, cfg.run.seed
    rank, world, device = start_worker(cfg, cfg.run.deterministic)
    p = build_parts(cfg, device, args.num_classes, args.teacher_dim, args.num_indices, ray.train.torch.prepare_model)
    p.teacher_servers = args.teacher_servers
    saved = p.checkpointed()

    # --- restore
    run = restore_run(saved)
    start_epoch, history, restarts = run.epoch, run.history, run.restarts
    # the selected epoch: the best validation top-1 (the test split never selects)
    best = run.values.get("best", {"validation_top1": -1.0, "epoch": 0})

    train_shard = ray.train.get_dataset_shard("train")
    per_worker = o.batch_size // world
    eval_rows = {split: EvalRows(args, split, rank, world, device) for split in args.eval_splits}
    steps_per_epoch = min(args.num_train // o.batch_size, o.max_steps_per_epoch or args.num_train)
    progress = Progress(cfg.run.name, o.epochs, start_epoch, steps_per_epoch, args.progress_bar)
    watch = NonFiniteWatch(WATCHED, device)
    # the deterministic path: the unsplit split, this rank's rows of each epoch gathered by index
    read = lambda: train_shard.iter_batches(batch_size=READ_BATCH, batch_format="numpy")  # noqa: E731
    epoch_rows = EpochRows(read, args.train_indices, rank, world, seed)

    for epoch in range(start_epoch, o.epochs):
        # --- train one epoch on this worker's shard
        seed_everything(epoch_seed(seed, epoch, rank))  # any global-RNG draw (dropout) replays on a resume
        p.views.reseed(epoch_seed(seed, epoch, rank))
        p.views.set_epoch(seed, epoch)  # training views keyed by (seed, epoch, row index)
        p.student_net.train()
        p.t_head.train()
        sums = torch.zeros(len(StepLosses._fields), dtype=torch.float64, device=device)  # the epoch's, summed
        watch.reset()
        steps, timer = 0, StepTimer(device)
        if cfg.run.deterministic:
            mine = p.mode.feed(p, epoch_rows.batches(epoch, per_worker, steps_per_epoch), epoch, seed)
            batches = (to_device(b, device) for b in mine)
        else:
            batches = train_shard.iter_torch_batches(
                batch_size=per_worker,
                drop_last=True,
                local_shuffle_buffer_size=p.mode.shuffle_buffer(cfg, per_worker) or None,
                local_shuffle_seed=epoch_seed(seed, epoch, rank),  # Ray Data's order still depends on timing
                device=device,
                prefetch_batches=cfg.data.prefetch_batches,
                pin_memory=device.type == "cuda",  # faster, asynchronous host-to-device copies
            )
        for step, batch in enumerate(batches):
            if step == o.max_steps_per_epoch:
                break
            losses = train_step(p, d, batch, p.features(batch, epoch, seed, train=True))
            sums += torch.stack(losses).double()
            watch.observe(torch.stack([getattr(losses, term) for term in WATCHED]))
            steps += 1
            timer.step()
            progress.step()
            if watch.due(steps):
                check_finite(p, watch, epoch)
        timer.stop()
        lr = p.opt_s.param_groups[0]["lr"]
        # before anything of this epoch is evaluated, reported or checkpointed (every rank, together)
        watch.observe_weights([*p.student_net.parameters(), *p.t_head.parameters()])
        check_finite(p, watch, epoch)
        p.sched_s.step()
        p.sched_t.step()
        if steps == 0:
            raise RuntimeError(
                f"worker {rank} got no full batch of {per_worker} rows: the training split is "
                f"smaller than optim.batch_size {o.batch_size}"
            )

        # --- evaluate both splits (summed over ranks) and report
        scores = {}
        for split, rows in eval_rows.items():
            c1, c5, ct, n = all_reduce_sum(list(evaluate(p, iter(rows), epoch, seed, args.num_classes)), device)
            scores |= {f"{split}_top1": 100.0 * c1 / n, f"{split}_top5": 100.0 * c5 / n}
            scores[f"{split}_teacher_top1"] = 100.0 * ct / n
        mean_losses = [x / world for x in all_reduce_sum((sums / steps).tolist(), device)]
        img_per_s = all_reduce_sum([timer.images_per_s(per_worker)], device)[0]  # summed over workers
        metrics = {
            "epoch": epoch + 1,
            **{f"train_{name}": value for name, value in zip(StepLosses._fields, mean_losses, strict=True)},
            **scores,
            "lr": lr,
            "train_img_per_s": img_per_s,
            "train_img_per_s_per_worker": img_per_s / world,
            # the epoch's training part, waiting for data included
            "train_time_s": all_reduce_sum([timer.elapsed_s()], device, op="max")[0],
            "gpu_mem_peak_gib": all_reduce_sum([peak_gpu_memory_gib(device)], device, op="max")[0],  # 0 on CPU
            "gpu_util_pct": all_reduce_sum([timer.mean_utilization()], device)[0] / world,  # 0 on CPU
            "restarts": restarts,
        }
        history.append(metrics)
        if metrics["validation_top1"] > best["validation_top1"]:
            best = {"validation_top1": metrics["validation_top1"], "epoch": epoch + 1}
        metrics |= {"best_validation_top1": best["validation_top1"], "selected_epoch": best["epoch"]}
        progress.epoch_done(epoch)
        # --- checkpoint every epoch: everything needed to resume exactly here
        state = saved.state(
            epoch=epoch + 1, history=history, best=best, num_classes=args.num_classes, restarts=restarts, seed=seed
        )
        end_epoch(cfg, epoch + 1, metrics, state)
