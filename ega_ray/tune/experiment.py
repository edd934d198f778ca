"""One Ray Tune experiment in an output folder (a search or a benchmark), started or resumed; the one trial
runner both use; and the guard that keeps a resume from unpickling state that ega-ray did not write.

Ray Tune resumes an experiment by unpickling its state (``tuner.pkl``, ``experiment_state-*.json`` with
pickled fields, searcher and trial ``*.pkl`` files): whoever can write those files can run code on the
driver. So while an experiment runs, :class:`StateRecorder` records the SHA-256 of every such file as Tune
writes it (in the driver's staging folder, which Tune copies to storage, and in local storage itself) in
the output folder's marker, and :func:`verify_state` refuses a resume when any state file in storage is
not one that was recorded. See docs/security.md for what this covers and what it does not.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from ega_ray import uris
from ega_ray.config import Config, parse_config
from ega_ray.disk import write_atomic
from ega_ray.driver.launch import run_distill
from ega_ray.driver.preflight import check_distill, resolve
from ega_ray.errors import ConfigError, Interrupted, OutputFolderError
from ega_ray.run_folder import check_target, claim, read_marker, write_marker
from ega_ray.worker.common import latest_state

logger = logging.getLogger(__name__)

TRIAL_DRIVER_CPU = 0.1
STATE_VERSIONS_KEPT = 50  # per file: storage can lag the staging folder by a few uploads
RUN_FOLDER_COPY = "run_folder"  # a trial's finished run folder, beside its checkpoints in remote storage


def trial_storage(storage: str | None, output: Path) -> str:
    """Where the trials' Ray Train checkpoints go: ``<output>/trials``, or under ``run.storage`` when set."""
    return uris.join(storage, output.name, "trials") if storage else str(output / "trials")


def trial_config(raw: dict[str, Any], output: Path, name: str) -> dict[str, Any]:
    """A trial's config: ``raw`` run as ``name`` in ``<output>/trials/<name>`` (checkpoints under
    ``run.storage`` when set), without a progress bar (Tune's trial table is the display)."""
    raw = copy.deepcopy(raw)
    raw["run"] |= {
        "name": name,
        "output": str(output / "trials" / name),
        "storage": trial_storage(raw["run"]["storage"], output),
        "progress_bar": False,
    }
    return raw


def run_trial(raw: dict[str, Any]) -> None:
    """The one trial runner of searches and benchmarks: a full distillation run (a TorchTrainer) with
    ``TuneReportCallback`` forwarding each epoch's metrics to Tune. It resumes from the trial's latest
    checkpoint, if any; a trial rescheduled after an interruption with every epoch already done trains and
    reports nothing, so its last epoch is reported here. With the checkpoints in remote storage, the
    finished run folder is copied there too (:func:`run_folder_copy`)."""
    cfg = parse_config(raw)
    finished = finished_history(cfg, cfg.optim.epochs)
    run_distill(cfg, callbacks=[TuneReportCallback()], trial=True)
    destination = run_folder_copy(cfg)
    if destination is not None:
        copy_folder(cfg.output_dir, destination)
    if finished:
        tune.report(finished[-1])


def run_folder_copy(cfg: Config) -> str | None:
    """Where a trial's finished run folder is copied: ``<its checkpoints>/run_folder`` when they are in remote
    storage (``s3://``, ``gs://``); None otherwise. On a cluster a trial writes its run folder on the disk of
    the node that runs it, which an autoscaler may remove, and a resumed trial may finish on another node;
    the copy keeps the finished folder where the checkpoints are."""
    storage = cfg.run.storage
    if not storage or not uris.is_uri(storage):
        return None
    return uris.join(storage, cfg.output_dir.name, RUN_FOLDER_COPY)


