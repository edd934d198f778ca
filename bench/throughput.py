"""Throughput of the seed paper's loop vs this project's online, cached and pipeline paths, in one run.

Same device, same teacher (ViT-B/32 image tower shape, random weights), same student (resnet8x4),
CIFAR-sized random images, batch 64 by default. The seed figure comes from ``seed_throughput`` in
``bench/seed_loop.py`` (the paper's DataLoader + PIL loop; fp16 teacher on a GPU, fp32 elsewhere). The
project's figures:

- **Ray paths**: real ``ega-ray distill`` runs (Ray Data → Ray Train, one worker). ``online`` and
  ``cached``: the last epoch's ``train_img_per_s`` (steps after the third). ``pipeline`` runs two epochs
  and reports the second *whole* epoch (``train_time_s``, its wait for the first batch included): its
  steady window would count batches that the teacher stage computed while the trainer waited. Both
  figures of every path are in the JSON. The cache build (K=1) is timed apart.
- **Bare step**: the same ``train_step`` (``ega_ray/worker/distill.py``) in a plain loop on one batch that
  stays on the device, no Ray: the ceiling of each path, and with it the overhead of going through Ray.
- **Data paths** (``--data-paths``, default ``both``): every Ray path runs with the deterministic data path
  (``run.deterministic``: the figures without a suffix) and then with Ray Data's streaming split
  (``*_streaming_*``); ``<path>_deterministic_cost`` is 1 − deterministic / streaming over whole epochs.
- ``--sweep``: the bare cached step over batch sizes × ``--graph-sizes`` (default 64), compiled with
  ``--compile`` and eager without it, with peak memory and GPU utilisation (the LR rule does not change
  speed). ``--profile``: the top kernels of the bare cached step (torch.profiler), printed and saved in the JSON.

The seed loop and the Ray paths are measured for ``--seconds`` each; the bare steps and the sweep's rows for
``--bare-seconds`` (default: ``--seconds``). ``--json`` is rewritten after every part (``"complete": false``
until the end), so a run cut short keeps what it measured. ``--deadline-s S``: the whole command's budget;
a part that would not fit in what is left is skipped and named in ``"skipped"``, and the exit status is 3.

    python bench/throughput.py --device cpu --seconds 5 --json runs/bench/cpu.json
    python bench/throughput.py --device cuda --seconds 15 --sweep --profile --json runs/bench/gpu.json
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from seed_loop import seed_throughput  # noqa: E402

MAX_ROWS = 51_200
CPUS = os.cpu_count() or 1
MIN_STEPS = 8  # measured steps of a Ray path, at least
MIN_BARE_STEPS = 5
WARMUP_STEPS = 3  # as Ray Train workers' StepTimer
SEED_WARMUP_STEPS = 2  # the seed loop's first step includes its loader workers' start
PATHS = ("online", "cached", "pipeline")


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes in bf16 natively (GPUs with bf16; CPUs with AVX-512 BF16 / AMX)."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # oneDNN "supports" bf16 on any AVX-512 CPU, by emulation: 10-30× slower than fp32 there
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def seed_baseline(x: np.ndarray, y: np.ndarray, device: str, batch: int, workers: int, seconds: float) -> float:
    """The paper's loop (bench/seed_loop.py) on the same images: the denominator of every ratio."""
    return seed_throughput(
        x, y, device=device, batch=batch, workers=workers, seconds=seconds, warmup_steps=SEED_WARMUP_STEPS
    )


