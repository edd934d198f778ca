"""The per-node checks (ega_ray.driver.nodes) as plain functions: what a node reports, and the lines and
settings the driver derives from the reports. The checks on a real cluster of separate hosts are in
tests/test_multihost.py."""

from __future__ import annotations

import os
import socket

import pytest

from ega_ray import uris
from ega_ray.config import parse_config
from ega_ray.driver.nodes import CLUSTER_MAX_FAILURES, NodeReport, max_failures, plan, probe_node, read_inputs


def _cfg(**run):
    raw = {"data": {"train": "s3://b/digits/train", "test": "s3://b/digits/test"}, "teacher": {"name": "zoo:resnet8"}}
    raw["run"] = run
    return parse_config(raw)


def _report(ip="198.18.0.11", host="w1", resolves=("198.18.0.11",), iface="eth0", **kw) -> NodeReport:
    return NodeReport(ip, host, list(resolves), iface, **kw)


def test_a_node_reports_its_inputs_its_storage_and_its_names(tmp_path):
    present = tmp_path / "train"
    present.mkdir()
    storage = tmp_path / "ckpt"
    storage.mkdir()
    (storage / "probe").touch()
    inputs = {"data.train": str(present), "data.test": str(tmp_path / "missing")}
    report = probe_node("127.0.0.1", inputs, str(storage), "probe")
    assert report.unreadable == {"data.test": f"{tmp_path / 'missing'}: no such file or folder"}
    assert report.storage_problem is None
    assert report.hostname == socket.gethostname() and report.interface == "lo"  # 127.0.0.1 is on lo
    elsewhere = probe_node("127.0.0.1", {}, str(storage), "a-probe-written-on-another-disk")
    assert elsewhere.storage_problem == "a folder on this node's own disk, not the driver's"


def test_unreadable_inputs_and_an_unshared_storage_are_one_line_each_naming_field_node_and_fix():
    cfg = _cfg()
    bad = _report(unreadable={"data.train": "/home/me/train: no such file or folder"})
    unshared = _report("198.18.0.12", "w2", ("198.18.0.12",), storage_problem="a folder on this node's own disk")
    problems, settings = plan(cfg, [bad, unshared, _report("198.18.0.13", "w3")])
    assert settings == {}
    assert len(problems) == 2
    assert problems[0].startswith("data.train: /home/me/train: no such file or folder on node w1 (198.18.0.11)")
    assert "s3:// or gs://" in problems[0]
    assert problems[1].startswith("run.storage (unset: checkpoints beside the run folder): ")
    assert "node w2 (198.18.0.12)" in problems[1] and "run.storage to s3://" in problems[1]
    assert "\n" not in "".join(problems)


def test_a_cache_build_names_its_output_not_the_checkpoints_when_a_node_cannot_share_it():
    """cache-teacher writes no checkpoint: its Ray Data writers write the cache, so its output is what every
    node must share (a local output's parent folder: its temporary sibling is built there)."""
    from ega_ray.driver.teacher_cache import cache_written

    unshared = _report("198.18.0.12", "w2", ("198.18.0.12",), storage_problem="a folder on this node's own disk")
    written = cache_written("/mnt/runs/.cache.tmp-1/embeddings")
    problems, _ = plan(_cfg(), [unshared], written)
    assert problems == [
        "--output (its parent folder): /mnt/runs is a folder on this node's own disk on node w2 (198.18.0.12); the "
        "Ray Data writers on every node write the cache there: use s3://…, gs://… or a path every node mounts"
    ]
    remote = cache_written("s3://b/cache/embeddings?endpoint_override=198.18.0.2:9000")
    assert remote.location == "s3://b/cache/embeddings?endpoint_override=198.18.0.2:9000"


def test_hostnames_on_loopback_set_the_interface_when_every_node_names_it_alike():
    cfg = _cfg()
    loop = [_report("198.18.0.11", "w1", ("127.0.1.1",)), _report("198.18.0.12", "w2", ("127.0.1.1",))]
    assert plan(cfg, loop) == ([], {"scaling.socket_ifname": "eth0"})
    fine = [_report("198.18.0.11", "w1"), _report("198.18.0.12", "w2")]
    assert plan(cfg, fine) == ([], {})  # nothing set where nothing is wrong
    one_worker = parse_config(cfg.model_dump(mode="json") | {"scaling": {"num_workers": 1}})
    assert plan(one_worker, loop) == ([], {})  # no DDP mesh to reach


