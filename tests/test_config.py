"""Config validation: every bad config fails with one ConfigError line naming the field, before Ray starts.

No test here starts Ray. The CLI tests run ``python -m ega_ray.cli`` in a subprocess with configs that
fail validation, so the process exits (code 2) before any cluster is started.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ega_ray.config import Config, ConfigError, OptimConfig, apply_overrides, load_config, parse_config
from ega_ray.config_distill import without_method_settings
from ega_ray.driver.preflight import resolve
from ega_ray.losses import SETTINGS
from ega_ray.losses.settings.docs import settings_tables
from ega_ray.run_folder import settings_differences

ROOT = Path(__file__).resolve().parents[1]
MINIMAL: dict[str, Any] = {"data": {"train": "train", "test": "test"}}


def _raw(**sections: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(MINIMAL)
    for name, fields in sections.items():
        raw.setdefault(name, {}).update(fields)
    return raw


def _error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return _one_line(info.value)


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def _write(path: Path, raw: Any) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding (empty) train/ and test/ folders; resolve() only checks they exist."""
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- the shipped configs parse ---------------------------------------------------------------


def test_smoke_yaml_parses() -> None:
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    assert cfg.data.train == "builtin:digits"
    assert cfg.teacher.name == "zoo:resnet8"
    assert cfg.student.name == "resnet8"
    assert cfg.optim.epochs == 2
    assert cfg.optim.milestones == [1]
    assert cfg.augment.flip is False
    assert cfg.scaling.cpus_per_worker == 0.5
    assert cfg.run.name == "smoke"


def test_embedded_yaml_parses() -> None:
    from ega_ray.embedded import embedded_config

    cfg = embedded_config()
    assert cfg.teacher.name == "ssl"
    assert cfg.data.label_fraction == 0.1
    assert cfg.run.output == "runs/embedded"
    out = embedded_config(["optim.epochs=1"], output="elsewhere")
    assert (out.optim.epochs, out.run.output) == (1, "elsewhere")


def test_defaults() -> None:
    cfg = parse_config(copy.deepcopy(MINIMAL))
    assert cfg.teacher.name == "open_clip:ViT-B-32"
    assert cfg.student.name == "resnet8x4"
    assert cfg.distill.ega.temperature is None and cfg.distill.settings is cfg.distill.ega
    assert cfg.optim.batch_size % cfg.scaling.num_workers == 0
    assert cfg.output_dir == Path("runs") / "ega"


# --- bad configs: one line naming the field and what is allowed ---------------------------------


def test_unknown_top_level_field() -> None:
    msg = _error(_raw(bogus={}))
    assert msg.startswith("bogus: unknown field")
    for section in ("data", "teacher", "student", "distill", "optim", "augment", "scaling", "pretrain", "run"):
        assert section in msg


def test_unknown_field_in_section() -> None:
    msg = _error(_raw(distill={"temprature": 0.5}))
    assert msg.startswith("distill.temprature: unknown field")
    assert "kd_temperature" in msg and "ega" in msg and "method" in msg
    msg = _error(_raw(distill={"ega": {"temprature": 0.5}}))
    assert msg.startswith("distill.ega.temprature: unknown field") and "node_weight, edge_weight, temperature" in msg


@pytest.mark.parametrize(
    ("section", "field", "value", "allowed"),
    [
        ("student", "name", "resnet9000", "resnet8x4"),
        ("distill", "method", "fitnets", "ccl, crd, ega"),
        ("teacher", "name", "clip:ViT-B-32", "open_clip:*"),
        ("pretrain", "arch", "resnet9000", "resnet8"),
    ],
)
def test_unknown_registry_name(section: str, field: str, value: str, allowed: str) -> None:
    msg = _error(_raw(**{section: {field: value}}))
    assert msg.startswith(f"{section}.{field}: unknown")
    assert repr(value) in msg and "allowed:" in msg and allowed in msg


def test_baseline_fields() -> None:
    ccl = parse_config(_raw(distill={"method": "ccl"})).distill.ccl
    crd = parse_config(_raw(distill={"method": "crd"})).distill.crd
    assert (ccl.logit_temperature, crd.negatives_from) == (1.0, "other_class")  # the references' settings
    msg = _error(_raw(distill={"method": "crd", "crd": {"negatives_from": "same_class"}}))
    assert msg.startswith("distill.crd.negatives_from:") and "'other_class'" in msg and "'any'" in msg
    assert _error(_raw(distill={"method": "ccl", "ccl": {"logit_temperature": 0}})).startswith(
        "distill.ccl.logit_temperature:"
    )


