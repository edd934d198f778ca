"""How long a short Ray Train fit takes at each controller poll interval, side by side on one local Ray.

Ray Train hands ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` from the driver's environment to each fit's controller,
so one process can alternate the settings fit by fit (A B A B ...) on the same Ray: the first fit pays for
Ray's start and is reported apart. Each fit is the smoke config, a few steps, the teacher a random resnet8
saved to a file; the figures are wall seconds and the machine's CPU-seconds (all processes, /proc/stat)
during the fit. docs/performance.md ("A local Ray on a busy machine") has the measured table.

    python bench/fit_latency.py                          # Ray's 2 s against ega-ray's local 0.25 s, 3 rounds
    python bench/fit_latency.py --intervals 2 0.5 0.1 --rounds 5 --output runs/fit-latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INTERVAL_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def machine_cpu_seconds() -> float:
    """CPU-seconds the whole machine has spent busy since boot (every process, Ray's included)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def write_figures(path: Path | None, figures: object) -> None:
    """A bench script's ``--output``: ``figures`` as JSON at ``path`` (its folder made), or nothing when None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")


class ShortFits:
    """Short fits of the smoke config on one teacher: a randomly initialised resnet8 saved to a new temp folder
    as the teacher's weights file; each call is one ``run_distill`` there, 2 epochs of ``steps`` steps on
    ``workers`` Train workers (the first call in a process starts a local Ray)."""

    def __init__(self, prefix: str, steps: int, workers: int) -> None:
        import torch

        from ega_ray.models import build_student

        self.folder = Path(tempfile.mkdtemp(prefix=prefix))
        self.steps, self.workers = steps, workers
        torch.manual_seed(1)
        torch.save(build_student("resnet8").state_dict(), self.folder / "teacher.pt")

    def __call__(self, name: str) -> tuple[float, float]:
        """The fit into the run folder ``name``: (wall seconds, machine CPU-seconds, every process's)."""
        from ega_ray.config import load_config
        from ega_ray.driver.launch import run_distill

        overrides = [f"run.output={self.folder / name}", f"teacher.weights={self.folder / 'teacher.pt'}",
                     "optim.epochs=2", "optim.milestones=[1]", f"optim.max_steps_per_epoch={self.steps}",
                     f"scaling.num_workers={self.workers}"]  # fmt: skip
        cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
        cpu, wall = machine_cpu_seconds(), time.perf_counter()
        run_distill(cfg, trial=True)
        return time.perf_counter() - wall, machine_cpu_seconds() - cpu


def main(argv: list[str] | None = None) -> dict:
    """Run the rounds and print one line per setting.

    Args:
        argv: the command line (default: sys.argv[1:]).

    Returns:
        The figures, as written to ``--output``: per interval its fits' wall and CPU seconds.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--intervals", type=float, nargs="+", default=[2.0, 0.25], help="poll intervals, seconds")
    parser.add_argument("--rounds", type=int, default=3, help="fits per interval after the first (Ray's start)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per epoch (2 epochs)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, help="a JSON file for the figures")
    args = parser.parse_args(argv)

    short_fit = ShortFits("fit-latency-", args.steps, args.workers)
    fits = 0

    def fit(interval: float) -> tuple[float, float]:
        nonlocal fits
        fits += 1
        os.environ[INTERVAL_VAR] = str(interval)
        return short_fit(f"run-{fits}")

    first = fit(args.intervals[0])
    print(f"first fit (Ray starts), {args.intervals[0]} s: {first[0]:.1f} s wall, {first[1]:.1f} CPU-s", flush=True)
    measured: dict[float, list[tuple[float, float]]] = {i: [] for i in args.intervals}
    for _ in range(args.rounds):
        for interval in args.intervals:
            measured[interval].append(fit(interval))
    result = {"first": {"interval_s": args.intervals[0], "wall_s": first[0], "cpu_s": first[1]},
              "settings": vars(args) | {"output": str(args.output) if args.output else None},
              "intervals": {str(i): {"wall_s": [w for w, _ in f], "cpu_s": [c for _, c in f]}
                            for i, f in measured.items()}}  # fmt: skip
    for interval, f in measured.items():
        walls, cpus = [w for w, _ in f], [c for _, c in f]
        spread = statistics.stdev(walls) if len(walls) > 1 else 0.0
        print(f"interval {interval} s: wall {statistics.mean(walls):.1f} ± {spread:.1f} s (min {min(walls):.1f}), "
              f"CPU {statistics.mean(cpus):.1f} s, over {len(f)} fits", flush=True)  # fmt: skip
    write_figures(args.output, result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
