"""The frozen teacher as a Ray Data stage, for the ``cached`` and ``pipeline`` teacher modes.

``TeacherEmbedder`` is a callable class that Ray Data runs on an actor pool (GPU actors when the run uses
GPUs): each actor builds the teacher once, then embeds batches of uint8 images under the teacher's own
random views (crop + flip of the padded image, resized and normalized as the teacher expects), exactly the
view the online mode makes inside the training worker. It is told what it needs of the run by a
``TeacherJob`` (the teacher, its precision, the augmentation), not the whole config.

- ``cached``: K views of every training image, written once as Parquet rows (index, view, embedding) by
  ``ega-ray cache-teacher``; training looks embeddings up by ``index`` and samples one view per image per
  epoch (:func:`view_for`).
- ``pipeline``: one fresh view per image per epoch, attached to the streamed batch as ``teacher_emb``
  between the reader and the training workers, so the training devices run only the student. Ray Data
  starts a new actor pool for every execution, i.e. every epoch (importing torch and building the teacher
  each time: seconds, more than a GPU epoch of CIFAR); so here the run starts ``teacher.actors``
  long-lived ``TeacherEmbedder`` actors once (:func:`teacher_servers`), and each epoch's Ray Data stage is
  a light task (:func:`embed_remotely`) that hands its batch to one of them.

Which mode uses which piece is decided in ``ega_ray.teacher_modes``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import ray
import ray.data
import torch

from ega_ray.constants import TEACHER_EMB

if TYPE_CHECKING:
    from ega_ray.config import Config


def view_for(index: torch.Tensor, epoch: int, seed: int, views: int) -> torch.Tensor:
    """Which of ``views`` cached views each image uses in ``epoch``: a fixed hash of (index, epoch, seed),
    so a resumed epoch picks the same views, and every view is used about equally often."""
    h = index.long() * 0x9E3779B1 + (epoch * 0x85EBCA77 + seed * 0xC2B2AE3D)
    h = (h ^ (h >> 15)) * 0x2C1B3C6D
    return (h ^ (h >> 12)).remainder(views)


@dataclass(frozen=True)
class TeacherJob:
    """What a teacher actor needs of a run: the teacher, its precision, and how its views are made."""

    name: str
    weights: str | None
    sha256: str | None
    precision: str
    pad: int
    flip: bool
    image_size: int
    student_mean: tuple[float, float, float]
    student_std: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg: Config) -> TeacherJob:
        t, a = cfg.teacher, cfg.augment
        return cls(
            t.name, t.weights, t.sha256, cfg.optim.precision, a.pad, a.flip, cfg.data.image_size,
            tuple(a.student_mean), tuple(a.student_std),
        )  # fmt: skip


class TeacherEmbedder:
    """Ray Data actor: teacher embeddings of ``views`` random teacher views per image.

    ``attach=False`` returns one row per (image, view): ``index``, ``view``, ``embedding`` (float16).
    ``attach=True`` keeps the batch and adds ``teacher_emb`` of shape (rows, views, D) (float16).
    ``augment=False`` embeds the evaluation view (no crop or flip), as for the validation split.
    """

    def __init__(self, job: TeacherJob, views: int, attach: bool, seed: int = 0, augment: bool = True) -> None:
        from ega_ray.data.augment import ViewMaker
        from ega_ray.models import build_teacher
        from ega_ray.models.precision import compute_dtype

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher = build_teacher(job.name, job.weights, job.sha256)
        self.teacher = self.teacher.to_device(self.device, compute_dtype(job.precision, self.device))
        self.views = ViewMaker(
            pad=job.pad, flip=job.flip, student_size=job.image_size, student_mean=job.student_mean,
            student_std=job.student_std, device=self.device, teacher=self.teacher.spec,
        )  # fmt: skip
        self.num_views, self.attach, self.seed, self.augment = views, attach, seed, augment
        self.rows = 0  # rows embedded by this actor (a long-lived one serves every epoch of a run)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.embed(batch, self.augment)

    def rows_embedded(self) -> int:
        return self.rows

    def device_name(self) -> str:
        """Where this actor's teacher runs: ``cuda (<GPU name>)`` or ``cpu``."""
        return f"cuda ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "cpu"

    @torch.no_grad()
    def embed(
        self, batch: dict[str, np.ndarray], augment: bool, epoch: int | None = None, seed: int | None = None
    ) -> dict[str, np.ndarray]:
        """The batch's teacher embeddings (see the class); with ``epoch`` and ``seed`` (a deterministic
        pipeline run's workers ask so), each row's view is keyed by (seed, epoch, index), as online's."""
        images = torch.from_numpy(np.array(batch["image"], dtype=np.uint8)).to(self.device)  # a writable copy
        index = batch["index"]
        keyed = None
        if epoch is not None:
            self.views.set_epoch(seed, epoch)
            keyed = torch.from_numpy(np.asarray(index, dtype=np.int64))
        embs = []
        for v in range(self.num_views):
            # the views of a cache are reproducible: seeded by (seed, view, first index of the batch)
            if not self.attach:
                self.views.reseed(self.seed * 1_000_003 + v * 7_919 + int(index[0]))
            x = self.views.teacher(images, train=augment, index=keyed)
            embs.append(self.teacher(x).to(torch.float16).cpu().numpy())
        stacked = np.stack(embs, axis=1)  # (rows, views, D)
        self.rows += len(index)
        if keyed is not None:  # a worker's request: it has the rest of the batch
            return {TEACHER_EMB: stacked}
        if self.attach:
            batch[TEACHER_EMB] = stacked
            return batch
        n = len(index)
        return {
            "index": np.repeat(index, self.num_views),
            "view": np.tile(np.arange(self.num_views, dtype=np.int64), n),
            "embedding": stacked.reshape(n * self.num_views, -1),
        }


