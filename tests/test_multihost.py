"""ega-ray on a cluster of separate hosts (tests/multihost.py): a head and two workers, each with its own
network, hostname, disk and /etc/hosts, an S3-compatible server as the only shared storage, and jobs submitted
from a client host with the real ``ray job submit`` and token auth. The workers' own names resolve to
127.0.1.1, as on stock Ubuntu images, so every job here also crosses the loopback-hostname trap.

One cluster serves the module. Marked ``multihost``; needs root, else each test skips with the reason."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from multihost import BIN, MultiHostCluster, missing_privileges

# one cluster of fixed names and addresses per machine: the module's tests share a worker of pytest-xdist
# (--dist loadgroup; tests/conftest.py's GROUPED_FILES stops a run where that fails) and MultiHostCluster.start
# waits for any other session's cluster to stop
pytestmark = [pytest.mark.multihost, pytest.mark.xdist_group("multihost")]

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
    digits = root / "digits"
    prepare = [str(BIN / "ega-ray"), "prepare", "digits", "--out", str(digits)]
    prepared = subprocess.Popen(prepare, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hosts.start()  # while the split is prepared
        hosts.make_bucket(BUCKET)
        _, errors = prepared.communicate(timeout=300)
        assert prepared.returncode == 0, errors[-2000:]
        hosts.upload(digits, hosts.s3_uri(f"{BUCKET}/data/digits"))
        yield hosts
    finally:
        if prepared.poll() is None:
            prepared.kill()
            prepared.wait()
        hosts.stop()


@pytest.fixture(scope="module")
def bucket_cache(cluster) -> str:
    """``cache-teacher`` as a job: its Ray Data writers run on the worker hosts and write the teacher's
    2-view cache of the bucket's training split to the bucket; its URI. Built once: the cached-mode run of
    the lost-host test reads it."""
    cache = cluster.s3_uri(f"{BUCKET}/cache/digits")
    done = submit(cluster, ["--config", "configs/smoke.yaml", *bucket_data(cluster), "--views", "2",
                            "--output", cache], script="cache_teacher")  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log, log[-4000:]
    return cache


def job(args: list[str], script: str = "distill", submission_id: str | None = None) -> list[str]:
    """``ray job submit`` of ``jobs/<script>.py``, as docs/cluster.md shows (``submission_id``: the id that
    ``ray job stop`` takes)."""
    named = ["--submission-id", submission_id] if submission_id else []
    return [
        str(BIN / "ray"), "job", "submit", *named, "--working-dir", str(REPO), "--runtime-env",
        str(REPO / "jobs" / "runtime_env.yaml"), "--", "python", f"jobs/{script}.py", *args,
    ]  # fmt: skip


def submit(
    cluster: MultiHostCluster, args: list[str], timeout: float = 600, script: str = "distill"
) -> subprocess.CompletedProcess:
    """A job submitted from the client host, waited for."""
    return cluster.client_run(job(args, script), timeout)


@contextmanager
def stopped_if_left_running(cluster: MultiHostCluster, driver: subprocess.Popen, submission_id: str):
    """The job ``submission_id`` (its submitting client ``driver``) is stopped when the block fails while it
    runs: a job left running would hold the worker hosts' CPUs, and the module's next tests would wait."""
    try:
        yield
    except BaseException:
        if driver.poll() is None:
            cluster.client_run([str(BIN / "ray"), "job", "stop", submission_id], timeout=120)
            driver.kill()
            driver.wait(timeout=30)
        raise


def registered_epoch(cluster: MultiHostCluster, run: str) -> int:
    """The newest epoch whose checkpoint Ray Train's controller has registered in the bucket (what a restart
    restores from), from its checkpoint-manager snapshot; 0 before the first."""
    text = cluster.read_bucket(cluster.s3_uri(f"{BUCKET}/ckpt/{run}/checkpoint_manager_snapshot.json"))
    try:
        snapshot = json.loads(text or "")
    except json.JSONDecodeError:
        return 0
    return max((r["metrics"]["epoch"] for r in snapshot["checkpoint_results"]), default=0)


def bucket_data(cluster: MultiHostCluster) -> list[str]:
    uri = cluster.s3_uri(f"{BUCKET}/data/digits")
    return ["--set", f"data.train={uri.replace('?', '/train?')}", "--set", f"data.test={uri.replace('?', '/test?')}"]


def train_workers(cluster: MultiHostCluster) -> dict[str, str]:
    """Every Ray Train worker actor (live or finished) → the address of its node, from the head's state API."""
    code = (
        "import json; from ray.util.state import list_actors, list_nodes\n"
        "ips = {n.node_id: n.node_ip for n in list_nodes()}\n"
        "actors = list_actors(filters=[('class_name', '=', 'RayTrainWorker')], limit=1000)\n"
        "print(json.dumps({a.actor_id: ips[a.node_id] for a in actors}))\n"
    )
    done = cluster.client_python(code, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_worker_ips(cluster: MultiHostCluster) -> set[str]:
    """The addresses of the nodes that hosted Ray Train workers (live or finished)."""
    return set(train_workers(cluster).values())


def trial_states(cluster: MultiHostCluster, trials: str, histories: bool = False) -> dict[str, dict]:
    """Each trial's latest registered checkpoint under ``trials`` (a search's ``<storage>/<output>/trials``
    URI), read from the client host as the search's report reads it (``latest_state``): trial id → its
    epoch, and with ``histories`` its epoch history. Trials without a registered checkpoint are left out."""
    code = (
        "import json, sys\n"
        f"if {str(REPO)!r} not in sys.path:  # the client's Python runs every poll\n"
        f"    sys.path.insert(0, {str(REPO)!r})\n"
        "import pyarrow.fs as fs\n"
        "trials = sys.argv[1]\n"
        "s3, root = fs.FileSystem.from_uri(trials)\n"
        "found = s3.get_file_info(fs.FileSelector(root, allow_not_found=True))\n"
        "names = [i.base_name for i in found if i.type == fs.FileType.Directory]\n"
        "out = {}\n"
        "for name in names:\n"
        "    snapshot = f'{root}/{name}/checkpoint_manager_snapshot.json'\n"
        "    if s3.get_file_info(snapshot).type != fs.FileType.File:\n"
        "        continue\n"
        "    if sys.argv[2] == '1':\n"
        "        from ega_ray.worker.common import latest_state\n"
        "        state = latest_state(trials, name)\n"
        "        out[name] = {'epoch': state['epoch'], 'history': state['history']}\n"
        "    else:\n"
        "        results = json.loads(s3.open_input_stream(snapshot).read())['checkpoint_results']\n"
        "        out[name] = {'epoch': max((r['metrics']['epoch'] for r in results), default=0)}\n"
        "print(json.dumps(out, default=float))\n"
    )
    done = cluster.client_python(code, trials, "1" if histories else "0", timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cached_distill_job_on_two_hosts_with_everything_in_the_bucket_survives_a_lost_host(cluster, bucket_cache):
    """Data, the teacher's cache and checkpoints (run.storage) in the bucket; run.max_failures unset, so the
    remote storage's default restarts apply. Once the first checkpoint is registered a worker host is lost
    without grace and a fresh one joins: the run resumes from the bucket on it, reading the teacher's
    embeddings from the bucket on hosts that never held them on disk, and finishes every epoch, each
    counted once."""
    storage = cluster.s3_uri(f"{BUCKET}/ckpt")
    epochs = 4  # a cached epoch takes seconds: the run must still be training when the host is lost
    args = [*SMOKE, *bucket_data(cluster), "--set", f"optim.epochs={epochs}", "--set", "optim.milestones=[3]",
            "--set", "teacher.mode=cached", "--set", f"teacher.cache={bucket_cache}",
            "--set", f"run.storage={storage}", "--output", "/mnt/runs/two-hosts"]  # fmt: skip
    log_file = cluster.logs / "two-hosts-job.log"
    driver = cluster.client_spawn(job(args, submission_id="two-hosts"), log_file)
    with stopped_if_left_running(cluster, driver, "two-hosts"):
        deadline = time.monotonic() + 420
        while (lost_after_epoch := registered_epoch(cluster, "two-hosts")) < 1:
            assert driver.poll() is None, log_file.read_text()[-4000:]
            assert time.monotonic() < deadline, "no registered checkpoint within 7 minutes"
            time.sleep(1)
        lost = cluster.workers["w2"].address
        cluster.kill_host("w2")
        # reading the bucket takes seconds, in which the run may have registered more epochs: what it had then
        registered_at_loss = registered_epoch(cluster, "two-hosts")
        assert registered_at_loss < epochs, "the run ended before the loss"
        cluster.add_worker("w3", WORKERS["w2"])
        assert driver.wait(timeout=480) == 0, log_file.read_text()[-4000:]
    log = log_file.read_text()
    assert "succeeded" in log, log[-4000:]
    # the node checks ran before training and found the loopback hostnames: DDP was told its interface
    assert "[nodes] checked 2 node(s)" in log, log[-4000:]
    assert "DDP binds to interface eth0" in log, log[-4000:]
    # Train workers ran on both first hosts, and after the loss on the replacement
    assert train_worker_ips(cluster) == {cluster.workers["w1"].address, lost, cluster.workers["w3"].address}
    run = cluster.head.outside("/mnt/runs/two-hosts")  # the run folder: on the head's own disk
    assert json.loads((run / "summary.json").read_text())["train_rows"] > 0
    recorded = json.loads((run / ".ega-ray.json").read_text())["inputs"]["teacher.cache"]  # what a resume checks
    assert recorded["path"] == bucket_cache and len(recorded["manifest_sha256"]) == 64, recorded
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))  # none lost, none twice
    restarts = [int(r["restarts"]) for r in rows]
    # the epochs registered before the loss were trained once, by the first workers; the run then resumed (the
    # epochs between the last poll and the loss may have been reported before it, so only the order is fixed)
    assert restarts[:lost_after_epoch] == [0] * lost_after_epoch, restarts
    assert restarts == sorted(restarts) and restarts[-1] >= 1, (lost_after_epoch, registered_at_loss, restarts)
    checkpoints = cluster.list_bucket(cluster.s3_uri(f"{BUCKET}/ckpt/two-hosts"))
    assert any(p.endswith("checkpoint_manager_snapshot.json") for p in checkpoints), checkpoints
    assert any("/checkpoint_" in p and p.endswith("state.pt") for p in checkpoints), checkpoints
    for host in cluster.workers.values():  # nothing of the run on the workers' disks
        assert not host.outside("/mnt/runs").joinpath("two-hosts").exists()