def test_only_the_chosen_methods_settings() -> None:
    cfg = parse_config(_raw(distill={"method": "rkd", "rkd": {"angle_weight": 5.0}}))
    assert (cfg.distill.rkd.angle_weight, cfg.distill.ega) == (5.0, None)
    assert list(cfg.distill.model_dump()).count("rkd") == 1 and "ega" not in cfg.distill.model_dump()
    assert parse_config(cfg.model_dump(mode="json")).distill == cfg.distill  # a dump parses again
    msg = _error(_raw(distill={"method": "crd", "ega": {"node_weight": 1.0}}))
    assert msg == (
        "distill: ega.node_weight is a setting of method 'ega', but distill.method is 'crd' "
        "(set distill.method: ega, or drop distill.ega)"
    )


def test_a_method_change_is_named_once_in_a_resume_refusal() -> None:
    ega, kd = (parse_config(_raw(distill={"method": m})).result_settings("distill") for m in ("ega", "kd"))
    assert ega["distill.ega.node_weight"] == 0.8 and "distill.ega.node_weight" not in kd  # recorded by path
    diffs = settings_differences(without_method_settings(ega), without_method_settings(kd))
    assert diffs == ['distill.method: "ega" → "kd"']


@pytest.mark.parametrize(
    ("old", "new"),
    [("node_weight", "distill.ega.node_weight"), ("crd_negatives", "distill.crd.negatives"),
     ("ccl_temperature", "distill.ccl.logit_temperature"), ("rkd_angle_weight", "distill.rkd.angle_weight")],
)  # fmt: skip
def test_the_old_flat_names_point_to_the_new_paths(old: str, new: str) -> None:
    msg = _error(_raw(distill={old: 1.0}))
    assert msg.startswith(f"distill: {old} moved to {new} ") and "\n" not in msg


def test_teacher_families_accepted() -> None:
    for name in (
        "open_clip:RN50",
        "timm:resnet18",
        "torchvision:resnet18",
        "ssl",
        "zoo:resnet32x4",
        "repdistiller:vgg13",
    ):
        assert parse_config(_raw(teacher={"name": name})).teacher.name == name
    assert parse_config(_raw(student={"name": "torchvision:mobilenet_v3_small"})).student.name.startswith("torch")


def test_negative_node_weight() -> None:
    msg = _error(_raw(distill={"ega": {"node_weight": -0.1}}))
    assert msg.startswith("distill.ega.node_weight:") and "greater than or equal to 0" in msg


@pytest.mark.parametrize("value", [0, -1])
def test_temperature_must_be_positive(value: float) -> None:
    msg = _error(_raw(distill={"ega": {"temperature": value}}))
    assert msg.startswith("distill.ega.temperature:") and "greater than 0" in msg


def test_temperature_none_and_positive_accepted() -> None:
    assert parse_config(_raw(distill={"ega": {"temperature": None}})).distill.ega.temperature is None
    assert parse_config(_raw(distill={"ega": {"temperature": 0.1}})).distill.ega.temperature == 0.1


def test_batch_size_multiple_of_workers() -> None:
    one_graph = {"ega": {"graph_size": None}}
    msg = _error(_raw(optim={"batch_size": 63}, scaling={"num_workers": 2}, distill=one_graph))
    assert "optim.batch_size" in msg and "scaling.num_workers" in msg and "multiple" in msg
    cfg = parse_config(_raw(optim={"batch_size": 63}, scaling={"num_workers": 3}, distill=one_graph))
    assert cfg.optim.batch_size == 63


def test_graph_size_must_divide_the_batch() -> None:
    msg = _error(_raw(optim={"batch_size": 96}))
    assert "distill.ega.graph_size 64 must divide optim.batch_size 96" in msg
    assert parse_config(_raw(optim={"batch_size": 256})).distill.ega.graph_size == 64  # 4 graphs per batch
    ega = {"ega": {"graph_size": 32}}
    assert parse_config(_raw(optim={"batch_size": 96}, distill=ega)).distill.ega.graph_size == 32
    ega = {"ega": {"graph_size": None}}
    assert parse_config(_raw(optim={"batch_size": 96}, distill=ega)).distill.ega.graph_size is None
    assert parse_config(_raw(optim={"batch_size": 96}, distill={"method": "kd"})).optim.batch_size == 96


def test_decreasing_milestones() -> None:
    msg = _error(_raw(optim={"milestones": [150, 100]}))
    assert msg.startswith("optim.milestones:") and "increasing" in msg


