"""The CUDA paths, proven on a GPU by ``bash bench/gpu_check.sh`` (``pytest -m gpu``; docs/performance.md).

On a CUDA device: the losses on cuda against float64 on CPU, the device-side augmentation against the same
on CPU, real ``ega-ray`` runs of configs/smoke.yaml in each teacher mode with bf16, channels_last, fused SGD and
torch.compile, the exported student back on cuda and on CPU, SimCLR pretraining, and a checkpoint written on
cuda resumed on CPU.

Without a CUDA device these are skipped (``make test`` spends no time on them), unless
``EGA_RAY_GPU_CHECK_DEVICE=cpu`` (``gpu_check.sh --dry-run``): then they run on CPU at tiny sizes, so that the
check cannot rot between GPU sessions, and what only a GPU has is asserted as its CPU equivalent (NVML
utilisation and peak GPU memory 0, SGD not fused, no compile: compiling costs minutes on a small CPU).
"""

from __future__ import annotations

import copy
import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.train
import torch
import yaml

from ega_ray.config import DistillConfig, load_config
from ega_ray.constants import CLIP_MEAN, CLIP_STD
from ega_ray.data.augment import ViewMaker
from ega_ray.data.parquet import read_decoded
from ega_ray.driver.preflight import resolve
from ega_ray.export import load_student
from ega_ray.losses import DISTILLERS, EGALoss, build_distiller
from ega_ray.models import build_teacher
from ega_ray.models.teachers.base import TeacherSpec
from ega_ray.worker.common import STATE_FILE, deterministic_kernels, latest_state, seed_everything, unwrap
from ega_ray.worker.distill import build_parts, train_step

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
ASKED = os.environ.get("EGA_RAY_GPU_CHECK_DEVICE", "cuda")
if ASKED not in ("cuda", "cpu"):
    raise pytest.UsageError(f"EGA_RAY_GPU_CHECK_DEVICE must be cuda or cpu, got {ASKED!r}")
GPU = ASKED == "cuda"
DEVICE = torch.device(ASKED)
CPU = torch.device("cpu")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        GPU and not torch.cuda.is_available(),
        reason="no CUDA device (EGA_RAY_GPU_CHECK_DEVICE=cpu runs these on CPU: bench/gpu_check.sh --dry-run)",
    ),
    pytest.mark.filterwarnings("ignore:teacher zoo"),
]

# Runs: on a GPU 6 whole epochs of the digits split (132 steps: on CPU, in fp32, the accuracy rose within 4-5
# such epochs for both seeds tried) with compile; on CPU 2 epochs of a few steps, eager (compiling would cost
# the dry run minutes per run).
EPOCHS = 6 if GPU else 2
COMPILE = GPU
CLI_TIMEOUT_S = 300 if GPU else 900


# ------------------------------------------------------------------------------------------------ losses


def _pair(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, d, generator=g, dtype=torch.float64)
    return t, 0.6 * t + torch.randn(b, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [None, 0.5], ids=["hard", "soft"])
@pytest.mark.parametrize("graph_size", [None, 8], ids=["one-graph", "groups-of-8"])
def test_ega_on_the_device_equals_float64_on_cpu(temperature: float | None, graph_size: int | None) -> None:
    t, s = _pair(32, 24, 0)
    loss = EGALoss(0.8, 0.24, temperature, graph_size=graph_size)
    s64 = s.clone().requires_grad_(True)
    ref = loss(t, s64)
    ref.backward()
    s_dev = s.float().to(DEVICE).requires_grad_(True)
    got = loss(t.float().to(DEVICE), s_dev)
    got.backward()
    assert got.device.type == DEVICE.type and got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(s_dev.grad.cpu().double(), s64.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("temperature", [None, 0.5], ids=["hard", "soft"])
def test_ega_of_bf16_autocast_embeddings_equals_float64_of_the_same_values(temperature: float | None) -> None:
    torch.manual_seed(0)
    proj = torch.nn.Linear(24, 16).to(DEVICE)
    t, s = (x.float().to(DEVICE) for x in _pair(32, 24, 1))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        emb_t, emb_s = proj(t), proj(s)
        got = EGALoss(0.8, 0.24, temperature, graph_size=8)(emb_t, emb_s)
    assert emb_t.dtype == emb_s.dtype == torch.bfloat16
    assert got.dtype == torch.float32  # the graph is computed in float32 under autocast
    ref = EGALoss(0.8, 0.24, temperature, graph_size=8)(emb_t.detach().cpu().double(), emb_s.detach().cpu().double())
    assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)


