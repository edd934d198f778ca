"""The training step without Ray: ``build_parts`` + ``train_step`` (what every Ray Train worker runs and what
bench/throughput.py times bare), precision settings, and the benchmark's bare-step and profile helpers."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ega_ray.config import ConfigError, parse_config
from ega_ray.losses import EGALoss
from ega_ray.models.precision import compute_dtype
from ega_ray.worker.distill import build_parts, train_step

B, CLASSES = 16, 10


def _cfg(**optim):
    return parse_config(
        {
            "data": {"train": "unused", "test": "unused", "num_classes": CLASSES},
            "teacher": {"name": "zoo:resnet8"},
            "student": {"name": "resnet8"},
            "distill": {"ega": {"graph_size": 8}},
            "optim": {"batch_size": B} | optim,
        }
    )


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randint(0, 256, (B, 32, 32, 3), dtype=torch.uint8, generator=g),
        "label": torch.randint(0, CLASSES, (B,), generator=g),
        "index": torch.arange(B),
    }


@pytest.mark.filterwarnings("ignore:teacher zoo")
def test_step_loss_is_ce_plus_ega_and_the_step_updates_both_sides() -> None:
    cfg = _cfg()
    cpu = torch.device("cpu")
    p = build_parts(cfg, cpu, CLASSES, teacher_dim=64, num_indices=B)
    batch = _batch()
    feat_t = torch.randn(B, 64, generator=torch.Generator().manual_seed(1))
    # the loss the step must compute, from copies of the modules and the same student view
    student, t_head = copy.deepcopy(p.student_net), copy.deepcopy(p.t_head)
    state = p.views.generator.get_state()
    x = p.views.student(batch["image"], train=True)
    p.views.generator.set_state(state)
    emb_s, logits_s = student(x)
    emb_t, logits_t = t_head(feat_t)
    ega = EGALoss(graph_size=8)(emb_t, emb_s)
    expected = F.cross_entropy(logits_s, batch["label"]) + ega

    before_s = [t.detach().clone() for t in p.student_net.parameters()]
    before_t = [t.detach().clone() for t in p.t_head.parameters()]
    losses = train_step(p, cfg.distill, batch, feat_t)
    assert len(losses) == 5 and not any(x.requires_grad for x in losses)
    torch.testing.assert_close(losses[0], expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[2], ega.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[3], F.cross_entropy(logits_t, batch["label"]).detach(), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before_s, p.student_net.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before_t, p.t_head.parameters(), strict=True))


@pytest.mark.filterwarnings("ignore:teacher zoo")
def test_the_kd_term_is_its_own_step_loss_so_a_divergence_can_name_it() -> None:
    from ega_ray.losses.kd import KDLoss
    from ega_ray.worker.distill import step_losses

    cfg = _cfg()
    cfg.distill.alpha, cfg.distill.beta = 0.7, 0.0
    p = build_parts(cfg, torch.device("cpu"), CLASSES, teacher_dim=64, num_indices=B)
    feat_t = torch.randn(B, 64, generator=torch.Generator().manual_seed(1))
    state = p.views.generator.get_state()
    losses = step_losses(p, cfg.distill, _batch(), feat_t)
    p.views.generator.set_state(state)
    _, logits_s = p.student_net(p.views.student(_batch()["image"], train=True))
    _, logits_t = p.t_head(feat_t)
    kd = KDLoss(cfg.distill.kd_temperature)(logits_t, logits_s)
    torch.testing.assert_close(losses.kd, kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.loss, losses.ce + 0.7 * kd, rtol=1e-5, atol=1e-6)
    assert float(losses.distill) == 0.0


@pytest.mark.filterwarnings("ignore:teacher zoo")
def test_bf16_precision_runs_the_teacher_and_the_student_in_bf16_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert compute_dtype(_cfg().optim.precision, cpu) == torch.float32  # auto: fp32 on CPU
    assert compute_dtype("fp32", cpu) == torch.float32
    cfg = _cfg(precision="bf16")
    assert compute_dtype(cfg.optim.precision, cpu) == torch.bfloat16
    p = build_parts(cfg, cpu, CLASSES, teacher_dim=64, num_indices=B)
    assert all(t.dtype == torch.bfloat16 for t in p.teacher.parameters())
    assert all(t.dtype == torch.float32 for t in p.student_net.parameters())  # master weights stay fp32
    batch = _batch()
    feat_t = p.teacher(p.views.teacher(batch["image"], train=True))
    assert feat_t.dtype == torch.float32  # embeddings leave the teacher as fp32
    with p.autocast:
        emb_s, _ = p.train_student(p.views.student(batch["image"], train=True))
    assert emb_s.dtype == torch.bfloat16
    losses = train_step(p, cfg.distill, batch, feat_t)
    assert all(x.dtype == torch.float32 for x in losses) and torch.isfinite(torch.stack(losses)).all()


@pytest.mark.filterwarnings("ignore:teacher zoo")
def test_restore_takes_the_checkpoint_but_keeps_this_devices_optimizer() -> None:
    """A checkpoint's optimizer state carries its device's implementation (fused on a GPU); restored on
    another device, the weights, momenta and schedule come from it, the implementation stays this device's."""
    cfg, cpu = _cfg(), torch.device("cpu")
    p = build_parts(cfg, cpu, CLASSES, teacher_dim=64, num_indices=B)
    feat_t = torch.randn(B, 64, generator=torch.Generator().manual_seed(1))
    train_step(p, cfg.distill, _batch(), feat_t)
    p.sched_s.step()
    p.sched_t.step()
    state = copy.deepcopy(p.checkpointed().state())
    for key in ("opt_s", "opt_t"):
        state[key]["param_groups"][0]["fused"] = True  # as a GPU run saves it
    q = build_parts(cfg, cpu, CLASSES, teacher_dim=64, num_indices=B)
    q.checkpointed().restore(state)
    for a, b in zip(p.student_net.parameters(), q.student_net.parameters(), strict=True):
        assert torch.equal(a, b)
    for opt in (q.opt_s, q.opt_t):
        assert opt.param_groups[0]["fused"] is None, "this device's choice, not the checkpoint's"
    assert q.opt_s.param_groups[0]["lr"] == p.opt_s.param_groups[0]["lr"]
    assert q.sched_s.last_epoch == p.sched_s.last_epoch == 1
    momenta = [q.opt_s.state[w]["momentum_buffer"] for w in q.student_net.parameters()]
    assert all(
        torch.equal(m, p.opt_s.state[w]["momentum_buffer"])
        for m, w in zip(momenta, p.student_net.parameters(), strict=True)
    )


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    gpu = torch.device("cuda")
    assert compute_dtype(_cfg().optim.precision, gpu) == torch.float32  # auto falls back
    with pytest.raises(ConfigError, match="optim.precision: bf16 is not supported by Tesla V100"):
        compute_dtype(_cfg(precision="bf16").optim.precision, gpu)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ConfigError, match="optim.precision"):
        _cfg(precision="fp16")


