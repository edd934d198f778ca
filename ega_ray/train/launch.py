"""The driver side, as Ray's guides lay it out: check everything that can be checked without a cluster
(``preflight``), connect to Ray, assemble the datasets and the TorchTrainer (ScalingConfig, RunConfig),
fit, and write the run folder from the reported checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ega_ray.config import Config
from ega_ray.data.images import decode_images
from ega_ray.data.parquet import mask_labels, read_decoded
from ega_ray.errors import ConfigError, DivergedError
from ega_ray.teacher_modes import TEACHER_MODES
from ega_ray.train.common import load_state
from ega_ray.train.outputs import export_student, plot_curves, write_config, write_json, write_metrics_csv
from ega_ray.train.preflight import PreparedData, check_distill, check_student, prepare_data, resolve, run_folder
from ega_ray.train.tracking import RunRecorder, epoch_lines, quiet_ray_logs

MATERIALIZE_AUTO_BYTES = 2 << 30
VAL_IN_MEMORY_BYTES = 256 << 20


def configure_ray_data() -> None:
    """This process's Ray Data settings: no progress bars (the run prints its own lines), and our own errors
    raised in a stage (a DataError naming the row) reach the driver as they are, not wrapped in a
    UserCodeException that loses them across processes, so the CLI prints them as one line."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True
    ctx.print_on_execution_start = False  # Ray Data's execution plans: Ray's, not the run's
    # Ray 2.60's default Parquet reader (V2) lists files by starting a pool of 32 FooterReader actors on
    # every read, for predicate and row-group push-down we never use (we read whole files): seconds of
    # process start-up per read, 5.4 s against 0.24 s for the same prepared split on 2 cores. V1 reads
    # the same files with plain tasks.
    ctx.use_datasource_v2 = False