def test_missing_data_section() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"optim": {"epochs": 1}})
    assert _one_line(info.value) == "data: required field is missing"


def test_missing_data_field() -> None:
    msg = _error({"data": {"train": "train"}})
    assert msg == "data.test: required field is missing"


def test_old_val_field_says_what_it_became() -> None:
    msg = _error({"data": {"train": "train", "val": "val"}})
    assert msg.startswith("data: data.val was split into data.test (the split you report on) and data.validation")
    assert "data.validation_fraction" in msg


def test_old_tune_metric_is_refused() -> None:
    msg = _error(_raw(tune={"metric": "val_top1"}))
    assert msg.startswith("tune.metric:") and "validation_top1" in msg


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_validation_fraction_outside_zero_one(fraction: float) -> None:
    assert _error(_raw(data={"validation_fraction": fraction})).startswith("data.validation_fraction:")


def test_validation_split_must_be_apart_from_test_and_train(splits: Path) -> None:
    for other in ("test", "train"):
        with pytest.raises(ConfigError) as info:
            resolve(parse_config(_raw(data={"validation": other})))
        msg = _one_line(info.value)
        assert msg.startswith("data.validation:") and f"is also data.{other}" in msg


def test_builtin_validation_split_is_refused(splits: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.validation: 'builtin:digits' has a train and a test split only"):
        resolve(parse_config(_raw(data={"validation": "builtin:digits"})))


def test_nonexistent_data_path(splits: Path) -> None:
    cfg = parse_config(_raw(data={"train": "no_such_folder"}))  # parses: existence is checked by resolve()
    with pytest.raises(ConfigError) as info:
        resolve(cfg)
    msg = _one_line(info.value)
    assert msg.startswith("data.train:") and "no_such_folder" in msg and "does not exist" in msg


def test_unknown_builtin_dataset(splits: Path) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(parse_config(_raw(data={"test": "builtin:cifar10"})))
    msg = _one_line(info.value)
    assert msg.startswith("data.test:") and "digits" in msg


def test_nonexistent_teacher_weights(splits: Path) -> None:
    cfg = parse_config(_raw(teacher={"name": "zoo:resnet8", "weights": "missing/teacher.pt"}))
    with pytest.raises(ConfigError) as info:
        resolve(cfg)
    msg = _one_line(info.value)
    assert msg.startswith("teacher.weights:") and "missing/teacher.pt" in msg


def test_hub_tag_weights_left_alone(splits: Path) -> None:
    cfg = resolve(parse_config(_raw(teacher={"name": "open_clip:RN50", "weights": "openai"})))
    assert cfg.teacher.weights == "openai"


def test_bad_override_item() -> None:
    for item in ("optim.epochs", "=3"):
        with pytest.raises(ConfigError) as info:
            apply_overrides({}, [item])
        msg = _one_line(info.value)
        assert msg.startswith("--set") and "key=value" in msg


def test_override_through_a_non_section() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"data": {"train": "x"}}, ["data.train.path=y"])
    assert "'train' is not a section" in _one_line(info.value)


def test_override_value_invalid_yaml() -> None:
    with pytest.raises(ConfigError, match=r"^--set"):
        apply_overrides({}, ["optim.milestones=[1"])


def test_config_file_not_a_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path / "list.yaml", ["data", "optim"])
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = _one_line(info.value)
    assert "list.yaml" in msg and "mapping" in msg


