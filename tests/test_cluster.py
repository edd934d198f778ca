"""Cluster operations on real Ray clusters: `ray job submit` with token auth to the fake-multinode autoscaler,
a node lost under it, and the autoscaler config's validation. The test starts its own cluster and stops only it."""

from __future__ import annotations

import csv
import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from ray_processes import RAY, Head, free_port, kill_node, make_token, ray_head

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.cluster
def test_ray_job_submit_to_an_autoscaling_cluster_with_token_auth_survives_a_lost_node(tmp_path):
    """The docs' `ray job submit` command against a head that trains nothing (0 CPUs) on Ray's fake
    multi-node autoscaler (worker type: 1 CPU, min 0, max 2), token auth on: the 2-worker smoke run makes
    the cluster scale up. Once its first checkpoint is registered, a node of its Train workers is lost
    without grace (a host that dies: its raylet, agents and workers killed); the run restarts from that
    checkpoint on the nodes the autoscaler leaves or adds, finishes every epoch once, and writes its
    outputs; the idle nodes go away afterwards. One cluster for both: each start is a dozen processes."""
    auth = make_token(tmp_path / "home")
    port = free_port()
    config = tmp_path / "autoscaler.yaml"
    # not shorter: Ray Data's 0-CPU actors do not keep a node busy, and a node dropped under one fails the job
    config.write_text(yaml.safe_dump(fake_autoscaling_config(f"127.0.0.1:{port}", idle_timeout_minutes=0.2)))
    # a lost node is given up after 10 s without a heartbeat (Ray's default: 30 s), freeing its place for another
    fake = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10"}
    path_env = {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}  # the job's `python` is this environment's
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | path_env | auth
    out, epochs = tmp_path / "smoke-job", 4
    with ray_head(
        0, env=auth, port=port, extra_args=(f"--autoscaling-config={config}",), extra_env=fake | path_env
    ) as head:
        wait_for(lambda: alive_nodes(head) == 1, 60, "the head node never showed up")  # and nothing else
        without_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"HOME": str(tmp_path)}
        refused = subprocess.run(
            [RAY, "job", "list", "--address", head.dashboard_url],
            env=without_token, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode != 0, "the job server answered a client without the token"
        # the exact command of docs/cluster.md
        with open(tmp_path / "submit.log", "w") as log:
            submit = subprocess.Popen(
                [RAY, "job", "submit", "--address", head.dashboard_url, "--working-dir", ".",
                 "--runtime-env", "jobs/runtime_env.yaml", "--",
                 "python", "jobs/distill.py", "--config", "configs/smoke.yaml", "--output", str(out),
                 "--set", "optim.max_steps_per_epoch=6", "--set", f"optim.epochs={epochs}",
                 "--set", "optim.milestones=[3]", "--set", "run.max_failures=2"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        peak, deadline, lost_after_epoch = 1, time.monotonic() + 420, 0
        while submit.poll() is None:
            assert time.monotonic() < deadline, "the job did not finish in 7 minutes"
            peak = max(peak, alive_nodes(head))
            if not lost_after_epoch and (lost_after_epoch := registered_epoch(out)) >= 1:
                assert kill_node(head.temp_dir, train_worker_nodes(head)[0]) > 1
            time.sleep(0.2)
        text = (tmp_path / "submit.log").read_text()
        assert submit.returncode == 0, text[-3000:]
        assert peak >= 2, "the autoscaler added no worker node"
        assert 1 <= lost_after_epoch < epochs, "the run finished before its node was lost"
        job_id = next(line.split("'")[1] for line in text.splitlines() if "submitted successfully" in line)
        status = subprocess.run(
            [RAY, "job", "status", "--address", head.dashboard_url, job_id],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
        assert f"Job '{job_id}' succeeded" in plain, plain
        # the dashboard's Train tab (state tracking is on through jobs/runtime_env.yaml)
        runs = dashboard_get(head, "/api/train/v2/runs/v1")["train_runs"]
        assert [r["status"] for r in runs if r["name"] == out.name] == ["FINISHED"], runs
        wait_for(lambda: alive_nodes(head) == 1, 120, "the idle worker nodes were not removed")
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))  # none lost, none twice
    restarts = [int(r["restarts"]) for r in rows]
    assert restarts[:lost_after_epoch] == [0] * lost_after_epoch, restarts  # trained once, before the loss
    assert restarts == sorted(restarts) and restarts[-1] >= 1, (lost_after_epoch, restarts)  # then resumed
    # what a run writes
    rows = read_metrics(out)
    assert all(float(r["train_img_per_s"]) == pytest.approx(2 * float(r["train_img_per_s_per_worker"])) for r in rows)
    assert all(float(r["gpu_mem_peak_gib"]) == 0.0 and float(r["gpu_util_pct"]) == 0.0 for r in rows)  # CPU run
    assert list(out.glob("checkpoint_*/state.pt")), "no checkpoint in the run folder"
    exports = ("student_last.pt", "student_last.safetensors", "student_best.pt2")
    for name in ("config.yaml", "learning_curves.png", *exports):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == epochs and summary["num_workers"] == 2 and 0.0 <= summary["test_top1_last"] <= 100.0
    assert summary["labeled_train_rows"] == pytest.approx(0.5 * summary["train_rows"], abs=10)  # label_fraction
    assert (out / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    deployed = torch.export.load(out / "student_best.pt2").module()  # float images in [0, 1], dynamic batch
    assert deployed(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    exported = torch.load(out / "student_last.pt", weights_only=True)
    assert exported["student"] == "resnet8" and exported["num_classes"] == 10


def test_runtime_env_carries_no_credentials():
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    secret_words = ("key", "secret", "token", "password", "credential")
    for name in env.get("env_vars", {}):
        assert not any(w in name.lower() for w in secret_words), name


SECRETS = (".env", ".env.local", ".aws/credentials", ".ssh/id_ed25519", "id_rsa", "id_ecdsa.pub", "deploy/server.pem",
           "deploy/tls.key", ".netrc", "ega_ray/data/.env")  # fmt: skip
LOCAL_ONLY = ("data/cifar100/train/part-00000.parquet", "runs/smoke/metrics.csv", ".venv/bin/python", ".git/config",
              ".whl/ray.whl")  # fmt: skip


def working_folder(root: Path) -> tuple[Path, set[str]]:
    """A checkout as a user's working folder holds it: this repository's tracked files, plus a dataset, run
    folders, a virtualenv, git's folder and secrets. Returns it and the tracked files that must travel."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((REPO / rel).read_bytes())
    for rel in SECRETS + LOCAL_ONLY:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("must not travel")
    code = {rel for rel in tracked if rel.startswith(("ega_ray/", "jobs/", "configs/")) or rel == "pyproject.toml"}
    assert {"ega_ray/data/parquet.py", "ega_ray/data/prepare.py", "ega_ray/embedded.yaml"} <= code
    return root, code


def assert_carries_the_code_and_no_secret(files: set[str], code: set[str]) -> None:
    assert not code - files, f"package files left behind: {sorted(code - files)[:10]}"
    travelled = [rel for rel in SECRETS + LOCAL_ONLY if rel in files]
    assert not travelled, f"uploaded: {travelled}"


def test_a_submitted_jobs_upload_carries_the_package_and_no_secret(tmp_path):
    """`ray job submit --working-dir .` zips the folder with Ray's own packaging code and the excludes of
    jobs/runtime_env.yaml (and .gitignore's rules, as Ray applies them by default)."""
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import _zip_files

    root, code = working_folder(tmp_path / "checkout")
    excludes = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())["excludes"]
    _zip_files(str(root), excludes, str(tmp_path / "upload.zip"), include_gitignore=True)
    with ZipFile(tmp_path / "upload.zip") as z:
        files = {name for name in z.namelist() if not name.endswith("/")}
    assert_carries_the_code_and_no_secret(files, code)


@pytest.mark.parametrize("path", ["cluster.yaml", "cluster-gcp.yaml"])
def test_ray_up_copies_the_package_and_no_secret_to_every_node(tmp_path, path):
    """`ray up` copies the checkout to each node with rsync and the cluster file's own excludes and filter; the
    arguments are those of Ray's command runner, run here with the real rsync into a local folder."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    config = yaml.safe_load((REPO / path).read_text())
    assert config["file_mounts"]["~/ega-ray"] == "."
    root, code = working_folder(tmp_path / "checkout")
    options = {"rsync_exclude": config["rsync_exclude"], "rsync_filter": config["rsync_filter"]}
    args = SSHCommandRunner._create_rsync_filter_args(None, options)
    subprocess.run(["rsync", "-a", *args, f"{root}/", str(tmp_path / "node")], cwd=root, check=True, timeout=120)
    files = {p.relative_to(tmp_path / "node").as_posix() for p in (tmp_path / "node").rglob("*") if p.is_file()}
    assert_carries_the_code_and_no_secret(files, code)


def test_every_cluster_verb_has_a_job_script():
    from ega_ray.cli import commands

    verbs = set(commands())
    scripts = {p.stem.replace("_", "-") for p in (REPO / "jobs").glob("*.py")}
    assert verbs <= scripts, f"no jobs/ script for {sorted(verbs - scripts)}"


def test_job_scripts_pass_their_arguments_to_the_cli(tmp_path):
    """A job script is the CLI verb: a bad config is refused the same way, before Ray starts."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: builtin:digits, test: builtin:digits}\noptim: {epochs: 0}\n")
    done = subprocess.run(
        [sys.executable, "jobs/distill.py", "--config", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "optim.epochs" in done.stderr


def train_worker_nodes(head: Head) -> list[str]:
    """IDs of the nodes that host a live Ray Train worker (the state API, as the dashboard serves it)."""
    query = "filter_keys=class_name&filter_predicates=%3D&filter_values=RayTrainWorker"
    query += "&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE"
    actors = dashboard_get(head, f"/api/v0/actors?{query}")["data"]["result"]["result"]
    return sorted({a["node_id"] for a in actors})


def registered_epoch(run_dir: Path) -> int:
    """The newest epoch whose checkpoint Ray Train's controller has registered (what a restart restores
    from); a checkpoint folder on disk alone is not registered yet. Reads Ray's checkpoint-manager snapshot."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return max((r["metrics"]["epoch"] for r in snapshot["checkpoint_results"]), default=0)


def fake_autoscaling_config(gcs_address: str, idle_timeout_minutes: float) -> dict:
    """Autoscaler v1 config for Ray's fake multi-node provider (this Ray wheel lacks its example.yaml):
    a head with 0 CPUs and a 1-CPU worker type, min 0, max 2. Every key the monitor reads is spelled out."""
    return {
        "cluster_name": "ega-ray-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,  # fake nodes share one IP
            "disable_node_updaters": True,  # nothing to set up over SSH
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_1": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def dashboard_get(head: Head, path: str) -> dict:
    """GET a dashboard endpoint with the token in the header, as any HTTP client sends it."""
    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{head.dashboard_url}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def alive_nodes(head: Head) -> int:
    """The head's count of alive nodes; -1 while its dashboard does not answer (on a loaded machine it can
    accept a connection and close it before replying), so a wait goes on instead of failing."""
    try:
        nodes = dashboard_get(head, "/api/v0/nodes")["data"]["result"]["result"]
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError):
        return -1
    return sum(n["state"] == "ALIVE" for n in nodes)


def wait_for(condition, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(1)


AWS_INSTANCE = re.compile(r"^[a-z][a-z0-9-]*\.[0-9]*[a-z]+$")  # family.size: m5.2xlarge, p4d.24xlarge
GCP_MACHINE = re.compile(r"^[a-z][a-z0-9]*-[a-z]+-[0-9]+[a-z]?$")  # n2-standard-8, a2-highgpu-1g


@pytest.mark.parametrize("path", sorted(p.name for p in REPO.glob("cluster*.yaml")))
def test_cluster_yaml_passes_ray_validation_and_our_checks(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / path).read_text())
    config = prepare_config(raw)
    validate_config(config)  # Ray's own schema check, no cloud credentials needed
    provider = config["provider"]
    types = config["available_node_types"]
    # what Ray's validation lets through
    assert provider.get("region"), "no region"
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["max_workers"] == 0, "the head must not train"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert sorted(t["resources"]["GPU"] for t in gpu_types.values()) == [1, 8]
    assert any(t["resources"].get("CPU") and not t["resources"].get("GPU") for n, t in types.items() if t is not head)
    for name, t in types.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= config["max_workers"], name
        node = t["node_config"]
        if provider["type"] == "aws":
            assert AWS_INSTANCE.match(node["InstanceType"]), node["InstanceType"]
            if name in gpu_types:
                assert node["InstanceMarketOptions"]["MarketType"] == "spot", name
        else:
            assert GCP_MACHINE.match(node["machineType"]), node["machineType"]
            if name in gpu_types:
                assert node["scheduling"]["provisioningModel"] == "SPOT", name
    assert config["idle_timeout_minutes"] > 0
    assert "0.0.0.0" not in yaml.safe_dump(raw), "nothing may bind to all interfaces"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    installs = " ".join(config["setup_commands"])
    assert "-r ~/ega-ray/requirements.lock" in installs  # the pinned versions (tests/test_lockfile.py)
    # least privilege: every node runs as a scoped identity, none with the provider's broad default, and SSH
    # comes in only where the user's own firewall says (Ray's default AWS group opens port 22 to 0.0.0.0/0)
    for name, t in types.items():
        node, role = t["node_config"], "head" if t is head else "worker"
        if provider["type"] == "aws":
            assert node["IamInstanceProfile"]["Arn"] == f"arn:aws:iam::YOUR-ACCOUNT-ID:instance-profile/ega-ray-{role}"
            assert node["SecurityGroupIds"] == ["sg-YOUR-GROUP-ID"], name
        else:
            assert [a["email"] for a in node["serviceAccounts"]] == [
                f"ega-ray-{role}@YOUR-PROJECT-ID.iam.gserviceaccount.com"
            ], name
            assert node["networkInterfaces"][0]["network"] == "projects/YOUR-PROJECT-ID/global/networks/ega-ray"
    assert "security_group" not in provider, "Ray would add SSH from 0.0.0.0/0 to a group it manages"


@pytest.mark.parametrize("role", ["head", "worker"])
def test_aws_policies_grant_the_run_prefix_and_no_more(role):
    policy = json.loads((REPO / "docs" / "iam" / f"aws-{role}-policy.json").read_text())
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all("*" not in a for a in actions), statement  # no wildcard actions
        if any(a.startswith("s3:") for a in actions):
            assert statement["Resource"] in (
                "arn:aws:s3:::YOUR-BUCKET/ega-ray/*",  # read/write: the runs
                "arn:aws:s3:::YOUR-BUCKET/datasets/*",  # read only: the data
                "arn:aws:s3:::YOUR-BUCKET",  # listing, under the prefix condition
            ), statement
            if statement["Resource"].endswith("/datasets/*"):
                assert actions == ["s3:GetObject"]
            if statement["Resource"] == "arn:aws:s3:::YOUR-BUCKET":
                assert set(statement["Condition"]["StringLike"]["s3:prefix"]) <= {
                    "ega-ray", "ega-ray/*", "datasets", "datasets/*"
                }  # fmt: skip
        elif role == "worker":
            raise AssertionError(f"a worker needs storage only: {statement}")
        if "ec2:TerminateInstances" in actions:
            assert statement["Condition"]["StringEquals"] == {"ec2:ResourceTag/ray-cluster-name": "ega-ray"}
        if "iam:PassRole" in actions:
            assert statement["Resource"] == "arn:aws:iam::YOUR-ACCOUNT-ID:role/ega-ray-worker"


def test_the_firewall_commands_in_the_docs_admit_ssh_from_the_users_range_only():
    text = (REPO / "docs" / "security.md").read_text()
    ssh = [line for line in text.splitlines() if "22" in line and ("authorize-security-group-ingress" in line
                                                                   or "firewall-rules create" in line)]  # fmt: skip
    assert len(ssh) == 2 and all("YOUR-CIDR" in line for line in ssh), ssh
    assert "0.0.0.0/0" not in "\n".join(line for line in text.splitlines() if line.startswith(("aws ", "gcloud ")))
