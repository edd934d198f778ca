"""The embedded default as a search or benchmark: a plain config whose SimCLR teacher lives in the cache,
one folder per pretraining settings, pinned by its SHA-256; and an output folder checked before a teacher
is pretrained."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ega_ray.cli import main
from ega_ray.config import Config
from ega_ray.embedded import _teacher_key, embedded_config, embedded_with_teacher, teacher_cache_folder
from ega_ray.errors import ConfigError
from ega_ray.models import build_student
from ega_ray.models.teachers.ssl_teacher import save_ssl_teacher
from ega_ray.run_folder import MARKER, claim


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EGA_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def pretrained_here(overrides: list[str], output: Path) -> Path:
    """A teacher file where ``embedded_with_teacher`` looks for one with these settings, as the embedded
    pretraining leaves it (SSL format, its settings' key), without the minutes of pretraining."""
    from ega_ray.driver.preflight import resolve

    base = resolve(embedded_config(overrides, str(output)))
    path = teacher_cache_folder(base) / "teacher.pt"
    path.parent.mkdir(parents=True)
    save_ssl_teacher(path, "resnet8", build_student("resnet8"), 16, (0.5,) * 3, (0.25,) * 3,
                     key=_teacher_key(base), knn_top1=50.0)  # fmt: skip
    return path


def test_the_embedded_experiment_config_names_and_pins_the_cached_teacher(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    teacher = pretrained_here([], out)
    assert teacher.is_relative_to(cache / "embedded-teacher")

    cfg = embedded_with_teacher([], str(out))

    assert isinstance(cfg, Config)
    assert cfg.teacher.weights == str(teacher)
    assert cfg.teacher.sha256 == hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert not out.exists(), "the experiment's folder is the search's to claim"
    # other pretraining settings are another teacher, in another folder: neither replaces the other
    from ega_ray.driver.preflight import resolve

    other = teacher_cache_folder(resolve(embedded_config(["pretrain.epochs=2"], str(out))))
    assert other.parent == teacher.parent.parent and other != teacher.parent
    # the pinned digest refuses a file changed under a paused experiment
    from ega_ray.driver.preflight import check_teacher

    save_ssl_teacher(teacher, "resnet8", build_student("resnet8"), 16, (0.5,) * 3, (0.25,) * 3, key="changed")
    with pytest.raises(ConfigError, match=r"SHA-256 .* does not match teacher.sha256"):
        check_teacher(cfg)


@pytest.mark.parametrize("command", ["tune", "benchmark"])
def test_an_earlier_experiment_is_refused_before_the_embedded_teacher_is_pretrained(
    command: str, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / command
    with claim(out, command):
        pass

    assert main([command, "--output", str(out)]) == 2

    err = capsys.readouterr().err.strip()
    assert err == (
        f"ega-ray: output folder: --output {out}: holds an earlier `ega-ray {command}`; continue it with --resume, "
        "or choose another folder"
    )
    assert not (cache / "embedded-teacher").exists(), "a teacher was pretrained for a folder that was refused"
    assert sorted(p.name for p in out.iterdir()) == [MARKER]


def test_a_new_experiment_without_a_config_is_one_clear_error(tmp_path: Path) -> None:
    from ega_ray.tune.benchmark import run_benchmark
    from ega_ray.tune.search import run_search

    for start in (lambda out: run_search(None, out), lambda out: run_benchmark(None, ["kd"], 1, out)):
        out = tmp_path / "never"
        with pytest.raises(ConfigError, match=r"config: none given; a new search or benchmark needs one"):
            start(out)
        assert not out.exists()
