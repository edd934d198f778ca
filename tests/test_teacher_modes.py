"""Teacher modes through the real Ray Data + Ray Train path: a K-view cache, a cached-mode run, the
manifest check, and the pipeline mode (the run's teacher actors behind a Ray Data stage) on CPU."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from ega_ray.config import ConfigError, load_config
from ega_ray.data.cache_format import check_manifest, file_digests, load_cached_embeddings
from ega_ray.data.teacher_stage import view_for
from ega_ray.driver.launch import run_distill
from ega_ray.driver.preflight import resolve
from ega_ray.models import build_student, build_teacher

REPO = Path(__file__).resolve().parents[1]


def smoke(tmp_path: Path, teacher_file: Path, *overrides: str):
    return load_config(
        REPO / "configs" / "smoke.yaml",
        [f"run.output={tmp_path / 'run'}", f"teacher.weights={teacher_file}", *overrides],
    )


def test_view_choice_is_deterministic_and_balanced():
    index = torch.arange(10_000)
    a, b = view_for(index, 3, 0, 4), view_for(index, 3, 0, 4)
    assert torch.equal(a, b)
    counts = torch.bincount(a, minlength=4).float()
    assert counts.min() > 0.2 * len(index) and counts.max() < 0.3 * len(index)
    assert (view_for(index, 4, 0, 4) != a).float().mean() > 0.5, "another epoch picks other views"


def test_a_cache_has_every_view_of_every_row_and_a_changed_one_is_refused(
    tmp_path, teacher_resnet8, teacher_cache_2_views
):
    """The session's 2-view cache (``build_cache``, shared with test_reproducible.py, whose cached-mode runs
    train from it), checked row by row, then changed on a copy: refused by its manifest."""
    shared, summary = teacher_cache_2_views
    shutil.copytree(shared, tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["views"] == 2 and manifest["teacher"] == "zoo:resnet8" and manifest["weights"].startswith("sha256:")
    table = pq.read_table(tmp_path / "cache" / "embeddings")
    assert table.num_rows == summary["rows"] == 2 * 1437
    index, view = table["index"].to_numpy(), table["view"].to_numpy()
    assert sorted(zip(index.tolist(), view.tolist(), strict=True)) == [(i, v) for i in range(1437) for v in range(2)]
    emb = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    assert emb.shape == (2874, 64) and np.isfinite(emb).all()
    first = {v: emb[(index == 0) & (view == v)][0] for v in range(2)}
    assert not np.allclose(first[0], first[1]), "the two views of an image are different augmentations"
    cached_overrides = ("teacher.mode=cached", f"teacher.cache={tmp_path / 'cache'}")
    cached = smoke(tmp_path, teacher_resnet8, *cached_overrides)

    # a cache changed after its manifest was written is refused, and so is one that lacks views
    spec = build_teacher("zoo:resnet8", weights=str(teacher_resnet8)).spec
    part = sorted((tmp_path / "cache" / "embeddings").glob("*.parquet"))[0]
    genuine = part.read_bytes()
    changed = pq.read_table(part)
    emb = np.stack(changed["embedding"].to_numpy(zero_copy_only=False))
    emb[0] += 1
    pq.write_table(changed.set_column(2, "embedding", pa.array(list(emb), changed.schema.field(2).type)), part)
    with pytest.raises(
        ConfigError, match=rf"differs from what its manifest recorded: embeddings/{part.name} \(changed\)"
    ):
        check_manifest(resolve(cached), spec)
    part.write_bytes(genuine)
    full = pq.read_table(tmp_path / "cache" / "embeddings")
    manifest_file = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for p in (tmp_path / "cache" / "embeddings").glob("*.parquet"):
        p.unlink()
    pq.write_table(full.slice(50), part)  # 50 view rows gone, manifest rewritten to match the files
    manifest["files"] = file_digests(tmp_path / "cache" / "embeddings")
    manifest_file.write_text(json.dumps(manifest))
    check_manifest(resolve(cached), spec)
    with pytest.raises(ConfigError, match=r"lacks 25 training images|lacks 50 of its 2874 views"):
        load_cached_embeddings(str(tmp_path / "cache"), np.arange(1437))

    torch.manual_seed(2)
    other = tmp_path / "other.pt"
    torch.save(build_student("resnet8").state_dict(), other)
    with pytest.raises(ConfigError, match=r"teacher.cache: .* weights"):
        run_distill(smoke(tmp_path, other, *cached_overrides))
    with pytest.raises(ConfigError, match=r"augmentation"):
        run_distill(smoke(tmp_path, teacher_resnet8, "augment.pad=2", *cached_overrides))


@pytest.mark.xdist_group("pipeline-run")  # on the test process whose Ray ran it: its CPUs are checked below
def test_pipeline_mode_feeds_every_epoch_through_the_runs_teacher_actors(pipeline_run, teacher_resnet8, local_ray):
    # the streaming path, where the teacher runs as a Ray Data stage (the deterministic path's pipeline runs
    # are in test_reproducible.py): the session's pipeline run (tests/conftest.py)
    run, summary = pipeline_run
    assert summary["epochs"] == 2
    # the run's long-lived teacher actors embedded every training row of both epochs (the carved validation
    # rows never) and both evaluation splits once: Ray Data did not start actors of its own per epoch, and
    # nothing was dropped on the way
    evaluated = summary["validation_rows"] + summary["test_rows"]
    assert summary["teacher_stage_rows"] == 2 * summary["train_rows"] + evaluated
    assert summary["teacher_stage_device"] == "cpu"  # where the actors ran
    assert json.loads((run / "summary.json").read_text()) == summary  # the file says so too
    # and they are gone with the run: every CPU of the cluster is free again
    deadline = time.monotonic() + 120  # Ray frees a finished run's placement groups asynchronously
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    # the teacher head's accuracy comes from embeddings computed by the stage, as in online mode
    teacher = build_teacher("zoo:resnet8", weights=str(teacher_resnet8))
    assert teacher.spec.embed_dim == 64
    assert 0.0 <= summary["test_teacher_head_top1_last"] <= 100.0


def test_small_evaluation_splits_get_the_evaluation_views_embedding_in_row_order(teacher_resnet8, local_ray):
    """``embed_splits`` (a cached or pipeline run's small evaluation splits): batches of two splits spread over
    two teacher actors come back in each split's row order, each row's embedding that of its evaluation view
    (no crop, no flip)."""
    from ega_ray.constants import TEACHER_EMB
    from ega_ray.data.teacher_stage import TeacherEmbedder, TeacherJob, embed_splits, teacher_servers

    cfg = resolve(smoke(Path("unused"), teacher_resnet8, "teacher.actors=2", "teacher.actor_cpus=0.5"))
    rng = np.random.default_rng(0)
    splits = {
        name: {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "index": np.arange(start, start + n)}
        for name, n, start in (("validation", 23, 100), ("test", 9, 500))
    }
    with teacher_servers(cfg) as servers:
        got = embed_splits(servers, splits, batch_size=5)  # 5 and 2 batches, the last ones of 3 and 4 rows
    assert list(got) == ["validation", "test"]
    direct = TeacherEmbedder(TeacherJob.from_config(cfg), views=1, attach=True)
    for name, rows in splits.items():
        assert set(got[name]) == {"image", "index", TEACHER_EMB}
        assert got[name][TEACHER_EMB].shape == (len(rows["index"]), 1, 64)
        for i in (0, 7, len(rows["index"]) - 1):  # one row at a time: no batch to mix rows up
            alone = direct.embed({"image": rows["image"][i : i + 1], "index": rows["index"][i : i + 1]}, augment=False)
            np.testing.assert_allclose(got[name][TEACHER_EMB][i], alone[TEACHER_EMB][0], atol=1e-2)
    assert not np.allclose(got["validation"][TEACHER_EMB][0], got["validation"][TEACHER_EMB][1]), (
        "rows differ, so their order is checked"
    )
