"""The run configuration: YAML validated by pydantic before anything starts.

Every error is raised as :class:`ConfigError` with one line naming the field and what is allowed;
the CLI prints it without a traceback. Importing this module imports neither torch nor Ray: registry names
are checked against the registries' tables, and what needs the models, the data or the disk (paths,
splits, weights) is checked by ``ega_ray.driver.preflight`` on the driver.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ega_ray.config_distill import DistillConfig
from ega_ray.config_io import apply_overrides, flat_settings, format_error
from ega_ray.config_tune import SpaceEntry, TuneSection, check_space, default_space
from ega_ray.constants import CLIP_MEAN, CLIP_STD
from ega_ray.errors import ConfigError
from ega_ray.models.students import STUDENTS
from ega_ray.models.teachers import TEACHERS
from ega_ray.teacher_modes import TEACHER_MODES
from ega_ray.uris import is_uri
from ega_ray.yaml_strict import load_yaml

__all__ = ["Config", "ConfigError", "DistillConfig", "SpaceEntry", "load_config", "parse_config", "apply_overrides"]
__all__ += ["is_uri"]

# Settings that say where or how fast a run executes, not what it computes: a run may be resumed with other
# values (e.g. on fewer workers after losing a node). A key ending in "." stands for its whole section.
EXECUTION_FIELDS = (
    "scaling.",
    "run.output",
    "run.name",
    "run.progress_bar",
    "run.verbose",
    "run.loggers",
    "run.wandb_project",
    "run.wandb_mode",
    "run.mlflow_tracking_uri",
    "run.mlflow_experiment",
    "run.max_failures",
    "run.fail_after_epoch",
    "data.prefetch_batches",
    "data.materialize",
    "teacher.actors",
    "teacher.actor_cpus",
    "teacher.actor_gpus",
    "teacher.batch_size",
    "optim.compile",
)
# The sections whose settings define the results of each training command.
RESULT_SECTIONS = {
    "distill": ("data", "teacher", "student", "distill", "optim", "augment", "run"),
    "pretrain-teacher": ("data", "augment", "pretrain", "run"),
}
# The one setting a finished or interrupted run may be resumed with a larger value of.
EPOCHS_FIELD = {"distill": "optim.epochs", "pretrain-teacher": "pretrain.epochs"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


OLD_VAL = (
    "data.val was split into data.test (the split you report on) and data.validation / "
    "data.validation_fraction (the split that selects; default: 10% of data.train, carved per class)"
)


class DataConfig(_Section):
    train: str = Field(description="Parquet folder, s3:// / gs:// URI, or builtin:digits")
    test: str = Field(description="the split the results are reported on: Parquet folder, URI, or builtin:digits")
    validation: str | None = Field(
        None, description="the split that selects (best epoch, Tune, tuned settings); None: carved from data.train"
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of each class's labeled training rows carved out as the validation split"
    )
    validation_seed: int = Field(0, description="the carving's seed; apart from run.seed, so every seed selects alike")
    num_classes: int | None = Field(None, ge=2, description="classes; None reads it from the training labels")
    label_fraction: float = Field(1.0, gt=0, le=1, description="share of training labels the CE terms see")
    image_size: int = Field(32, ge=8, description="the student's input size (images are resized to it)")
    shuffle_buffer: int = Field(10_000, ge=0, description="rows in each worker's local shuffle buffer")
    prefetch_batches: int = Field(2, ge=0, description="batches each worker prefetches while it trains")
    materialize: Literal["auto", "always", "never"] = Field(
        "auto", description="keep decoded splits in Ray's object store (auto: when under 2 GiB decoded)"
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "val" in raw:
            raise ValueError(OLD_VAL)
        return raw


class TeacherConfig(_Section):
    name: str = Field("open_clip:ViT-B-32", description="teacher registry name, see docs/config.md")
    weights: str | None = Field(None, description="local weights file, or a hub tag (e.g. 'openai')")
    sha256: str | None = Field(None, description="expected SHA-256 of a local weights file")
    mode: str = Field(
        "online",
        description="online: in each training worker; cached: embeddings from `ega-ray cache-teacher`; "
        "pipeline: the run's teacher actors, fed by a Ray Data stage between reader and workers",
    )
    cache: str | None = Field(
        None, description="folder or s3:// / gs:// URI written by `ega-ray cache-teacher` (mode cached)"
    )
    actors: int = Field(1, ge=1, description="teacher actors (the cache build, a pipeline run)")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs per teacher actor")
    actor_gpus: float = Field(1.0, gt=0, description="GPUs per teacher actor when scaling.use_gpu")
    batch_size: int = Field(256, ge=1, description="images per teacher forward in the Ray Data stage")

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: str) -> str:
        if v not in TEACHER_MODES:
            raise ValueError(f"unknown teacher mode {v!r}; allowed: {', '.join(TEACHER_MODES)}")
        return v

    @model_validator(mode="after")
    def _mode_needs(self) -> TeacherConfig:
        TEACHER_MODES[self.mode].check_config(self)
        return self

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return TEACHERS.check(v)


class StudentConfig(_Section):
    name: str = Field("resnet8x4", description="student registry name, or torchvision:NAME")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return STUDENTS.check(v)  # a family's member (torchvision:NAME) is checked by the preflight


class OptimConfig(_Section):
    epochs: int = Field(240, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cut epochs short (benchmarks, smoke runs)")
    batch_size: int = Field(64, ge=2, description="global batch, split evenly over the workers")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    milestones: list[int] = Field([150, 180, 210], description="epochs at which the lr is multiplied by lr_decay")
    lr_decay: float = Field(0.1, gt=0, le=1)
    teacher_head_lr: float = Field(0.01, gt=0, description="lr of the teacher's projection and classifier")
    lr_scaling: Literal["none", "linear", "sqrt", "noise"] = Field(
        "none", description="scale lr by batch_size / reference (noise: by the gradient noise scale)"
    )
    reference_batch_size: int = Field(64, ge=1)
    noise_scale: float | None = Field(
        None, gt=0, description="gradient noise scale B_noise in images (bench/noise_scale.py), for lr_scaling noise"
    )
    warmup_epochs: int = Field(0, ge=0, description="linear lr warm-up from lr/N over the first N epochs")
    compile: bool = Field(False, description="torch.compile the student (and an online teacher); eager if unavailable")
    channels_last: bool | None = Field(None, description="NHWC activations for the student; null: on GPUs")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16: autocast student step and a bf16 frozen teacher; auto: bf16 on GPUs, fp32 on CPU"
    )

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if any(m < 1 for m in v) or any(b <= a for a, b in pairwise(v)):
            raise ValueError("must be strictly increasing positive epochs")
        return v

    def lr_factor(self, epoch: int) -> float:
        """The lr multiplier in ``epoch`` (0-based): linear warm-up, then ×lr_decay at every milestone passed."""
        warm = min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs else 1.0
        return warm * self.lr_decay ** bisect_right(self.milestones, epoch)

    @model_validator(mode="after")
    def _noise_scale_given(self) -> OptimConfig:
        if self.lr_scaling == "noise" and self.noise_scale is None:
            raise ValueError("lr_scaling 'noise' needs optim.noise_scale (measure it with bench/noise_scale.py)")
        return self

    def scaled_lr(self, base: float) -> float:
        """``base`` (meant at reference_batch_size) at batch_size. ``noise``: McCandlish et al.'s optimal SGD
        step ε(B) = ε_max / (1 + B_noise/B), i.e. linear far below B_noise and constant far above it."""
        b, ref = self.batch_size, self.reference_batch_size
        if self.lr_scaling == "noise":
            return base * (1 + self.noise_scale / ref) / (1 + self.noise_scale / b)
        return base * {"none": 1.0, "linear": b / ref, "sqrt": (b / ref) ** 0.5}[self.lr_scaling]


class AugmentConfig(_Section):
    pad: int = Field(4, ge=0, description="zero padding before the random crop")
    flip: bool = True
    student_mean: tuple[float, float, float] = CLIP_MEAN
    student_std: tuple[float, float, float] = CLIP_STD


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="fractional values leave CPUs to Ray Data")
    gpus_per_worker: float = Field(1.0, gt=0)
    socket_ifname: str | None = Field(
        None, description="network interface DDP binds to (GLOO_/NCCL_SOCKET_IFNAME); set by the node checks"
    )


class PretrainConfig(_Section):
    """SimCLR pretraining of this project's self-supervised teacher (``ega-ray pretrain-teacher``)."""

    arch: str = Field("resnet8", description="backbone from the student registry")
    image_size: int | None = Field(
        None, ge=8, description="the teacher's input size (None: data.image_size); small CNNs see more at less"
    )
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=4)
    lr: float = Field(0.3, gt=0, description="SGD lr, cosine schedule")
    weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.2, gt=0)
    proj_dim: int = Field(64, ge=1)
    knn_k: int = Field(10, ge=1)

    @field_validator("arch")
    @classmethod
    def _known(cls, v: str) -> str:
        return StudentConfig._known(v)