def project_config(
    args: argparse.Namespace,
    data: Path,
    out: Path,
    mode: str,
    steps: int = 1,
    epochs: int = 1,
    graph_size: int | None = None,
    deterministic: bool = True,
    **optim: Any,
):
    """A one-worker ``ega-ray distill`` config of the benchmark (a cached run reads ``out``/cache);
    ``deterministic``: its ``run.deterministic`` (the data path)."""
    from ega_ray.config import parse_config

    # on one GPU the pipeline's teacher actor and the training worker must share it (a whole GPU each would
    # leave one of them waiting for the other forever); the cache build and a cached run's validation
    # embedding run before the worker starts, and take the whole GPU
    gpu_share = 0.5 if mode == "pipeline" else 1.0
    raw = {
        # random labels leave some of the 100 classes with one training row: a given validation split, not a
        # carved one (what is timed is the training epoch; the two small evaluation splits are the same size)
        "data": {
            "train": str(data / "train"),
            "validation": str(data / "validation"),
            "test": str(data / "test"),
            "num_classes": 100,
        },
        "teacher": {
            "name": args.teacher,
            "mode": mode,
            "cache": str(out / "cache") if mode == "cached" else None,
            "batch_size": args.batch,
            "actor_cpus": float(CPUS),
            "actor_gpus": gpu_share,
        },
        "student": {"name": args.student},
        "distill": {"ega": {"graph_size": graph_size or min(64, args.batch)}},  # the paper's 64-node graphs
        "optim": {
            "epochs": epochs,
            "batch_size": args.batch,
            "max_steps_per_epoch": steps,
            "milestones": [epochs + 1],
            "precision": args.precision,
            "compile": args.compile,
        }
        | optim,
        # one worker with every core, as the seed loop's step has (its loader workers share them too)
        "scaling": {
            "num_workers": 1,
            "use_gpu": args.device == "cuda",
            "cpus_per_worker": float(CPUS),
            "gpus_per_worker": gpu_share,
        },
        "run": {
            "name": f"bench-{mode}",
            "output": str(out / (mode if deterministic else f"{mode}-streaming")),
            "deterministic": deterministic,
        },
    }
    return parse_config(raw)


def bare_step(cfg, device: torch.device, seconds: float, teacher_dim: int, profile: bool = False) -> dict[str, Any]:
    """Images per second of ``train_step`` in a plain loop (no Ray) on one resident random batch.

    ``cfg.teacher.mode == "online"`` runs the teacher on its view every step; otherwise the teacher's
    embeddings (``teacher_dim`` wide) are a fixed tensor, as a cached lookup hands them over."""
    from ega_ray.worker.common import StepTimer, peak_gpu_memory_gib, seed_everything
    from ega_ray.worker.distill import build_parts, train_step

    seed_everything(0)
    b = cfg.optim.batch_size
    p = build_parts(cfg, device, 100, teacher_dim, num_indices=b)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randint(0, 256, (b, 32, 32, 3), dtype=torch.uint8, generator=gen).to(device),
        "label": torch.randint(0, 100, (b,), generator=gen).to(device),
        "index": torch.arange(b).to(device),
    }
    cached_emb = torch.randn(b, teacher_dim, generator=gen).to(device)

    def step() -> None:
        with torch.no_grad():
            feat_t = p.teacher(p.views.teacher(batch["image"], train=True)) if p.teacher is not None else cached_emb
        train_step(p, cfg.distill, batch, feat_t)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer, t0 = StepTimer(device, warmup=WARMUP_STEPS), None
    while True:
        step()
        timer.step()
        if timer.steps == WARMUP_STEPS:
            t0 = time.perf_counter()
        elif t0 and timer.steps >= WARMUP_STEPS + MIN_BARE_STEPS and time.perf_counter() - t0 >= seconds:
            break
    timer.stop()
    result = {
        "img_per_s": timer.images_per_s(b),
        "gpu_mem_peak_gib": peak_gpu_memory_gib(device),
        "gpu_util_pct": timer.mean_utilization(),
    }
    if profile:
        result["profile"] = profile_summary(step, device)
    return result


