"""The embedded default run: everything on one machine, no network, a local Ray.

digits → Parquet; SimCLR teacher (reused when its cached file matches the pretraining settings);
EGA student on 10% of the labels; the same student with CE only on the same labels; a table.
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from ega_ray.config import Config, apply_overrides, parse_config
from ega_ray.data.digits import cache_dir
from ega_ray.disk import write_with
from ega_ray.driver.launch import run_distill, run_pretrain
from ega_ray.driver.outputs import write_json
from ega_ray.driver.preflight import clear_run, resolve
from ega_ray.models.weights import sha256_of
from ega_ray.run_folder import check_target, claim


def embedded_config(overrides: list[str] | None = None, output: str | None = None) -> Config:
    raw = yaml.safe_load(resources.files("ega_ray").joinpath("embedded.yaml").read_text())
    raw = apply_overrides(raw, overrides or [])
    if output:
        raw["run"]["output"] = output
    return parse_config(raw)


def _teacher_key(cfg: Config) -> str:
    """What the cached teacher depends on: pretraining settings, data, seed and view statistics."""
    parts = [cfg.pretrain.model_dump(), cfg.data.model_dump(), cfg.augment.model_dump(), cfg.run.seed]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_teacher(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    return torch.load(path, map_location="cpu", weights_only=True).get("key") == key


def ensure_teacher(base: Config, teacher_dir: Path) -> tuple[Path, float]:
    """The embedded default's SimCLR teacher file and its kNN top-1: reused when its settings match,
    pretrained on Ray Train otherwise."""
    key = _teacher_key(base)
    teacher_file = teacher_dir / "teacher.pt"
    if _cached_teacher(teacher_file, key):
        knn = torch.load(teacher_file, map_location="cpu", weights_only=True)["knn_top1"]
        print(f"[embedded]     reusing the cached teacher (kNN top-1 {knn:.1f}%)", flush=True)
        return teacher_file, knn
    clear_run(teacher_dir, "pretrain-teacher")
    raw = base.model_dump(mode="json")
    raw["run"] |= {"output": str(teacher_dir), "name": "teacher"}
    knn = run_pretrain(parse_config(raw))["knn_test_top1"]
    ckpt = torch.load(teacher_file, map_location="cpu", weights_only=True)
    ckpt["key"] = key
    write_with(teacher_file, lambda tmp: torch.save(ckpt, tmp))
    return teacher_file, knn


STAGES = ("ega", "ce")  # the EGA student, then the same student with CE only


def run_embedded(overrides: list[str] | None = None, output: str | None = None) -> dict[str, Any]:
    t0 = time.time()
    base = resolve(embedded_config(overrides, output))
    root = base.output_dir
    with claim(root, "embedded"):
        # every stage folder is checked before the first stage starts: each may be replaced by its stage
        check_target(root / "teacher", "pretrain-teacher")
        for label in STAGES:
            check_target(root / label, "distill")
        (root / "summary.json").unlink(missing_ok=True)  # written last: never one older than the stages' outputs
        summary = _run_stages(base) | {"wall_time_s": round(time.time() - t0, 1)}
        write_json(summary, base.output_dir / "summary.json")
    print_table(summary)
    return summary


def _run_stages(base: Config) -> dict[str, Any]:
    root = base.output_dir
    teacher_dir = root / "teacher"

    def stage(**changes: Any) -> Config:
        raw = base.model_dump(mode="json")
        for dotted, value in changes.items():
            section, field = dotted.split("__")
            raw[section][field] = value
        return parse_config(raw)

    print(f"[embedded] 1/3 self-supervised teacher ({base.pretrain.arch}, SimCLR) → {teacher_dir}", flush=True)
    teacher_file, knn = ensure_teacher(base, teacher_dir)

    results = {}
    for i, label in enumerate(STAGES, start=2):
        beta = base.distill.beta if label == "ega" else 0.0
        out = root / label
        what = "EGA distillation" if label == "ega" else "CE-only baseline"
        print(
            f"[embedded] {i}/3 {what} ({base.student.name}, {base.data.label_fraction:.0%} labels) → {out}", flush=True
        )
        clear_run(out, "distill")  # the students train from scratch every time
        cfg = stage(run__output=str(out), run__name=label, distill__beta=beta, teacher__weights=str(teacher_file))
        results[label] = run_distill(cfg)

    scores = {
        f"student_{label}_{key}": results[label][key]
        for label in ("ce", "ega")
        for key in ("test_top1_at_selected", "test_top1_last", "selected_epoch", "validation_top1_at_selected")
    }
    return {
        "teacher_knn_test_top1": knn,
        **scores,
        "label_fraction": base.data.label_fraction,
        "labeled_train_rows": results["ega"]["labeled_train_rows"],
        "train_rows": results["ega"]["train_rows"],
        "validation_rows": results["ega"]["validation_rows"],
        "test_rows": results["ega"]["test_rows"],
        "student": base.student.name,
        "teacher": f"ssl:{base.pretrain.arch}",
    }


# A search trial on the embedded default trains 10 epochs, not 30: 8 trials with ASHA then fit in about
# 12 minutes on two cores (docs/tuning.md); --set overrides these like any field.
TUNE_BUDGET = ["optim.epochs=10", "optim.milestones=[7, 9]", "tune.grace_period=2"]


def embedded_tune_config(overrides: list[str] | None, output: str) -> Config:
    """The embedded default as a search (10 epochs per trial), its teacher ready (``embedded_with_teacher``)."""
    return embedded_with_teacher(TUNE_BUDGET + (overrides or []), output)


def teacher_cache_folder(base: Config) -> Path:
    """Where ``embedded_with_teacher`` keeps the embedded default's teacher: ``$EGA_RAY_CACHE/embedded-teacher/
    <key>`` (``ega_ray.data.digits.cache_dir``), one folder per pretraining settings, data, views and seed, so
    that a teacher with other settings never replaces the file a paused search or benchmark was started with.

    Args:
        base: the resolved embedded config.

    Returns:
        The teacher's run folder (its ``teacher.pt`` once pretrained).
    """
    return cache_dir() / "embedded-teacher" / _teacher_key(base)


def embedded_with_teacher(overrides: list[str] | None, output: str) -> Config:
    """The embedded default as a plain config for ``run_search`` and ``run_benchmark``: its data prepared and
    its SimCLR teacher pretrained on Ray Train, or reused from ``teacher_cache_folder``, named by
    ``teacher.weights`` and pinned by ``teacher.sha256`` (a resumed experiment refuses a changed file).

    Args:
        overrides: ``--set`` values, applied to the embedded config.
        output: the experiment's folder (``run.output``; each trial gets its own under it).

    Returns:
        The config, every path absolute.
    """
    base = resolve(embedded_config(overrides, output))
    teacher_file, _ = ensure_teacher(base, teacher_cache_folder(base))
    raw = base.model_dump(mode="json")
    raw["teacher"] |= {"weights": str(teacher_file), "sha256": sha256_of(teacher_file)}
    return parse_config(raw)


def print_table(s: dict[str, Any]) -> None:
    """The embedded default's table: test top-1 at the epoch the validation split selected, and at the last."""
    rows = [
        (f"teacher {s['teacher']} (SimCLR, kNN)", s["teacher_knn_test_top1"], None),
        *(
            (f"student {s['student']}, {name}", s[f"student_{label}_test_top1_at_selected"],
             s[f"student_{label}_test_top1_last"])
            for label, name in (("ce", "CE only"), ("ega", "CE + EGA"))
        ),
    ]  # fmt: skip
    print(
        f"\ndigits, {s['labeled_train_rows']}/{s['train_rows']} training labels ({s['label_fraction']:.0%}); "
        f"test top-1 (%) on {s['test_rows']} rows, at the epoch the validation split ({s['validation_rows']} rows "
        "carved from train) selected, and at the last"
    )
    print(f"{'model':<40} {'selected':>8} {'last':>7}")
    for name, selected, last in rows:
        print(f"{name:<40} {selected:>8.2f} {'' if last is None else f'{last:7.2f}':>7}")
    print(f"wall time {s['wall_time_s']:.0f} s\n")
