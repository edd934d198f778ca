"""The student files a distillation run writes, how they load back, and ``ega-ray export``.

Per exported student (``student_best``, ``student_last``) a run writes:

- ``<stem>.pt``: ``torch.save`` of a dict: ``student`` (registry name), ``num_classes``, ``embed_dim``,
  ``image_size``, ``mean``, ``std``, ``epoch``, ``class_names`` (when the training split recorded them;
  absent from older files) and ``state_dict`` (the ``StudentClassifier``'s: backbone +
  head). Loads with ``torch.load(weights_only=True)``; ``load_student`` rebuilds the model from it.
- ``<stem>.safetensors``: the same state dict; the other keys are in the file's metadata, as strings
  (``mean``, ``std`` and ``class_names`` as JSON lists).
- ``<stem>.pt2``: ``torch.export`` of ``DeployedStudent``: float32 images in [0, 1], NCHW, at the training
  size (B, 3, S, S), B dynamic → logits (B, C); the run's normalization is inside. ``torch.export.load(f)
  .module()`` runs it without ega-ray; the metadata is also in it (extra file ``ega_ray_student.json``).
- ``<stem>.onnx`` (``ega-ray export --onnx``, needs the ``onnx`` extra): the same module as ONNX (opset 18),
  input ``images``, output ``logits``, batch dimension ``batch``; the metadata in its ``metadata_props``.

Every file is written to a temporary sibling and renamed into place (``ega_ray.disk``), so a reader never
sees half a file, after a check that the disk has room for it (a full disk is one line, not torch's zip
writer's "unexpected pos" or an abort).

``ega-ray export`` replaces only files it can prove ega-ray wrote: ones its folder's marker lists with their
current content (``run_folder.written_here``; a run records the students it writes). Any other file with a
target's name is refused, naming it, unless ``--force``.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ega_ray.disk import check_name_length, need_space, write_with
from ega_ray.errors import OutputFolderError, UsageError
from ega_ray.models import STUDENTS, build_student
from ega_ray.models.heads import EmbeddingHead, StudentClassifier

META_KEYS = ("student", "num_classes", "embed_dim", "image_size", "mean", "std", "epoch")
# Recorded when known, absent from older files: the training split's class names, in label order (eval checks
# a split's names against them)
OPTIONAL_META_KEYS = ("class_names",)
ALL_META_KEYS = META_KEYS + OPTIONAL_META_KEYS
FORMATS = ("pt", "safetensors", "pt2", "onnx")
RUN_FORMATS = ("pt", "safetensors", "pt2")  # what a distillation run writes (ONNX: `ega-ray export --onnx`)
META_FILE = "ega_ray_student.json"  # the metadata's name inside a .pt2
ONNX_OPSET = 18
EXAMPLE_BATCH = 2  # the traced batch; the exported batch dimension is dynamic (1 and up)


class StudentFileError(UsageError):
    """A file that is not a student written by ega-ray, or one that does not rebuild."""

    label = "student file"


class DeployedStudent(nn.Module):
    """What ``.pt2`` and ``.onnx`` hold: float32 images in [0, 1], NCHW, at the training size → logits.

    The run's normalization (``mean``, ``std``) is applied inside, so a caller only scales pixels to [0, 1]
    and resizes to ``image_size`` (training resized with PIL's bicubic filter when it decoded)."""

    def __init__(self, model: StudentClassifier, mean: Iterable[float], std: Iterable[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.model((images - self.mean) / self.std)[1]


def build_classifier(meta: dict[str, Any]) -> StudentClassifier:
    """An untrained ``StudentClassifier`` of the shape ``meta`` describes (eval mode)."""
    backbone = build_student(meta["student"])
    head = EmbeddingHead(backbone.feat_dim, meta["embed_dim"], meta["num_classes"])
    return StudentClassifier(backbone, head).eval()


FRAMING_BYTES = 512 << 10  # a file holds the weights plus its framing: a .pt2's program, a .pt's pickle


def _atomic(path: Path, write, needed: int) -> Path:
    """``write(tmp)`` into a temporary sibling (same suffix) renamed to ``path`` (``disk.write_with``)."""
    return write_with(path, write, needed)


def _meta_strings(meta: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def export_program(model: StudentClassifier, meta: dict[str, Any]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``DeployedStudent(model)`` with a dynamic batch dimension."""
    # torch.export's first use reads os.getcwd() (torch._dynamo's debug folder). A job's working directory can
    # vanish under a long driver (Ray deletes a released runtime_env package; seen with fake-multinode nodes on
    # one machine) and the export would fail on that alone; nothing relative can resolve there anyway.
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(tempfile.gettempdir())
    deployed = DeployedStudent(model, meta["mean"], meta["std"]).eval()
    size = meta["image_size"]
    example = torch.rand(EXAMPLE_BATCH, 3, size, size)
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(deployed, (example,), dynamic_shapes=({0: batch},))


def onnx_missing() -> str | None:
    """Why ONNX export cannot run here (None when it can)."""
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return f"ONNX export needs {' and '.join(missing)}: pip install 'ega-ray[onnx]'"
    return None


def _write_onnx(program: torch.export.ExportedProgram, meta: dict[str, Any], path: Path) -> None:
    onnx_program = torch.onnx.export(
        program, input_names=["images"], output_names=["logits"], opset_version=ONNX_OPSET, dynamo=True, verbose=False
    )
    onnx_program.rename_axes({onnx_program.model.graph.inputs[0].shape[0]: "batch"})
    onnx_program.model.metadata_props.update(_meta_strings(meta))
    onnx_program.save(path, external_data=False)  # one file: a student is far below ONNX's 2 GB limit


def write_student(
    model: StudentClassifier, meta: dict[str, Any], folder: str | Path, stem: str, formats: Iterable[str] = RUN_FORMATS
) -> dict[str, Path]:
    """Write ``folder/<stem>.<format>`` for each of ``formats`` (see the module's docstring); return them."""
    from safetensors.torch import save_file

    folder, formats = Path(folder), list(formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; known: {list(FORMATS)}")
    meta = {k: meta[k] for k in META_KEYS} | {k: meta[k] for k in OPTIONAL_META_KEYS if meta.get(k) is not None}
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # checked before anything is written: torch.export's writer aborts the process on a full disk
    needed = sum(v.numel() * v.element_size() for v in state.values()) + FRAMING_BYTES
    need_space(folder, needed * len(formats))
    written: dict[str, Path] = {}
    if "pt" in formats:
        record = meta | {"state_dict": state}
        written["pt"] = _atomic(folder / f"{stem}.pt", lambda p: torch.save(record, p), needed)
    if "safetensors" in formats:
        tensors = {k: v.contiguous() for k, v in state.items()}
        written["safetensors"] = _atomic(
            folder / f"{stem}.safetensors", lambda p: save_file(tensors, str(p), metadata=_meta_strings(meta)), needed
        )
    if "pt2" in formats or "onnx" in formats:
        program = export_program(model, meta)
        if "pt2" in formats:
            extra = {META_FILE: json.dumps(meta)}
            written["pt2"] = _atomic(
                folder / f"{stem}.pt2", lambda p: torch.export.save(program, p, extra_files=extra), needed
            )
        if "onnx" in formats:
            problem = onnx_missing()
            if problem:
                raise UsageError(problem)
            written["onnx"] = _atomic(folder / f"{stem}.onnx", lambda p: _write_onnx(program, meta, p), needed)
    return written


# ------------------------------------------------------------------ loading


def _not_a_student(path: Path, why: str) -> StudentFileError:
    return StudentFileError(
        f"--student {path}: {why}; expected a student_best.pt / student_last.pt (or .safetensors) that "
        "`ega-ray distill` wrote"
    )


def _check_meta(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise _not_a_student(path, f"not an ega-ray student export (no {', '.join(missing)})")
    ok = (
        isinstance(meta["student"], str)
        and all(isinstance(meta[k], int) and meta[k] >= 1 for k in ("num_classes", "embed_dim", "image_size"))
        and all(isinstance(meta[k], list) and len(meta[k]) == 3 for k in ("mean", "std"))
    )
    if not ok:
        raise _not_a_student(path, "its student, num_classes, embed_dim, image_size, mean or std are malformed")
    names = meta.get("class_names")
    if names is not None and not (
        isinstance(names, list) and len(names) == meta["num_classes"] and all(isinstance(n, str) for n in names)
    ):
        raise _not_a_student(path, f"its class_names are not {meta['num_classes']} names")
    if meta["student"] not in STUDENTS:
        raise StudentFileError(f"--student {path}: student {meta['student']!r} is not one this ega-ray knows")
    return meta


def _read_pt(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        # a truncated file: torch's reader raises OSError (Invalid argument) when it seeks past the end
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise _not_a_student(path, f"not a weights-only torch file ({first})") from None
    if not isinstance(record, dict) or not isinstance(record.get("state_dict"), dict):
        raise _not_a_student(path, "not an ega-ray student export (no state_dict)")
    return _check_meta(path, {k: record[k] for k in ALL_META_KEYS if k in record}), record["state_dict"]


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            strings = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise _not_a_student(path, f"not a readable safetensors file ({str(err)[:120]})") from None
    meta: dict[str, Any] = {}
    try:
        for k in ALL_META_KEYS:
            if k in strings:
                meta[k] = strings[k] if k == "student" else json.loads(strings[k])
    except ValueError:
        raise _not_a_student(path, f"its metadata {k!r} is not JSON") from None
    return _check_meta(path, meta), state


def load_student(path: str | Path) -> tuple[StudentClassifier, dict[str, Any]]:
    """The student in ``path`` (``.pt`` or ``.safetensors``) rebuilt and in eval mode, with its metadata.
    A missing file or one that is not an ega-ray student export is a one-line StudentFileError."""
    path = Path(path)
    check_name_length(path, "--student", StudentFileError)
    if not path.is_file():
        raise StudentFileError(f"--student {path}: {'is a folder' if path.is_dir() else 'no such file'}")
    if path.suffix == ".safetensors":
        meta, state = _read_safetensors(path)
    elif path.suffix == ".pt":
        meta, state = _read_pt(path)
    else:
        raise _not_a_student(path, f"a {path.suffix or 'suffix-less'} file")
    model = build_classifier(meta)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:200]
        raise StudentFileError(
            f"--student {path}: its weights do not fit a {meta['student']} student ({detail})"
        ) from None
    return model.eval(), meta


# ------------------------------------------------------------------ ega-ray export


def unproven(targets: list[Path]) -> list[Path]:
    """The files among ``targets`` that exist and that ega-ray cannot prove it wrote (see
    ``run_folder.written_here``): replacing them could destroy a user's own file."""
    from ega_ray.run_folder import written_here

    return [t for t in targets if (t.exists() or t.is_symlink()) and not written_here(t)]


def run_export(student: str, onnx: bool, force: bool = False) -> dict[str, Path]:
    """Load ``student`` and write its other formats next to it, under the folder's lock (so not while a run
    writes the same folder). A target that exists and is not provably ega-ray's is refused, naming it, unless
    ``force``; what is written is recorded in the folder's marker when it has one.

    Args:
        student: the student file (``.pt`` or ``.safetensors``).
        onnx: also write ``<stem>.onnx``.
        force: replace existing targets whoever wrote them.

    Returns:
        Format → the file written.
    """
    from ega_ray.run_folder import locked, record_written

    path = Path(student)
    problem = onnx_missing() if onnx else None
    if problem:
        raise UsageError(f"--onnx: {problem}")
    model, meta = load_student(path)
    formats = [f for f in FORMATS if f != path.suffix.lstrip(".") and (f != "onnx" or onnx)]
    with locked(path.parent, "--student"):
        foreign = [] if force else unproven([path.with_name(f"{path.stem}.{f}") for f in formats])
        if foreign:
            names = ", ".join(p.name for p in foreign)
            raise OutputFolderError(
                f"--student {path}: {names} beside it {'is' if len(foreign) == 1 else 'are'} not a file ega-ray "
                "wrote (or was changed since); export would replace it: move it away, or pass --force to replace it"
            )
        for leftover in path.parent.glob(f".{path.stem}.tmp-*"):
            leftover.unlink(missing_ok=True)  # a killed writer's: every writer of these names holds this lock
        written: dict[str, Path] = {}
        programs = [f for f in formats if f in ("pt2", "onnx")]  # one torch.export serves both
        for group in [[f] for f in formats if f not in programs] + ([programs] if programs else []):
            done = write_student(model, meta, path.parent, path.stem, group)
            record_written(path.parent, list(done.values()))  # each as it is written: a later failure keeps it
            written |= done
        return written
