"""How long materializing a split takes at each CPU request of its Ray Data tasks, side by side on one local Ray.

A run's Ray Data stages (read, row selection, decoding, label masking) ask for ``DATA_STAGE_CPUS`` each, a
fraction of a CPU, so that they also run beside training workers that leave a node less than a CPU
(docs/data.md). Before training, with every CPU free, the same fraction lets Ray Data start more tasks than
there are cores. This measures what that costs: a synthetic split of random PNG images, read, decoded and
materialized as ``ega_ray.driver.launch.read_split`` builds it for a run, alternately (A B A B ...) at each
request, on one local Ray whose start is not timed. Figures: wall seconds and the machine's CPU-seconds (all
processes, /proc/stat). docs/performance.md has the measured table.

    python bench/stage_cpus.py                                   # 0.25 (ega-ray's) against 1 (Ray Data's default)
    python bench/stage_cpus.py --rows 50000 --cpus 0.25 0.5 1 --rounds 5 --output runs/stage-cpus.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fit_latency import machine_cpu_seconds, write_figures

REPO = Path(__file__).resolve().parents[1]


def synthetic_split(folder: Path, rows: int) -> Path:
    """``rows`` random 32×32 RGB images with labels 0–9, written as a split (PNG bytes in Parquet)."""
    from ega_ray.data.parquet import write_split

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8)
    return write_split(folder / "train", images, rng.integers(0, 10, rows), rows_per_file=max(1, rows // 8))


def timed_materialize(path: Path, cpus: float) -> tuple[float, float]:
    """One ``read_split(...).materialize()`` with every stage asking for ``cpus``: (wall s, machine CPU-s)."""
    import ega_ray.driver.launch as launch

    launch.DATA_STAGE_CPUS = cpus  # read at call time: the one knob this measures
    wall, cpu = time.perf_counter(), machine_cpu_seconds()
    dataset = launch.read_split(str(path), 32, "data.train", None).materialize()
    wall, cpu = time.perf_counter() - wall, machine_cpu_seconds() - cpu
    assert dataset.count() > 0
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help="images in the synthetic split")
    ap.add_argument("--cpus", type=float, nargs="+", default=[0.25, 1.0], help="CPU requests to alternate")
    ap.add_argument("--rounds", type=int, default=3, help="timed materializations per request")
    ap.add_argument("--output", type=Path, help="write the figures here as JSON")
    args = ap.parse_args(argv)

    import ray

    from ega_ray.driver.launch import configure_ray_data

    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_split(Path(tmp), args.rows)
        ray.init(address="local", include_dashboard=False, configure_logging=False)
        configure_ray_data()
        timed_materialize(path, args.cpus[0])  # warm: the first pays for Ray Data's actors and the workers' start
        walls: dict[float, list[float]] = {c: [] for c in args.cpus}
        cpu_s: dict[float, list[float]] = {c: [] for c in args.cpus}
        for _ in range(args.rounds):
            for cpus in args.cpus:
                wall, cpu = timed_materialize(path, cpus)
                walls[cpus].append(wall)
                cpu_s[cpus].append(cpu)
        ray.shutdown()
    figures = {
        str(c): {
            "wall_s": walls[c],
            "wall_mean_s": statistics.mean(walls[c]),
            "wall_sd_s": statistics.stdev(walls[c]) if len(walls[c]) > 1 else 0.0,
            "machine_cpu_s_mean": statistics.mean(cpu_s[c]),
        }
        for c in args.cpus
    }
    for c, f in figures.items():
        print(f"CPUs per task {c}: {f['wall_mean_s']:.2f} ± {f['wall_sd_s']:.2f} s wall, "
              f"{f['machine_cpu_s_mean']:.1f} machine CPU-s ({args.rounds} rounds, {args.rows} rows)")  # fmt: skip
    write_figures(args.output, {"rows": args.rows, "rounds": args.rounds, "figures": figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
