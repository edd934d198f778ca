"""The Parquet format, the digits preparation, label budgets and on-device augmentation."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ega_ray.data.augment import ViewMaker, random_crop_flip, resize, simclr_view
from ega_ray.data.digits import digits_images, prepare_digits
from ega_ray.data.parquet import check_split, decode_images, mask_labels, stratified_label_mask, write_split
from ega_ray.models.teachers.base import TeacherSpec


def test_digits_preparation_is_pixel_exact_and_complete(tmp_path):
    paths = prepare_digits(tmp_path / "digits")
    train = pq.read_table(paths["train"]).to_pydict()
    val = pq.read_table(paths["val"]).to_pydict()
    assert len(train["index"]) + len(val["index"]) == 1797  # nothing dropped
    assert len(val["index"]) == 360
    for split in (train, val):
        assert sorted(split["index"]) == list(range(len(split["index"])))
        assert set(split["label"]) == set(range(10))
    # every stored image decodes to one of the source images, byte for byte
    source = {im.tobytes() for im in digits_images()[0]}
    for png in train["image"][:50]:
        im = np.asarray(Image.open(io.BytesIO(png)))
        assert im.shape == (32, 32, 3) and im.tobytes() in source
    assert check_split(str(paths["train"]), "data.train") == 1437


def test_write_split_is_atomic_and_idempotent(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    out = write_split(tmp_path / "s", images, np.arange(5))
    write_split(tmp_path / "s", images, np.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["s"], "no temporary folder left behind"
    assert pq.read_table(out).num_rows == 5
    with pytest.raises(ValueError, match="uint8"):
        write_split(tmp_path / "bad", images.astype(np.float32), np.arange(5))
    assert not (tmp_path / "bad").exists()


def test_check_split_names_missing_columns(tmp_path):
    import pyarrow as pa

    (tmp_path / "x").mkdir()
    pq.write_table(pa.table({"image": [b"x"], "label": [0]}), tmp_path / "x" / "p.parquet")
    with pytest.raises(ValueError, match=r"data.train: .* lacks column\(s\) \['index'\]"):
        check_split(str(tmp_path / "x"), "data.train")


def test_decode_images_resizes_and_keeps_arrays():
    im = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    out = decode_images({"image": np.array([buf.getvalue()], dtype=object)}, image_size=16)["image"]
    assert out.shape == (1, 16, 16, 3) and np.array_equal(out[0], im)
    assert decode_images({"image": np.array([buf.getvalue()], dtype=object)}, image_size=32)["image"].shape == (
        1,
        32,
        32,
        3,
    )


def test_stratified_label_budget():
    labels = np.repeat(np.arange(4), 25)
    index = np.arange(100)
    keep = stratified_label_mask(labels, index, 0.1, seed=0)
    assert keep.sum() == 12  # ceil(2.5) per class
    assert all(keep[labels == c].sum() == 3 for c in range(4))
    assert np.array_equal(keep, stratified_label_mask(labels, index, 0.1, seed=0))
    assert not np.array_equal(keep, stratified_label_mask(labels, index, 0.1, seed=1))
    assert stratified_label_mask(labels, index, 1.0, seed=0).all()
    batch = mask_labels({"label": labels[:10].copy(), "index": index[:10]}, keep)
    assert np.array_equal(batch["label"] >= 0, keep[:10])
    assert set(batch["label"][~keep[:10]]) <= {-1}


def test_crop_and_flip():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    assert torch.equal(random_crop_flip(x, pad=0, flip=False), x)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, pad=2, flip=False, generator=g)
    assert out.shape == x.shape
    # every output crop is a window of the zero-padded input
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r : r + 4, c : c + 4] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = [random_crop_flip(x, 0, True, torch.Generator().manual_seed(s)) for s in range(20)]
    assert any(torch.equal(f, x.flip(3)) or torch.equal(f[0], x[0].flip(2)) for f in flipped)


def test_views_have_the_teachers_geometry_and_statistics():
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    spec = TeacherSpec(512, 224, "bicubic", (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    views = ViewMaker(
        pad=4,
        flip=True,
        student_size=32,
        student_mean=(0.5,) * 3,
        student_std=(0.25,) * 3,
        device=torch.device("cpu"),
        teacher=spec,
    )
    s, t = views.student(images, train=True), views.teacher(images, train=True)
    assert s.shape == (4, 3, 32, 32) and t.shape == (4, 3, 224, 224)
    ev = views.teacher(images, train=False)
    ref = (resize(images.permute(0, 3, 1, 2).float() / 255, 224, "bicubic") - 0.4) / 0.2
    assert torch.allclose(ev, ref)
    assert t.min() >= (0 - 0.4) / 0.2 - 1e-5 and t.max() <= (1 - 0.4) / 0.2 + 1e-5  # bicubic is clamped


def test_simclr_views_differ_and_stay_in_range():
    x = torch.rand(8, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    a, b = simclr_view(x, g), simclr_view(x, g)
    assert a.shape == x.shape and not torch.allclose(a, b)
    assert a.min() >= 0 and a.max() <= 1