def test_a_search_across_hosts_resumes_from_the_bucket_after_its_driver_is_stopped(cluster):
    """A 2-trial search with one Train worker per trial and room for one per host, so the trials train on both
    worker hosts at once, its state and checkpoints under run.storage in the bucket. Once a trial has
    registered a checkpoint the driver is stopped (``ray job stop`` from the client host, which ends the
    trials with it); ``--resume`` then finishes the search: every trial has every epoch exactly once, those
    registered before the stop were not trained again, and trials.csv / best.yaml are on the head."""
    storage = cluster.s3_uri(f"{BUCKET}/tune")
    trials = cluster.s3_uri(f"{BUCKET}/tune/tune-hosts/trials")
    epochs = 6  # room for the epochs a trial trains while `ray job stop` reaches it: 2 were seen, at 3 epochs
    args = [*SMOKE, *bucket_data(cluster), "--num-samples", "2", "--set", f"optim.epochs={epochs}",
            "--set", "optim.milestones=[2]", "--set", "scaling.num_workers=1", "--set", "tune.max_concurrent=2",
            "--set", f"tune.grace_period={epochs}", "--set", f"run.storage={storage}",
            "--output", "/mnt/runs/tune-hosts"]  # fmt: skip
    workers_before = set(train_workers(cluster))
    log_file = cluster.logs / "tune-job.log"
    driver = cluster.client_spawn(job(args, "tune", submission_id="tune-hosts"), log_file)
    with stopped_if_left_running(cluster, driver, "tune-hosts"):
        deadline = time.monotonic() + 420
        before = trial_states(cluster, trials)  # trial id → its registered epoch, polled until one has one
        while not any(t["epoch"] >= 1 for t in before.values()):
            assert driver.poll() is None, log_file.read_text()[-4000:]
            assert time.monotonic() < deadline, "no trial registered a checkpoint within 7 minutes"
            time.sleep(1)
            before = trial_states(cluster, trials)
    stop = cluster.client_run([str(BIN / "ray"), "job", "stop", "tune-hosts"], timeout=120)
    assert stop.returncode == 0, (stop.stdout + stop.stderr)[-2000:]
    driver.wait(timeout=120)
    assert "succeeded" not in log_file.read_text()
    time.sleep(5)  # the trials end with their driver; what they registered until then is restored
    at_stop = {name: t["epoch"] for name, t in trial_states(cluster, trials).items()}
    first_ips = {ip for actor, ip in train_workers(cluster).items() if actor not in workers_before}
    assert first_ips == {h.address for h in cluster.workers.values()}, first_ips  # the trials used both hosts
    assert any(1 <= e < epochs for e in at_stop.values()), f"no trial stopped between epochs: {at_stop}"

    done = submit(cluster, ["--resume", "--output", "/mnt/runs/tune-hosts"], script="tune")
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log, log[-4000:]
    out = cluster.head.outside("/mnt/runs/tune-hosts")
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "COMPLETED" and int(r["epochs"]) == epochs for r in rows), rows
    assert (out / "best.yaml").is_file() and (out / "search.png").read_bytes()[:4] == b"\x89PNG"
    ids = {r["trial_id"] for r in rows}
    assert set(before) <= ids and set(at_stop) <= ids, (before, at_stop, ids)  # the same trials, resumed
    final = trial_states(cluster, trials, histories=True)
    assert set(final) == ids
    for name, trial in final.items():
        history = trial["history"]
        assert [h["epoch"] for h in history] == list(range(1, epochs + 1)), (name, history)  # each epoch once
        restarts = [h["restarts"] for h in history]
        done_before = before.get(name, {"epoch": 0})["epoch"]
        assert restarts[:done_before] == [0] * done_before, (name, restarts)  # not trained again
        trained_after = at_stop.get(name, 0)
        if 1 <= trained_after < epochs:  # resumed from its checkpoint, not from zero
            assert min(restarts[trained_after:]) >= 1, (name, at_stop, restarts)
    state = cluster.list_bucket(cluster.s3_uri(f"{BUCKET}/tune/tune-hosts/search"))
    assert any(p.rsplit("/", 1)[1].startswith("experiment_state") for p in state), state  # what --resume restores
    checkpoints = cluster.list_bucket(trials)
    for name in ids:
        assert any(f"/{name}/checkpoint_" in p and p.endswith("state.pt") for p in checkpoints), (name, checkpoints)
        # the finished run folder: written on the worker host that ran the trial last (none on the head), and
        # copied beside the trial's checkpoints, where it outlives the host
        assert any(h.outside(f"/mnt/runs/tune-hosts/trials/{name}/summary.json").is_file()
                   for h in cluster.workers.values()), name  # fmt: skip
        copy = cluster.s3_uri(f"{BUCKET}/tune/tune-hosts/trials/{name}/run_folder")
        metrics = cluster.read_bucket(copy.replace("?", "/metrics.csv?")) or ""
        assert [int(r["epoch"]) for r in csv.DictReader(metrics.splitlines())] == list(range(1, epochs + 1)), metrics
        assert json.loads(cluster.read_bucket(copy.replace("?", "/summary.json?")) or "{}").get("epochs") == epochs
    assert not (out / "trials").exists()