BASELINES = sorted(set(DISTILLERS.names()) - {"ega"})


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_on_the_device_equals_float64_on_cpu(name: str) -> None:
    d = DistillConfig(method=name, embed_dim=24, **({"crd": {"negatives": 16}} if name == "crd" else {}))
    ref_loss = build_distiller(name, d, num_samples=64, seed=0).double()
    dev_loss = build_distiller(name, d, num_samples=64, seed=0).to(DEVICE)
    for step in range(2):  # twice: CRD's memory, updated by the first step, is used by the second
        t, s = _pair(16, 24, 10 + step)
        zt, zs = _pair(16, 10, 20 + step)
        labels = torch.tensor([0, 1, 2, 3, 0, 1, -1, -1, 4, 5, 6, 7, 8, 9, 4, 5])
        extra = {"labels": labels, "index": torch.arange(16) + 16 * step}
        ref = ref_loss(t, s, teacher_logits=zt, student_logits=zs, **extra)
        on_dev = {k: v.to(DEVICE) for k, v in extra.items()}
        f32 = lambda x: x.float().to(DEVICE)  # noqa: E731
        got = dev_loss(f32(t), f32(s), teacher_logits=f32(zt), student_logits=f32(zs), **on_dev)
        assert got.device.type == DEVICE.type and torch.isfinite(got)
        assert got.item() == pytest.approx(ref.item(), rel=1e-3, abs=1e-5), f"{name}, step {step}"


# ------------------------------------------------------------------------------------------ augmentation


def test_device_augmentation_has_the_statistics_it_has_on_cpu() -> None:
    """Random crops and flips draw from each device's own generator, so the views differ image by image; what
    must agree is their statistics, and the evaluation views (no randomness) exactly."""
    n = 256 if GPU else 64
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 120, 32).view(1, 1, 32, 1)  # brighter to the right: a flip shows
    images = (torch.randint(0, 120, (n, 32, 32, 3), generator=g) + ramp).to(torch.uint8)
    spec = TeacherSpec(512, 224, "bicubic", CLIP_MEAN, CLIP_STD)
    mean, std = (0.5, 0.45, 0.4), (0.25, 0.25, 0.3)

    def views(device: torch.device) -> dict[str, torch.Tensor]:
        vm = ViewMaker(
            pad=4, flip=True, student_size=32, student_mean=mean, student_std=std, device=device, teacher=spec
        )
        x = images.to(device)
        out = {
            "student": vm.student(x, train=True),
            "teacher": vm.teacher(x, train=True),
            "student_eval": vm.student(x, train=False),
            "teacher_eval": vm.teacher(x, train=False),
        }
        assert all(v.device.type == device.type for v in out.values())
        return {k: v.cpu() for k, v in out.items()}

    on_cpu, on_dev = views(CPU), views(DEVICE)
    torch.testing.assert_close(on_dev["student_eval"], on_cpu["student_eval"], rtol=0, atol=1e-5)
    torch.testing.assert_close(on_dev["teacher_eval"], on_cpu["teacher_eval"], rtol=0, atol=1e-3)
    for key, (m, s) in (("student", (mean, std)), ("teacher", (CLIP_MEAN, CLIP_STD))):
        a, b = on_cpu[key], on_dev[key]
        size = 32 if key == "student" else 224
        assert a.shape == b.shape == (n, 3, size, size)
        torch.testing.assert_close(b.mean(dim=(0, 2, 3)), a.mean(dim=(0, 2, 3)), rtol=0, atol=0.05)
        torch.testing.assert_close(b.std(dim=(0, 2, 3)), a.std(dim=(0, 2, 3)), rtol=0, atol=0.05)
        unit_a, unit_b = _unnormalize(a, m, s), _unnormalize(b, m, s)
        # crops: the share of the zero padding that came into the views
        pad_a, pad_b = _padding_share(unit_a), _padding_share(unit_b)
        assert pad_a == pytest.approx(pad_b, abs=0.03) and pad_a > 0.02, (key, pad_a, pad_b)
        # flips: the share of views brighter on the left (the images are brighter on the right)
        flip_a, flip_b = _flipped_share(unit_a), _flipped_share(unit_b)
        assert 0.35 < flip_a < 0.65 and 0.35 < flip_b < 0.65, (key, flip_a, flip_b)


def _unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


def _padding_share(unit: torch.Tensor) -> float:
    return (unit.abs().amax(1) < 1e-3).float().mean().item()


