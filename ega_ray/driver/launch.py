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
from typing import Any

import numpy as np
import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ega_ray.config import Config
from ega_ray.constants import DATA_STAGE_CPUS, LOCAL_HEALTH_CHECK_INTERVAL_S
from ega_ray.data.images import decode_images
from ega_ray.data.parquet import mask_labels, read_decoded, select_rows
from ega_ray.data.split_files import unreadable_named
from ega_ray.driver.checkpoints import check_resume, remove_unregistered, run_dir
from ega_ray.driver.nodes import Written, check_cluster, max_failures
from ega_ray.driver.outputs import (
    SELECTION_METRIC,
    checkpoint_location,
    plot_curves,
    write_config,
    write_distill_outputs,
    write_json,
)
from ega_ray.driver.preflight import (
    PreparedData,
    check_batch_rows,
    check_distill,
    check_student,
    data_splits,
    prepare_data,
    resolve,
    run_folder,
)
from ega_ray.driver.tracking import METRICS_CSV, RunRecorder, epoch_lines, write_rows
from ega_ray.errors import ConfigError, DivergedError
from ega_ray.ray_logs import quiet_ray_logs
from ega_ray.teacher_modes import TEACHER_MODES
from ega_ray.worker.common import load_state

MATERIALIZE_AUTO_BYTES = 2 << 30
LOCAL_WORKER_START_TIMEOUT_S = 600  # a local Ray's worker-group start (Ray Train's default: 60 s)
VALIDATION_ROWS = "validation_rows.json"  # the run folder's record of the validation split
VAL_IN_MEMORY_BYTES = 256 << 20


