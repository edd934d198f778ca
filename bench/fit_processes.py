"""The processes a Ray Train fit starts, and what starting a Ray worker process costs.

On one local Ray (after a first fit that starts it): each short smoke fit's new worker processes by the name Ray
gives them (its controller, its Train workers and Ray Train's helper actors; sampled every 0.1 s), its wall
seconds, the machine's CPU-seconds and those CPU-seconds by process kind (``bench/cpu_by_process.py``'s kinds:
``Ray: worker (starting)`` is a process before it is a worker, ``ray::IDLE`` a worker loading its actor's
class and the modules it imports). Then the start of a bare actor (a Ray worker process that imports nothing
more) and of one whose class imports torch, each created, called once and killed ``--actors`` times: the
machine's CPU-seconds per actor. docs/performance.md ("What a fit's CPU goes to") has the measured figures.

    python bench/fit_processes.py                      # 3 fits, 10 actors of each kind
    python bench/fit_processes.py --fits 5 --output runs/fit-processes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from cpu_by_process import Sampler, read_processes  # noqa: E402
from fit_latency import machine_cpu_seconds, timed_fit  # noqa: E402


class NewProcesses(threading.Thread):
    """The processes that appear while it runs, each under the name of the actor or task it ran (polled every
    0.1 s): a ``ray::<name>`` other than ``ray::IDLE`` is kept once seen, since an ending process loses its name."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._before = set(read_processes())
        self.kinds: dict[int, str] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.1):
            for pid, (_, _, kind) in read_processes().items():
                named = self.kinds.get(pid, "").startswith("ray::") and self.kinds[pid] != "ray::IDLE"
                if pid not in self._before and not named:
                    self.kinds[pid] = kind

    def stop(self) -> Counter[str]:
        self._done.set()
        self.join()
        return Counter(self.kinds.values())


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

    import torch

    from ega_ray.models import build_student

    folder = Path(tempfile.mkdtemp(prefix="fit-processes-"))
    torch.manual_seed(1)
    torch.save(build_student("resnet8").state_dict(), folder / "teacher.pt")

    def fit(n: int) -> tuple[float, float]:
        overrides = [f"run.output={folder / f'run-{n}'}", f"teacher.weights={folder / 'teacher.pt'}",
                     "optim.epochs=2", "optim.milestones=[1]", f"optim.max_steps_per_epoch={args.steps}",
                     f"scaling.num_workers={args.workers}"]  # fmt: skip
        return timed_fit(overrides)

    fit(0)  # starts Ray
    fits = []
    for n in range(1, args.fits + 1):
        time.sleep(2.0)  # the last fit's processes gone
        watch, sampler = NewProcesses(), Sampler()
        watch.start()
        sampler.start()
        wall, cpu = fit(n)
        sampler.stop()
        started = watch.stop()
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
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
