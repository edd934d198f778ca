"""Where the frozen teacher runs (``teacher.mode``): one class per mode, the only place that knows the modes.

Each mode answers, for every layer that needs to know:

- ``check_config``: what the config must give for it (the config's validation),
- ``preflight``: what the driver checks before Ray starts,
- ``actors``: long-lived actors the run holds while it trains (a context manager),
- ``wire``: how the teacher's embeddings reach the splits (Ray Data),
- ``embed_evals``: how they reach the small evaluation splits the driver hands the workers,
- ``features``: the teacher features of one batch in the training worker (``bench/`` uses it too),
- ``teacher_in_worker``, ``shuffle_buffer``, ``feed``, ``summary``, ``inputs``: what the worker loop and the run
  folder need.

``online``: the teacher runs in every training worker on its own view of each batch. ``cached``: its
embeddings of K views per image come from ``ega-ray cache-teacher``'s folder, looked up by ``index``.
``pipeline``: the run's long-lived teacher actors embed a fresh view per image per epoch between the reader
and the workers. A new mode is a class here plus a line in ``TEACHER_MODES``. This module imports no torch
and no Ray at import (the config uses it); each method imports what it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

from ega_ray.constants import DATA_STAGE_CPUS, TEACHER_EMB

if TYPE_CHECKING:
    import numpy as np
    import ray.data
    import torch

    from ega_ray.config import Config, TeacherConfig
    from ega_ray.driver.preflight import PreparedData
    from ega_ray.models.teachers.base import TeacherSpec
    from ega_ray.worker.distill import Parts

# each worker's local shuffle buffer yields its first batch only once it holds this many of its batches:
# behind a teacher stage a large one would stall every epoch's start
STAGE_SHUFFLE_BATCHES = 4


class TeacherMode:
    name: ClassVar[str]
    teacher_in_worker: ClassVar[bool] = False  # the worker builds the frozen teacher and runs it every step

    def check_config(self, teacher: TeacherConfig) -> None:
        """Raise ValueError (one line) when the ``teacher`` section lacks what this mode needs."""

    def preflight(self, cfg: Config, spec: TeacherSpec) -> None:
        """Driver-side checks before Ray starts (a ConfigError naming the field)."""

    def actors(self, cfg: Config) -> AbstractContextManager[list]:
        """Actors the run holds while it trains (started on entry, stopped on exit)."""
        return nullcontext([])

    def wire(
        self,
        cfg: Config,
        data: PreparedData,
        train: ray.data.Dataset,
        evals: dict[str, ray.data.Dataset],
        actors: list,
        materialized: bool,
    ) -> tuple[ray.data.Dataset, dict[str, ray.data.Dataset]]:
        """The decoded splits (training, and the evaluation splits that travel through Ray Data, by name) with
        the teacher's embeddings attached where the worker expects them."""
        return train, evals

    def embed_evals(
        self, cfg: Config, splits: dict[str, dict[str, np.ndarray]], actors: list
    ) -> dict[str, dict[str, np.ndarray]]:
        """The small evaluation splits, decoded on the driver (by name: image, label, index), with what the
        worker needs to score the teacher's head on them (a mode whose worker runs the teacher needs nothing)."""
        return splits

    def shuffle_buffer(self, cfg: Config, per_worker: int) -> int:
        """Rows in each worker's local shuffle buffer."""
        return cfg.data.shuffle_buffer

    def feed(self, parts: Parts, batches: Iterator[dict], epoch: int, seed: int) -> Iterator[dict]:
        """The deterministic path's numpy training batches, with what this mode attaches in the worker."""
        return batches

    def features(self, parts: Parts, batch: dict[str, torch.Tensor], epoch: int, seed: int, train: bool):
        """The teacher's (B, D) float features of ``batch`` in the worker."""
        raise NotImplementedError

    def summary(self, actors: list) -> dict[str, Any]:
        """What this mode adds to the run's summary.json."""
        return {}

    def inputs(self, cfg: Config) -> dict[str, dict[str, Any]]:
        """The files this mode reads besides the data and the teacher's weights, by field, with their identity
        (what the run folder records: a resume on other files is refused)."""
        return {}


class Online(TeacherMode):
    name = "online"
    teacher_in_worker = True

    def features(self, parts, batch, epoch, seed, train):
        return parts.teacher(parts.views.teacher(batch["image"], train=train, index=batch["index"]))