def test_a_teacher_cache_job_writes_every_view_to_the_bucket_and_nothing_to_a_hosts_disk(cluster, bucket_cache):
    """The cache the ``bucket_cache`` job built: its manifest counts every view of every image, its listing
    is the manifest's files, and no host kept any of it on disk (the lost-host test trains from it)."""
    manifest = json.loads(cluster.read_bucket(bucket_cache.replace("?", "/manifest.json?")) or "{}")
    assert manifest["views"] == 2 and manifest["rows"] == 2 * manifest["images"] > 0, manifest
    listed = cluster.list_bucket(bucket_cache)
    assert sorted(p.split("/embeddings/", 1)[1] for p in listed if "/embeddings/" in p) == sorted(manifest["files"])
    for host in (cluster.head, *cluster.workers.values()):  # nothing of it on any host's disk
        assert not list(host.outside("/mnt/runs").rglob("*.parquet"))


def test_inputs_only_the_driver_sees_and_a_local_storage_are_refused_before_training(cluster):
    """A split on the head's disk only and no run.storage: one line each, naming the field, a worker host and
    the fix, before any training worker starts."""
    shutil.copytree(cluster.root / "digits", cluster.head.outside("/mnt/digits"))  # the fixture's split
    t0 = time.monotonic()
    args = [*SMOKE, "--set", "data.train=/mnt/digits/train", "--set", "data.test=/mnt/digits/test",
            "--output", "/mnt/runs/local-only"]  # fmt: skip
    done = submit(cluster, args, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode != 0 and "failed" in log, log[-4000:]
    for name in cluster.workers:  # w1 and w2, or w3 for the w2 lost above
        assert f"data.train: /mnt/digits/train: no such file or folder on node {name} (" in log, log[-4000:]
    unshared = "run.storage (unset: checkpoints beside the run folder): /mnt/runs is a folder on this node's own disk"
    assert unshared in log, log[-4000:]
    assert "RayTrainWorker" not in log and "Traceback" not in log, log[-4000:]
    assert time.monotonic() - t0 < 240
    assert not cluster.head.outside("/mnt/runs/local-only").exists()  # refused before the folder was claimed