def test_config_file_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  train: [builtin:digits\n  val: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = _one_line(info.value)
    assert "broken.yaml" in msg and "not valid YAML" in msg


def test_config_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    msg = _one_line(info.value)
    assert "nope.yaml" in msg and "does not exist" in msg


def test_config_file_not_text(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="binary.yaml"):
        load_config(path)


def test_empty_config_file_needs_data(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"^data: required field is missing$"):
        load_config(path)


# --- overrides ---------------------------------------------------------------------------------


def test_overrides_parse_values_as_yaml() -> None:
    raw = apply_overrides(
        {"optim": {"epochs": 240}},
        ["optim.epochs=3", "distill.ega.temperature=null", "augment.flip=false", "optim.milestones=[1, 2]"]
        + ["run.name=a=b"],
    )
    assert raw["optim"]["epochs"] == 3 and isinstance(raw["optim"]["epochs"], int)
    assert raw["distill"]["ega"]["temperature"] is None
    assert raw["augment"]["flip"] is False
    assert raw["optim"]["milestones"] == [1, 2]
    assert raw["run"]["name"] == "a=b"  # only the first '=' separates key and value


def test_overrides_create_nested_keys() -> None:
    raw = apply_overrides({}, ["a.b.c=1.5", "a.b.d=x"])
    assert raw == {"a": {"b": {"c": 1.5, "d": "x"}}}


def test_load_config_applies_overrides_after_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", _raw(optim={"epochs": 10}))
    cfg = load_config(path, ["optim.epochs=3", "distill.ega.temperature=0.5", "augment.flip=false"])
    assert (cfg.optim.epochs, cfg.distill.ega.temperature, cfg.augment.flip) == (3, 0.5, False)
    with pytest.raises(ConfigError, match=r"^distill\.ega\.temperature:"):
        load_config(path, ["distill.ega.temperature=0"])
    with pytest.raises(ConfigError, match=r"^distill: temperature moved to distill\.ega\.temperature "):
        load_config(path, ["distill.temperature=0.5"])


# --- path resolution ---------------------------------------------------------------------------


def test_resolved_makes_paths_absolute(splits: Path) -> None:
    (splits / "weights").mkdir()
    (splits / "weights" / "t.pt").write_bytes(b"")
    cfg = parse_config(_raw(teacher={"name": "zoo:resnet8", "weights": "weights/t.pt"}))
    res = resolve(cfg)
    assert res.data.train == str(splits.resolve() / "train")
    assert res.data.test == str(splits.resolve() / "test") and res.data.validation is None
    assert res.teacher.weights == str(splits.resolve() / "weights" / "t.pt")
    assert res.run.output == str(splits.resolve() / "runs" / "ega")
    assert cfg.data.train == "train"  # the original is untouched


def test_resolved_keeps_uris(splits: Path) -> None:
    uris = {"train": "s3://bucket/train", "test": "gs://bucket/test", "validation": "gs://bucket/validation"}
    res = resolve(parse_config(_raw(data=uris)))
    assert (res.data.train, res.data.test, res.data.validation) == tuple(uris.values())


def test_resolved_prepares_builtin_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EGA_RAY_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    res = resolve(parse_config(_raw(data={"train": "builtin:digits", "test": "builtin:digits"})))
    train, val = Path(res.data.train), Path(res.data.test)
    assert val.name == "test"
    assert train.is_absolute() and val.is_absolute() and train != val
    assert train.is_relative_to(cache.resolve()) and val.is_relative_to(cache.resolve())
    for split in (train, val):
        assert split.is_dir()
        assert list(split.rglob("*.parquet")), f"no parquet files in {split}"


# --- learning-rate scaling ---------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "expected"), [("none", 0.1), ("linear", 0.4), ("sqrt", 0.2)])
def test_scaled_lr(mode: str, expected: float) -> None:
    optim = OptimConfig(batch_size=256, reference_batch_size=64, lr_scaling=mode)
    assert optim.scaled_lr(0.1) == pytest.approx(expected)


@pytest.mark.parametrize(("noise_scale", "expected"), [(64.0, 0.1 * 2 / 1.25), (1e9, 0.4), (1e-9, 0.1)])
def test_noise_scaled_lr(noise_scale: float, expected: float) -> None:
    """ε(B) ∝ 1 / (1 + B_noise/B): linear far below the noise scale, constant far above it."""
    optim = OptimConfig(batch_size=256, reference_batch_size=64, lr_scaling="noise", noise_scale=noise_scale)
    assert optim.scaled_lr(0.1) == pytest.approx(expected, rel=1e-6)


def test_noise_scaled_lr_needs_the_noise_scale() -> None:
    msg = _error(_raw(optim={"lr_scaling": "noise"}))
    assert msg.startswith("optim:") and "optim.noise_scale" in msg and "bench/noise_scale.py" in msg


def test_scaled_lr_rejects_unknown_mode() -> None:
    msg = _error(_raw(optim={"lr_scaling": "cubic"}))
    assert msg.startswith("optim.lr_scaling:") and "'linear'" in msg and "'sqrt'" in msg


# --- docs/config.md stays in step with the models ------------------------------------------------


def _doc_example() -> dict[str, Any]:
    doc = (ROOT / "docs" / "config.md").read_text()
    return yaml.safe_load(doc.split("## A complete annotated example")[1].split("```yaml")[1].split("```")[0])


def _fields(section: str) -> list[str]:
    """A section's own fields (for distill: those every method shares, not the methods' keys)."""
    return [f for f in Config.model_fields[section].annotation.model_fields if f not in SETTINGS]


def test_docs_example_parses_and_lists_every_field() -> None:
    raw = _doc_example()
    parse_config(copy.deepcopy(raw))
    assert list(raw) == list(Config.model_fields)
    for section in Config.model_fields:
        assert [f for f in raw[section] if f not in SETTINGS] == _fields(section), section
    method = raw["distill"]["method"]
    assert list(raw["distill"][method]) == list(SETTINGS.get(method).model_fields)  # the chosen method's, all


def test_docs_table_row_for_every_field() -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    for section in Config.model_fields:
        body = doc.split(f"### `{section}`")[1].split("\n### ")[0]
        for field in _fields(section):
            assert f"| `{field}` |" in body, f"{section}.{field} has no row in docs/config.md"


def test_docs_method_settings_are_the_models() -> None:
    """docs/config.md's per-method tables are what the settings models generate: every field, its default,
    bounds and description (regenerate with `python -m ega_ray.losses.settings.docs --write`)."""
    doc = (ROOT / "docs" / "config.md").read_text()
    assert settings_tables() in doc.split("### `distill`")[1].split("\n### ")[0]
    assert "| `negatives` | int | `16384` | ≥ 1 |" in settings_tables()  # a row carries the model's default
    for name in SETTINGS.names():
        assert f"#### `distill.{name}` (method `{name}`)" in doc


# --- the CLI: one stderr line, exit 2, no traceback, no Ray ------------------------------------


def _cli(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ega_ray.cli", "distill", "--config", str(config)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_raw(distill={"bogus": 1}), "distill.bogus"),
        (_raw(distill={"ega": {"temperature": 0}}), "distill.ega.temperature"),
    ],
    ids=["unknown-field", "temperature-zero"],
)
def test_cli_config_error(tmp_path: Path, raw: dict[str, Any], field: str) -> None:
    proc = _cli(_write(tmp_path / "bad.yaml", raw), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"ega-ray: config error: {field}:")


