"""Every student family exports and loads back: the .pt and .safetensors rebuild the model, the .pt2 and
.onnx run without ega-ray, and all of them give the trained model's logits at two batch sizes other than
the traced one (the batch dimension is dynamic)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from ega_ray.cli import main
from ega_ray.export import (
    EXAMPLE_BATCH,
    FORMATS,
    META_FILE,
    META_KEYS,
    RUN_FORMATS,
    StudentFileError,
    build_classifier,
    load_student,
    onnx_missing,
    write_student,
)
from ega_ray.models import STUDENTS

# one student per family file in the registry, all at 32 px (each family's export costs seconds: torch.export,
# then ONNX's decomposition and optimizer; a second CIFAR ResNet width would add time and no new operator)
FAMILIES = {
    "resnet8": "ega_ray.models.students.cifar_resnet",
    "vgg13": "ega_ray.models.students.vgg",
    "shufflenet_v1": "ega_ray.models.students.shufflenet",
    "resnet50": "ega_ray.models.students.resnet50",
    "torchvision:resnet18": "ega_ray.models.students.torchvision_models",
}
SIZE = 32
BATCHES = (1, 3)  # neither is the traced batch
assert EXAMPLE_BATCH not in BATCHES
HAS_ONNX = onnx_missing() is None


def test_the_families_cover_the_registry():
    assert {STUDENTS.get(name).__module__ for name in STUDENTS.names()} == set(FAMILIES.values())


def trained_like(name: str, num_classes: int = 7, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """A student with random weights and random normalization statistics (so that a weight or a BatchNorm
    buffer left behind by a format shows in the logits), in eval mode, and its metadata."""
    torch.manual_seed(seed)
    meta = {
        "student": name,
        "num_classes": num_classes,
        "embed_dim": 16,
        "image_size": SIZE,
        "mean": [0.5, 0.45, 0.4],
        "std": [0.25, 0.2, 0.3],
        "epoch": 3,
    }
    model = build_classifier(meta)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval(), meta


def reference_logits(model, meta, images: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(meta[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        return model((images - mean) / std)[1]


def assert_close(actual, expected, tol: float = 1e-4) -> None:
    actual = torch.as_tensor(actual)
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1.0)
    assert (actual - expected).abs().max() <= tol * scale, (actual - expected).abs().max()


# the smallest family in the fast tier; the full-size ones cost tens of CPU-seconds each to export
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "resnet8" else pytest.mark.heavy) for n in FAMILIES])
def test_every_format_gives_the_models_logits_at_any_batch_size(name, tmp_path):
    model, meta = trained_like(name)
    formats = FORMATS if HAS_ONNX else RUN_FORMATS
    written = write_student(model, meta, tmp_path, "student_best", formats)
    assert sorted(written) == sorted(formats)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"student_best.{f}" for f in formats)
    images = {n: torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n)) for n in BATCHES}
    expected = {n: reference_logits(model, meta, x) for n, x in images.items()}

    for fmt in ("pt", "safetensors"):
        rebuilt, rebuilt_meta = load_student(written[fmt])
        assert rebuilt_meta == meta and not rebuilt.training
        for n, x in images.items():
            assert_close(reference_logits(rebuilt, meta, x), expected[n], tol=1e-6)

    extra = {META_FILE: ""}
    program = torch.export.load(written["pt2"], extra_files=extra).module()
    assert json.loads(extra[META_FILE]) == meta
    for n, x in images.items():
        assert_close(program(x), expected[n])

    if HAS_ONNX:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        assert (inp.name, inp.shape, out.name) == ("images", ["batch", 3, SIZE, SIZE], "logits")
        assert json.loads(session.get_modelmeta().custom_metadata_map["mean"]) == meta["mean"]
        for n, x in images.items():
            assert_close(session.run(None, {"images": x.numpy()})[0], expected[n])


def test_the_pt_file_keeps_its_keys_and_safetensors_carries_the_metadata(tmp_path):
    from safetensors import safe_open

    model, meta = trained_like("resnet8")
    written = write_student(model, meta, tmp_path, "s", ("pt", "safetensors"))
    record = torch.load(written["pt"], weights_only=True)
    assert list(record) == [*META_KEYS, "state_dict"]
    assert {k: record[k] for k in META_KEYS} == meta
    with safe_open(str(written["safetensors"]), framework="pt") as f:
        assert f.metadata() == {
            "student": "resnet8",
            "num_classes": "7",
            "embed_dim": "16",
            "image_size": "32",
            "mean": "[0.5, 0.45, 0.4]",
            "std": "[0.25, 0.2, 0.3]",
            "epoch": "3",
        }
        assert set(f.keys()) == set(record["state_dict"])


def test_a_run_exports_pt_safetensors_and_pt2_and_survives_an_exporter_failure(tmp_path, monkeypatch, caplog):
    from ega_ray.config import parse_config
    from ega_ray.driver import outputs

    cfg = parse_config(
        {
            "data": {"train": "t", "test": "v", "image_size": SIZE},
            "teacher": {"name": "ssl"},
            "student": {"name": "resnet8"},
            "distill": {"embed_dim": 16},
        }
    )
    model, meta = trained_like("resnet8", num_classes=10)
    state = {"student": model.state_dict(), "num_classes": 10, "epoch": 5}
    outputs.export_student(cfg, state, tmp_path, "student_best")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"student_best.{f}" for f in ("pt", "pt2", "safetensors")]
    rebuilt, rebuilt_meta = load_student(tmp_path / "student_best.pt")
    run_stats = {"mean": list(cfg.augment.student_mean), "std": list(cfg.augment.student_std)}
    assert rebuilt_meta == meta | {"num_classes": 10, "epoch": 5} | run_stats
    x = torch.rand(2, 3, SIZE, SIZE)
    assert_close(torch.export.load(tmp_path / "student_best.pt2").module()(x), reference_logits(model, rebuilt_meta, x))

    def refuse(*args, **kwargs):
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr("ega_ray.export.export_program", refuse)
    (tmp_path / "another").mkdir()
    with caplog.at_level("WARNING"):
        outputs.export_student(cfg, state, tmp_path / "another", "student_last")
    assert sorted(p.name for p in (tmp_path / "another").iterdir()) == ["student_last.pt", "student_last.safetensors"]
    # the warning names the error and where torch.export raised it (here: refuse() in this file)
    assert re.search(
        r"student_last\.pt2 not written: torch\.export failed \(RuntimeError: data-dependent control flow, "
        r"at test_export\.py:\d+\)",
        caplog.text,
    ), caplog.text


def test_a_run_records_its_training_splits_class_names_and_both_formats_keep_them(tmp_path):
    from safetensors import safe_open

    from ega_ray.config import parse_config
    from ega_ray.driver import outputs

    names = [f"class {i}" for i in range(10)]
    (tmp_path / "data" / "train").mkdir(parents=True)
    report = {"dataset": "imagefolder", "classes": names, "splits": {"train": {"rows": 20}}}
    (tmp_path / "data" / "prepare.json").write_text(json.dumps(report))
    cfg = parse_config(
        {
            "data": {"train": str(tmp_path / "data" / "train"), "test": "v", "image_size": SIZE},
            "teacher": {"name": "ssl"},
            "student": {"name": "resnet8"},
            "distill": {"embed_dim": 16},
        }
    )
    model, _ = trained_like("resnet8", num_classes=10)
    state = {"student": model.state_dict(), "num_classes": 10, "epoch": 5}
    outputs.export_student(cfg, state, tmp_path, "student_best", pt2=False)
    for suffix in ("pt", "safetensors"):
        assert load_student(tmp_path / f"student_best.{suffix}")[1]["class_names"] == names, suffix
    with safe_open(str(tmp_path / "student_best.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["class_names"]) == names
    # data.num_classes beyond the prepared names: no names are recorded rather than names for some classes
    wider = {"student": trained_like("resnet8", num_classes=11)[0].state_dict(), "num_classes": 11, "epoch": 5}
    outputs.export_student(cfg, wider, tmp_path / "wider", "s", pt2=False)
    assert "class_names" not in torch.load(tmp_path / "wider" / "s.pt", weights_only=True)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.heavy
def test_a_pt2_is_written_when_the_working_directory_was_deleted(tmp_path):
    """A job's working directory can be deleted under its driver (Ray releasing the runtime_env package);
    torch.export's first use reads the working directory. A fresh interpreter, since the first use counts."""
    gone = tmp_path / "gone"
    gone.mkdir()
    script = (
        "import os, sys; from ega_ray.export import build_classifier, write_student; "
        f"os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); "
        "meta = dict(student='resnet8', num_classes=3, embed_dim=8, image_size=32, "
        "mean=[0.5] * 3, std=[0.25] * 3, epoch=1); "
        f"print(sorted(write_student(build_classifier(meta), meta, {str(tmp_path)!r}, 's', ('pt2',))))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "['pt2']", done.stderr[-2000:]
    assert torch.export.load(tmp_path / "s.pt2").module()(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_ega_ray_export_writes_the_other_formats_beside_the_student(tmp_path, capsys):
    model, meta = trained_like("resnet8")
    write_student(model, meta, tmp_path, "student_best", ("safetensors",))
    args = ["export", "--student", str(tmp_path / "student_best.safetensors")]
    assert main(args + (["--onnx"] if HAS_ONNX else [])) == 0
    formats = ["pt", "pt2"] + (["onnx"] if HAS_ONNX else [])
    assert capsys.readouterr().out.splitlines() == [f"{f}: {tmp_path / f'student_best.{f}'}" for f in formats]
    rebuilt, _ = load_student(tmp_path / "student_best.pt")
    x = torch.rand(2, 3, SIZE, SIZE)
    assert_close(reference_logits(rebuilt, meta, x), reference_logits(model, meta, x), tol=1e-6)


def test_onnx_without_the_extra_is_one_line(tmp_path, capsys, monkeypatch):
    model, meta = trained_like("resnet8")
    write_student(model, meta, tmp_path, "s", ("pt",))
    monkeypatch.setattr("ega_ray.export.onnx_missing", lambda: "ONNX export needs onnx: pip install 'ega-ray[onnx]'")
    assert main(["export", "--student", str(tmp_path / "s.pt"), "--onnx"]) == 2
    assert one_line(capsys) == "ega-ray: error: --onnx: ONNX export needs onnx: pip install 'ega-ray[onnx]'"
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]


def bad_student_files(tmp_path):
    """(file, what the one-line error says) for files that are not ega-ray students."""
    model, meta = trained_like("resnet8")
    write_student(model, meta, tmp_path, "good", ("pt",))
    torch.save({"arch": "resnet8", "state_dict": model.state_dict()}, tmp_path / "teacher.pt")
    torch.save(dict(meta, student="vgg13", state_dict=model.state_dict()), tmp_path / "wrong.pt")
    torch.save(dict(meta, student="resnet9000", state_dict={}), tmp_path / "unknown.pt")
    torch.save(dict(meta, class_names=["ant"], state_dict=model.state_dict()), tmp_path / "names.pt")
    (tmp_path / "noise.pt").write_bytes(b"not a torch file at all")
    (tmp_path / "notes.txt").write_text("x")
    return [
        (tmp_path / "missing.pt", "no such file"),
        (tmp_path, "is a folder"),
        (tmp_path / "teacher.pt", "not an ega-ray student export (no student, num_classes"),
        (tmp_path / "wrong.pt", "its weights do not fit a vgg13 student"),
        (tmp_path / "unknown.pt", "student 'resnet9000' is not one this ega-ray knows"),
        (tmp_path / "names.pt", "its class_names are not 7 names"),
        (tmp_path / "noise.pt", "not a weights-only torch file"),
        (tmp_path / "notes.txt", "a .txt file"),
    ]


def test_a_file_that_is_not_a_student_is_one_line(tmp_path, capsys):
    for path, why in bad_student_files(tmp_path):
        with pytest.raises(StudentFileError, match=re.escape(why)):
            load_student(path)
        assert main(["export", "--student", str(path)]) == 2
        assert one_line(capsys).startswith(f"ega-ray: student file: --student {path}: "), path
