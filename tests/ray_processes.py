"""Real Ray clusters for the cluster-operations tests, started with Ray's own CLI and stopped without
touching any other Ray on this machine (``ray stop`` would end every Ray process here).

Each cluster gets its own temp dir; stopping it ends the ``ray start --block`` process (which takes its
node down) and then every process whose command line names that temp dir or its session (raylets of
nodes added later, workers, the dashboard). The temp dir, with the cluster's logs, is removed after a clean
stop and kept when the block inside failed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # what a client of this cluster needs: RAY_AUTH_MODE and the token's path
    temp_dir: Path


def make_token(home: Path) -> dict[str, str]:
    """Token auth as the docs say (`ray get-auth-token --generate`), in a private HOME so the user's
    ~/.ray/auth_token is never touched; returns the env that points Ray at it."""
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    token = home / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_size > 0
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def _wait_for_dashboard(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token): up
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray job server at {url} did not answer")


@contextmanager
def ray_head(
    num_cpus: float,
    env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
    timeout_s: float = 120,
) -> Iterator[Head]:
    """``ray start --head --block`` on free ports, with the job server; stopped (only it) on exit."""
    temp_dir = Path(tempfile.mkdtemp(prefix="egaray-", dir="/tmp"))  # short: Ray's socket paths have a limit
    port, dash = port or free_port(), free_port()
    client_env = dict(env or {})
    proc_env = {**os.environ, **client_env, **(extra_env or {})}
    proc_env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *extra_args,
    ]
    log = open(temp_dir / "ray-start.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=proc_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", client_env, temp_dir)
    failed = True
    try:
        _wait_for_dashboard(head.dashboard_url, time.monotonic() + timeout_s)
        yield head
        failed = False
    finally:
        stop_cluster(proc, temp_dir)
        log.close()
        if failed:  # its logs: kept for a look
            print(f"the test cluster's logs are kept in {temp_dir}", file=sys.stderr)
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(proc: subprocess.Popen, temp_dir: Path) -> None:
    """End the `ray start --block` process, then whatever else still runs from this cluster: processes
    naming its temp dir and their descendants (Ray workers rename themselves, so they are found as children)."""
    tree = _with_descendants([psutil.Process(proc.pid), *cluster_processes(temp_dir)]) if proc.poll() is None else []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for _ in range(3):
        left = [p for p in {*tree, *_with_descendants(cluster_processes(temp_dir))} if p.is_running()]
        if not left:
            return
        for p in left:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(left, timeout=10)
        for p in alive:
            p.kill()
    assert not cluster_processes(temp_dir), "processes of the test cluster survived its shutdown"


def _with_descendants(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = set(procs)
    for p in procs:
        try:
            out.update(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    out.discard(psutil.Process(os.getpid()))
    return list(out)


def cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names this cluster's temp dir (its raylets, GCS, dashboard, monitor)."""
    key = str(temp_dir)
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(key in arg for arg in p.info["cmdline"] or ()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill_node(temp_dir: Path, node_id: str) -> int:
    """Lose one node of this cluster without grace, as a host that dies does: its raylet and agents (their command
    lines name the node's id) and every process under them (its workers, renamed ``ray::…``) get SIGKILL.
    Returns how many processes were killed."""
    node = [p for p in cluster_processes(temp_dir) if any(node_id in arg for arg in p.info["cmdline"] or ())]
    assert node, f"no process of node {node_id} in the cluster at {temp_dir}"
    tree = _with_descendants(node)
    for p in tree:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=30)
    return len(tree)
