"""The record of ``bench/gpu_check.sh``: summary.json and tests.json in its output folder, and the figures
against the speed targets, printed. Called by gpu_check.sh (its working folder holds steps.jsonl,
environment.json and pytest's junit.xml); only the standard library, so it runs wherever the check does.

Targets (issues 7 and 17; docs/performance.md): through real Ray Data + Ray Train, the cached path ≥ 25× the
seed loop (moonshot 45×), online ≥ 8×, the pipeline within 10% of online, Ray's overhead over the bare step
≤ 10%.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# (figure, comparison, bound, what) for each throughput JSON
TARGETS = [
    ("cached_vs_seed", ">=", 25.0, "cached ≥ 25× the seed loop (moonshot 45×)"),
    ("online_vs_seed", ">=", 8.0, "online ≥ 8× the seed loop"),
    ("pipeline_vs_online", ">=", 0.9, "pipeline within 10% of online"),
    ("cached_ray_overhead", "<=", 0.10, "cached: Ray overhead ≤ 10%"),
    ("online_ray_overhead", "<=", 0.10, "online: Ray overhead ≤ 10%"),
]


def junit_tests(path: Path) -> list[dict]:
    """One row per test of pytest's junit XML: name, outcome, seconds, and the first line of any message."""
    if not path.is_file():
        return []
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (node.get("message") or node.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        rows.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": round(float(case.get("time", 0.0)), 1),
                "message": message,
            }
        )
    return rows


def met(value: float, op: str, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


def figures(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", type=int, default=0)
    ap.add_argument("--wall", type=float, default=0.0)
    a = ap.parse_args()

    steps = [json.loads(line) for line in (a.work / "steps.jsonl").read_text().splitlines() if line.strip()]
    env = figures(a.work / "environment.json") or {}
    tests = junit_tests(a.work / "junit.xml")
    if tests:
        (a.out / "tests.json").write_text(json.dumps(tests, indent=2) + "\n")
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
    summary = {
        "dry_run": bool(a.dry_run),
        "environment": env,
        "steps": steps,
        "failed_steps": [s["step"] for s in steps if s["rc"] != 0],
        "tests": counts,
        "wall_s": a.wall,
        "targets": {},
    }

    print("\n== summary")
    print(
        f"   {env.get('gpu') or env.get('device')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"Python {env.get('python')}, {env.get('cpus')} CPUs; wall {a.wall:.0f} s"
    )
    for s in steps:
        status = "ok" if s["rc"] == 0 else f"FAILED (exit {s['rc']}{', ' + s['note'] if s['note'] else ''})"
        print(f"   {s['step']:<20} {s['seconds']:>5} s  {status}")
    if tests:
        print(
            f"   tests: {counts['passed']} passed, {counts['failed'] + counts['error']} failed, "
            f"{counts['skipped']} skipped"
        )
        for t in tests:
            if t["outcome"] in ("failed", "error"):
                print(f"     {t['outcome']}: {t['test']}: {t['message']}")
    for name in ("throughput", "throughput-compile"):
        f = figures(a.out / f"{name}.json")
        if f is None:
            continue
        line = f"   {name}: seed {f.get('seed_img_per_s', float('nan')):.1f} img/s"
        for mode in ("online", "cached", "pipeline"):
            if f"{mode}_img_per_s" in f:
                ratio = f.get(f"{mode}_vs_seed")  # absent when the run was cut short before its seed loop
                line += f", {mode} {f[f'{mode}_img_per_s']:.1f}" + (f" ({ratio:.2f}×)" if ratio is not None else "")
        print(
            line
            + ("" if f.get("complete") else "  [cut short]")
            + (f"  [skipped: {', '.join(f['skipped'])}]" if f.get("skipped") else "")
        )
        rows = summary["targets"][name] = []
        for key, op, bound, what in TARGETS:
            if key in f:
                ok = met(f[key], op, bound)
                rows.append({"figure": key, "value": round(f[key], 4), "target": f"{op} {bound}", "met": ok})
                print(f"     {'met    ' if ok else 'not met'}  {what}: {f[key]:.3g}")
        for row in f.get("sweep", []):
            print(
                f"     sweep batch {row['batch']:>5} compile {row['compile']!s:<5} {row['img_per_s']:>10.1f} img/s "
                f"({row['img_per_s'] / f['seed_img_per_s']:.1f}× seed) peak {row['gpu_mem_peak_gib']:.2f} GiB "
                f"util {row['gpu_util_pct']:.0f}%"
            )
    if a.dry_run:
        print("   (dry run: CPU, tiny sizes: the figures check the plumbing, not the targets)")
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
