"""The processes a Ray Train fit starts, and what starting a Ray worker process costs.

On one local Ray (after a first fit that starts it): each short smoke fit's new worker processes by the name Ray
gives them (its controller, its Train workers and Ray Train's helper actors), its wall seconds, the machine's
CPU-seconds and those CPU-seconds by process kind, the processes and the CPU-seconds both from
``bench/cpu_by_process.py``'s sampler (its kinds: ``Ray: worker (starting)`` is a process before it is a
worker, ``ray::IDLE`` a worker loading its actor's class and the modules it imports). Then the start of a bare
actor (a Ray worker process that imports nothing more) and of one whose class imports torch, each created,
called once and killed ``--actors`` times: the machine's CPU-seconds per actor. docs/performance.md ("What a
fit's CPU goes to") has the measured figures.

    python bench/fit_processes.py                      # 3 fits, 10 actors of each kind
    python bench/fit_processes.py --fits 5 --output runs/fit-processes.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from cpu_by_process import Sampler  # noqa: E402
from fit_latency import ShortFits, machine_cpu_seconds, write_figures  # noqa: E402


def actor_start_cpu(imports_torch: bool, count: int) -> float:
    """Machine CPU-seconds per actor: ``count`` actors created, called once and killed, one after another."""
    import ray

    @ray.remote(num_cpus=0)
    class Bare:
        def ping(self) -> int:
            return 1

    @ray.remote(num_cpus=0)
    class WithTorch:
        def __init__(self) -> None:
            import torch  # noqa: F401 - what a Train worker's or a controller's class loading does

        def ping(self) -> int:
            return 1

    actor_class = WithTorch if imports_torch else Bare
    idle = busy_when_idle(3.0)
    cpu, wall = machine_cpu_seconds(), time.perf_counter()
    for _ in range(count):
        actor = actor_class.remote()
        ray.get(actor.ping.remote())
        ray.kill(actor)
    time.sleep(2.0)  # the last one's exit
    spent = machine_cpu_seconds() - cpu - idle * (time.perf_counter() - wall)
    return spent / count


def busy_when_idle(seconds: float) -> float:
    """The machine's CPU-seconds per second while nothing is asked of Ray (its daemons' own polling)."""
    cpu = machine_cpu_seconds()
    time.sleep(seconds)
    return (machine_cpu_seconds() - cpu) / seconds


def main(argv: list[str] | None = None) -> dict:
    """Run the fits and the actor starts; print and return the figures.

    Args:
        argv: the command line (default: sys.argv[1:]).

    Returns:
        What ``--output`` gets: per fit its new processes by name, wall and CPU-seconds (total and by process
        kind), and the CPU-seconds per bare actor and per actor importing torch.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=3, help="fits measured after the first (Ray's start)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per epoch (2 epochs)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--actors", type=int, default=10, help="actors started per kind")
    parser.add_argument("--output", type=Path, help="a JSON file for the figures")
    args = parser.parse_args(argv)

    fit = ShortFits("fit-processes-", args.steps, args.workers)
    fit("run-0")  # starts Ray
    fits = []
    for n in range(1, args.fits + 1):
        time.sleep(2.0)  # the last fit's processes gone
        sampler = Sampler()
        sampler.start()
        wall, cpu = fit(f"run-{n}")
        sampler.stop()
        started = sampler.started
        fits.append({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "new_processes": dict(started.most_common()),
                     "cpu_s_by_kind": {k: round(v, 2) for k, v in sampler.seconds.most_common()}})  # fmt: skip
        print(f"fit {n}: {wall:.1f} s, {cpu:.1f} CPU-s; new processes: {dict(started.most_common())}", flush=True)
    kinds = sorted({k for f in fits for k in f["cpu_s_by_kind"]})
    per_kind = {k: statistics.mean(f["cpu_s_by_kind"].get(k, 0.0) for f in fits) for k in kinds}
    for kind, seconds in sorted(per_kind.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {seconds:6.2f} CPU-s per fit  {kind}")
    bare, with_torch = actor_start_cpu(False, args.actors), actor_start_cpu(True, args.actors)
    print(f"an actor's start: {bare:.2f} CPU-s bare, {with_torch:.2f} CPU-s when its class imports torch", flush=True)
    result = {"settings": vars(args) | {"output": str(args.output) if args.output else None}, "fits": fits,
              "cpu_s_per_fit_by_kind": {k: round(v, 2) for k, v in per_kind.items()},
              "actor_start_cpu_s": {"bare": round(bare, 2), "imports_torch": round(with_torch, 2)}}  # fmt: skip
    write_figures(args.output, result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