def test_hostnames_on_loopback_with_interfaces_that_differ_say_how_to_fix_it():
    cfg = _cfg()
    reports = [_report("198.18.0.11", "w1", ("127.0.1.1", "::1"), "eth0"), _report("198.18.0.12", "w2", iface="ens5")]
    problems, settings = plan(cfg, reports)
    assert settings == {}
    (line,) = problems
    assert line.startswith("node w1 (198.18.0.11): its hostname resolves to 127.0.1.1, ::1")
    assert "198.18.0.11: eth0, 198.18.0.12: ens5" in line
    assert "/etc/hosts" in line and "GLOO_SOCKET_IFNAME" in line and "NCCL_SOCKET_IFNAME" in line


@pytest.mark.parametrize(
    ("configured", "storage", "nodes", "expected"),
    [
        (None, None, 1, 0),  # one machine: a failure is a bug, a restart repeats it
        (None, "/mnt/shared/ckpt", 1, 0),
        (None, "s3://bucket/ega-ray", 1, CLUSTER_MAX_FAILURES),  # a head alone, workers to come: remote storage
        (None, None, 3, CLUSTER_MAX_FAILURES),  # several nodes: the checks proved the folder shared
        (0, "s3://bucket/ega-ray", 3, 0),  # what the user set wins
        (-1, None, 1, -1),
    ],
)
def test_restarts_default_to_surviving_a_preemption_where_a_restart_can_resume(configured, storage, nodes, expected):
    assert max_failures(configured, storage, nodes) == expected
    assert _cfg().run.max_failures is None  # unset unless the user sets it


def test_the_inputs_checked_are_the_splits_and_the_teacher_files_not_a_hub_tag(tmp_path):
    cfg = _cfg()
    cfg.teacher.weights = "openai"
    cfg.data.validation = "s3://b/digits/validation"
    assert read_inputs(cfg) == {
        "data.train": "s3://b/digits/train",
        "data.test": "s3://b/digits/test",
        "data.validation": "s3://b/digits/validation",
    }
    cfg.teacher.weights = str(tmp_path / "teacher.pt")
    assert read_inputs(cfg)["teacher.weights"] == str(tmp_path / "teacher.pt")


@pytest.mark.parametrize(
    ("base", "parts", "joined", "name"),
    [
        ("/runs/ckpt/", ("exp", "trials"), "/runs/ckpt/exp/trials", "trials"),
        ("s3://b/ega-ray", ("exp",), "s3://b/ega-ray/exp", "exp"),
        (
            "s3://b/ega-ray/?endpoint_override=198.18.74.2:9000&scheme=http",
            ("exp", "search"),
            "s3://b/ega-ray/exp/search?endpoint_override=198.18.74.2:9000&scheme=http",
            "search",
        ),
    ],
)
def test_locations_under_a_storage_uri_keep_its_query_for_an_s3_compatible_server(base, parts, joined, name):
    """An S3-compatible server is named in the URI's query (pyarrow's from_uri): every location derived from
    run.storage must carry it, after the path."""
    assert uris.join(base, *parts) == joined
    assert uris.basename(joined) == name
    assert uris.is_uri(base) == base.startswith("s3://")


def test_a_local_ray_polls_its_workers_often_and_keeps_what_the_user_set(monkeypatch):
    """The defaults a local Ray starts with (connect_ray), each only where the environment has none."""
    from ega_ray.constants import LOCAL_HEALTH_CHECK_INTERVAL_S
    from ega_ray.driver.launch import set_local_train_defaults

    for name in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        monkeypatch.setenv(name, "unset below")  # recorded, so the value set here is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "42")
    set_local_train_defaults()
    assert float(os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]) == LOCAL_HEALTH_CHECK_INTERVAL_S < 2.0
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "42", "a user's setting is kept"
