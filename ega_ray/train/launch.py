"""The driver side: validate inputs, connect to Ray, assemble the TorchTrainer, write the run's outputs.

Everything that can be checked without a cluster (config, data splits, labels, teacher weights) is
checked before Ray starts.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ega_ray.config import EPOCHS_FIELD, Config, ConfigError
from ega_ray.data.parquet import (
    check_labels,
    check_split,
    decode_images,
    mask_labels,
    read_decoded,
    stratified_label_mask,
)
from ega_ray.data.teacher_stage import TeacherEmbedder, attach_cached, embed_remotely, teacher_servers
from ega_ray.errors import OutputFolderError
from ega_ray.models import Teacher, build_teacher
from ega_ray.run_folder import claim, remove_own, settings_differences
from ega_ray.train.common import load_state
from ega_ray.train.outputs import export_student, plot_curves, write_config, write_json, write_metrics_csv
from ega_ray.train.teacher_cache import (
    check_manifest,
    load_cached_embeddings,
    teacher_actor_resources,
    teacher_stage_args,
)


@dataclass
class PreparedData:
    num_classes: int
    keep: np.ndarray  # which training rows keep their label (by index)
    indices: np.ndarray  # the training split's index column
    num_train: int
    num_val: int


def prepare_data(cfg: Config) -> PreparedData:
    """Check both splits and their labels on the driver; choose the labeled subset. No Ray needed."""
    try:
        n_train = check_split(cfg.data.train, "data.train")
        n_val = check_split(cfg.data.val, "data.val")
        labels, index = check_labels(cfg.data.train, "data.train", n_train, unlabeled_ok=True)
        val_labels, _ = check_labels(cfg.data.val, "data.val", n_val, unlabeled_ok=False)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    seen = int(max(labels.max(), val_labels.max())) + 1
    if seen < 1:
        raise ConfigError(f"data.train: {cfg.data.train!r} has no labeled row (every label is -1)")
    num_classes = cfg.data.num_classes or seen
    if seen > num_classes:
        split, path = ("data.train", cfg.data.train) if labels.max() >= num_classes else ("data.val", cfg.data.val)
        raise ConfigError(
            f"data.num_classes: {num_classes}, but {split} {path!r} has label {seen - 1} "
            "(labels are 0..C-1, -1 unlabeled)"
        )
    keep = stratified_label_mask(labels, index, cfg.data.label_fraction, cfg.run.seed)
    return PreparedData(num_classes, keep, index, n_train, n_val)


def connect_ray(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``), or start a local Ray.

    A local Ray is told of at least enough logical CPUs for the workers plus one for Ray Data: on a
    2-core machine two 1-CPU workers would otherwise leave Ray Data no CPU and the run would hang.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    s, t = cfg.scaling, cfg.teacher
    teacher_actor_cpus = 0.0 if s.use_gpu else t.actors * t.actor_cpus
    needed = math.ceil(s.num_workers * s.cpus_per_worker + teacher_actor_cpus) + 1
    ray.init(num_cpus=max(os.cpu_count() or 1, needed))
    ray.data.DataContext.get_current().enable_progress_bars = False


def raise_data_errors_as_they_are() -> None:
    """Ray Data stages raise our own errors as they are (a DataError naming the row), not wrapped in a
    UserCodeException that loses them across processes: the CLI prints them as one line."""
    ray.data.DataContext.get_current().raise_original_map_exception = True


def _scaling(cfg: Config) -> ScalingConfig:
    s = cfg.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources)


MATERIALIZE_AUTO_BYTES = 2 << 30
VAL_IN_MEMORY_BYTES = 256 << 20


def _datasets(
    cfg: Config, data: PreparedData, with_val: bool = True, servers: list | None = None
) -> dict[str, ray.data.Dataset]:
    """Decoded, label-masked splits. Small splits are materialized once: re-reading and decoding them every
    epoch costs seconds of Ray Data start-up per epoch, more than training on them. ``with_val=False``: the
    validation split travels another way (see ``run_distill``).

    Teacher modes: ``cached`` attaches the cached embeddings by index; ``pipeline`` sends the (materialized)
    decoded split through the run's teacher actors (``servers``, see ``teacher_servers``) every epoch, so
    every epoch streams fresh views. In both, the validation split gets its teacher embeddings (evaluation
    view) once. Without ``servers`` a pipeline run's splits get no teacher stage (pretraining).
    """
    size = cfg.data.image_size
    raise_data_errors_as_they_are()
    train = (
        ray.data.read_parquet(cfg.data.train)
        .map_batches(decode_images, fn_kwargs={"image_size": size, "split": "data.train"}, batch_format="numpy")
        .map_batches(mask_labels, fn_kwargs={"keep": data.keep}, batch_format="numpy")
    )
    val = ray.data.read_parquet(cfg.data.val).map_batches(
        decode_images, fn_kwargs={"image_size": size, "split": "data.val"}, batch_format="numpy"
    )
    decoded_bytes = (data.num_train + data.num_val) * size * size * 3
    materialized = cfg.data.materialize == "always" or (
        cfg.data.materialize == "auto" and decoded_bytes < MATERIALIZE_AUTO_BYTES
    )
    if materialized:
        train, val = train.materialize(), val.materialize() if with_val else val
    mode = cfg.teacher.mode
    if mode == "cached":
        # embedded here, before training holds its resources: the stage's actors may need the same GPUs
        val = val.map_batches(
            TeacherEmbedder,
            fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "views": 1, "attach": True, "augment": False},
            **teacher_stage_args(cfg),
        ).materialize()
        table, position = load_cached_embeddings(str(cfg.teacher.cache), data.indices)
        train = train.map_batches(attach_cached, fn_kwargs={"table": table, "position": position}, batch_format="numpy")
    elif mode == "pipeline" and servers:
        # light tasks that hand each batch to a long-lived teacher actor; a few in flight per actor keep it busy
        stage = dict(batch_size=cfg.teacher.batch_size, batch_format="numpy", num_cpus=0, concurrency=2 * len(servers))
        val = val.map_batches(embed_remotely, fn_kwargs={"servers": servers, "augment": False}, **stage).materialize()
        # blocks of one teacher batch: a task hands back its output when its input block is done, so a large
        # block (a whole materialized file) would reach the trainer as one late burst, not a stream.
        # A materialized split's blocks come in a new random order every epoch: the workers' local
        # shuffle buffer is kept small in this mode (it would wait for the stage to fill it)
        train = train.repartition(target_num_rows_per_block=cfg.teacher.batch_size)
        train = train.randomize_block_order() if materialized else train
        train = train.map_batches(embed_remotely, fn_kwargs={"servers": servers, "augment": True}, **stage)
    return {"train": train, "val": val} if with_val else {"train": train}


def _fit(
    cfg: Config, train_fn, datasets: dict, extra: dict[str, Any], score: str | None, callbacks: list | None = None
) -> ray.train.Result:
    out = cfg.output_dir
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), **extra},
        scaling_config=_scaling(cfg),
        run_config=RunConfig(
            name=out.name,
            storage_path=cfg.checkpoint_root,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks,
            # the latest checkpoint is always kept too: best + latest
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=score, checkpoint_score_order="max"
            )
            if score
            else CheckpointConfig(num_to_keep=1),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit()


def run_distill(cfg: Config, callbacks: list | None = None) -> dict[str, Any]:
    """Validate, train with Ray Train, write the run folder; returns the summary. ``callbacks``: Ray Train
    callbacks (a Tune trial passes the one that forwards metrics to Tune)."""
    cfg = cfg.resolved()
    data = prepare_data(cfg)
    spec = check_teacher(cfg).spec
    if cfg.teacher.mode == "cached":
        check_manifest(cfg, spec)
    with run_folder(cfg, "distill") as out:
        return _distill(cfg, data, spec, out, callbacks)


def _distill(cfg: Config, data: PreparedData, spec, out: Path, callbacks: list | None) -> dict[str, Any]:
    from ega_ray.train.distill import train_func_per_worker

    write_config(cfg, out)
    t0 = time.time()
    connect_ray(cfg)
    bar = cfg.run.progress_bar if cfg.run.progress_bar is not None else sys.stderr.isatty()  # not in job logs
    # a validation split this small stays in the workers' memory after its first pass; with an online
    # teacher it is decoded here and handed over through the object store, without a Ray Data pass (each
    # pass starts a streaming executor: seconds, more than a small split's evaluation)
    keep_val = data.num_val * cfg.data.image_size**2 * 3 <= VAL_IN_MEMORY_BYTES
    val_on_driver = keep_val and cfg.teacher.mode == "online"
    extra = {
        "num_classes": data.num_classes,
        "teacher_dim": spec.embed_dim,
        "num_train": data.num_train,
        "num_indices": int(data.indices.max()) + 1,  # the size of a per-row memory (CRD)
        "keep_val": keep_val,
        "val_split": ray.put(read_decoded(cfg.data.val, cfg.data.image_size)) if val_on_driver else None,
        "bar": bar,
    }
    pipeline = cfg.teacher.mode == "pipeline"
    # the pipeline's teacher actors live for the whole run: Ray Data would start new ones every epoch
    with teacher_servers(cfg, teacher_actor_resources(cfg)) if pipeline else nullcontext([]) as servers:
        result = _fit(
            cfg, train_func_per_worker, _datasets(cfg, data, not val_on_driver, servers), extra, "val_top1", callbacks
        )
        teacher_rows = sum(ray.get([s.rows_embedded.remote() for s in servers]))
    last = load_state(result.checkpoint)
    best_ckpt = max(result.best_checkpoints, key=lambda cm: cm[1]["val_top1"])[0] if result.best_checkpoints else None
    best = load_state(best_ckpt) if best_ckpt is not None else last
    history = last["history"]
    write_metrics_csv(history, out / "metrics.csv")
    plot_curves(
        history,
        out / "learning_curves.png",
        f"{cfg.run.name}: {cfg.distill.method} (β={cfg.distill.beta}) {cfg.teacher.name} → {cfg.student.name}",
    )
    export_student(cfg, last, out, "student_last")
    export_student(cfg, best, out, "student_best")
    final = history[-1]
    summary = {
        "name": cfg.run.name,
        "method": cfg.distill.method if cfg.distill.beta > 0 else "ce-only",
        "teacher": cfg.teacher.name,
        "teacher_mode": cfg.teacher.mode,
        "student": cfg.student.name,
        "epochs": final["epoch"],
        "num_workers": cfg.scaling.num_workers,
        "global_batch": cfg.optim.batch_size,
        "labeled_train_rows": int(data.keep.sum()),
        "train_rows": data.num_train,
        "val_rows": data.num_val,
        "best_val_top1": last["best"]["val_top1"],
        "best_epoch": last["best"]["epoch"],
        "last_val_top1": final["val_top1"],
        "last_val_top5": final["val_top5"],
        "teacher_head_top1": final["val_teacher_top1"],
        "seed": cfg.run.seed,
        "wall_time_s": round(time.time() - t0, 1),
        "output": str(out),
        **({"teacher_stage_rows": teacher_rows} if pipeline else {}),  # every epoch's rows + the validation split
    }
    write_json(summary, out / "summary.json")
    return summary


def run_pretrain(cfg: Config) -> dict[str, Any]:
    """SimCLR-pretrain the self-supervised teacher; writes ``<output>/teacher.pt`` (loadable as ``ssl``)."""
    cfg = cfg.resolved(check_teacher=False)
    if cfg.pretrain.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"pretrain.batch_size {cfg.pretrain.batch_size} must be a multiple of "
            f"scaling.num_workers {cfg.scaling.num_workers}"
        )
    data = prepare_data(cfg)
    with run_folder(cfg, "pretrain-teacher") as out:
        return _pretrain(cfg, data, out)


def _pretrain(cfg: Config, data: PreparedData, out: Path) -> dict[str, Any]:
    from ega_ray.models.students import build_student
    from ega_ray.models.teachers.ssl_teacher import save_ssl_teacher
    from ega_ray.train.pretrain import pretrain_func_per_worker, teacher_input_size

    write_config(cfg, out)
    t0 = time.time()
    connect_ray(cfg)
    datasets = _datasets(cfg, data)
    datasets["knn_train"] = datasets["train"]
    result = _fit(cfg, pretrain_func_per_worker, datasets, {}, None)
    state = load_state(result.checkpoint)
    history = state["history"]
    write_metrics_csv(history, out / "metrics.csv")
    plot_curves(history, out / "learning_curves.png", f"{cfg.run.name}: SimCLR {cfg.pretrain.arch}")
    knn = next(row["knn_top1"] for row in reversed(history) if "knn_top1" in row)
    backbone = build_student(cfg.pretrain.arch)
    backbone.load_state_dict(
        {k.removeprefix("backbone."): v for k, v in state["net"].items() if k.startswith("backbone.")}
    )
    save_ssl_teacher(
        out / "teacher.pt",
        cfg.pretrain.arch,
        backbone,
        teacher_input_size(cfg),
        cfg.augment.student_mean,
        cfg.augment.student_std,
        knn_top1=knn,
        epochs=state["epoch"],
    )
    summary = {
        "name": cfg.run.name,
        "arch": cfg.pretrain.arch,
        "epochs": state["epoch"],
        "knn_top1": knn,
        "teacher": str(out / "teacher.pt"),
        "wall_time_s": round(time.time() - t0, 1),
    }
    write_json(summary, out / "summary.json")
    return summary


def check_teacher(cfg: Config) -> Teacher:
    """Build the teacher once on the driver, so that bad weights fail before workers start."""
    try:
        return build_teacher(cfg.teacher.name, cfg.teacher.weights, cfg.teacher.sha256)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        raise ConfigError(
            f"teacher: {cfg.teacher.name} with weights {cfg.teacher.weights!r}: {str(err).splitlines()[0]}"
        ) from None


@contextmanager
def run_folder(cfg: Config, command: str) -> Iterator[Path]:
    """The run's output folder, claimed for ``command`` (see ``ega_ray.run_folder``) and locked while the run
    lasts. A folder that already holds a run resumes it only if every setting that defines the results is the
    same, except that the number of epochs may be raised; otherwise it is refused, naming what differs,
    before anything is written."""
    out = cfg.output_dir
    settings = json.loads(json.dumps(cfg.result_settings(command)))  # as the marker stores them
    growing = EPOCHS_FIELD[command]

    def same_run(marker: dict[str, Any]) -> None:
        diffs = settings_differences(marker.get("settings", {}), settings, growing)
        if diffs:
            raise OutputFolderError(
                f"--output {out}: holds a run with other settings ({'; '.join(diffs)}); a rerun resumes it only "
                f"with the same settings ({growing} may be raised): choose another folder, or delete it to start over"
            )

    with claim(out, command, record={"settings": settings}, check=same_run):
        yield out


def clear_run(path: Path, command: str = "distill") -> None:
    """Remove a run folder that ``command`` wrote (or an empty one), so that the next run with its name starts
    fresh instead of resuming; anything else is refused (OutputFolderError)."""
    remove_own(path, command)