def teacher_actor_resources(cfg: Config) -> dict[str, float]:
    """What one teacher actor asks for: a GPU share on GPU runs, CPUs otherwise."""
    t = cfg.teacher
    return {"num_gpus": t.actor_gpus} if cfg.scaling.use_gpu else {"num_cpus": t.actor_cpus}


def embed_with_actor_pool(
    ds: ray.data.Dataset, cfg: Config, views: int, attach: bool, augment: bool = True
) -> ray.data.Dataset:
    """``ds`` through a pool of ``teacher.actors`` TeacherEmbedder actors (one execution: the cache build,
    the validation split of a cached run)."""
    return ds.map_batches(
        TeacherEmbedder,
        fn_constructor_kwargs={
            "job": TeacherJob.from_config(cfg), "views": views, "attach": attach, "seed": cfg.run.seed,
            "augment": augment,
        },
        compute=ray.data.ActorPoolStrategy(size=cfg.teacher.actors),
        batch_size=cfg.teacher.batch_size,
        batch_format="numpy",
        **teacher_actor_resources(cfg),
    )  # fmt: skip


SERVER_START_TIMEOUT_S = 600.0


@contextmanager
def teacher_servers(cfg: Config) -> Iterator[list[ray.actor.ActorHandle]]:
    """``cfg.teacher.actors`` long-lived teacher actors for a pipeline run; they are started and ready on
    entry (or a clear error), and stopped on exit."""
    resources = teacher_actor_resources(cfg)
    actor = ray.remote(TeacherEmbedder).options(max_restarts=3, max_task_retries=3, **resources)
    job = TeacherJob.from_config(cfg)
    servers = [actor.remote(job=job, views=1, attach=True) for _ in range(cfg.teacher.actors)]
    try:
        try:
            ray.get([s.rows_embedded.remote() for s in servers], timeout=SERVER_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"teacher.actors: {len(servers)} teacher actor(s) with {resources} each did not start within "
                f"{SERVER_START_TIMEOUT_S:.0f} s; the cluster has {ray.cluster_resources()} (lower teacher.actors "
                "or teacher.actor_gpus / actor_cpus, or add nodes)"
            ) from None
        yield servers
    finally:
        for s in servers:
            ray.kill(s)


def embed_remotely(
    batch: dict[str, np.ndarray], servers: list[ray.actor.ActorHandle], augment: bool
) -> dict[str, np.ndarray]:
    """Ray Data task: ``batch`` with ``teacher_emb`` attached by one of the run's teacher actors."""
    return ray.get(random.choice(servers).embed.remote(batch, augment))


def embed_splits(
    servers: list[ray.actor.ActorHandle], splits: dict[str, dict[str, np.ndarray]], batch_size: int
) -> dict[str, dict[str, np.ndarray]]:
    """Each split of ``splits`` (small ones, decoded on the driver, by name) with ``teacher_emb`` (rows, 1, D)
    of their evaluation view, embedded by the ``servers`` (:func:`teacher_servers`) in batches of
    ``batch_size``: every batch of every split is handed out before any answer is awaited."""
    refs = {
        name: [
            servers[(k + i) % len(servers)].embed.remote(
                {"image": rows["image"][s : s + batch_size], "index": rows["index"][s : s + batch_size]}, False
            )
            for i, s in enumerate(range(0, len(rows["index"]), batch_size))
        ]
        for k, (name, rows) in enumerate(splits.items())
    }
    return {
        name: rows | {TEACHER_EMB: np.concatenate([out[TEACHER_EMB] for out in ray.get(refs[name])])}
        for name, rows in splits.items()
    }
