"""What Ray's worker niceness costs a fit on a machine that is busy with something else.

Ray starts every worker process (Train workers, their controller, Ray Data's tasks) at niceness 15
(``RAY_worker_niceness``, read when Ray starts). Beside processes at niceness 0 that compute, such as a second
test process, a CLI subprocess or another cluster's raylets, a fit's workers then get a sliver of a core. This
runs ``bench/fit_latency.py`` (one local Ray, one fit after the one that starts Ray) once per niceness, each in
its own process, while ``--busy`` busy-loop processes at niceness 0 hold the cores, and reports each fit's wall
seconds and the CPU-seconds the machine spent on everything but the busy loops. docs/performance.md ("Ray's
worker niceness") has the measured table.

    python bench/worker_niceness.py                       # niceness 15 (Ray's default) and 0, 2 busy loops
    python bench/worker_niceness.py --busy 0 --output runs/niceness.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from fit_latency import machine_cpu_seconds, write_figures  # noqa: E402


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU-seconds that process ``pid`` has spent (its /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fit_beside_busy_loops(niceness: int, busy: int, workers: int, folder: Path) -> dict:
    """One ``bench/fit_latency.py`` run (a fit that starts Ray, then one measured fit) with Ray's workers at
    ``niceness``, while ``busy`` busy loops run at niceness 0.

    Returns:
        The measured fit's wall and machine CPU-seconds, Ray's start (the first fit), the whole run's wall, and
        the CPU-seconds of the whole run less the busy loops'.
    """
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        output = folder / f"niceness-{niceness}.json"
        cpu = machine_cpu_seconds()
        loops_cpu = sum(process_cpu_seconds(p.pid) for p in loops)
        command = [sys.executable, str(REPO / "bench" / "fit_latency.py"), "--intervals", "0.25", "--rounds", "1",
                   "--workers", str(workers), "--output", str(output)]  # fmt: skip
        env = os.environ | {"RAY_worker_niceness": str(niceness)}
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        busy_cpu = sum(process_cpu_seconds(p.pid) for p in loops) - loops_cpu
        total = machine_cpu_seconds() - cpu
    finally:
        for p in loops:
            p.kill()
            p.wait()
    figures = json.loads(output.read_text())
    return {"niceness": niceness, "busy_loops": busy,
            "fit_wall_s": figures["intervals"]["0.25"]["wall_s"][0],
            "fit_machine_cpu_s": figures["intervals"]["0.25"]["cpu_s"][0],
            "first_fit_wall_s": figures["first"]["wall_s"],
            "cpu_s_less_busy_loops": total - busy_cpu}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure each niceness in turn and print one line per setting.

    Args:
        argv: the command line (default: sys.argv[1:]).

    Returns:
        One dict per niceness, as written to ``--output``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--niceness", type=int, nargs="+", default=[15, 0], help="Ray worker niceness values")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="busy loops at niceness 0")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, help="a JSON file for the figures")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="worker-niceness-"))
    results = []
    for niceness in args.niceness:
        r = fit_beside_busy_loops(niceness, args.busy, args.workers, folder)
        results.append(r)
        print(f"niceness {niceness:2d}, {args.busy} busy loop(s): fit {r['fit_wall_s']:.1f} s wall, "
              f"first fit (Ray starts) {r['first_fit_wall_s']:.1f} s, "
              f"CPU-s less the busy loops {r['cpu_s_less_busy_loops']:.1f}", flush=True)  # fmt: skip
    write_figures(args.output, results)
    return results


if __name__ == "__main__":
    main()