def copy_folder(folder: Path, destination: str) -> None:
    """Copy local ``folder`` (every file, recursively) to the URI ``destination``, replacing same-named files."""
    fs, path = pyarrow.fs.FileSystem.from_uri(destination)
    pyarrow.fs.copy_files(str(folder), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def finished_history(cfg: Config, epochs: int) -> list[dict[str, Any]] | None:
    """The metric history of a run whose latest checkpoint already holds the last epoch."""
    state = latest_state(cfg.checkpoint_root, cfg.output_dir.name)
    return state["history"] if state is not None and state["epoch"] >= epochs else None


def trial_concurrency(cfg: Config) -> int:
    """How many trials the cluster holds at once: CPUs (and GPUs) over what one trial takes (its workers,
    its driver's token share, and half a CPU left to its Ray Data reads)."""
    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    s, res = cfg.scaling, ray.cluster_resources()
    if s.use_gpu and not res.get("GPU"):
        logger.warning(
            "the cluster has no GPUs yet: trials run one at a time until the autoscaler adds some; "
            "set tune.max_concurrent to the number of trials your GPU nodes can hold at full size"
        )
    by_cpu = res.get("CPU", 1) / (s.num_workers * s.cpus_per_worker + 0.5 + TRIAL_DRIVER_CPU)
    by_gpu = res.get("GPU", 0) / (s.num_workers * s.gpus_per_worker) if s.use_gpu else math.inf
    return max(1, int(min(by_cpu, by_gpu)))


def is_state_file(relpath: str) -> bool:
    """The files a resume unpickles: every ``*.pkl``, and the experiment folder's own ``*.json``."""
    return relpath.endswith(".pkl") or ("/" not in relpath and relpath.endswith(".json"))


def _fs_and_path(uri_or_path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if uris.is_uri(uri_or_path):
        return pyarrow.fs.FileSystem.from_uri(uri_or_path)
    return pyarrow.fs.LocalFileSystem(), str(Path(uri_or_path).resolve())


def state_digests(location: str) -> dict[str, str]:
    """SHA-256 of every state file under ``location`` (a folder or URI), by path: the experiment's name (the
    folder's) and the path within it, so that the experiments of one output folder are kept apart."""
    fs, root = _fs_and_path(location)
    name = root.rstrip("/").rsplit("/", 1)[-1]
    found = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    out = {}
    for info in found:
        rel = info.path[len(root) :].lstrip("/")
        if info.type == pyarrow.fs.FileType.File and is_state_file(rel):
            with fs.open_input_stream(info.path) as f:
                out[f"{name}/{rel}"] = hashlib.sha256(f.readall()).hexdigest()
    return out


def record_state(output: Path, digests: dict[str, str]) -> None:
    """Add ``digests`` to the history kept in the output folder's marker (rewritten only when it grows)."""
    marker = read_marker(output)
    if marker is None:
        return
    history: dict[str, list[str]] = marker.setdefault("state", {})
    changed = False
    for rel, digest in digests.items():
        seen = history.setdefault(rel, [])
        if digest not in seen:
            seen.append(digest)
            del seen[:-STATE_VERSIONS_KEPT]
            changed = True
    if changed:
        write_marker(output, marker)


def verify_state(output: Path, location: str) -> None:
    """Refuse (OutputFolderError) to resume the experiment at ``location`` unless every state file there is
    one that ega-ray recorded in ``output``'s marker while it ran the experiment."""
    marker = read_marker(output) or {}
    if marker.get("path") != str(output):
        raise OutputFolderError(
            f"--output {output}: was moved from {marker.get('path')!r}; an experiment resumes only where it ran "
            "(its trials write to the folder they started in)"
        )
    history = marker.get("state") or {}
    foreign = sorted(rel for rel, digest in state_digests(location).items() if digest not in history.get(rel, ()))
    if foreign:
        raise OutputFolderError(
            f"--output {output}: the experiment state at {location} holds file(s) ega-ray did not write "
            f"({', '.join(foreign[:3])}); refusing to unpickle them. They changed after the experiment last "
            "recorded them, or the driver died while Tune wrote them: start a new experiment in another folder"
        )


class StateRecorder(tune.Callback):
    """Records the digest of every state file Tune writes, right after it writes it (Tune saves its state in
    a loop step before the callbacks' ``on_step_end``). Holds only paths: Tune pickles its callbacks into
    ``tuner.pkl``, and a resumed experiment runs the unpickled copy."""

    def __init__(self, output: str, location: str) -> None:
        self.output, self.location = output, location

    def _record(self, trials: list) -> None:
        digests: dict[str, str] = {}
        if trials:  # the driver's staging folder: what Tune uploads to storage next (named as the experiment)
            staging = state_digests(trials[0].storage.experiment_driver_staging_path)
            name = uris.basename(self.location)
            digests |= {f"{name}/{k.split('/', 1)[1]}": v for k, v in staging.items()}
        if not uris.is_uri(self.location):
            digests |= state_digests(self.location)
        record_state(Path(self.output), digests)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._record(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._record(trials)


def checked(cfg: Config | None) -> Config:
    """``cfg`` resolved, with what every trial's run checks checked once on the driver, before any starts; a
    ConfigError for None (a new search or benchmark needs a config: only --resume reads it back)."""
    if not isinstance(cfg, Config):
        raise ConfigError("config: none given; a new search or benchmark needs one (only --resume reads it back)")
    cfg = resolve(cfg)
    check_distill(cfg)
    return cfg


def saved_experiment_config(output: Path, name: str, command: str) -> dict[str, Any]:
    """The YAML an experiment saved in ``output`` (``name``), once its digest matches the one the output
    folder's marker recorded when it was written; raises a ConfigError / OutputFolderError otherwise."""
    saved, marker = output / name, read_marker(output)
    if not saved.is_file() or marker is None:
        raise ConfigError(f"--resume: {str(output)!r} holds no `ega-ray {command}` to resume (no {name})")
    text = saved.read_bytes()
    if hashlib.sha256(text).hexdigest() != marker.get("config_sha256"):
        raise OutputFolderError(
            f"--output {output}: {name} changed after `ega-ray {command}` wrote it; refusing to resume"
        )
    return yaml.safe_load(text)


def refuse_earlier_experiment(output: Path, command: str) -> None:
    """OutputFolderError when ``output`` holds an earlier ``ega-ray command`` (``tune`` or ``benchmark``): a new
    experiment needs a new or empty folder, an earlier one is continued with --resume, never overwritten.
    Checked by :func:`experiment_folder`, and by the CLI before the embedded default pretrains its teacher."""
    if check_target(output, command) is not None:
        raise OutputFolderError(
            f"--output {output}: holds an earlier `ega-ray {command}`; continue it with --resume, or choose "
            "another folder"
        )


def experiment_folder(output: Path, command: str, resume: bool):
    """Claim ``output`` for an experiment (``tune`` or ``benchmark``): a new one needs a new or empty folder
    (an earlier experiment there is resumed with --resume, never overwritten); --resume needs the earlier one."""

    def new_or_resumed(marker: dict[str, Any]) -> None:
        if not resume:
            refuse_earlier_experiment(output, command)

    if resume and (not output.is_dir() or read_marker(output) is None):
        raise ConfigError(f"--resume: {str(output)!r} holds no `ega-ray {command}` to resume")
    # the folder's first path stays recorded: a resume from elsewhere is refused (verify_state)
    return claim(output, command, record={} if resume else {"path": str(output)}, check=new_or_resumed)


def save_experiment_config(output: Path, name: str, data: dict[str, Any]) -> None:
    """Write the experiment's YAML and record its digest in the output folder's marker."""
    text = yaml.safe_dump(data, sort_keys=False).encode()
    write_atomic(output / name, text)
    write_marker(output, (read_marker(output) or {}) | {"config_sha256": hashlib.sha256(text).hexdigest()})


def experiment_location(output: Path, storage: str | None, name: str) -> str:
    """Where Tune keeps experiment ``name`` of ``output``: in it, or under ``run.storage`` when set."""
    return uris.join(storage, output.name, name) if storage else str(output / name)


def run_experiment(
    fn: Callable,
    base: dict[str, Any],
    output: Path,
    storage: str | None,
    name: str,
    resume: bool,
    new_tuner: Callable[[Any, str, list], tune.Tuner],
    trial_args: dict[str, Any] | None = None,
) -> tune.ResultGrid:
    """Run (or resume) the experiment ``name`` of ``output``: restored with its finished and unfinished trials
    when ``resume`` finds one (after :func:`verify_state`), else ``new_tuner(trainable, storage_path,
    callbacks)``. Each trial runs ``fn(params, base, root, **trial_args)`` in an actor that only drives a
    TorchTrainer: a token CPU share, the workers ask for their own.

    Args:
        fn: the trial's function; ``params`` are the trial's sampled values.
        base: the experiment's config as a dict (``Config.model_dump``), every trial's starting point.
        output: the experiment's folder.
        storage: ``run.storage``: where Tune keeps its state, or None (inside ``output``).
        name: the experiment's name (its folder under ``output`` or the storage).
        resume: restore the experiment when its state is there.
        new_tuner: makes the Tuner of a new experiment.
        trial_args: what ``fn`` takes besides the config (the benchmark's method and weights), by keyword.

    Returns:
        Tune's results, one per trial.
    """
    with_args = tune.with_parameters(fn, base=base, root=str(output), **(trial_args or {}))
    trainable = tune.with_resources(with_args, {"CPU": TRIAL_DRIVER_CPU})
    location = experiment_location(output, storage, name)
    root = uris.join(storage, output.name) if storage else str(output)  # the query of a storage URI kept
    if resume and tune.Tuner.can_restore(location):
        verify_state(output, location)  # (again: the callers check before Ray starts; this is the last moment)
        tuner = tune.Tuner.restore(location, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = new_tuner(trainable, root, [StateRecorder(str(output), location)])
        record_state(output, state_digests(location))  # tuner.pkl, written when the Tuner was made
    # Ray Tune's own Ctrl-C handler ends the trials as if they had finished and returns them, which a search
    # would then choose from; without it a Ctrl-C stops the search where it is, as it stops a run, and
    # --resume continues from the last saved state and checkpoints
    sigint_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        return tuner.fit()
    except KeyboardInterrupt as stop:
        raise Interrupted(
            f"{location} stopped before its trials ended; nothing was chosen; continue with --resume --output {output}"
        ) from stop
    finally:
        if sigint_handler is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER")
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = sigint_handler
        record_state(output, state_digests(location))
