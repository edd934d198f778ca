"""Which kinds of process a command's CPU-seconds go to: Ray's worker start-ups, its Train workers and
controllers, its daemons, the command's own processes.

Runs the command given after ``--`` and samples every process on the machine twice a second
(``/proc/<pid>/stat``), charging each sample's CPU ticks to the process's kind as its command line names it
at that moment: Ray renames a worker ``ray::IDLE`` once it has started, then ``ray::<actor or task>`` while it
runs one, so a worker's start (``worker (starting)``) and the loading of its actor's class
(``ray::IDLE``: the modules the class imports, torch among them) are told apart from its work. A process
that ends between two samples loses its last half second, so the kinds add up to a little less than the
machine's busy CPU-seconds (``/proc/stat``), which are reported beside them. Everything on the machine is
counted: run it with nothing else going on. docs/performance.md ("What a fit's CPU goes to") has the
whole test suite's figures.

    python bench/cpu_by_process.py -- make test
    python bench/cpu_by_process.py --output runs/suite-cpu.json -- .venv/bin/python -m pytest -q -m ray tests
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_latency import machine_cpu_seconds, write_figures  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
# a command line naming one of these (first match) is that kind; Ray's daemons and its dashboard's processes
DAEMONS = {
    "default_worker.py": "Ray: worker (starting)",  # first: a worker's command line names the raylet's socket
    "gcs_server": "Ray: gcs_server",
    "/raylet ": "Ray: raylet",
    "log_monitor.py": "Ray: log_monitor",
    "dashboard/agent.py": "Ray: dashboard agent",
    "dashboard/dashboard.py": "Ray: dashboard",
    "ray-dashboard-": "Ray: dashboard",
    "runtime_env/agent": "Ray: runtime_env agent",
    "autoscaler/_private/monitor.py": "Ray: autoscaler monitor",
}


def process_kind(cmdline: str) -> str:
    """The kind a process is counted under, from its command line as it reads now.

    Args:
        cmdline: ``/proc/<pid>/cmdline`` with its NULs as spaces.

    Returns:
        ``ray::<name>`` for a Ray worker (its actor class or task, ``ray::IDLE`` between them), a ``Ray: ...``
        kind for Ray's daemons and a starting worker, else the program's file name (``python``, ``ray``...).
    """
    if cmdline.startswith("ray::"):
        return "ray::" + re.split(r"[ .(]", cmdline[5:], maxsplit=1)[0]
    padded = cmdline + " "
    for needle, kind in DAEMONS.items():
        if needle in padded:
            return kind
    program = cmdline.split(" ", 1)[0].rsplit("/", 1)[-1]
    if program.startswith("python") and " -m " in padded:
        return f"{program} -m {padded.split(' -m ', 1)[1].split(' ', 1)[0]}"
    return program or "(kernel or unnamed)"


def read_processes() -> dict[int, tuple[int, int, str]]:
    """Every process now: pid → (its start time in ticks, its CPU ticks so far, its kind)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # it ended while we looked
        found[int(entry)] = (int(fields[19]), int(fields[11]) + int(fields[12]), process_kind(cmdline))
    return found


class Sampler(threading.Thread):
    """Charges CPU ticks to process kinds every ``interval_s`` until :meth:`stop`, and names each process that
    appears meanwhile by the actor or task it ran (:attr:`started`)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.seconds: Counter[str] = Counter()
        self._done = threading.Event()
        self._before = read_processes()  # what ran before the command: only its later ticks count
        self._first = {(pid, started) for pid, (started, _, _) in self._before.items()}
        self._appeared: dict[tuple[int, int], str] = {}

    @property
    def started(self) -> Counter[str]:
        """The processes that appeared while it ran, counted by kind: a ``ray::<name>`` other than
        ``ray::IDLE`` is kept once seen, since a process loses its name as it ends."""
        return Counter(self._appeared.values())

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            self.sample()
        self.sample()

    def sample(self) -> None:
        now = read_processes()
        for pid, (started, ticks, kind) in now.items():
            earlier = self._before.get(pid)
            spent = ticks - earlier[1] if earlier and earlier[0] == started else ticks  # a new (or reused) pid
            if spent > 0:
                self.seconds[kind] += spent / TICKS
            named = self._appeared.get((pid, started), "")
            if (pid, started) not in self._first and not (named.startswith("ray::") and named != "ray::IDLE"):
                self._appeared[pid, started] = kind
        self._before = now

    def stop(self) -> None:
        self._done.set()
        self.join()


def main(argv: list[str] | None = None) -> dict:
    """Run the command and print its CPU-seconds by process kind.

    Args:
        argv: the command line (default: sys.argv[1:]): options, ``--``, then the command to run.

    Returns:
        What ``--output`` gets: the command, its exit status, wall seconds, the machine's busy CPU-seconds and
        the CPU-seconds per process kind, largest first.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: python bench/cpu_by_process.py [--output FILE] [--top N] -- COMMAND ...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, help="write the figures as JSON")
    parser.add_argument("--top", type=int, default=25, help="kinds to print")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]

    sampler = Sampler()
    cpu, wall = machine_cpu_seconds(), time.perf_counter()
    sampler.start()
    returncode = subprocess.call(command)
    sampler.stop()
    wall, cpu = time.perf_counter() - wall, machine_cpu_seconds() - cpu
    kinds = dict(sampler.seconds.most_common())
    result = {"command": command, "returncode": returncode, "wall_s": round(wall, 1),
              "machine_cpu_s": round(cpu, 1), "cpu_s_by_kind": {k: round(v, 1) for k, v in kinds.items()}}  # fmt: skip
    print(f"{' '.join(command)}: exit {returncode}, {wall:.0f} s, the machine busy {cpu:.0f} CPU-seconds")
    for kind, seconds in list(kinds.items())[: args.top]:
        print(f"{seconds:9.1f}  {100 * seconds / max(cpu, 1e-9):5.1f}%  {kind}")
    write_figures(args.output, result)
    return result


if __name__ == "__main__":
    sys.exit(main()["returncode"])