class RunSection(_Section):
    name: str = Field("ega", pattern=r"^[A-Za-z0-9_.-]+$")
    output: str | None = Field(None, description="run folder; default runs/<name>")
    storage: str | None = Field(
        None,
        description="where Ray Train keeps checkpoints: s3://, gs:// or a folder every node mounts; "
        "default: inside the run folder (single-node only)",
    )
    seed: int = 0
    deterministic: bool = Field(
        True,
        description="reproducible runs: each epoch's rows per worker and their order from (seed, epoch, index) "
        "(every worker reads the whole training split), deterministic GPU kernels (docs/performance.md)",
    )
    progress_bar: bool | None = Field(
        None, description="a progress bar over the run's steps; default: when the driver runs in a terminal"
    )
    verbose: bool = Field(False, description="show Ray's own INFO logs (reports, checkpoints, Ray Data plans)")
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"],
        description="trackers every epoch is logged to, beside metrics.csv; wandb and mlflow need the extra [tracking]",
    )
    wandb_project: str = Field("ega-ray", description="Weights & Biases project")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="offline: no network (`wandb sync` later)")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: file:<run folder>/mlruns")
    mlflow_experiment: str = Field("ega-ray", description="MLflow experiment name")
    max_failures: int | None = Field(
        None, ge=-1, description="worker-group restarts from the last checkpoint; -1: forever; default: 3 "
        "with s3:// / gs:// storage or several nodes, else 0 (docs/cluster.md)"
    )
    fail_after_epoch: int | None = Field(
        None, ge=1, description="testing: raise once after this epoch's checkpoint, to exercise recovery"
    )

    @field_validator("loggers")
    @classmethod
    def _installed(cls, v: list[str]) -> list[str]:
        import importlib.util

        for name, module in (("wandb", "wandb"), ("mlflow", "mlflow")):
            if name in v and importlib.util.find_spec(module) is None:
                raise ValueError(f"{name} needs the optional extra: pip install 'ega-ray[tracking]'")
        return v


