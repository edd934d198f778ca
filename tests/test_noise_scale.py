"""The gradient noise scale (McCandlish et al. 2018): the two-batch estimator against exact expectations and
against a problem whose |G|² and tr(Σ) are known; the derived step and epoch factors; bench/noise_scale.py
end to end on the smoke config (real data, real models, no Ray)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ega_ray.tools.noise_scale import (
    NoiseScale,
    bootstrap_range,
    estimate_noise_scale,
    grad_sq_norms,
    measure_noise_scale,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("grad_sq", "trace_cov"), [(2.0, 50.0), (0.3, 900.0), (5.0, 0.0)])
def test_estimator_inverts_the_expected_batch_gradient_norm(grad_sq: float, trace_cov: float) -> None:
    def expected(b: int) -> float:  # E|G_b|² = |G|² + tr(Σ)/b
        return grad_sq + trace_cov / b

    s = estimate_noise_scale(expected(64), 64, expected(256), 256)
    assert s.grad_sq == pytest.approx(grad_sq)
    assert s.trace_cov == pytest.approx(trace_cov, abs=1e-9)
    assert s.b_simple == pytest.approx(trace_cov / grad_sq)


def test_measured_noise_scale_of_a_known_problem() -> None:
    """Per-example loss ½‖w − x‖² at w = 0 with x ~ N(μ, σ²I_d): G = −μ, tr(Σ) = dσ², B_noise = dσ²/|μ|²."""
    d, sigma = 40, 1.5
    mu = torch.full((d,), 0.25, dtype=torch.float64)  # |μ|² = 2.5, tr(Σ) = 90, B_noise = 36
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(0)

    def batch_losses(b: int) -> dict[str, torch.Tensor]:
        x = mu + sigma * torch.randn(b, d, dtype=torch.float64, generator=gen)
        return {"quadratic": 0.5 * ((w - x) ** 2).sum(1).mean(), "twice": ((w - x) ** 2).sum(1).mean()}

    scales = measure_noise_scale(batch_losses, [w], 8, 64, draws_small=2000, draws_big=1000)
    s = scales["quadratic"]
    assert s.grad_sq == pytest.approx(2.5, rel=0.1)
    assert s.trace_cov == pytest.approx(90.0, rel=0.1)
    assert s.b_simple == pytest.approx(36.0, rel=0.15)
    assert scales["twice"].b_simple == pytest.approx(s.b_simple, rel=0.15)  # a loss's scale does not move it
    lo, hi = s.b_simple_range
    assert lo < s.b_simple < hi and lo < 36.0 < hi and hi / lo < 1.6  # 3,000 draws: a narrow range around it
    assert w.grad is None  # measuring takes no step and leaves no gradient behind


def test_bootstrap_range_of_noiseless_draws_is_the_estimate_itself() -> None:
    small, big = np.full(8, 2.0 + 90 / 8), np.full(4, 2.0 + 90 / 64)  # E|G_b|² exactly, in every draw
    assert bootstrap_range(small, 8, big, 64) == pytest.approx((45.0, 45.0))
    few = bootstrap_range(small + np.linspace(-3, 3, 8), 8, big + np.linspace(-1, 1, 4), 64)
    assert few[0] < 45.0 < few[1]  # noisy draws widen it around the estimate


def test_grad_sq_norms_of_several_losses_from_one_forward() -> None:
    w = torch.tensor([3.0, -4.0], requires_grad=True)
    unused = torch.zeros(3, requires_grad=True)
    y = w * 2
    norms = grad_sq_norms({"a": (y**2).sum() / 4, "b": y.sum()}, [w, unused])  # ∇a = 2w, ∇b = (2, 2)
    assert norms == {"a": pytest.approx(100.0), "b": pytest.approx(8.0)}


def test_step_and_epoch_factors() -> None:
    s = NoiseScale(grad_sq=1.0, trace_cov=64.0)
    assert s.steps_ratio(256, 64) == pytest.approx((1 + 64 / 256) / (1 + 64 / 64))
    assert s.epochs_factor(256, 64) == pytest.approx(2.5)  # ×4 the batch, 0.625× the steps
    assert NoiseScale(1.0, 1e9).epochs_factor(256, 64) == pytest.approx(1.0, rel=1e-6)  # noise-dominated: linear
    assert NoiseScale(1.0, 0.0).epochs_factor(256, 64) == pytest.approx(4.0)  # no noise: as many steps
    lost = NoiseScale(grad_sq=-0.1, trace_cov=30.0)  # |G|² measured ≤ 0: the mean gradient is lost in the noise
    assert math.isinf(lost.b_simple) and lost.epochs_factor(256, 64) == pytest.approx(1.0)
    assert NoiseScale(grad_sq=2.0, trace_cov=-5.0).b_simple == 0.0  # no measurable noise: as if none


def test_estimator_needs_two_increasing_batch_sizes() -> None:
    with pytest.raises(ValueError, match="0 < b_small < b_big, got 256 and 64"):
        estimate_noise_scale(1.0, 256, 1.0, 64)


@pytest.mark.heavy
def test_bench_noise_scale_on_the_smoke_config(tmp_path: Path) -> None:
    out = tmp_path / "noise"
    cmd = [sys.executable, str(REPO / "bench" / "noise_scale.py"), "--config", str(REPO / "configs" / "smoke.yaml")]
    cmd += ["--at", "0", "1", "--batches", "64", "128", "--draws", "3", "2", "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "noise_scale.json").read_text())
    assert [r["epoch"] for r in summary["rows"]] == [0, 1]
    for row in summary["rows"]:
        assert set(row) == {"epoch", "lr", "loss", "distill", "ce"}
        assert all(math.isfinite(row[part][k]) for part in ("loss", "distill", "ce") for k in ("grad_sq", "trace_cov"))
    assert summary["batches"] == [64, 128] and summary["train_rows"] > 1000
    assert summary["epochs_factor"] > 0
    assert summary["noise_scale"] == statistics.median(r["loss"]["b_simple"] for r in summary["rows"][:1])
    assert (out / "noise_scale.png").stat().st_size > 10_000
    assert "the epochs of batch 64" in done.stdout

    bad = subprocess.run([*cmd[:4], "--batches", "48", "128", "--output", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "multiples of distill.ega.graph_size 64" in bad.stderr


def test_accuracy_guard_takes_its_rule_from_the_measurement(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import fast_path_accuracy as guard

    def overrides(*argv: str) -> list[str]:
        args = guard.parse_args(["--precision", "fp32", *argv])  # the script's own command line
        return guard.fast_overrides(args, "cpu", {"epochs": 30, "milestones": [20, 26]})

    linear = overrides()
    assert {"optim.lr_scaling=linear", "optim.warmup_epochs=5", "optim.epochs=30", "optim.milestones=[20, 26]"} <= set(
        linear
    )
    measured = tmp_path / "noise_scale.json"
    measured.write_text(json.dumps({"batches": [64, 256], "noise_scale": 41.0, "epochs_factor": 2.1238}))
    noise = overrides("--noise-json", str(measured))
    assert {"optim.lr_scaling=noise", "optim.noise_scale=41.0", "optim.warmup_epochs=0", "optim.batch_size=256"} <= set(
        noise
    )
    assert {"optim.epochs=64", "optim.milestones=[42, 55]"} <= set(noise)  # 30 × 2.12, milestones alike
    assert "optim.warmup_epochs=3" in overrides("--noise-json", str(measured), "--warmup-epochs", "3")  # a flag wins
    measured.write_text(json.dumps({"batches": [64, 512], "noise_scale": 41.0, "epochs_factor": 2.0}))
    with pytest.raises(SystemExit, match=r"measured for batches \[64, 512\], not \[64, 256\]"):
        overrides("--noise-json", str(measured))