def _flipped_share(unit: torch.Tensor) -> float:
    w = unit.shape[-1] // 2
    return (unit[..., :w].mean((1, 2, 3)) > unit[..., w:].mean((1, 2, 3))).float().mean().item()


# ------------------------------------------------------------------------------------------- ega-ray runs


def device_settings(mode: str = "online") -> list[str]:
    """``--set`` overrides of configs/smoke.yaml for a run on the checked device."""
    s = [
        "scaling.num_workers=1",
        "optim.precision=bf16",
        "optim.channels_last=true",
        f"optim.compile={str(COMPILE).lower()}",
        f"optim.epochs={EPOCHS}",
        "optim.milestones=[100]",
        # a random teacher: CE on every label at a gentle lr lets the accuracy rise within a few short epochs
        "data.label_fraction=1.0",
        "optim.lr=0.01",
        "run.progress_bar=false",
    ]
    if GPU:
        share = 0.5 if mode == "pipeline" else 1.0  # the pipeline's worker and teacher actor share the GPU
        s += ["scaling.use_gpu=true", "scaling.cpus_per_worker=2", f"scaling.gpus_per_worker={share}"]
        s += ["teacher.actor_gpus=0.5"] if mode == "pipeline" else []
    else:
        s += ["scaling.use_gpu=false", "scaling.cpus_per_worker=1", "optim.max_steps_per_epoch=6"]
    return [arg for item in s for arg in ("--set", item)]


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


RAY_START_TIMEOUT = "The current node timed out during startup"


