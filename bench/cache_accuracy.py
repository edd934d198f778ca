"""What a K-view teacher cache costs in accuracy on the embedded default (digits, SimCLR teacher, 10%
labels): EGA students trained with the teacher online and cached with K = 1, 4, 16 views per image.

Reuses (or pretrains) the embedded default's teacher; each run is a full ``ega-ray distill``.

    python bench/cache_accuracy.py --views 1 4 16 --output runs/cache-accuracy --json runs/cache-accuracy.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--output", type=Path, default=Path("runs/cache-accuracy"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from ega_ray.config import parse_config
    from ega_ray.driver.launch import run_distill
    from ega_ray.driver.preflight import clear_run
    from ega_ray.driver.teacher_cache import build_cache
    from ega_ray.embedded import embedded_config, run_embedded

    root = args.output.resolve()
    reference = run_embedded(args.overrides, output=str(root))  # teacher (cached), online EGA, CE-only
    base = embedded_config(args.overrides, output=str(root)).model_dump(mode="json")
    base["teacher"]["weights"] = str(root / "teacher" / "teacher.pt")
    rows = [
        {
            "mode": "online",
            "views": None,
            "best_top1": reference["student_ega_test_top1_at_selected"],
            "last_top1": reference["student_ega_test_top1_last"],
        },
        {
            "mode": "ce-only",
            "views": None,
            "best_top1": reference["student_ce_test_top1_at_selected"],
            "last_top1": reference["student_ce_test_top1_last"],
        },
    ]
    for k in args.views:
        cache = root / f"cache-k{k}"
        build_cache(parse_config(base), k, cache)
        raw = json.loads(json.dumps(base))
        raw["teacher"] |= {"mode": "cached", "cache": str(cache)}
        raw["run"] |= {"name": f"cached-k{k}", "output": str(root / f"cached-k{k}")}
        clear_run(root / f"cached-k{k}")
        s = run_distill(parse_config(raw))
        selected, last = s["test_top1_at_selected"], s["test_top1_last"]
        rows.append({"mode": "cached", "views": k, "best_top1": selected, "last_top1": last})
    print(f"\n{'teacher':<14} {'test @sel.':>10} {'test last':>10}")
    for r in rows:
        name = r["mode"] if r["views"] is None else f"cached K={r['views']}"
        print(f"{name:<14} {r['best_top1']:>10.2f} {r['last_top1']:>10.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "reference": reference}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
