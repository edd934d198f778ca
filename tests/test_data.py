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
from ega_ray.data.images import decode_images
from ega_ray.data.parquet import check_split, mask_labels, stratified_label_mask, write_split
from ega_ray.models.teachers.base import TeacherSpec


def test_digits_preparation_is_pixel_exact_and_complete(tmp_path):
    paths = prepare_digits(tmp_path / "digits")
    train = pq.read_table(paths["train"]).to_pydict()
    test = pq.read_table(paths["test"]).to_pydict()
    assert len(train["index"]) + len(test["index"]) == 1797  # nothing dropped
    assert len(test["index"]) == 360
    for split in (train, test):
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


def cifar_views(spec: TeacherSpec) -> ViewMaker:
    """32 px student views (pad 4, flip) beside the views ``spec``'s teacher sees, on the CPU."""
    return ViewMaker(
        pad=4, flip=True, student_size=32, student_mean=(0.5,) * 3, student_std=(0.25,) * 3,
        device=torch.device("cpu"), teacher=spec,
    )  # fmt: skip


def test_views_have_the_teachers_geometry_and_statistics():
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    spec = TeacherSpec(512, 224, "bicubic", (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    views = cifar_views(spec)
    s, t = views.student(images, train=True), views.teacher(images, train=True)
    assert s.shape == (4, 3, 32, 32) and t.shape == (4, 3, 224, 224)
    ev = views.teacher(images, train=False)
    ref = (resize(images.permute(0, 3, 1, 2).float() / 255, 224, "bicubic") - 0.4) / 0.2
    assert torch.allclose(ev, ref)
    assert t.min() >= (0 - 0.4) / 0.2 - 1e-5 and t.max() <= (1 - 0.4) / 0.2 + 1e-5  # bicubic is clamped


def test_a_teacher_with_a_resize_size_sees_a_center_crop_as_torchvisions_transform_makes_it():
    """torchvision's evaluation transform: resize to resize_size, then the central crop_size window."""
    import torchvision.transforms.v2.functional as TF

    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    spec = TeacherSpec(512, 224, "bicubic", (0.4, 0.4, 0.4), (0.2, 0.2, 0.2), resize_size=256)
    views = cifar_views(spec)
    assert views.teacher(images, train=True).shape == (2, 3, 224, 224)
    x = resize(images.permute(0, 3, 1, 2).float() / 255, 256, "bicubic")
    ref = (TF.center_crop(x, [224, 224]) - 0.4) / 0.2
    assert torch.equal(views.teacher(images, train=False), ref)
    assert torch.equal(ref, (x[..., 16:240, 16:240] - 0.4) / 0.2)


def test_simclr_views_differ_and_stay_in_range():
    x = torch.rand(8, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    a, b = simclr_view(x, g), simclr_view(x, g)
    assert a.shape == x.shape and not torch.allclose(a, b)
    assert a.min() >= 0 and a.max() <= 1


# ---------------------------------------------------------------- what a split must hold before training


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_raw_split(folder, label, index, image=None) -> str:
    """A Parquet split with the given columns as they are (types included), as a third-party tool might write."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    n = len(index)
    pq.write_table(
        pa.table(
            {"image": pa.array(image or [png_bytes(i) for i in range(n)], pa.binary()), "label": label, "index": index}
        ),
        folder / "part-0.parquet",
    )
    return str(folder)


@pytest.mark.parametrize(
    ("label", "index", "message"),
    [
        ([0.0, 1.0, 2.0], [0, 1, 2], r"column 'label' is of type double; it must hold integers"),
        (["cat", "dog", "cat"], [0, 1, 2], r"column 'label' is of type string; it must hold integers"),
        ([0, 1, 2], [0.0, 1.0, 2.0], r"column 'index' is of type double; it must hold integers \(row numbers 0..2\)"),
        ([0, None, 2], [0, 1, 2], r"column 'label' is null in 1 row\(s\), the first at row 1"),
        ([0, 1, 2], [0, None, 2], r"column 'index' is null in 1 row\(s\), the first at row 1"),
        ([0, 1, 2], [0, 1, 100_000_000_000], r"has index 100000000000; the column 'index' must number the 3 rows"),
        ([0, 1, 2], [0, 1, 1], r"has index 1 2 times"),
        ([0, -5, -7], [0, 1, 2], r"has label -5 \(index 1\); labels are 0..C−1, or −1 for an unlabeled row"),
    ],
    ids=["float-label", "string-label", "float-index", "null-label", "null-index", "huge-index", "repeated", "neg"],
)
def test_bad_training_columns_are_refused_before_ray_naming_the_split(tmp_path, label, index, message):
    from ega_ray.config import ConfigError, load_config
    from ega_ray.driver.preflight import prepare_data, resolve

    cfg = resolve(
        load_config(
            None, [f"data.train={write_raw_split(tmp_path / 'train', label, index)}", "data.test=builtin:digits"]
        ),
        check_teacher_file=False,
    )
    with pytest.raises(ConfigError, match=r"^data\.train: .*" + message):
        prepare_data(cfg)


def test_validation_rows_need_labels_and_the_classes_must_cover_them(tmp_path):
    from ega_ray.config import ConfigError, load_config
    from ega_ray.driver.preflight import prepare_data, resolve

    def cfg(val, *more):
        overrides = ["data.train=builtin:digits", "data.test=builtin:digits", f"data.validation={val}", *more]
        return resolve(load_config(None, overrides), False)

    unlabeled = write_raw_split(tmp_path / "v1", [0, -1, 2], [0, 1, 2])
    with pytest.raises(ConfigError, match=r"^data\.validation: .* has label -1 \(index 1\); labels are 0..C−1 \(rows"):
        prepare_data(cfg(unlabeled))
    eleven = write_raw_split(tmp_path / "v2", [0, 1, 10], [0, 1, 2])
    with pytest.raises(ConfigError, match=r"^data.num_classes: 10, but data.validation .* has label 10"):
        prepare_data(cfg(eleven, "data.num_classes=10"))
    data = prepare_data(cfg(eleven))
    assert data.num_classes == 11 and data.carved is None and data.num_validation == 3
    assert data.num_train == 1437 and data.validation["split"] == "data.validation"


def test_a_split_of_one_class_is_refused_naming_the_field_and_path(tmp_path):
    """A third-party Parquet split whose labeled rows are all one class would train (or score) a model that
    cannot be wrong: refused before Ray starts, for the split trained on and for the splits scored on."""
    from ega_ray.config import ConfigError, load_config
    from ega_ray.driver.preflight import prepare_data, resolve

    def cfg(*overrides):
        return resolve(load_config(None, ["data.train=builtin:digits", "data.test=builtin:digits", *overrides]), False)

    one = write_raw_split(tmp_path / "one", [3, -1, 3, 3, -1, 3], list(range(6)))
    with pytest.raises(ConfigError, match=rf"^data\.train: '{one}' has labeled rows of one class only \(label 3\)"):
        prepare_data(cfg(f"data.train={one}"))
    fives = write_raw_split(tmp_path / "fives", [5, 5], [0, 1])
    with pytest.raises(ConfigError, match=rf"^data\.test: '{fives}' has labeled rows of one class only \(label 5\)"):
        prepare_data(cfg(f"data.test={fives}"))
    assert prepare_data(cfg()).num_classes == 10


def test_an_undecodable_image_names_its_split_and_row():
    from ega_ray.errors import DataError

    batch = {
        "image": np.array([png_bytes(0), b"not an image", png_bytes(2)], dtype=object),
        "index": np.array([7, 8, 9]),
    }
    with pytest.raises(DataError, match=r"^data\.train: the image of the row with index 8 cannot be decoded"):
        decode_images(batch, 8, "data.train")


def test_decoding_refuses_a_decompression_bomb_and_scales_16_bit_images():
    from ega_ray.data.images import MAX_PIXELS
    from ega_ray.errors import DataError

    side = int(MAX_PIXELS**0.5) + 1
    bomb = io.BytesIO()
    Image.new("L", (side, side)).save(bomb, format="PNG", optimize=True)  # a few hundred KB, ~50 M pixels
    with pytest.raises(DataError, match=rf"index 3 cannot be decoded \(ValueError: {side}×{side} = .* over the limit"):
        decode_images({"image": np.array([bomb.getvalue()], dtype=object), "index": np.array([3])}, 8, "data.val")
    deep = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    out = decode_images({"image": np.array([buf.getvalue()], dtype=object)}, 4)["image"][0]
    assert out[0, :, 0].tolist() == [0, 1, 128, 255], "16-bit values are scaled to 8 bits, not clipped"
