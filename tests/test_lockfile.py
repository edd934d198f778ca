"""requirements.lock: it pins what pyproject.toml asks for, every machine installs it, and a job's driver
refuses a node whose packages differ from it."""

from __future__ import annotations

from importlib import metadata

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as pip vendors it
    from pip._vendor import tomli as tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

from ega_ray.cli import main
from ega_ray.lockfile import LOCK_ENV, canonical, differences, pinned

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"


def test_the_lock_pins_every_dependency_of_pyproject_within_its_bounds():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = pinned(LOCK)
    for req in wanted:
        name = canonical(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock (run `make lock`)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req}: the lock pins {pins[name]}"
        for extra in req.extras:  # ray[data] etc.: the extra's own requirements are pinned too
            for sub in metadata.requires(req.name) or []:
                sub_req = Requirement(sub)
                if sub_req.marker and sub_req.marker.evaluate({"extra": extra}) and "extra" in str(sub_req.marker):
                    assert canonical(sub_req.name) in pins, f"{sub_req.name} (of {req.name}[{extra}]) not pinned"
    assert (pins["ray"], pins["torch"], pins["torchvision"]) == ("2.60.0", "2.14.1", "0.29.1")
    assert "--index-url" not in LOCK.read_text() and "--find-links" not in LOCK.read_text(), "no machine paths"


def test_every_machine_installs_the_lock():
    makefile = (REPO / "Makefile").read_text()
    assert "pip install -q -r requirements.lock" in makefile and "pip install -q --no-deps -e ." in makefile
    for path in ("cluster.yaml", "cluster-gcp.yaml"):
        setup = yaml.safe_load((REPO / path).read_text())["setup_commands"]
        assert setup == [
            "python3 -m pip install -q -r ~/ega-ray/requirements.lock",
            "python3 -m pip install -q --no-deps -e ~/ega-ray",
        ], path
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())["env_vars"]
    assert env[LOCK_ENV] == "requirements.lock"


def test_a_job_on_a_node_with_other_versions_stops_naming_them(tmp_path, monkeypatch, capsys):
    lock = tmp_path / "requirements.lock"
    numpy, pyyaml = metadata.version("numpy"), metadata.version("pyyaml")
    lock.write_text(f"numpy=={numpy}\n    # via ray\npyyaml==0.0.1\nno-such-package==1.0\npip==0.1\n")
    assert differences(lock) == ["no-such-package: lock 1.0, not installed", f"pyyaml: lock 0.0.1, installed {pyyaml}"]
    monkeypatch.setenv(LOCK_ENV, str(lock))
    assert main(["distill", "--config", str(REPO / "configs" / "smoke.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ega-ray: config error: {LOCK_ENV}: this node's packages differ")
    assert "no-such-package: lock 1.0, not installed" in err and "numpy" not in err