@pytest.fixture
def bench_module():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import throughput

        yield throughput
    finally:
        sys.path.pop(0)


@pytest.mark.heavy
@pytest.mark.filterwarnings("ignore:teacher zoo")
@pytest.mark.parametrize("mode", ["online", "cached"])
def test_bench_bare_step_and_profile(bench_module, mode: str) -> None:
    raw = _cfg().model_dump(mode="json")
    raw["teacher"] |= {"mode": mode, "cache": "unused" if mode == "cached" else None}
    result = bench_module.bare_step(parse_config(raw), torch.device("cpu"), 0.05, teacher_dim=64, profile=True)
    assert result["img_per_s"] > 0 and result["gpu_mem_peak_gib"] == 0.0 and result["gpu_util_pct"] == 0.0
    rows = result["profile"]
    assert 0 < len(rows) <= 15
    shares = [r["share_pct"] for r in rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.0 + 1e-6
    ops = {r["op"] for r in rows}
    assert any("conv" in op for op in ops), ops  # the student's convolutions are among the top ops


def test_step_timer_counts_the_training_part_only() -> None:
    import time

    from ega_ray.worker.common import StepTimer

    timer = StepTimer(torch.device("cpu"), warmup=1)
    time.sleep(0.2)  # waiting for the first batch: in elapsed_s, not in the steady rate
    for _ in range(4):
        time.sleep(0.05)
        timer.step()
    timer.stop()
    time.sleep(0.3)  # evaluation after the epoch: in neither
    assert 10 * 3 / 0.15 * 0.6 < timer.images_per_s(10) <= 10 * 3 / 0.15 * 1.01
    assert 0.4 <= timer.elapsed_s() < 0.65
    assert timer.mean_utilization() == 0.0


@pytest.mark.filterwarnings("ignore:teacher zoo")
def test_lr_schedule_warms_up_then_decays_at_the_milestones() -> None:
    cfg = _cfg(lr=0.2, teacher_head_lr=0.04, warmup_epochs=3, milestones=[4, 6], lr_decay=0.1, epochs=7)
    p = build_parts(cfg, torch.device("cpu"), CLASSES, teacher_dim=64, num_indices=B)
    factors = [1 / 3, 2 / 3, 1.0, 1.0, 0.1, 0.1, 0.01]
    seen_s, seen_t = [], []
    for _ in factors:
        seen_s.append(p.opt_s.param_groups[0]["lr"])
        seen_t.append(p.opt_t.param_groups[0]["lr"])
        p.opt_s.step()
        p.opt_t.step()
        p.sched_s.step()
        p.sched_t.step()
    assert seen_s == pytest.approx([0.2 * f for f in factors])
    assert seen_t == pytest.approx([0.04 * f for f in factors])


def test_read_decoded_matches_the_images_written(tmp_path) -> None:
    import numpy as np

    from ega_ray.data.parquet import read_decoded, write_split

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), np.array([3, 1, 4, 1, 5])
    write_split(tmp_path / "val", images, labels)
    got = read_decoded(str(tmp_path / "val"), 8)
    order = np.argsort(got["index"])
    np.testing.assert_array_equal(got["index"][order], np.arange(5))
    np.testing.assert_array_equal(got["image"][order], images)  # PNG round trip is pixel-exact
    np.testing.assert_array_equal(got["label"][order], labels)
