"""Throughput of the seed paper's loop vs this project's online, cached and pipeline paths, in one run.

Same device, same teacher (ViT-B/32 image tower shape, random weights), same student (resnet8x4),
CIFAR-sized random images, batch 64 by default. The seed figure comes from ``seed_throughput`` in
``../shared/bench/seed_recipe.py`` (the paper's DataLoader + PIL loop); the project's figures come from
real ``ega-ray distill`` runs (Ray Data → Ray Train, one worker), read from their ``train_img_per_s``
metric (steps after the first three, so start-up is excluded). The cache build is timed separately.

    python bench/throughput.py --device cpu --seconds 5 --json runs/bench/cpu.json
    python bench/throughput.py --device cuda --seconds 20 --json runs/bench/gpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = REPO.parent / "shared" / "bench"
MAX_ROWS = 51_200
CPUS = os.cpu_count() or 1
MIN_STEPS = 16


def seed_baseline(
    recipe: Path, x: np.ndarray, y: np.ndarray, device: str, batch: int, workers: int, seconds: float
) -> float:
    sys.path.insert(0, str(recipe.parent))
    try:
        from seed_recipe import seed_throughput
    except ImportError as err:
        raise SystemExit(f"bench: cannot import seed_throughput from {recipe}: {err}") from None
    return seed_throughput(x, y, device=device, batch=batch, workers=workers, seconds=seconds, warmup_steps=3)


def project_config(
    data: Path, out: Path, mode: str, device: str, batch: int, steps: int, epochs: int, cache: Path | None
):
    from ega_ray.config import parse_config

    raw = {
        "data": {"train": str(data / "train"), "val": str(data / "val"), "num_classes": 100},
        "teacher": {
            "name": "open_clip:ViT-B-32",
            "mode": mode,
            "cache": str(cache) if cache else None,
            "batch_size": batch,
            "actor_cpus": float(CPUS),
        },
        "student": {"name": "resnet8x4"},
        "optim": {"epochs": epochs, "batch_size": batch, "max_steps_per_epoch": steps, "milestones": [epochs + 1]},
        # one worker with every core, as the seed loop's step has (its loader workers share them too)
        "scaling": {"num_workers": 1, "use_gpu": device == "cuda", "cpus_per_worker": float(CPUS)},
        "run": {"name": f"bench-{mode}", "output": str(out / mode)},
    }
    return parse_config(raw)


def gpu_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per path (after warm-up)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed-workers", type=int, default=min(8, os.cpu_count() or 1), help="the seed's loader workers")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--seed-recipe", type=Path, default=SHARED_BENCH / "seed_recipe.py", help="the paper's loop")
    ap.add_argument(
        "--expect-cached", type=float, help="expected cached/seed ratio, to size its run and cache (5 CPU, 15 GPU)"
    )
    args = ap.parse_args()

    from ega_ray.data.parquet import write_split
    from ega_ray.train.launch import run_distill
    from ega_ray.train.teacher_cache import build_cache

    t_start = time.time()
    print(f"[bench] device: {gpu_name(args.device)}", flush=True)
    rng = np.random.default_rng(0)
    n_seed = max(args.batch * 20, 1280)
    x = rng.integers(0, 256, (n_seed, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, n_seed)
    seed_ips = seed_baseline(args.seed_recipe, x, y, args.device, args.batch, args.seed_workers, args.seconds)
    print(f"[bench] seed loop: {seed_ips:.1f} img/s", flush=True)

    figures: dict[str, float] = {"seed_img_per_s": seed_ips}
    with tempfile.TemporaryDirectory(prefix="ega-bench-") as tmp:
        tmp = Path(tmp)

        # each path runs about --seconds at an expected speed-up over the seed, in epochs of at most
        # MAX_ROWS images; its figure is the median over epochs of steps after the third
        def schedule(speedup: float) -> tuple[int, int]:
            # at least MIN_STEPS measured steps: batches that Ray Data prepared ahead during start-up (the
            # pipeline's teacher stage runs ahead of the trainer) must not dominate the measured window
            steps = 4 + max(MIN_STEPS, math.ceil(args.seconds * seed_ips * speedup / args.batch))
            epochs = math.ceil(steps / (MAX_ROWS // args.batch))
            return math.ceil(steps / epochs), epochs

        cached_speedup = args.expect_cached or (15.0 if args.device == "cuda" else 5.0)
        rows = schedule(cached_speedup)[0] * args.batch
        write_split(
            tmp / "data" / "train", rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, rows)
        )
        write_split(tmp / "data" / "val", x[: args.batch], y[: args.batch])
        t0 = time.time()
        build_cache(project_config(tmp / "data", tmp, "online", args.device, args.batch, 1, 1, None), 1, tmp / "cache")
        figures["cache_build_s"] = round(time.time() - t0, 1)
        for mode, speedup in (("online", 1.5), ("cached", cached_speedup), ("pipeline", 1.5)):
            steps, epochs = schedule(speedup)
            cfg = project_config(
                tmp / "data",
                tmp,
                mode,
                args.device,
                args.batch,
                steps,
                epochs,
                tmp / "cache" if mode == "cached" else None,
            )
            with open(Path(run_distill(cfg)["output"]) / "metrics.csv") as f:
                figures[f"{mode}_img_per_s"] = statistics.median(float(r["train_img_per_s"]) for r in csv.DictReader(f))
            print(f"[bench] {mode}: {figures[f'{mode}_img_per_s']:.1f} img/s", flush=True)
    import ray

    ray.shutdown()
    for mode in ("online", "cached", "pipeline"):
        figures[f"{mode}_vs_seed"] = figures[f"{mode}_img_per_s"] / seed_ips
    figures |= {
        "device": gpu_name(args.device),
        "batch": args.batch,
        "seconds": args.seconds,
        "seed_loader_workers": args.seed_workers,
        "wall_time_s": round(time.time() - t_start, 1),
    }
    print(f"\n{'path':<10} {'img/s':>10} {'× seed':>8}")
    print(f"{'seed':<10} {seed_ips:>10.1f} {1.0:>8.2f}")
    for mode in ("online", "cached", "pipeline"):
        print(f"{mode:<10} {figures[f'{mode}_img_per_s']:>10.1f} {figures[f'{mode}_vs_seed']:>8.2f}")
    print(f"cache build (K=1, {rows} images): {figures['cache_build_s']} s; wall time {figures['wall_time_s']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
