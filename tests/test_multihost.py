"""ega-ray on a cluster of separate hosts (tests/multihost.py): a head and two workers, each with its own
network, hostname, disk and /etc/hosts, an S3-compatible server as the only shared storage, and jobs submitted
from a client host with the real ``ray job submit`` and token auth. The workers' own names resolve to
127.0.1.1, as on stock Ubuntu images, so every job here also crosses the loopback-hostname trap.

One cluster serves the module. Marked ``multihost``; needs root, else each test skips with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multihost import BIN, MultiHostCluster, missing_privileges

pytestmark = pytest.mark.multihost

REPO = Path(__file__).resolve().parents[1]
BUCKET = "ega-ray-test"
WORKERS = {"w1": 2, "w2": 2}  # logical CPUs per worker host; the head has none (it trains nothing)
SMOKE = [
    "--config", "configs/smoke.yaml", "--set", "optim.epochs=2", "--set", "optim.milestones=[1]",
    "--set", "optim.max_steps_per_epoch=4", "--set", "scaling.cpus_per_worker=1.5",  # one worker per host
]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing_privileges()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("multihost")
    hosts = MultiHostCluster(root, WORKERS, loopback=tuple(WORKERS))
    try:
        hosts.start()
        hosts.make_bucket(BUCKET)
        digits = root / "digits"
        done = subprocess.run(
            [str(BIN / "ega-ray"), "prepare", "digits", "--out", str(digits)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        hosts.upload(digits, hosts.s3_uri(f"{BUCKET}/data/digits"))
        yield hosts
    finally:
        hosts.stop()


def submit(cluster: MultiHostCluster, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``ray job submit`` of ``jobs/distill.py`` from the client host, as docs/cluster.md shows."""
    argv = [
        str(BIN / "ray"), "job", "submit", "--working-dir", str(REPO), "--runtime-env",
        str(REPO / "jobs" / "runtime_env.yaml"), "--", "python", "jobs/distill.py", *args,
    ]  # fmt: skip
    return cluster.client_run(argv, timeout)


def bucket_data(cluster: MultiHostCluster) -> list[str]:
    uri = cluster.s3_uri(f"{BUCKET}/data/digits")
    return ["--set", f"data.train={uri.replace('?', '/train?')}", "--set", f"data.test={uri.replace('?', '/test?')}"]


def train_worker_ips(cluster: MultiHostCluster) -> set[str]:
    """The addresses of the nodes that hosted Ray Train workers (live or finished), from the head's state API."""
    code = (
        "import json; from ray.util.state import list_actors, list_nodes\n"
        "ips = {n.node_id: n.node_ip for n in list_nodes()}\n"
        "actors = list_actors(filters=[('class_name', '=', 'RayTrainWorker')], limit=1000)\n"
        "print(json.dumps(sorted({ips[a.node_id] for a in actors})))\n"
    )
    done = cluster.client_run([sys.executable, "-c", code], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_distill_job_trains_on_two_hosts_with_everything_in_the_bucket(cluster):
    storage = cluster.s3_uri(f"{BUCKET}/ckpt")
    done = submit(cluster, [*SMOKE, *bucket_data(cluster), "--set", f"run.storage={storage}",
                            "--output", "/mnt/runs/two-hosts"])  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log, log[-4000:]
    # the node checks ran before training and found the loopback hostnames: DDP was told its interface
    assert "[nodes] checked 2 node(s)" in log, log[-4000:]
    assert "DDP binds to interface eth0" in log, log[-4000:]
    assert train_worker_ips(cluster) == {cluster.workers["w1"].address, cluster.workers["w2"].address}
    run = cluster.head.outside("/mnt/runs/two-hosts")  # the run folder: on the head's own disk
    assert json.loads((run / "summary.json").read_text())["train_rows"] > 0
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    checkpoints = cluster.list_bucket(cluster.s3_uri(f"{BUCKET}/ckpt/two-hosts"))
    assert any(p.endswith("checkpoint_manager_snapshot.json") for p in checkpoints), checkpoints
    assert any("/checkpoint_" in p and p.endswith("state.pt") for p in checkpoints), checkpoints
    for host in cluster.workers.values():  # nothing of the run on the workers' disks
        assert not host.outside("/mnt/runs").joinpath("two-hosts").exists()


def test_inputs_only_the_driver_sees_and_a_local_storage_are_refused_before_training(cluster):
    """A split on the head's disk only and no run.storage: one line each, naming the field, a worker host and
    the fix, before any training worker starts."""
    head_digits = cluster.head.outside("/mnt/digits")
    done = subprocess.run(
        [str(BIN / "ega-ray"), "prepare", "digits", "--out", str(head_digits)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    t0 = time.monotonic()
    args = [*SMOKE, "--set", "data.train=/mnt/digits/train", "--set", "data.test=/mnt/digits/test",
            "--output", "/mnt/runs/local-only"]  # fmt: skip
    done = submit(cluster, args, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode != 0 and "failed" in log, log[-4000:]
    assert "data.train: /mnt/digits/train: no such file or folder on node w1 (" in log, log[-4000:]
    assert "data.train: /mnt/digits/train: no such file or folder on node w2 (" in log, log[-4000:]
    unshared = "run.storage (unset: checkpoints beside the run folder): /mnt/runs is a folder on this node's own disk"
    assert unshared in log, log[-4000:]
    assert "RayTrainWorker" not in log and "Traceback" not in log, log[-4000:]
    assert time.monotonic() - t0 < 240
    assert not cluster.head.outside("/mnt/runs/local-only").exists()  # refused before the folder was claimed