def profile_summary(step, device: torch.device, steps: int = 5, rows: int = 15) -> list[dict[str, Any]]:
    """The ``rows`` ops with the most self time (device time on a GPU) over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [
        {
            "op": e.key,
            "calls_per_step": e.count / steps,
            "ms_per_step": getattr(e, key) / 1e3 / steps,
            "share_pct": 100.0 * getattr(e, key) / total,
        }
        for e in events[:rows]
    ]


def connect_local_ray(args: argparse.Namespace) -> None:
    """A local Ray for the Ray paths, as ``ega-ray distill`` starts one but without the dashboard, whose
    processes would take a share of a small machine's cores from the measured step. Its dashboard address is
    a free port all the same: at Ray's default another Ray's dashboard could answer for it, and Ray Train's
    placement-group cleaner would end the measured run (docs/performance.md, "A local Ray on a busy
    machine")."""
    import socket

    import ray

    if not ray.is_initialized():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dashboard_port = probe.getsockname()[1]
        # the worker's and the teacher actor's CPUs, plus one for Ray Data (see ega_ray.driver.launch)
        local = {"num_cpus": 2 * CPUS + 1, "include_dashboard": False, "dashboard_port": dashboard_port}
        try:
            ray.init(**local)
        except Exception as err:  # noqa: BLE001 - Ray gives its raylet a fixed 30 s, which a loaded machine can miss
            if "timed out during startup" not in str(err):
                raise
            print(f"[bench] the local Ray did not start in time ({err}); starting it again", flush=True)
            ray.shutdown()
            ray.init(**local)
        ray.data.DataContext.get_current().enable_progress_bars = False


def gpu_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({CPUS} cores)"


class Budget:
    """The command's time budget (``--deadline-s``): whether a part still fits, and which parts did not.

    A part's need is its measured seconds plus a fixed cost (building, warming up, compiling, starting a Ray
    run); the fixed costs start from a guess and follow what the earlier parts of this run took."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.t0, self.skipped = seconds, time.monotonic(), []

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.monotonic() - self.t0)

    def fits(self, part: str, need_s: float) -> bool:
        if need_s <= self.left():
            return True
        self.skipped.append(part)
        print(f"[bench] {part}: skipped (needs ~{need_s:.0f} s, {max(0.0, self.left()):.0f} s left of --deadline-s)")
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds of the seed loop and each Ray path")
    ap.add_argument("--bare-seconds", type=float, help="measured seconds of each bare step and sweep row (--seconds)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 where the device has it natively")
    ap.add_argument("--compile", action="store_true", help="torch.compile in the Ray paths, bare steps and sweep")
    ap.add_argument(
        "--paths", nargs="*", choices=PATHS, default=list(PATHS), help="the Ray paths to run (none: bare only)"
    )
    ap.add_argument(
        "--data-paths",
        choices=["both", "deterministic", "streaming"],
        default="both",
        help="each Ray path with run.deterministic, Ray Data's streaming split, or both side by side",
    )
    ap.add_argument("--sweep", type=int, nargs="*", metavar="BATCH", help="bare cached step at these batch sizes")
    ap.add_argument("--graph-sizes", type=int, nargs="+", default=[64], help="EGA graph sizes in the sweep")
    ap.add_argument("--profile", action="store_true", help="top kernels of the bare cached step")
    ap.add_argument("--teacher", default="open_clip:ViT-B-32")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--seed-workers", type=int, default=min(8, CPUS), help="the seed loop's loader workers")
    ap.add_argument(
        "--max-rows", type=int, default=MAX_ROWS, help="training rows at most (the cache build, a pipeline epoch)"
    )
    ap.add_argument("--json", type=Path, help="write the figures here (after every part)")
    ap.add_argument("--deadline-s", type=float, help="skip the parts that would end after this many seconds")
    args = ap.parse_args()
    args.precision = args.precision or ("bf16" if native_bf16(args.device) else "fp32")
    args.bare_seconds = args.seconds if args.bare_seconds is None else args.bare_seconds
    if args.sweep == []:
        args.sweep = [64, 256, 1024]
    budget = Budget(args.deadline_s)
    figures = run_bench(args, budget)
    print_table(figures)
    return 3 if budget.skipped else 0


def run_bench(args: argparse.Namespace, budget: Budget | None = None) -> dict[str, Any]:
    from ega_ray.data.parquet import write_split
    from ega_ray.driver.launch import run_distill
    from ega_ray.driver.teacher_cache import build_cache
    from ega_ray.models import build_teacher
    from ega_ray.worker.common import compiler_available

    budget = budget or Budget(None)
    t_start = time.time()
    device = torch.device(args.device)
    figures: dict[str, Any] = {}
    parts: dict[str, float] = {}  # wall seconds of every part: what a --deadline-s must leave room for
    settings = {
        "device": gpu_name(args.device),
        "precision": args.precision,
        "compile": args.compile,
        "batch": args.batch,
        "seconds": args.seconds,
        "bare_seconds": args.bare_seconds,
        "seed_loader_workers": args.seed_workers,
        "max_rows": args.max_rows,
        # why torch.compile would fall back to eager here (no Triton, no C++ compiler); None: it compiles
        "compile_unavailable": compiler_available(device) if args.compile else None,
        "command": " ".join(sys.argv),
    }

    def save(complete: bool = False) -> dict[str, Any]:
        out = figures | settings | {"part_seconds": parts, "skipped": budget.skipped, "complete": complete}
        out["wall_time_s"] = round(time.time() - t_start, 1)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")
        return out

    def timed(part: str, t0: float) -> None:
        parts[part] = round(time.time() - t0, 1)
        save()

    print(f"[bench] {gpu_name(args.device)}, precision {args.precision}, compile {args.compile}", flush=True)
    if settings["compile_unavailable"]:
        print(f"[bench] --compile: runs eagerly here: {settings['compile_unavailable']}", flush=True)
    rng = np.random.default_rng(0)
    n_seed = max(args.batch * 20, 1280)
    x = rng.integers(0, 256, (n_seed, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, n_seed)
    t0 = time.time()
    seed_ips = seed_baseline(x, y, args.device, args.batch, args.seed_workers, args.seconds)
    print(f"[bench] seed loop: {seed_ips:.1f} img/s", flush=True)
    figures["seed_img_per_s"] = seed_ips
    timed("seed", t0)

    # fixed costs beyond the measured seconds, first guessed, then as measured in this run
    bare_fixed = 60.0 if args.compile else 10.0
    ray_fixed = 45.0
    teacher_dim = build_teacher(args.teacher).spec.embed_dim  # built once: the bare steps need only its width
    with tempfile.TemporaryDirectory(prefix="ega-bench-") as tmp:
        tmp = Path(tmp)

        def bare(part: str, cfg, profile: bool = False, seconds: float | None = None) -> dict[str, Any] | None:
            nonlocal bare_fixed
            seconds = args.bare_seconds if seconds is None else seconds
            if not budget.fits(part, seconds + bare_fixed):
                return None
            t0 = time.time()
            result = bare_step(cfg, device, seconds, teacher_dim, profile=profile)
            bare_fixed = max(5.0, time.time() - t0 - seconds)
            timed(part, t0)
            return result

        for mode in ("online", "cached"):
            r = bare(f"bare_{mode}", project_config(args, tmp / "data", tmp, mode))
            if r is not None:
                figures[f"bare_{mode}_img_per_s"] = r["img_per_s"]
                figures[f"bare_{mode}_gpu_util_pct"] = r["gpu_util_pct"]
                print(f"[bench] bare {mode} step: {r['img_per_s']:.1f} img/s", flush=True)

        # each Ray path runs about --seconds at the speed its bare step showed, never fewer than MIN_STEPS
        # measured steps, over one training split sized for the teacher-bound paths (at most --max-rows): a
        # faster path runs more epochs over it rather than making the cache build (the teacher over every
        # row) longer. A path's figure is the median over its epochs after the first (the only one, if so).
        def steps_for(img_per_s: float) -> int:
            return WARMUP_STEPS + 1 + max(MIN_STEPS, math.ceil(args.seconds * img_per_s / args.batch))

        guess = seed_ips  # a path whose bare step was skipped: sized as if it ran at the seed loop's speed
        expected = {
            "online": figures.get("bare_online_img_per_s", guess),
            "cached": figures.get("bare_cached_img_per_s", guess),
            "pipeline": figures.get("bare_online_img_per_s", guess),
        }
        epoch_steps = max(1, min(args.max_rows // args.batch, steps_for(expected["online"])))
        rows = epoch_steps * args.batch
        data = tmp / "data"
        paths = list(args.paths)
        if paths:
            t0 = time.time()
            train_x = rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8)
            write_split(data / "train", train_x, rng.integers(0, 100, rows))
            write_split(data / "validation", x[: args.batch], y[: args.batch])
            write_split(data / "test", x[: args.batch], y[: args.batch])
            connect_local_ray(args)
            timed("ray_setup", t0)
        if "cached" in paths:
            if budget.fits("cache_build", 2 * rows / expected["online"] + ray_fixed):
                t0 = time.time()
                build_cache(project_config(args, data, tmp, "online"), 1, tmp / "cache")
                figures["cache_build_s"] = round(time.time() - t0, 1)
                figures["cache_rows"] = rows
                timed("cache_build", t0)
            else:
                paths.remove("cached")
        # each path with the deterministic data path (run.deterministic, the figures without a suffix) and,
        # with --data-paths both, right after it Ray Data's streaming split (the figures with "_streaming")
        variants = {"both": (True, False), "deterministic": (True,), "streaming": (False,)}[args.data_paths]
        for mode, deterministic in itertools.product(paths, variants):
            # the pipeline's first epoch is fed partly by what its teacher stage computed during start-up
            epochs = max(2 if mode == "pipeline" else 1, math.ceil(steps_for(expected[mode]) / epoch_steps))
            if not budget.fits(mode, epochs * rows / expected[mode] + ray_fixed):
                continue
            t0 = time.time()
            cfg = project_config(args, data, tmp, mode, epoch_steps, epochs, deterministic=deterministic)
            suffix = "" if deterministic else "_streaming"
            with open(Path(run_distill(cfg)["output"]) / "metrics.csv") as f:
                per_epoch = list(csv.DictReader(f))
            measured = per_epoch[1:] or per_epoch

            def median(key: str, measured: list[dict] = measured) -> float:
                return statistics.median(float(r[key]) for r in measured)

            # steps after the warm-up; and whole epochs, their wait for the first batch included
            figures[f"{mode}{suffix}_steady_img_per_s"] = median("train_img_per_s")
            figures[f"{mode}{suffix}_epoch_img_per_s"] = rows / median("train_time_s")
            # the pipeline's headline is its whole epoch: its steady window is fed by batches the teacher
            # stage computed while the trainer waited for its first ones (Ray Data runs ahead)
            headline = "epoch" if mode == "pipeline" else "steady"
            figures[f"{mode}{suffix}_img_per_s"] = figures[f"{mode}{suffix}_{headline}_img_per_s"]
            figures[f"{mode}{suffix}_gpu_util_pct"] = median("gpu_util_pct")
            figures[f"{mode}{suffix}_gpu_mem_peak_gib"] = max(float(r["gpu_mem_peak_gib"]) for r in per_epoch)
            ray_fixed = max(15.0, time.time() - t0 - sum(float(r["train_time_s"]) for r in per_epoch))
            ips = figures[f"{mode}{suffix}_img_per_s"]
            print(f"[bench] {mode}{suffix}: {ips:.1f} img/s ({epochs} epochs)", flush=True)
            timed(mode + suffix, t0)
            if f"{mode}_streaming_epoch_img_per_s" in figures and f"{mode}_epoch_img_per_s" in figures:
                # what the deterministic path costs, over whole epochs (its gathering of the epoch's rows included)
                figures[f"{mode}_deterministic_cost"] = (
                    1.0 - figures[f"{mode}_epoch_img_per_s"] / figures[f"{mode}_streaming_epoch_img_per_s"]
                )

        if args.sweep or args.profile:
            figures["sweep"] = []
            for batch, graph in itertools.product(args.sweep or [], args.graph_sizes):
                if batch % graph:
                    print(f"[bench] sweep: batch {batch} skipped for graph size {graph} (not a multiple)", flush=True)
                    continue
                cfg = project_config(args, data, tmp, "cached", graph_size=graph, batch_size=batch)
                r = bare(f"sweep_{batch}_{graph}", cfg)
                if r is not None:
                    row = {"batch": batch, "graph_size": graph, "compile": args.compile} | r
                    figures["sweep"].append(row)
                    print(f"[bench] sweep {row}", flush=True)
            if args.profile:
                r = bare("profile", project_config(args, data, tmp, "cached"), profile=True, seconds=1.0)
                if r is not None:
                    figures["profile_bare_cached"] = r["profile"]
    import ray

    ray.shutdown()
    done = [mode for mode in PATHS if f"{mode}_img_per_s" in figures]
    for mode in done:
        figures[f"{mode}_vs_seed"] = figures[f"{mode}_img_per_s"] / seed_ips
    for mode in set(done) & {"online", "cached"}:
        if f"bare_{mode}_img_per_s" in figures:
            figures[f"{mode}_ray_overhead"] = 1.0 - figures[f"{mode}_img_per_s"] / figures[f"bare_{mode}_img_per_s"]
    if {"pipeline", "online"} <= set(done):
        figures["pipeline_vs_online"] = figures["pipeline_img_per_s"] / figures["online_img_per_s"]
    return save(complete=True)


def print_table(f: dict[str, Any]) -> None:
    print(f"\n{f['device']}, precision {f['precision']}, compile {f['compile']}, batch {f['batch']}")
    print(f"{'path':<10} {'img/s':>9} {'× seed':>7} {'bare img/s':>11} {'Ray overhead':>13} {'GPU util %':>11}")
    print(f"{'seed':<10} {f['seed_img_per_s']:>9.1f} {1.0:>7.2f}")
    for mode in PATHS:
        if f"{mode}_img_per_s" not in f:
            continue
        bare = f.get(f"bare_{mode}_img_per_s")
        overhead = f.get(f"{mode}_ray_overhead")
        print(
            f"{mode:<10} {f[f'{mode}_img_per_s']:>9.1f} {f[f'{mode}_vs_seed']:>7.2f} "
            f"{'' if bare is None else f'{bare:.1f}':>11} {'' if overhead is None else f'{overhead:.1%}':>13} "
            f"{f[f'{mode}_gpu_util_pct']:>11.0f}"
        )
    for mode in PATHS:
        if f"{mode}_streaming_epoch_img_per_s" in f:
            cost = f.get(f"{mode}_deterministic_cost")
            print(
                f"{mode}: streaming split {f[f'{mode}_streaming_epoch_img_per_s']:.1f} img/s over whole epochs, "
                f"deterministic {f.get(f'{mode}_epoch_img_per_s', float('nan')):.1f}"
                + ("" if cost is None else f" (costs {cost:.1%})")
            )
    if "cache_build_s" in f:
        print(f"cache build (K=1, {f['cache_rows']} images): {f['cache_build_s']} s")
    for row in f.get("sweep", []):
        print(
            f"sweep: batch {row['batch']:>5} graph {row['graph_size']:>5} compile {row['compile']!s:<5} "
            f"{row['img_per_s']:>9.1f} img/s "
            f"{row['img_per_s'] / f['seed_img_per_s']:>6.2f}× seed  peak {row['gpu_mem_peak_gib']:.2f} GiB  "
            f"util {row['gpu_util_pct']:.0f}%"
        )
    for row in f.get("profile_bare_cached", []):
        print(f"profile: {row['ms_per_step']:>8.2f} ms/step {row['share_pct']:>5.1f}%  {row['op']}")
    if f.get("skipped"):
        print(f"skipped for --deadline-s: {', '.join(f['skipped'])}")
    print(f"wall time {f['wall_time_s']} s")


if __name__ == "__main__":
    sys.exit(main())