def ega_ray(log: Path, *args: str | Path) -> str:
    """Run the ``ega-ray`` command line in a subprocess (its own local Ray); its output goes to ``log``.

    Once, when the local Ray itself did not come up (Ray gives its raylet a fixed 30 s, which a small machine
    under others' load can miss), the command is run again from scratch: that is the machine, not ega-ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "ega_ray.cli", *map(str, args)]
    output = Path(args[args.index("--output") + 1])
    for attempt in (1, 2):
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=CLI_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"ega-ray {args[0]} ran past {CLI_TIMEOUT_S} s; its log ends:\n{_tail(log)}")
        text = log.read_text(errors="replace")
        if rc.returncode == 0 or attempt == 2 or RAY_START_TIMEOUT not in text:
            break
        print(f"ega-ray {args[0]}: the local Ray did not start in time; running it again")
        log.rename(log.with_suffix(".first-attempt.log"))
        shutil.rmtree(output, ignore_errors=True)
    if rc.returncode:
        pytest.fail(f"ega-ray {' '.join(map(str, args))} exited with {rc.returncode}; its log ends:\n{_tail(log)}")
    return text


def smoke_command(verb: str, out: Path, *extra: str, mode: str = "online") -> str:
    """``ega-ray <verb>`` of configs/smoke.yaml on the checked device into ``out``; its log is ``out``.log."""
    return ega_ray(out.with_suffix(".log"), verb, "--config", SMOKE, *device_settings(mode), *extra, "--output", out)


def distill(out: Path, mode: str, *extra: str) -> Path:
    smoke_command("distill", out, *extra, mode=mode)
    return out


def read_metrics(out: Path) -> list[dict[str, float]]:
    with open(out / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def latest_checkpoint(out: Path) -> Path:
    """The state file of the run's latest checkpoint, as Ray Train registered it (its path: the resume check
    also loads it unmapped, to see the device it was written on)."""
    result = ray.train.Result.from_path(str(out))
    assert result.checkpoint is not None, f"no registered checkpoint in {out}"
    return Path(result.checkpoint.path) / STATE_FILE


def check_run(out: Path) -> None:
    """What every distillation run on the checked device must show."""
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    for r in rows:
        for key in ("train_loss", "train_ce", "train_distill", "train_teacher_ce", "validation_top1", "test_top1"):
            assert math.isfinite(r[key]), (key, r)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], [r["train_loss"] for r in rows]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["optim"]["precision"] == "bf16" and cfg["optim"]["channels_last"] is True
    assert cfg["optim"]["compile"] is COMPILE and cfg["scaling"]["use_gpu"] is GPU
    state = latest_state(str(out.parent), out.name)  # the registered checkpoint, read on CPU
    assert state is not None, f"no registered checkpoint in {out}"
    fused = state["opt_s"]["param_groups"][0].get("fused")
    if GPU:
        top1 = [r["validation_top1"] for r in rows]
        assert max(top1[1:]) > top1[0] and max(top1) > 15.0, f"accuracy did not rise: {top1}"
        for r in rows:  # NVML's utilisation and the worker's peak memory are real readings on a GPU
            assert 0.0 < r["gpu_util_pct"] <= 100.0, r
            assert r["gpu_mem_peak_gib"] > 0.0, r
        assert fused is True, "SGD is fused on a GPU"
        log = out.with_suffix(".log").read_text(errors="replace")
        assert "optim.compile: running the" not in log, "torch.compile fell back to eager (see the run's log)"
    else:
        assert all(r["gpu_util_pct"] == 0.0 and r["gpu_mem_peak_gib"] == 0.0 for r in rows)
        assert not fused


def test_online_run_its_export_and_its_checkpoint_resumed_on_cpu(tmp_path: Path) -> None:
    """``ega-ray distill`` with the online teacher; then its exported student and its last checkpoint. One test:
    the three share the run, and one test per run lets pytest-xdist spread the runs over its workers."""
    out = distill(tmp_path / "run", "online")
    check_run(out)
    check_export(out)
    check_resume_on_cpu(out)


def check_export(out: Path) -> None:
    """The exported students load and run on the device and on CPU, alike: ``student_last.pt`` rebuilt by
    ``load_student`` on both (normalized images in, logits second), ``student_best.pt2`` (torch.export, images
    in [0, 1], no ega-ray needed) on CPU against its ``.pt``."""
    model, meta = load_student(out / "student_last.pt")
    size = meta["image_size"]
    x = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    normalized = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    best, _ = load_student(out / "student_best.pt")
    with torch.no_grad():
        ref = model(normalized)[1]
        on_dev = copy.deepcopy(model).to(DEVICE)(normalized.to(DEVICE))[1].cpu()
        program = torch.export.load(out / "student_best.pt2").module()(x)
        best_ref = best(normalized)[1]
    assert ref.shape == (8, meta["num_classes"]) and torch.isfinite(ref).all()
    torch.testing.assert_close(program, best_ref, rtol=1e-4, atol=1e-4)
    # cuDNN may convolve in TF32: agreement to about 1e-2 of the logits' scale
    torch.testing.assert_close(on_dev, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def check_resume_on_cpu(out: Path) -> None:
    """The run's last checkpoint (written by its worker on the checked device) is read on CPU and training goes
    on there, through the same restore as a worker's (``Parts.checkpointed().restore``). In-process rather than
    a second ``ega-ray distill`` into the same folder: a rerun there with another ``scaling.use_gpu`` is another
    config."""
    path = latest_checkpoint(out)
    if GPU:  # written on cuda: its tensors come back on cuda unless mapped
        raw = torch.load(path, weights_only=True)
        assert {v.device.type for v in raw["student"].values()} == {"cuda"}
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = load_config(out / "config.yaml", ["scaling.use_gpu=false", "optim.compile=false"])
    seed_everything(cfg.run.seed)
    teacher_dim = build_teacher(cfg.teacher.name, cfg.teacher.weights).spec.embed_dim
    p = build_parts(cfg, CPU, state["num_classes"], teacher_dim, num_indices=2000)
    p.checkpointed().restore(state)
    for k, v in unwrap(p.student_net).state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, state["student"][k]), k
    assert not p.opt_s.param_groups[0].get("fused"), "the CPU optimizer keeps its own implementation"
    assert p.opt_s.param_groups[0]["lr"] == state["opt_s"]["param_groups"][0]["lr"]
    assert all(s["momentum_buffer"].device.type == "cpu" for s in p.opt_s.state.values())
    split = read_decoded(cfg.data.train, cfg.data.image_size)
    before = [q.detach().clone() for q in p.student_net.parameters()]
    for step in range(3):
        rows = slice(64 * step, 64 * (step + 1))
        batch = {k: torch.from_numpy(np.asarray(v[rows])) for k, v in split.items()}
        with torch.no_grad():
            feat_t = p.teacher(p.views.teacher(batch["image"], train=True))
        losses = train_step(p, cfg.distill, batch, feat_t)
        assert torch.isfinite(torch.stack(tuple(losses))).all(), losses
    assert all(not torch.equal(a, b) for a, b in zip(before, p.student_net.parameters(), strict=True))


def test_one_step_twice_under_deterministic_kernels(tmp_path: Path) -> None:
    """run.deterministic's kernels: the same step from the same state twice, on the device. Records the
    largest difference of the losses and of the updated weights, and the operations PyTorch warned have no
    deterministic kernel (warn-only), in determinism.json (kept in the check's artifacts)."""
    cfg = resolve(load_config(SMOKE, ["augment.flip=true", f"scaling.use_gpu={GPU}"]))  # builtin:digits → its files
    set_up = deterministic_kernels(DEVICE)
    try:
        one_step_twice(cfg, set_up, tmp_path)
    finally:  # the other tests of this process keep PyTorch's defaults
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def one_step_twice(cfg, set_up: list[str], tmp_path: Path) -> None:
    import json
    import warnings

    assert bool(set_up) == GPU and (torch.are_deterministic_algorithms_enabled() or not GPU)
    split = read_decoded(cfg.data.train, cfg.data.image_size)
    batch = {k: torch.from_numpy(np.asarray(v[:64])).to(DEVICE) for k, v in split.items()}
    outcomes, warned = [], set()
    for _ in range(2):
        seed_everything(cfg.run.seed)
        teacher_dim = build_teacher(cfg.teacher.name, cfg.teacher.weights).spec.embed_dim
        p = build_parts(cfg, DEVICE, 10, teacher_dim, num_indices=2000)
        p.views.set_epoch(cfg.run.seed, 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                feat_t = p.teacher(p.views.teacher(batch["image"], train=True, index=batch["index"]))
            losses = train_step(p, cfg.distill, batch, feat_t)
        warned |= {str(w.message).split("\n")[0] for w in caught if "deterministic" in str(w.message)}
        weights = [q.detach().cpu().clone() for q in p.student_net.parameters()]
        outcomes.append((torch.stack(tuple(losses)).cpu(), weights))
    (l1, w1), (l2, w2) = outcomes
    report = {
        "device": str(DEVICE) if not GPU else torch.cuda.get_device_name(DEVICE),
        "settings": set_up,
        "max_abs_diff_loss": float((l1 - l2).abs().max()),
        "max_abs_diff_weights": max(float((a - b).abs().max()) for a, b in zip(w1, w2, strict=True)),
        "nondeterministic_ops": sorted(warned),
    }
    (tmp_path / "determinism.json").write_text(json.dumps(report, indent=2) + "\n")
    print("determinism:", json.dumps(report))
    assert math.isfinite(report["max_abs_diff_weights"])
    if not GPU:  # CPU kernels at a fixed thread count are deterministic
        assert report["max_abs_diff_weights"] == 0.0 and report["max_abs_diff_loss"] == 0.0


def test_cached_mode(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    smoke_command("cache-teacher", cache, "--views", "2")
    assert (cache / "manifest.json").is_file()
    out = tmp_path / "run"
    check_run(distill(out, "cached", "--set", "teacher.mode=cached", "--set", f"teacher.cache={cache}"))


def test_pipeline_mode_with_its_teacher_actor_on_a_gpu_share(tmp_path: Path) -> None:
    out = tmp_path / "run"
    check_run(distill(out, "pipeline", "--set", "teacher.mode=pipeline"))
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["teacher_stage_device"].startswith("cuda" if GPU else "cpu"), summary["teacher_stage_device"]
    assert summary["teacher_stage_rows"] >= summary["validation_rows"] + summary["test_rows"] + EPOCHS * 64


def test_pretrain_teacher_on_the_device(tmp_path: Path) -> None:
    out = tmp_path / "pretrain"
    smoke_command(
        "pretrain-teacher", out, "--set", "pretrain.epochs=1", "--set", f"pretrain.batch_size={128 if GPU else 256}"
    )
    rows = read_metrics(out)
    assert len(rows) == 1 and math.isfinite(rows[0]["train_loss"]) and 0.0 <= rows[0]["knn_top1"] <= 100.0
    assert (rows[0]["gpu_mem_peak_gib"] > 0.0) if GPU else (rows[0]["gpu_mem_peak_gib"] == 0.0), rows[0]
    teacher = build_teacher("ssl", weights=str(out / "teacher.pt"))
    x = torch.randn(4, 3, teacher.spec.input_size, teacher.spec.input_size, generator=torch.Generator().manual_seed(0))
    on_cpu = teacher(x)
    on_dev = copy.deepcopy(teacher).to(DEVICE)(x.to(DEVICE)).cpu()
    assert on_cpu.shape == (4, teacher.spec.embed_dim) and torch.isfinite(on_cpu).all()
    torch.testing.assert_close(on_dev, on_cpu, rtol=1e-2, atol=1e-2 * on_cpu.abs().max().item())