class Config(_Section):
    data: DataConfig
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    scaling: ScalingSection = ScalingSection()
    pretrain: PretrainConfig = PretrainConfig()
    tune: TuneSection = TuneSection()
    run: RunSection = RunSection()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, raw: Any) -> Any:
        """A section left empty in YAML (``teacher:``) means its defaults; the default search space leaves out
        the settings of methods other than the chosen one."""
        if not isinstance(raw, dict):
            return raw
        raw = {k: ({} if v is None and k in cls.model_fields else v) for k, v in raw.items()}
        distill, tune = raw.get("distill", {}), raw.get("tune", {})
        if isinstance(distill, dict) and isinstance(tune, dict) and "space" not in tune:
            raw["tune"] = {**tune, "space": default_space(str(distill.get("method", "ega")))}
        return raw

    @model_validator(mode="after")
    def _batch_divides(self) -> Config:
        n = self.scaling.num_workers
        if self.optim.batch_size % n:
            raise ValueError(f"optim.batch_size {self.optim.batch_size} must be a multiple of scaling.num_workers {n}")
        return self

    @model_validator(mode="after")
    def _method_settings_fit(self) -> Config:
        self.distill.settings.check_with(self)  # e.g. EGA's graph_size divides the batch
        return self

    @model_validator(mode="after")
    def _space_fields_exist(self) -> Config:
        check_space(self)
        return self

    def result_settings(self, command: str) -> dict[str, Any]:
        """The settings that define what ``command`` (distill, pretrain-teacher) computes, flat
        (``optim.lr``: value): what a run folder records, and what a rerun into it must repeat."""
        flat = {
            f"{section}.{field}": value
            for section in RESULT_SECTIONS[command]
            for field, value in flat_settings(getattr(self, section).model_dump(mode="json")).items()
        }
        return {
            k: v
            for k, v in flat.items()
            if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in EXECUTION_FIELDS)
        }

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output or Path("runs") / self.run.name)

    @property
    def checkpoint_root(self) -> str:
        """Ray Train's storage_path; the run's checkpoints are in ``<checkpoint_root>/<output folder name>``."""
        return self.run.storage or str(self.output_dir.parent)


def parse_config(raw: dict[str, Any]) -> Config:
    """The validated config; a ConfigError with one line per problem, every field's problems at once (the
    rules that relate fields of several sections are checked once every field is valid)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(*dict.fromkeys(format_error(e, Config) for e in err.errors())) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = load_yaml(p.read_text(), f"config file {str(path)!r}") or {}  # duplicate keys, alias bombs: refused
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return parse_config(apply_overrides(raw, overrides or []))