@pytest.mark.heavy
def test_cli_missing_data_path(tmp_path: Path) -> None:
    """Fails in the preflight (resolve) inside run_distill: before Ray starts."""
    proc = _cli(_write(tmp_path / "bad.yaml", _raw(data={"train": "no_such_folder"})), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ega-ray: config error: data.train:") and "no_such_folder" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*_clip_vitb32_resnet8x4.yaml")))
def test_paper_scale_configs_follow_the_seed_recipe(path) -> None:
    cfg = load_config(path)
    assert (cfg.teacher.name, cfg.teacher.weights, cfg.student.name) == ("open_clip:ViT-B-32", "openai", "resnet8x4")
    assert (cfg.optim.epochs, cfg.optim.milestones, cfg.optim.momentum, cfg.optim.weight_decay) == (
        240,
        [150, 180, 210],
        0.9,
        5e-4,
    )
    assert cfg.optim.scaled_lr(cfg.optim.lr) == pytest.approx(0.05 * cfg.optim.batch_size / 64)
    assert cfg.scaling.use_gpu and cfg.run.max_failures > 0
    assert "GPU-hours" in path.read_text(), "each recipe states the compute it needs"


def test_every_problem_of_a_file_at_once_and_help_without_torch_or_ray(tmp_path: Path) -> None:
    """A config error lists every field's problem, one line each; neither it nor --help imports torch or Ray
    (which is what keeps both near a second on a small machine)."""
    bad = _write(
        tmp_path / "bad.yaml",
        _raw(distill={"ega": {"temperature": 0}, "bogus": 1}, optim={"epochs": 0}, teacher={"name": "nope:x"}),
    )
    script = (
        "import sys\n"
        "from ega_ray.cli import main\n"
        "for argv in (['--help'], ['distill', '--help'], ['distill', '--config', sys.argv[1]]):\n"
        "    try:\n"
        "        code = main(argv)\n"
        "    except SystemExit as done:\n"
        "        code = done.code\n"
        "    print(code, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(bad)], capture_output=True, text=True, timeout=120)
    results = [line for line in done.stdout.splitlines() if line[:1].isdigit()]  # the help texts go there too
    assert results == ["0 []", "0 []", "2 []"], done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert [line.split(":")[2].strip() for line in lines] == [
        "teacher.name", "distill.ega.temperature", "distill.bogus", "optim.epochs"
    ], lines  # fmt: skip
    assert all(line.startswith("ega-ray: config error: ") for line in lines)