class Cached(TeacherMode):
    name = "cached"

    def check_config(self, teacher: TeacherConfig) -> None:
        if not teacher.cache:
            raise ValueError("cache is required when mode is cached (the folder `ega-ray cache-teacher` writes)")

    def preflight(self, cfg: Config, spec: TeacherSpec) -> None:
        from ega_ray.data.cache_format import check_manifest

        check_manifest(cfg, spec)

    def inputs(self, cfg: Config) -> dict[str, dict[str, Any]]:
        from ega_ray import uris
        from ega_ray.data.cache_format import sha256_at

        # the manifest holds the SHA-256 of every embeddings file, checked against them by ``preflight``
        manifest = uris.join(str(cfg.teacher.cache), "manifest.json")
        return {"teacher.cache": {"path": str(cfg.teacher.cache), "manifest_sha256": sha256_at(manifest)}}

    def wire(self, cfg, data, train, evals, actors, materialized):
        from ega_ray.data.cache_format import attach_cached, load_cached_embeddings
        from ega_ray.data.teacher_stage import embed_with_actor_pool

        # large evaluation splits (small ones: ``embed_evals``): their view embedded once, before training
        evals = {
            k: embed_with_actor_pool(v, cfg, views=1, attach=True, augment=False).materialize()
            for k, v in evals.items()
        }
        table, position = load_cached_embeddings(str(cfg.teacher.cache), data.indices)
        lookup = {"table": table, "position": position}  # beside the workers, as every stage: DATA_STAGE_CPUS
        train = train.map_batches(attach_cached, fn_kwargs=lookup, batch_format="numpy", num_cpus=DATA_STAGE_CPUS)
        return train, evals

    def embed_evals(self, cfg, splits, actors):
        from ega_ray.data.teacher_stage import embed_splits, teacher_servers

        # teacher actors for the evaluation view only, stopped before training: the cache serves training
        with teacher_servers(cfg) as servers:
            return embed_splits(servers, splits, cfg.teacher.batch_size)

    def features(self, parts, batch, epoch, seed, train):
        import torch

        from ega_ray.data.teacher_stage import view_for

        emb = batch[TEACHER_EMB]
        if emb.shape[1] == 1:
            return emb[:, 0].float()
        chosen = view_for(batch["index"], epoch, seed, emb.shape[1])  # one of the K views per image and epoch
        return emb[torch.arange(len(chosen), device=emb.device), chosen].float()


class Pipeline(TeacherMode):
    name = "pipeline"

    def actors(self, cfg: Config) -> AbstractContextManager[list]:
        # long-lived: a Ray Data actor stage would start new actors, and build the teacher again, every epoch
        from ega_ray.data.teacher_stage import teacher_servers

        return teacher_servers(cfg)

    def wire(self, cfg, data, train, evals, actors, materialized):
        from ega_ray.data.teacher_stage import embed_remotely

        # light tasks that hand each batch to a long-lived teacher actor; a few in flight per actor keep it busy
        # (the evaluation splits here are the large ones: small ones take ``embed_evals``)
        stage = dict(batch_size=cfg.teacher.batch_size, batch_format="numpy", num_cpus=0, concurrency=2 * len(actors))
        evals = {
            k: v.map_batches(embed_remotely, fn_kwargs={"servers": actors, "augment": False}, **stage).materialize()
            for k, v in evals.items()
        }
        # blocks of one teacher batch: a task hands back its output when its input block is done, so a large
        # block (a whole materialized file) would reach the trainer as one late burst, not a stream. A
        # materialized split's blocks come in a new random order every epoch: the workers' local shuffle
        # buffer is kept small in this mode (it would wait for the stage to fill it)
        if cfg.run.deterministic:
            # a stage does not know the epoch, and every worker reads the whole split on this path: the
            # workers ask the actors themselves, for views keyed by (seed, epoch, index) (``features``)
            return train, evals
        train = train.repartition(target_num_rows_per_block=cfg.teacher.batch_size)
        train = train.randomize_block_order() if materialized else train
        train = train.map_batches(embed_remotely, fn_kwargs={"servers": actors, "augment": True}, **stage)
        return train, evals

    def embed_evals(self, cfg, splits, actors):
        from ega_ray.data.teacher_stage import embed_splits

        return embed_splits(actors, splits, cfg.teacher.batch_size)

    def shuffle_buffer(self, cfg: Config, per_worker: int) -> int:
        return min(cfg.data.shuffle_buffer, STAGE_SHUFFLE_BATCHES * per_worker)

    def feed(self, parts, batches, epoch, seed):
        import ray

        # the deterministic path has no stage: the run's teacher actors embed each batch's views keyed by
        # (seed, epoch, index), asked one batch ahead so that the teacher works while the student trains
        # (which actor does not matter: the same teacher, the same views)
        servers, pending = parts.teacher_servers, None
        for step, batch in enumerate(batches):
            rows = {"image": batch["image"], "index": batch["index"]}
            ref = servers[step % len(servers)].embed.remote(rows, True, epoch=epoch, seed=seed)
            if pending is not None:
                yield pending[0] | {TEACHER_EMB: ray.get(pending[1])[TEACHER_EMB]}
            pending = (batch, ref)
        if pending is not None:
            yield pending[0] | {TEACHER_EMB: ray.get(pending[1])[TEACHER_EMB]}

    def features(self, parts, batch, epoch, seed, train):
        return batch[TEACHER_EMB][:, 0].float()

    def summary(self, actors: list) -> dict[str, Any]:
        import ray

        # every epoch's training rows and the evaluation splits once (more if the run was restored), and
        # where the teacher actors ran
        return {
            "teacher_stage_rows": sum(ray.get([a.rows_embedded.remote() for a in actors])),
            "teacher_stage_device": ", ".join(sorted(set(ray.get([a.device_name.remote() for a in actors])))),
        }


TEACHER_MODES: dict[str, TeacherMode] = {mode.name: mode for mode in (Online(), Cached(), Pipeline())}
