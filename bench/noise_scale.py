"""Gradient noise scale along a training run: which batch sizes still pay off in steps?

Trains a config's reference path (its batch size and LR schedule) in a plain loop without Ray, with the
same step as a Ray Train worker (``build_parts`` / ``train_step``, the decoded training split in memory,
the teacher online on its own view), and at the chosen epochs measures the simple noise scale
B_noise = tr(Σ)/|G|² (``ega_ray/tools/noise_scale.py``; McCandlish et al. 2018) of the student's loss,
its distiller term and its CE, from gradients of ``--batches SMALL BIG`` images (multiples of
``distill.ega.graph_size``; no step is taken for them). A batch ×k needs about
k·(1 + B_noise/B)/(1 + B_noise/B_ref) times the reference's epochs to make the same progress; the script
integrates that factor over the run for the big batch and writes JSON and a PNG.

    python bench/noise_scale.py --output runs/noise-scale                    # the embedded default
    python bench/noise_scale.py --config configs/cifar100_clip_vitb32_resnet8x4.yaml --device cuda \\
        --at 0 10 50 100 150 200 240 --output runs/noise-scale-cifar100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PARTS = ("loss", "distill", "ce")


def epochs_factor(at: list[int], b_simple: list[float], epochs: int, batch: int, reference: int) -> float:
    """The mean over the reference's epochs of ``batch``'s epochs factor, interpolated between the measured
    epochs (an unbounded B_noise, the mean gradient lost in the noise, counts as the linear rule's 1)."""
    from ega_ray.tools.noise_scale import NoiseScale

    factors = [NoiseScale(grad_sq=1.0, trace_cov=b).epochs_factor(batch, reference) for b in b_simple]
    return float(np.mean([np.interp(e + 0.5, at, factors) for e in range(epochs)]))


def plot(rows: list[dict[str, Any]], batches: tuple[int, int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max([r[p]["b_simple"] for r in rows for p in PARTS if math.isfinite(r[p]["b_simple"])] + [max(batches)])
    for part in PARTS:
        ys = [r[part]["b_simple"] if math.isfinite(r[part]["b_simple"]) else top * 2 for r in rows]
        ax.plot([r["epoch"] for r in rows], ys, marker="o", label=f"B_noise of the {part}")
    for b, style in zip(batches, ("--", ":"), strict=True):
        ax.axhline(b, color="grey", linestyle=style, label=f"batch {b}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (reference path)")
    ax.set_ylabel("simple noise scale (images)")
    ax.set_title(title + "\n(points at the top: mean gradient lost in the noise, B_noise unbounded)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    from ega_ray.config import ConfigError

    try:
        return measure(parse_args())
    except ConfigError as err:
        print(f"noise_scale.py: error: {err}", file=sys.stderr)
        return 2


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a YAML config; default: the embedded default (its SimCLR teacher)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--at", type=int, nargs="+", help="epochs to measure at; default: 0 and 7 more up to the end")
    ap.add_argument("--batches", type=int, nargs=2, metavar=("SMALL", "BIG"), help="default: the batch and ×4")
    ap.add_argument("--draws", type=int, nargs=2, default=[32, 16], metavar=("SMALL", "BIG"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", type=Path, default=Path("runs/noise-scale"))
    return ap.parse_args()


def measure(args: argparse.Namespace) -> int:
    from ega_ray.config import ConfigError, load_config
    from ega_ray.data.parquet import mask_labels, read_decoded
    from ega_ray.driver.preflight import check_teacher, prepare_data, resolve
    from ega_ray.embedded import embedded_with_teacher
    from ega_ray.tools.noise_scale import measure_noise_scale
    from ega_ray.worker.common import seed_everything
    from ega_ray.worker.distill import build_parts, step_losses, train_step

    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*args.overrides, "teacher.mode=online"]
    if args.config:
        cfg = resolve(load_config(args.config, overrides))
    else:
        cfg = embedded_with_teacher(overrides, str(out))
    o, g = cfg.optim, cfg.distill.ega.graph_size
    small, big = args.batches or (o.batch_size, 4 * o.batch_size)
    if g is not None and (small % g or big % g):
        raise ConfigError(f"--batches {small} {big}: both must be multiples of distill.ega.graph_size {g}")
    at = sorted(set(args.at or np.linspace(0, o.epochs, 8).round().astype(int).tolist()))
    if at[0] < 0 or at[-1] > o.epochs:
        raise ConfigError(f"--at {at}: epochs must lie in 0..optim.epochs ({o.epochs})")

    device = torch.device(args.device)
    seed_everything(cfg.run.seed)
    prepared = prepare_data(cfg)  # the run's checks, classes and labeled subset
    n = prepared.num_train
    if big > n:
        raise ConfigError(f"--batches: {big} is more than the training split's {n} rows")
    rows = read_decoded(cfg.data.train, cfg.data.image_size, "data.train", prepared.trained)  # less validation
    split = mask_labels(rows, prepared.keep)
    data = {"image": torch.from_numpy(split["image"]).to(device)}
    data |= {k: torch.from_numpy(split[k].astype(np.int64)).to(device) for k in ("label", "index")}
    teacher_dim = check_teacher(cfg).spec.embed_dim
    p = build_parts(cfg, device, prepared.num_classes, teacher_dim, int(prepared.indices.max()) + 1)
    params = list(p.student_net.parameters())

    def features(batch: dict[str, torch.Tensor]) -> torch.Tensor:  # the online teacher on its view of the batch
        return p.features(batch, 0, cfg.run.seed, train=True)

    def batch_losses(b: int) -> dict[str, torch.Tensor]:
        rows = torch.randperm(n, device=device)[:b]
        batch = {k: v[rows] for k, v in data.items()}
        loss, ce, distill = step_losses(p, cfg.distill, batch, features(batch))[:3]
        return {"loss": loss, "distill": distill, "ce": ce}

    rows: list[dict[str, Any]] = []
    steps = n // o.batch_size
    t0 = time.time()
    for epoch in range(o.epochs + 1):
        if epoch in at:
            p.student_net.train()
            p.t_head.train()
            scales = measure_noise_scale(batch_losses, params, small, big, *args.draws)
            row = {"epoch": epoch, "lr": p.opt_s.param_groups[0]["lr"]}
            row |= {
                k: {"b_simple": s.b_simple, "range": s.b_simple_range, "grad_sq": s.grad_sq, "trace_cov": s.trace_cov}
                for k, s in scales.items()
            }
            rows.append(row)
            print(
                f"[noise-scale] epoch {epoch:>3}  "
                + "  ".join(
                    f"B_noise({k}) {row[k]['b_simple']:>6.0f} [{row[k]['range'][0]:.0f}–{row[k]['range'][1]:.0f}]"
                    for k in PARTS
                )
                + f"  ({time.time() - t0:.0f} s)",
                flush=True,
            )
        if epoch == o.epochs:
            break
        p.student_net.train()
        p.t_head.train()
        order, loss_sum = torch.randperm(n, device=device), 0.0
        for step in range(steps):
            batch = {k: v[order[step * o.batch_size : (step + 1) * o.batch_size]] for k, v in data.items()}
            loss_sum += float(train_step(p, cfg.distill, batch, features(batch))[0])
        p.sched_s.step()
        p.sched_t.step()
        eta = (time.time() - t0) / (epoch + 1) * (o.epochs - epoch - 1)
        print(
            f"[noise-scale] trained epoch {epoch + 1}/{o.epochs}: loss {loss_sum / steps:.3f}, eta {eta:.0f} s",
            flush=True,
        )

    ats = [r["epoch"] for r in rows]
    factor = epochs_factor(ats, [r["loss"]["b_simple"] for r in rows], o.epochs, big, small)
    # one B_noise for lr_scaling noise: the median while the LR is at its peak (before the first milestone)
    first_decay = o.milestones[0] if o.milestones else o.epochs + 1
    peak = [r["loss"]["b_simple"] for r in rows if r["epoch"] < first_decay] or [r["loss"]["b_simple"] for r in rows]
    noise_scale = float(np.median(peak))
    summary = {
        "config": args.config or "embedded default",
        "overrides": args.overrides,
        "batches": [small, big],
        "draws": args.draws,
        "graph_size": g,
        "train_rows": n,
        "rows": rows,
        "epochs_factor": factor,
        "noise_scale": noise_scale,
        "wall_time_s": round(time.time() - t0, 1),
    }
    (out / "noise_scale.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, (small, big), out / "noise_scale.png", f"{summary['config']}: {n} training images, graph {g}")
    if not math.isfinite(noise_scale):
        rule = "optim.lr_scaling=linear (the mean gradient is lost in the noise: B_noise unbounded)"
    elif noise_scale <= 0:
        rule = "optim.lr_scaling=none (no measurable gradient noise)"
    else:
        rule = f"optim.lr_scaling=noise optim.noise_scale={noise_scale:.0f}"
    print(
        f"[noise-scale] B_noise before the first LR decay (median): {noise_scale:.0f} images → {rule}\n"
        f"[noise-scale] batch {big} needs about {factor:.2f}× the epochs of batch {small} for the same progress "
        f"(the linear rule assumes 1.00×) → {out}/noise_scale.{{json,png}}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
