"""`ega-ray eval` against a direct computation: top-1, top-5, per-class accuracy and the confusion matrix
from the model's own logits, the kNN probe from scikit-learn on the model's own embeddings; and bad input
as one line, before anything is written."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier

from ega_ray.cli import main
from ega_ray.data.parquet import write_split
from ega_ray.export import build_classifier, write_student

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]
STORED, SIZE = 20, 16  # the split's images are resized to the student's input size, as in training


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A student with random weights (8 classes, 16 px) and a labeled split (class 7 absent, 3 Parquet files)
    plus a training split with unlabeled rows, beside a prepare.json naming the classes."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    splits = {}
    for name, rows, low in (("val", 29, 0), ("train", 41, -1)):
        images = rng.integers(0, 256, (rows, STORED, STORED, 3), dtype=np.uint8)
        labels = rng.integers(low, 7, rows)
        write_split(root / "data" / name, images, labels, rows_per_file=10)
        splits[name] = (images, labels)
    write_prepare_json(root / "data", CLASSES, splits)
    torch.manual_seed(0)
    meta = {
        "student": "resnet8",
        "num_classes": len(CLASSES),
        "embed_dim": 8,
        "image_size": SIZE,
        "mean": [0.5, 0.45, 0.4],
        "std": [0.25, 0.2, 0.3],
        "epoch": 4,
    }
    model = build_classifier(meta)
    torch.nn.init.normal_(model.head.classifier.weight, std=3.0)  # spread the predictions over the classes
    write_student(model, meta, root / "run", "student_best", ("pt", "safetensors"))
    # the training run's resolved config beside the student: eval names what the evaluated split was to it
    run_data = {"train": str(root / "data" / "train"), "test": str(root / "data" / "val")}
    (root / "run" / "config.yaml").write_text(json.dumps({"data": run_data}))
    return root, model, meta, splits


def write_prepare_json(folder, classes: list[str], splits: dict) -> None:
    """What `ega-ray prepare` writes beside its splits: their names and the class names, in label order."""
    report = {"dataset": "imagefolder", "classes": classes, "splits": {name: {"rows": 1} for name in splits}}
    (folder / "prepare.json").write_text(json.dumps(report))


def direct(model, meta, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, logits) of the student on the images, computed here: PIL bicubic resize, [0, 1], normalize."""
    resized = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BICUBIC)) for im in images])
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0
    mean, std = (torch.tensor(meta[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        emb, logits = model((x - mean) / std)
    return emb.numpy(), logits.numpy()


def test_eval_matches_a_direct_computation(world, capsys):
    root, model, meta, splits = world
    student, out = root / "run" / "student_best.pt", root / "out"
    args = ["eval", "--student", str(student), "--data", str(root / "data" / "val"), "--output", str(out)]
    knn_args = ["--knn-train", str(root / "data" / "train"), "--knn-k", "3", "--batch-size", "7"]
    assert main(args + knn_args) == 0
    printed = capsys.readouterr().out
    assert "top-1: " in printed and "kNN top-1: " in printed and f"output: {out}" in printed
    result = json.loads((out / "eval.json").read_text())
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    images, labels = splits["val"]
    emb, logits = direct(model, meta, images)
    ranked = np.argsort(-logits, axis=1)
    assert result["top1"] == pytest.approx(100 * np.mean(ranked[:, 0] == labels), abs=1e-3)
    assert result["top5"] == pytest.approx(100 * np.mean((ranked[:, :5] == labels[:, None]).any(1)), abs=1e-3)
    assert 0 < result["top1"] < result["top5"] < 100, "a test that tells top-1 from top-5"
    confusion = np.zeros((8, 8), dtype=int)
    np.add.at(confusion, (labels, ranked[:, 0]), 1)
    assert result["confusion_matrix"] == confusion.tolist()
    expected_per_class = []
    for c, name in enumerate(CLASSES):
        rows = int((labels == c).sum())
        top1 = 100 * float(np.mean(ranked[labels == c, 0] == c)) if rows else None
        expected_per_class.append({"class": c, "name": name, "rows": rows, "top1": top1})
    assert [{**e, "top1": pytest.approx(e["top1"], abs=1e-3)} for e in expected_per_class] == result["per_class"]
    assert result["per_class"][7] == {"class": 7, "name": "hen", "rows": 0, "top1": None}

    bank_images, bank_labels = splits["train"]
    bank_emb, _ = direct(model, meta, bank_images)
    labeled = bank_labels >= 0
    knn = KNeighborsClassifier(n_neighbors=3, metric="cosine", weights="distance")
    knn.fit(bank_emb[labeled], bank_labels[labeled])
    assert result["knn"]["top1"] == pytest.approx(100 * np.mean(knn.predict(emb) == labels), abs=1e-3)
    assert result["knn"] | {"embedding": None} == {
        "top1": result["knn"]["top1"],
        "k": 3,
        "bank": str(root / "data" / "train"),
        "bank_rows": int(labeled.sum()),
        "embedding": None,
    }
    assert (result["split"], result["split_of_run"]) == ("val", "test")
    assert result["class_check"] == "count", "the student records no names: the split's 8 names are taken"
    assert "split val, the training run's data.test (reported on)" in printed
    assert result["student_sha256"] == hashlib.sha256(student.read_bytes()).hexdigest()
    assert (result["student"], result["data"], result["rows"], result["epoch"]) == (
        str(student),
        str(root / "data" / "val"),
        29,
        4,
    )


def test_leave_one_out_by_default_from_the_safetensors_file_into_the_default_folder(world, capsys):
    root, model, meta, splits = world
    student = root / "run" / "student_best.safetensors"
    args = ["eval", "--student", str(student), "--data", str(root / "data" / "val")]
    assert main(args) == 0
    assert main(args) == 0, "an earlier eval output is replaced"
    out = root / "run" / "eval-student_best-val"
    result = json.loads((out / "eval.json").read_text())
    images, labels = splits["val"]
    emb, logits = direct(model, meta, images)
    assert result["top1"] == pytest.approx(100 * np.mean(logits.argmax(1) == labels), abs=1e-3)
    hits = []
    for i in range(len(labels)):
        others = np.arange(len(labels)) != i
        knn = KNeighborsClassifier(n_neighbors=10, metric="cosine", weights="distance")
        hits.append(knn.fit(emb[others], labels[others]).predict(emb[i : i + 1])[0] == labels[i])
    assert result["knn"]["top1"] == pytest.approx(100 * np.mean(hits), abs=1e-3)
    assert result["knn"]["bank"] == "leave-one-out" and result["knn"]["bank_rows"] == 28
    assert sorted(p.name for p in out.iterdir()) == [".ega-ray.json", "confusion.png", "eval.json"]


def test_bad_input_is_one_line_before_anything_is_written(world, capsys, tmp_path):
    root, _, _, _ = world
    student, val = str(root / "run" / "student_best.pt"), str(root / "data" / "val")
    (tmp_path / "notes.txt").write_text("x")
    pq.write_table(pa.table({"image": [b"x"], "label": [0]}), tmp_path / "columns.parquet")
    far = tmp_path / "far"
    write_split(far, np.zeros((2, 8, 8, 3), dtype=np.uint8), np.array([0, 9]))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.txt").write_text("four years of work")
    out = tmp_path / "out"
    cases = [
        (["--student", str(tmp_path / "gone.pt"), "--data", val], "student file: --student", "no such file"),
        (["--student", str(tmp_path / "notes.txt"), "--data", val], "student file: --student", "a .txt file"),
        (["--student", student, "--data", str(tmp_path / "nowhere")], "data error: --data", "no such folder"),
        (["--student", student, "--data", str(tmp_path / "columns.parquet")], "data error: --data", "lacks column"),
        (["--student", student, "--data", str(far)], "data error: --data", "label 9, beyond the student's 8 classes"),
        (["--student", student, "--data", val, "--knn-train", str(far)], "data error: --knn-train", "label 9"),
        (["--student", student, "--data", val, "--knn-k", "0"], "error: --knn-k 0", "at least 1"),
    ]
    for argv, head, why in cases:
        assert main(["eval", *argv, "--output", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"ega-ray: {head}") and why in err, err
        assert not out.exists(), argv
    assert main(["eval", "--student", student, "--data", val, "--output", str(theirs)]) == 2
    assert "holds files ega-ray did not write (thesis.txt)" in capsys.readouterr().err
    assert [p.name for p in theirs.iterdir()] == ["thesis.txt"]


def student_with_names(world, folder, names: list[str]) -> str:
    """The world's student, written again with the class names it records (as a run now writes it)."""
    _, model, meta, _ = world
    write_student(model, meta | {"class_names": names}, folder, "named", ("pt",))
    return str(folder / "named.pt")


def test_a_split_of_other_classes_is_refused_by_count_or_by_name(world, capsys, tmp_path):
    root, _, _, _ = world
    rng = np.random.default_rng(1)
    three = tmp_path / "three"
    write_split(three / "test", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), np.array([0, 1, 2, 0, 1, 2]))
    write_prepare_json(three, ["red", "green", "blue"], {"test": None})
    shuffled = tmp_path / "shuffled"
    write_split(shuffled / "val", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.array([0, 1, 2, 3]))
    write_prepare_json(shuffled, CLASSES[1:] + CLASSES[:1], {"val": None})
    out = tmp_path / "out"
    named = student_with_names(world, tmp_path, CLASSES)
    unnamed = str(root / "run" / "student_best.pt")
    cases = [
        # the case: a 3-class split is no longer evaluated as 8 classes with labels 0..2
        (unnamed, three / "test", "is a 3-class dataset (red, green, blue, per its prepare.json) but the student "
         "has 8 classes"),
        (named, three / "test", "is a 3-class dataset"),
        (named, shuffled / "val", "names its classes otherwise than the student (the same names in another "
         "order): class 0 is 'bee' here, 'ant' to the student; class 1 is 'cat' here, 'bee' to the student; "
         "class 2 is 'dog' here, 'cat' to the student and 5 more"),
    ]  # fmt: skip
    for student, data, why in cases:
        assert main(["eval", "--student", student, "--data", str(data), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"ega-ray: data error: --data: '{data}'") and why in err, err
        assert not out.exists()
    argv = ["eval", "--student", named, "--data", str(root / "data" / "val"), "--knn-train", str(shuffled / "val")]
    assert main([*argv, "--output", str(out)]) == 2, "the kNN bank's classes are checked too"
    assert "data error: --knn-train" in capsys.readouterr().err


def test_matching_names_are_checked_by_name_and_reported(world, capsys, tmp_path):
    root, _, _, _ = world
    named = student_with_names(world, tmp_path, CLASSES)
    val = str(root / "data" / "val")
    assert main(["eval", "--student", named, "--data", val, "--output", str(tmp_path / "o")]) == 0
    assert "8 classes, the student's by name" in capsys.readouterr().out
    result = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert result["class_check"] == "names" and [c["name"] for c in result["per_class"]] == CLASSES
    # a split with no prepare.json: only its labels can be checked, and eval says so
    bare = tmp_path / "bare"
    write_split(bare, np.zeros((3, 8, 8, 3), dtype=np.uint8), np.array([0, 1, 7]))
    assert main(["eval", "--student", named, "--data", str(bare), "--output", str(tmp_path / "b")]) == 0
    assert "taken to be the student's (the split records no class names)" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["class_check"] == "labels"