def configure_ray_data() -> None:
    """This process's Ray Data settings: no progress bars (the run prints its own lines), and our own errors
    raised in a stage (a DataError naming the row) reach the driver as they are, not wrapped in a
    UserCodeException that loses them across processes, so the CLI prints them as one line."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True
    ctx.print_on_execution_start = False  # Ray Data's execution plans: Ray's, not the run's
    # Ray 2.60's default Parquet reader (V2) starts a pool of actors on every read for push-downs that
    # whole-file reads never use; V1 reads the same files with plain tasks (docs/data.md has the cost)
    ctx.use_datasource_v2 = False


def connect_ray(cfg: Config, written: Written | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``) and check its nodes (``written``:
    where they write, default the run's checkpoints; ``ega_ray.driver.nodes``), or start a local Ray.

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
        for note in check_cluster(cfg, written):  # every node, before any training worker starts
            print(f"[nodes] {note}", flush=True)
        return
    s, t = cfg.scaling, cfg.teacher
    teacher_actor_cpus = 0.0 if s.use_gpu else t.actors * t.actor_cpus
    needed = math.ceil(s.num_workers * s.cpus_per_worker + teacher_actor_cpus) + 1
    set_local_train_defaults()  # before the start: Ray's processes (a Tune trial's too) inherit them
    # Ray Data's processes (its coordinators, the workers' iterators) warn about settings made on purpose,
    # and Ray's own code about its deprecated internals: not the run's business unless --verbose
    quiet = {"RAY_DATA_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env = {} if cfg.run.verbose else {"runtime_env": {"env_vars": quiet}}
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), logging_level=level, **env)


def set_local_train_defaults() -> None:
    """Ray Train's settings for a run on one machine, each only where the user left it unset
    (docs/performance.md, "A local Ray on a busy machine", says why and what each costs or saves)."""
    # a preemption watcher is for spot nodes of a cluster; on one machine it only adds an actor (and Ray's
    # error-looking note about its arguments)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Train gives a worker group 60 s to be placed and started, then tears it down and tries again; on a
    # busy small machine the start alone can take longer, and every retry starts over
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(LOCAL_WORKER_START_TIMEOUT_S))
    # the controller learns of a started, reporting or finished worker group only when it polls: at Ray's
    # 2 s each short run and each Tune trial waits idle at every step; a poll of local workers costs little
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(LOCAL_HEALTH_CHECK_INTERVAL_S))


EVAL_SPLITS = ("validation", "test")  # evaluated every epoch; only the validation split selects


def eval_source(cfg: Config, data: PreparedData, split: str) -> tuple[str, str, np.ndarray | None]:
    """Where an evaluation split's rows are: its Parquet path, the field naming that path (in a decoding
    error), and for the validation rows carved from the training split the mask (by index) of those rows
    (None: the whole split)."""
    if split == "validation" and data.carved is not None:
        return cfg.data.train, "data.train", data.carved
    return getattr(cfg.data, split), f"data.{split}", None


def read_split(path: str, image_size: int, field: str, wanted: np.ndarray | None) -> ray.data.Dataset:
    """A split read through Ray Data (only the rows ``wanted`` marks, when given) and decoded, each task on
    a fraction of a CPU (:data:`~ega_ray.constants.DATA_STAGE_CPUS`)."""
    ds = ray.data.read_parquet(path, num_cpus=DATA_STAGE_CPUS)
    if wanted is not None:  # before decoding: the rows left out are never decoded
        ds = ds.map_batches(select_rows, fn_kwargs={"wanted": wanted}, batch_format="numpy", num_cpus=DATA_STAGE_CPUS)
    decode = {"image_size": image_size, "split": field}
    return ds.map_batches(decode_images, fn_kwargs=decode, batch_format="numpy", num_cpus=DATA_STAGE_CPUS)


def decoded_splits(
    cfg: Config, data: PreparedData, evals: tuple[str, ...] = EVAL_SPLITS
) -> tuple[ray.data.Dataset, dict[str, ray.data.Dataset], bool]:
    """The decoded, label-masked training split (less the carved validation rows), the decoded evaluation
    splits named in ``evals`` (the others travel another way), and whether they were materialized: small
    splits are kept in the object store, since re-reading and decoding them every epoch costs seconds of
    Ray Data start-up per epoch, more than training on them."""
    size = cfg.data.image_size
    train = read_split(cfg.data.train, size, "data.train", data.trained).map_batches(
        mask_labels, fn_kwargs={"keep": data.keep}, batch_format="numpy", num_cpus=DATA_STAGE_CPUS
    )
    splits = {}
    for split in evals:
        path, field, wanted = eval_source(cfg, data, split)
        splits[split] = read_split(path, size, field, wanted)
    decoded_bytes = (data.num_train + data.num_validation + data.num_test) * size * size * 3
    materialize = cfg.data.materialize == "always" or (
        cfg.data.materialize == "auto" and decoded_bytes < MATERIALIZE_AUTO_BYTES
    )
    if not materialize:
        return train, splits, False
    return train.materialize(), {k: v.materialize() for k, v in splits.items()}, True


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
    restarts = max_failures(cfg.run.max_failures, cfg.run.storage, sum(n["Alive"] for n in ray.nodes()))
    ifname = cfg.scaling.socket_ifname
    socket_env = {"GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": ifname} if ifname else {}
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
            failure_config=FailureConfig(max_failures=restarts),
            callbacks=[recorder, *(callbacks or [])],
            checkpoint_config=CheckpointConfig(num_to_keep=1, **keep),  # the latest is always kept too
            logging_config=ray.train.LoggingConfig(log_level="INFO" if cfg.run.verbose else "WARNING"),
            worker_runtime_env={"env_vars": socket_env} if socket_env else None,
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[] if whole_train else ["train"]),
    )
    try:
        if console:
            with epoch_lines(out, cfg.run.name, epochs):
                result = trainer.fit()
        else:
            result = trainer.fit()
    finally:  # an upload cut short (a full disk, an error) leaves no checkpoint folder behind
        remove_unregistered(run_dir(cfg.checkpoint_root, cfg.output_dir.name))
    diverged = result.return_value.get("diverged") if isinstance(result.return_value, dict) else None
    if diverged:  # the workers stopped together at a non-finite loss (worker.divergence): no output is written
        raise DivergedError(diverged)
    return result


def run_distill(cfg: Config, callbacks: list | None = None, trial: bool = False) -> dict[str, Any]:
    """Check, train with Ray Train, write the run folder.

    Everything that can be checked before Ray starts is (``preflight``); on a cluster every node is checked
    before the run folder is claimed (``nodes``); a run folder with the same settings and inputs resumes.

    Args:
        cfg: the run's config (relative paths resolve against the current directory).
        callbacks: Ray Train callbacks; a Tune trial passes the one that forwards metrics to Tune.
        trial: a Tune trial's run: no console lines (Tune's trial table is the display) and no ``.pt2``
            program of the student.

    Returns:
        The run's summary, as written to ``summary.json``.
    """
    from ega_ray.worker.distill import WorkerArgs, train_func_per_worker

    cfg = resolve(cfg)
    data, teacher_dim = check_distill(cfg)
    mode = TEACHER_MODES[cfg.teacher.mode]
    if os.environ.get("RAY_ADDRESS"):
        connect_ray(cfg)  # a cluster's nodes are checked before the run folder is claimed
    # a damaged Parquet page is found where rows are read (Ray Data tasks, the workers): named in one line
    with run_folder(cfg, "distill") as out, unreadable_named(data_splits(cfg)):
        check_resume(cfg.checkpoint_root, out.name)  # a checkpoint that does not load: refused before Ray starts
        write_config(cfg, out)
        if not trial:  # the run folder is on the driver's host; the checkpoints may be in a bucket
            print(f"[run] folder {out}; checkpoints {checkpoint_location(cfg, out)}", flush=True)
        t0 = time.time()
        connect_ray(cfg)
        write_json(data.validation, out / VALIDATION_ROWS)
        # evaluation splits this small stay in the workers' memory after their first pass; they are decoded here,
        # given the teacher's embeddings where the mode needs them (its teacher actors), and handed over through
        # the object store, without a Ray Data pass (each pass starts a streaming executor, and a teacher stage its
        # own actor pool: seconds, more than a small split's evaluation)
        rows = {"validation": data.num_validation, "test": data.num_test}
        keep_eval = all(n * cfg.data.image_size**2 * 3 <= VAL_IN_MEMORY_BYTES for n in rows.values())
        with mode.actors(cfg) as actors:
            eval_splits = dict.fromkeys(EVAL_SPLITS)  # None: read through Ray Data by the workers
            if keep_eval:
                decoded = {}
                for split in EVAL_SPLITS:
                    path, field, wanted = eval_source(cfg, data, split)
                    decoded[split] = read_decoded(path, cfg.data.image_size, field, wanted)
                eval_splits = {k: ray.put(v) for k, v in mode.embed_evals(cfg, decoded, actors).items()}
            args = WorkerArgs(
                num_classes=data.num_classes,
                teacher_dim=teacher_dim,
                num_train=data.num_train,
                train_indices=data.indices if data.trained is None else data.indices[data.trained[data.indices]],
                num_indices=int(data.indices.max()) + 1,
                keep_eval=keep_eval,
                eval_splits=eval_splits,
                progress_bar=cfg.run.progress_bar if cfg.run.progress_bar is not None else sys.stderr.isatty(),
                teacher_servers=actors,
            )
            train, evals, materialized = decoded_splits(cfg, data, () if keep_eval else EVAL_SPLITS)
            train, evals = mode.wire(cfg, data, train, evals, actors, materialized)
            datasets, epochs = {"train": train} | evals, cfg.optim.epochs
            result = fit(
                cfg, train_func_per_worker, datasets, args, SELECTION_METRIC, epochs, callbacks, not trial,
                whole_train=cfg.run.deterministic,
            )  # fmt: skip
            mode_summary = mode.summary(actors)
        return write_distill_outputs(cfg, data, result, out, time.time() - t0, not trial, mode_summary)


def run_pretrain(cfg: Config) -> dict[str, Any]:
    """SimCLR-pretrain the self-supervised teacher with Ray Train.

    Args:
        cfg: the config; its ``pretrain`` section and ``data.train`` (the validation rows carved from it are
            held out of pretraining).

    Returns:
        The summary (kNN top-1 on the test split, the teacher file: ``<output>/teacher.pt``, loadable as
        teacher ``ssl:<path>``).
    """
    from ega_ray.models.students import build_student
    from ega_ray.models.teachers.ssl_teacher import save_ssl_teacher
    from ega_ray.worker.pretrain import pretrain_func_per_worker, teacher_input_size

    cfg = resolve(cfg, check_teacher_file=False)
    if cfg.pretrain.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"pretrain.batch_size {cfg.pretrain.batch_size} must be a multiple of "
            f"scaling.num_workers {cfg.scaling.num_workers}"
        )
    check_student(cfg.pretrain.arch, "pretrain.arch")
    data = prepare_data(cfg)
    check_batch_rows(data.num_train, cfg.pretrain.batch_size, cfg.scaling.num_workers, "pretrain.batch_size")
    with run_folder(cfg, "pretrain-teacher") as out, unreadable_named(data_splits(cfg)):
        check_resume(cfg.checkpoint_root, out.name)
        write_config(cfg, out)
        t0 = time.time()
        write_json(data.validation, out / VALIDATION_ROWS)  # held out of pretraining too
        connect_ray(cfg)
        train, evals, _ = decoded_splits(cfg, data, ("test",))
        datasets = {"train": train, "knn_train": train, "test": evals["test"]}  # kNN reported on test
        result = fit(cfg, pretrain_func_per_worker, datasets, None, None, cfg.pretrain.epochs)
        (out / "summary.json").unlink(missing_ok=True)  # written last, as for a distillation
        state = load_state(result.checkpoint)
        history = state["history"]
        write_rows(out / METRICS_CSV, history)
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
            "knn_test_top1": knn,  # the kNN probe on data.test (nothing is selected on it)
            "teacher": str(out / "teacher.pt"),
            "wall_time_s": round(time.time() - t0, 1),
        }
        write_json(summary, out / "summary.json")
        return summary
