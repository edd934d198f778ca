"""What every worker loop shares (distillation and teacher pretraining): the skeleton a loop is written in
(:func:`start_worker`, :func:`restore_run`, :func:`end_epoch`), seeding, checkpoint files, progress lines and
metric reduction.

A loop reads, top to bottom::

    rank, world, device = start_worker(cfg, deterministic)
    ...build its models and optimizers...
    saved = Checkpointed({...})                 # what a checkpoint holds, listed once
    run = restore_run(saved)                    # epoch 0, or where Ray Train's latest checkpoint left it
    for epoch in range(run.epoch, epochs):
        ...train, evaluate, metrics (with "restarts": run.restarts)...
        run.history.append(metrics)
        end_epoch(cfg, epoch + 1, metrics, saved.state(epoch=epoch + 1, history=run.history, ...))
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ega_ray import uris
from ega_ray.disk import is_no_space, need_space, no_space
from ega_ray.ray_logs import quiet_ray_logs

if TYPE_CHECKING:
    from ega_ray.config import Config

STATE_FILE = "state.pt"
logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deterministic_kernels(device: torch.device) -> list[str]:
    """PyTorch's deterministic algorithms on a GPU, where they exist (warn-only: an operation without one
    warns and runs its usual kernel); cuDNN's autotuner off (it may pick other kernels per run). cuBLAS needs
    a fixed workspace, set before its first use. Nothing to do on a CPU: its kernels are deterministic at a
    fixed thread count (``torch_threads``).

    Returns:
        What was set, for the record.
    """
    if device.type != "cuda":
        return []
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return ["torch.use_deterministic_algorithms(warn_only)", "cudnn.deterministic", "CUBLAS_WORKSPACE_CONFIG"]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The RNG seed of one rank's epoch: resuming at an epoch replays the same randomness."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**63


def all_reduce_sum(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Element-wise sum (or ``op="max"``) of ``values`` over the workers."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def peak_gpu_memory_gib(device: torch.device) -> float:
    """Peak memory this process allocated on its GPU since the last call (0 on CPU), then reset."""
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def load_state(checkpoint: ray.train.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def latest_state(storage: str, name: str) -> dict | None:
    """The state of run ``name``'s latest checkpoint under Ray Train's ``storage`` (a folder, s3:// or gs://),
    read on the driver from Ray Train's own record of the run (its checkpoint-manager snapshot): a
    checkpoint folder that Ray never registered (a copy, an upload cut short) is not taken. None when the run
    has no registered checkpoint."""
    try:
        result = ray.train.Result.from_path(uris.join(storage, name))
    except RuntimeError:  # no such run folder, or no snapshot in it yet
        return None
    return load_state(result.checkpoint)


class Checkpointed:
    """What a checkpoint holds, listed once: named objects with ``state_dict`` / ``load_state_dict`` (models,
    optimizers, schedulers, a distiller's memory) beside plain values (epoch, history, ...). ``optional``
    names objects that older checkpoints may lack (their ``load_state_dict`` is skipped then)."""

    def __init__(self, objects: dict[str, Any], optional: tuple[str, ...] = ()) -> None:
        self.objects, self.optional = objects, optional

    def state(self, **values: Any) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.objects.items()} | values

    def restore(self, state: dict[str, Any]) -> dict[str, Any]:
        """Load every object from ``state`` (read with ``map_location="cpu"``: tensors move to each object's
        device); return the plain values. An optimizer keeps the implementation chosen for this device
        (fused SGD on a GPU), not the one saved with it, so a run started on a GPU resumes on a CPU and the
        other way round."""
        for name, obj in self.objects.items():
            if name not in state and name in self.optional:
                continue
            if isinstance(obj, torch.optim.Optimizer):
                own = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in obj.param_groups]
                obj.load_state_dict(state[name])
                for group, keep in zip(obj.param_groups, own, strict=True):
                    group.update(keep)
            else:
                obj.load_state_dict(state[name])
        return {k: v for k, v in state.items() if k not in self.objects}


def start_worker(cfg: Config, deterministic: bool) -> tuple[int, int, torch.device]:
    """A worker loop's first lines: this worker's threads (its CPU share), Ray's logs quiet, deterministic
    kernels when asked, and the global RNGs seeded with ``run.seed``, so every rank builds the same initial
    weights.

    Args:
        cfg: the run's config.
        deterministic: turn on the device's deterministic algorithms (warn-only where none exists).

    Returns:
        This worker's rank, the world size and its device.
    """
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch_threads(cfg.scaling.cpus_per_worker)
    quiet_ray_logs(cfg.run.verbose)
    if deterministic:
        deterministic_kernels(device)
    seed_everything(cfg.run.seed)
    return ctx.get_world_rank(), ctx.get_world_size(), device


@dataclass
class RestoredRun:
    """Where a loop starts: the next epoch (0-based), the epochs reported so far, how many times the run was
    restored from a checkpoint (this time included), and the checkpoint's other plain values."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0
    values: dict[str, Any] = field(default_factory=dict)


def restore_run(saved: Checkpointed) -> RestoredRun:
    """Load ``saved``'s objects from Ray Train's latest checkpoint of this run, if it has one.

    Args:
        saved: what the loop's checkpoints hold.

    Returns:
        Where the loop starts: a new run at epoch 0, or a restored one after its last checkpointed epoch.
    """
    state = load_state(ray.train.get_checkpoint())
    if state is None:
        return RestoredRun()
    values = saved.restore(state)
    return RestoredRun(values["epoch"], values["history"], values["restarts"] + 1, values)


def end_epoch(cfg: Config, epoch: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """Report an epoch's metrics with a checkpoint of ``state`` (rank 0 writes it, :func:`report`), then,
    in tests, fail once after it (``run.fail_after_epoch``).

    Args:
        cfg: the run's config.
        epoch: the epoch just finished (1-based).
        metrics: what every rank reports.
        state: everything needed to resume after this epoch (:meth:`Checkpointed.state`).
    """
    report(metrics, state)
    maybe_inject_failure(epoch, cfg.run.fail_after_epoch, cfg.output_dir)


def state_bytes(state: Any) -> int:
    """The bytes of the tensors in a (nested) state: about what ``torch.save`` writes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _storage_folder() -> str | None:
    """The run's checkpoint folder when it is local (for a full disk's message and check)."""
    try:
        storage = ray.train.get_context().get_storage()
        local = type(storage.storage_filesystem).__name__ == "LocalFileSystem"
        return storage.experiment_fs_path if local else None
    except Exception:  # noqa: BLE001 - Ray's storage context is a developer API: no check, not a failed run
        return None


def report(metrics: dict, state: dict | None) -> None:
    """Report metrics; rank 0 attaches a checkpoint holding ``state`` (the others pass None). Both disks
    it is written to (a local temporary folder, then the run's storage when local) are checked for room
    first, and a full disk is one line (DiskFullError) naming the folder, not torch's or Ray's traceback."""
    if state is None or ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    needed = state_bytes(state) + (1 << 20)
    storage = _storage_folder()
    need_space(tempfile.gettempdir(), needed)
    if storage is not None:
        need_space(storage, needed)
    with tempfile.TemporaryDirectory() as d:
        try:
            torch.save(state, Path(d) / STATE_FILE)
        except (OSError, RuntimeError) as err:
            if is_no_space(err):
                raise no_space(tempfile.gettempdir(), needed) from None
            raise
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        except (OSError, RuntimeError) as err:
            if is_no_space(err):  # the copy into the run's storage
                raise no_space(storage or d, needed) from None
            raise


def maybe_inject_failure(epoch: int, fail_after_epoch: int | None, marker_dir: str) -> None:
    """Testing aid: raise once (a marker file remembers) after the given epoch's checkpoint."""
    if fail_after_epoch is None or epoch != fail_after_epoch:
        return
    marker = Path(marker_dir) / f".injected-failure-epoch-{epoch}"
    if ray.train.get_context().get_world_rank() == 0 and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"injected failure after epoch {epoch} (run.fail_after_epoch)")


class Progress:
    """The step progress bar that rank 0 draws while a run trains (``ray.experimental.tqdm_ray``: drawn by the
    driver, so it works on any node). The one line per epoch is printed by the driver
    (``tracking.epoch_lines``), from what every epoch reports."""

    def __init__(self, label: str, total_epochs: int, start_epoch: int, steps_per_epoch: int, bar: bool) -> None:
        self.label, self.total, self.bar = label, total_epochs, None
        if bar and ray.train.get_context().get_world_rank() == 0 and steps_per_epoch:
            from ray.experimental.tqdm_ray import tqdm

            steps = steps_per_epoch * (total_epochs - start_epoch)
            self.bar = tqdm(total=steps, desc=f"{label} epoch {start_epoch + 1}/{total_epochs}")

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def epoch_done(self, epoch: int) -> None:
        if self.bar is None:
            return
        if epoch + 1 < self.total:
            self.bar.set_description(f"{self.label} epoch {epoch + 2}/{self.total}")
        else:
            self.bar.close()


class StepTimer:
    """Training throughput of one epoch, from the end of the ``warmup``-th step (start-up, first-batch
    latency and compilation excluded) to the last step; the whole epoch when it is shorter. ``stop()``
    ends the epoch's training part (evaluation is not counted). On a GPU it also samples NVML's
    utilisation after every ``util_every``-th measured step."""

    def __init__(self, device: torch.device, warmup: int = 3, util_every: int = 10) -> None:
        self.device, self.util_every, self.util = device, util_every, []
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.warmup, self.steps, self.t0 = warmup, 0, time.perf_counter()
        self.start, self.start_step, self.end = self.t0, 0, None

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.sync()
            self.start, self.start_step = time.perf_counter(), self.steps
        elif self.steps > self.warmup and (self.steps - self.warmup) % self.util_every == 0:
            self.util.append(gpu_utilization(self.device))

    def stop(self) -> None:
        self.sync()
        self.end = time.perf_counter()

    def images_per_s(self, batch_size: int) -> float:
        end = self.end if self.end is not None else time.perf_counter()
        counted, start = self.steps - self.start_step, self.start
        if counted <= 0:
            start, counted = self.t0, self.steps
        return batch_size * counted / max(end - start, 1e-9)

    def elapsed_s(self) -> float:
        """Wall time of the epoch's training part, the wait for its first batch included."""
        return (self.end if self.end is not None else time.perf_counter()) - self.t0

    def mean_utilization(self) -> float:
        """Mean GPU utilisation (%) over the measured steps; 0 on CPU, NaN where NVML cannot tell."""
        if self.device.type != "cuda":
            return 0.0
        return sum(self.util) / len(self.util) if self.util else float("nan")


def gpu_utilization(device: torch.device) -> float:
    """NVML's utilisation (%) of ``device`` over its last sample period; NaN without NVML (pynvml)."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - NVML missing or not permitted: no figure, not a failed run
        return float("nan")


def compiler_available(device: torch.device) -> str | None:
    """None when torch.compile can build kernels for ``device``; otherwise why it cannot."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx!r}) for Inductor's CPU kernels"


def maybe_compile(module: torch.nn.Module, enabled: bool, device: torch.device, what: str) -> torch.nn.Module:
    """``torch.compile(module)`` when asked and possible; the module itself (eager) otherwise, with a warning."""
    if not enabled:
        return module
    missing = compiler_available(device)
    if missing:
        logger.warning("optim.compile: running the %s eagerly: %s", what, missing)
        return module
    return torch.compile(module)


def torch_threads(cpus_per_worker: float) -> None:
    """Match intra-op threads to the worker's CPU share (Ray sets OMP_NUM_THREADS; torch may not follow)."""
    n = max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or int(cpus_per_worker) or 1)
    torch.set_num_threads(n)