def connect_ray(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``), or start a local Ray.

    A local Ray is told of at least enough logical CPUs for the workers plus one for Ray Data: on a
    2-core machine two 1-CPU workers would otherwise leave Ray Data no CPU and the run would hang. It is
    always a new one (``address="local"``): without that, Ray would join a cluster that ``ray start`` left
    running on this machine, and refuse the CPU count.
    """
    configure_ray_data()
    quiet_ray_logs(cfg.run.verbose)
    if ray.is_initialized():
        return
    level = logging.INFO if cfg.run.verbose else logging.WARNING  # Ray's own INFO lines only with --verbose
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=level)
        return
    s, t = cfg.scaling, cfg.teacher
    teacher_actor_cpus = 0.0 if s.use_gpu else t.actors * t.actor_cpus
    needed = math.ceil(s.num_workers * s.cpus_per_worker + teacher_actor_cpus) + 1
    # a preemption watcher is for spot nodes of a cluster; on one machine it only adds an actor (and Ray's
    # error-looking note about its arguments)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Data's processes (its coordinators, the workers' iterators) warn about settings made on purpose,
    # and Ray's own code about its deprecated internals: not the run's business unless --verbose
    quiet = {"RAY_DATA_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env = {} if cfg.run.verbose else {"runtime_env": {"env_vars": quiet}}
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), logging_level=level, **env)


def decoded_splits(
    cfg: Config, data: PreparedData, with_val: bool = True
) -> tuple[ray.data.Dataset, ray.data.Dataset | None, bool]:
    """The decoded, label-masked training split, the decoded validation split (None without ``with_val``:
    it travels another way), and whether they were materialized: small splits are kept in the object store,
    since re-reading and decoding them every epoch costs seconds of Ray Data start-up per epoch, more than
    training on them."""
    size = cfg.data.image_size
    train = (
        ray.data.read_parquet(cfg.data.train)
        .map_batches(decode_images, fn_kwargs={"image_size": size, "split": "data.train"}, batch_format="numpy")
        .map_batches(mask_labels, fn_kwargs={"keep": data.keep}, batch_format="numpy")
    )
    val = None
    if with_val:
        val = ray.data.read_parquet(cfg.data.val).map_batches(
            decode_images, fn_kwargs={"image_size": size, "split": "data.val"}, batch_format="numpy"
        )
    decoded_bytes = (data.num_train + data.num_val) * size * size * 3
    materialize = cfg.data.materialize == "always" or (
        cfg.data.materialize == "auto" and decoded_bytes < MATERIALIZE_AUTO_BYTES
    )
    if not materialize:
        return train, val, False
    return train.materialize(), None if val is None else val.materialize(), True


def fit(
    cfg: Config,
    train_fn,
    datasets: dict[str, ray.data.Dataset],
    args: Any,
    score: str | None,
    epochs: int,
    callbacks: list | None = None,
    console: bool = True,
    whole_train: bool = False,
) -> ray.train.Result:
    """One TorchTrainer over ``datasets`` (``train`` split between the workers), resuming from the run's
    latest checkpoint when it has one; keeps the best (by ``score``) and the latest checkpoints. Every epoch
    is recorded in the run folder (``RunRecorder``) and, with ``console``, printed as one line. ``whole_train``:
    every worker gets the whole ``train`` split (the deterministic path picks its rows by index). A run whose
    workers returned ``{"diverged": line}`` raises that DivergedError."""
    keep = {"checkpoint_score_attribute": score, "checkpoint_score_order": "max"} if score else {}
    out, config = cfg.output_dir, cfg.model_dump(mode="json")
    recorder = RunRecorder(str(out), cfg.run.name, epochs, cfg.run.loggers, config, cfg.run.verbose)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"cfg": config, "args": args},
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}
            | ({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=cfg.output_dir.name,
            storage_path=cfg.checkpoint_root,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[recorder, *(callbacks or [])],
            checkpoint_config=CheckpointConfig(num_to_keep=1, **keep),  # the latest is always kept too
            logging_config=ray.train.LoggingConfig(log_level="INFO" if cfg.run.verbose else "WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[] if whole_train else ["train"]),
    )
    if console:
        with epoch_lines(out, cfg.run.name, epochs):
            result = trainer.fit()
    else:
        result = trainer.fit()
    diverged = result.return_value.get("diverged") if isinstance(result.return_value, dict) else None
    if diverged:  # the workers stopped together at a non-finite loss (train.divergence): no output is written
        raise DivergedError(diverged)
    return result


def run_distill(cfg: Config, callbacks: list | None = None, trial: bool = False) -> dict[str, Any]:
    """Check, train with Ray Train, write the run folder; returns the summary. ``callbacks``: Ray Train
    callbacks (a Tune trial passes the one that forwards metrics to Tune, with ``trial``: no console lines,
    Tune's trial table is the display, and no ``.pt2`` program of the student)."""
    from ega_ray.train.distill import WorkerArgs, train_func_per_worker

    cfg = resolve(cfg)
    data, teacher_dim = check_distill(cfg)
    mode = TEACHER_MODES[cfg.teacher.mode]
    with run_folder(cfg, "distill") as out:
        write_config(cfg, out)
        t0 = time.time()
        connect_ray(cfg)
        # a validation split this small stays in the workers' memory after its first pass; when no teacher
        # stage must embed it, it is decoded here and handed over through the object store, without a Ray
        # Data pass (each pass starts a streaming executor: seconds, more than a small split's evaluation)
        keep_val = data.num_val * cfg.data.image_size**2 * 3 <= VAL_IN_MEMORY_BYTES
        val_on_driver = keep_val and mode.teacher_in_worker
        args = WorkerArgs(
            num_classes=data.num_classes,
            teacher_dim=teacher_dim,
            num_train=data.num_train,
            num_indices=int(data.indices.max()) + 1,
            keep_val=keep_val,
            val_split=ray.put(read_decoded(cfg.data.val, cfg.data.image_size)) if val_on_driver else None,
            progress_bar=cfg.run.progress_bar if cfg.run.progress_bar is not None else sys.stderr.isatty(),
        )
        with mode.actors(cfg) as actors:
            args.teacher_servers = actors
            train, val, materialized = decoded_splits(cfg, data, with_val=not val_on_driver)
            train, val = mode.wire(cfg, data, train, val, actors, materialized)
            datasets = {"train": train} | ({} if val_on_driver else {"val": val})
            result = fit(
                cfg, train_func_per_worker, datasets, args, "val_top1", cfg.optim.epochs, callbacks, not trial,
                whole_train=cfg.run.deterministic,
            )  # fmt: skip
            mode_summary = mode.summary(actors)
        return write_distill_outputs(cfg, data, result, out, time.time() - t0, not trial, mode_summary)


def write_distill_outputs(
    cfg: Config,
    data: PreparedData,
    result: ray.train.Result,
    out: Path,
    wall_s: float,
    deployable: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """metrics.csv, learning_curves.png, the exported students and summary.json (with ``extra``: what the
    teacher mode adds), from the checkpoints; the best student also as a ``.pt2`` program when
    ``deployable`` (a search's trials skip it: seconds each)."""
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
    export_student(cfg, last, out, "student_last", pt2=False)  # `ega-ray export` makes one when wanted
    export_student(cfg, best, out, "student_best", pt2=deployable)
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
        "wall_time_s": round(wall_s, 1),
        "output": str(out),
    } | (extra or {})
    write_json(summary, out / "summary.json")
    return summary


def run_pretrain(cfg: Config) -> dict[str, Any]:
    """SimCLR-pretrain the self-supervised teacher; writes ``<output>/teacher.pt`` (loadable as ``ssl``)."""
    from ega_ray.models.students import build_student
    from ega_ray.models.teachers.ssl_teacher import save_ssl_teacher
    from ega_ray.train.pretrain import pretrain_func_per_worker, teacher_input_size

    cfg = resolve(cfg, check_teacher_file=False)
    if cfg.pretrain.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"pretrain.batch_size {cfg.pretrain.batch_size} must be a multiple of "
            f"scaling.num_workers {cfg.scaling.num_workers}"
        )
    check_student(cfg.pretrain.arch, "pretrain.arch")
    data = prepare_data(cfg)
    with run_folder(cfg, "pretrain-teacher") as out:
        write_config(cfg, out)
        t0 = time.time()
        connect_ray(cfg)
        train, val, _ = decoded_splits(cfg, data)
        datasets = {"train": train, "knn_train": train, "val": val}
        result = fit(cfg, pretrain_func_per_worker, datasets, None, None, cfg.pretrain.epochs)
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
