"""A cluster of separate hosts on this one machine, for the multi-host tests (``-m multihost``).

Each host is a network namespace on a private bridge, with an address from the test-only range
198.18.0.0/15, its own UTS namespace (hostname) and its own mount namespace: its own disk (a folder bound
over ``/mnt``: run folders, HOME) and Ray temp dir (another bound over ``/tmp/ray``, so sessions, logs and
unpacked job packages are the host's alone), and its own ``/etc/hosts``.
The bridge lives in a namespace of its own too, so nothing is added to the machine's own network: traffic
only flows between the namespaces made here. An S3-compatible server (moto's) on the bridge is the only
storage the hosts share; a "client" namespace on the bridge runs the real ``ray job submit`` with token auth.

Every namespace is named ``egaray-mh-<role>``; every process the cluster starts runs inside one of them, so
stopping it kills exactly the processes in those namespaces (by pid, from ``ip netns pids``) and deletes
the namespaces, which takes their links with them. A start first removes what a killed earlier run left.
Needs root (namespaces, mounts); :func:`missing_privileges` says why not, for a one-line skip.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ega_ray.constants import LOCAL_HEALTH_CHECK_INTERVAL_S

PREFIX = "egaray-mh"
LOCK_FILE = f"/run/lock/{PREFIX}.lock" if os.path.isdir("/run/lock") else f"/tmp/{PREFIX}.lock"
SUBNET = "198.18.74"  # a /24 of the test-only range 198.18.0.0/15
S3_ADDRESS = f"{SUBNET}.2"
S3_PORT = 9000
CLIENT_ADDRESS = f"{SUBNET}.3"
HEAD_PORT = 6379
DASHBOARD_PORT = 8265
BIN = Path(sys.executable).parent  # the venv's python, ray and moto_server


def missing_privileges() -> str | None:
    """Why the multi-host cluster cannot start here (None when it can)."""
    if os.geteuid() != 0:
        return "the multi-host tests make network and mount namespaces: they need root (CI runs as root)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"the multi-host tests need `{tool}` (iproute2 / util-linux; `make test` installs them)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def _namespaces() -> list[str]:
    listing = _ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listing if line.startswith(f"{PREFIX}-")]


def _kill_namespace(netns: str) -> None:
    """SIGKILL every process in ``netns`` (children spawned later included: a few passes), then delete it."""
    _kill_namespace_processes(netns)
    _ip("netns", "del", netns, check=False)


def _kill_namespace_processes(netns: str) -> None:
    for _ in range(5):
        pids = [int(p) for p in _ip("netns", "pids", netns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def remove_leftovers() -> None:
    """Remove the namespaces (with their processes and links) an earlier, killed run left behind."""
    for netns in _namespaces():
        _kill_namespace(netns)


# the client host's snippet runner (MultiHostCluster.client_python): reads one JSON request per line, runs its
# code as ``python -c code *args`` would, and answers one JSON line; polls then cost no interpreter start and
# no pyarrow import each (about half a CPU-second that the tests' one-second polls would spend)
SNIPPET_RUNNER = r"""
import contextlib, io, json, sys, traceback
answer = sys.stdout
for line in sys.stdin:
    request = json.loads(line)
    sys.argv = ["-c", *request["args"]]
    out, err, rc = io.StringIO(), "", 0
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(request["code"], "<snippet>", "exec"), {"__name__": "__main__"})
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        err, rc = traceback.format_exc(), 1
    answer.write(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err}) + "\n")
    answer.flush()
"""


@dataclass(eq=False)  # hosts are told apart by identity (dict keys)
class Host:
    """One host: its namespace, address, hostname and disk."""

    name: str
    address: str
    disk: Path  # bound over /mnt inside the host; its ray/ over /tmp/ray
    loopback_name: bool = False  # /etc/hosts maps its own name to 127.0.1.1, as stock Ubuntu images do
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.name}"

    def outside(self, path: str) -> Path:
        """Where the host's ``/mnt/...`` path is, seen from outside."""
        return self.disk / Path(path).relative_to("/mnt")

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` as run on this host: in its network namespace, with its hostname, /tmp and /etc/hosts."""
        setup = (
            f"hostname {self.name} && mount --bind {self.disk / 'hosts'} /etc/hosts && "
            f"mount --bind {self.disk / 'ray'} /tmp/ray && mount --bind {self.disk} /mnt && exec \"$@\""
        )
        unshare = ["unshare", "--uts", "--mount", "--propagation", "private"]
        return ["ip", "netns", "exec", self.netns, *unshare, "sh", "-c", setup, "sh", *argv]

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            process = subprocess.Popen(self.wrap(argv), env=env, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.wrap(argv), env=env, capture_output=True, text=True, timeout=timeout)


class MultiHostCluster:
    """Start with :meth:`start`, always end with :meth:`stop` (it also runs at interpreter exit)."""

    def __init__(self, root: Path, workers: dict[str, int], loopback: tuple[str, ...] = ()) -> None:
        """Args:
        root: where the hosts' disks and the logs go.
        workers: worker host name → its logical CPUs (the head has none: it trains nothing).
        loopback: hosts whose own name resolves to a loopback address.
        """
        self.root = root
        self.logs = root / "logs"
        self.token = secrets.token_hex(16)
        self.head = self._host("head", 10, "head" in loopback)
        self.workers = {n: self._host(n, 11 + i, n in loopback) for i, n in enumerate(workers)}
        self.worker_cpus = dict(workers)
        self.client = self._host("client", 3, False)
        self.s3 = self._host("s3", 2, False)
        self._next_address = 11 + len(workers)
        self._runner: subprocess.Popen | None = None  # client_python's, started on first use

    def _host(self, name: str, last_octet: int, loopback: bool) -> Host:
        return Host(name, f"{SUBNET}.{last_octet}", self.root / "hosts" / name, loopback)

    # ------------------------------------------------------------------ environment

    @property
    def s3_endpoint(self) -> str:
        return f"http://{S3_ADDRESS}:{S3_PORT}"

    def s3_uri(self, path: str) -> str:
        """``s3://<path>`` on this cluster's S3 server: pyarrow (Ray Train, Ray Data, ega-ray) reads the
        server from the URI's query; it ignores AWS_ENDPOINT_URL."""
        return f"s3://{path}?endpoint_override={S3_ADDRESS}:{S3_PORT}&scheme=http"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.address}:{DASHBOARD_PORT}"

    def env(self, host: Host) -> dict[str, str]:
        """What every process on ``host`` sees: the venv first on PATH, token auth, the shared S3 server."""
        return {
            "PATH": f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/mnt/home",  # the host's own disk: ~/.ray and caches are per host
            "LANG": "C.UTF-8",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "15"),  # tests/conftest.py sets 0
            "RAY_agent_register_timeout_ms": "300000",  # a loaded 2-core machine starts agents slowly
            "AWS_ENDPOINT_URL": self.s3_endpoint,  # boto3's (the bucket's creation)
            "AWS_ACCESS_KEY_ID": "testing",  # moto's server accepts any key; none of these is a real secret
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
            # the jobs' Ray Train controllers poll as a local run's do (tests/conftest.py: no idle waits)
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(LOCAL_HEALTH_CHECK_INTERVAL_S),
        }

    # ------------------------------------------------------------------ start / stop

    def _make_host(self, host: Host) -> None:
        for folder in ("home", "ray", "runs"):
            (host.disk / folder).mkdir(parents=True, exist_ok=True)
        Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point (Ray makes it on any machine it runs on)
        names = [self.head, *self.workers.values(), self.client, self.s3]
        lines = ["127.0.0.1 localhost"]
        if host.loopback_name:
            lines.append(f"127.0.1.1 {host.name}")
        lines += [f"{h.address} {h.name}" for h in names if not (h is host and host.loopback_name)]
        (host.disk / "hosts").write_text("\n".join(lines) + "\n")
        _ip("netns", "add", host.netns)
        veth = f"v{host.address.rsplit('.', 1)[1]}"  # the switch's end, named by the host's last octet
        _ip("-n", self._switch, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("-n", self._switch, "link", "set", veth, "master", "br0", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")

    @property
    def _switch(self) -> str:
        return f"{PREFIX}-switch"

    def start(self) -> MultiHostCluster:
        """Start the hosts, the S3 server and Ray on each; first wait for the machine's lock (one such cluster
        at a time: their names and addresses are fixed), then remove what a killed earlier run left."""
        import atexit

        self._lock = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # held until stop(); released by the kernel if this process dies
        remove_leftovers()
        self.logs.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        _ip("netns", "add", self._switch)
        _ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self._switch, "link", "set", "br0", "up")
        for host in (self.s3, self.client, self.head, *self.workers.values()):
            self._make_host(host)
        moto = [str(BIN / "python"), "-m", "moto.server", "-H", S3_ADDRESS, "-p", str(S3_PORT)]
        self.s3.spawn(moto, self.env(self.s3), self.logs / "s3.log")
        self._start_head()
        # the workers join as soon as the head's GCS answers, while its dashboard still starts
        self._wait_for_port(self.head.address, HEAD_PORT, restart={self.head: self._start_head})
        restart = {self.head: self._start_head}
        for name, cpus in self.worker_cpus.items():
            self._start_worker(self.workers[name], cpus)
            restart[self.workers[name]] = partial(self._start_worker, self.workers[name], cpus)
        self.wait_for_nodes(1 + len(self.workers), restart=restart)
        return self

    def _start_head(self) -> None:
        argv = [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", self.head.address,
            "--port", str(HEAD_PORT), "--dashboard-host", self.head.address,
            "--dashboard-port", str(DASHBOARD_PORT), "--num-cpus", "0", "--disable-usage-stats",
        ]  # fmt: skip
        self.head.spawn(argv, self.env(self.head), self.logs / "head.log")

    def _start_worker(self, host: Host, cpus: int) -> None:
        argv = [
            str(BIN / "ray"), "start", "--block", "--address", f"{self.head.address}:{HEAD_PORT}",
            "--node-ip-address", host.address, "--num-cpus", str(cpus), "--disable-usage-stats",
        ]  # fmt: skip
        host.spawn(argv, self.env(host), self.logs / f"{host.name}.log")

    def add_worker(self, name: str, cpus: int) -> Host:
        """A new worker host joins (e.g. the replacement of a lost one)."""
        host = self._host(name, self._next_address, False)
        self._next_address += 1
        self.workers[name] = host
        self._make_host(host)
        self._start_worker(host, cpus)
        return host

    def kill_host(self, name: str) -> None:
        """Host ``name`` is lost without grace: every process on it killed, its network gone."""
        host = self.workers.pop(name)
        _kill_namespace(host.netns)
        for process in host.processes:
            process.wait(timeout=10)

    def stop(self) -> None:
        """Kill every process this cluster started and remove its namespaces; idempotent."""
        if getattr(self, "_lock", None) is None:
            return  # never started, or stopped already: the namespaces may be another session's
        try:
            for netns in _namespaces():
                _kill_namespace(netns)
            for host in (self.head, self.client, self.s3, *self.workers.values()):
                for process in host.processes:
                    process.wait(timeout=10)  # reaped: killed above with their namespace
        finally:
            os.close(self._lock)  # the lock: the next session's cluster may start
            self._lock = None

    # ------------------------------------------------------------------ use

    def client_run(self, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        """``argv`` from the client host (outside the cluster), e.g. ``ray job submit``."""
        env = self.env(self.client) | {"RAY_ADDRESS": self.dashboard_url}
        return self.client.run(argv, env, timeout)

    def client_spawn(self, argv: list[str], log: Path) -> subprocess.Popen:
        """``argv`` started from the client host without waiting (e.g. a job to interrupt); output to ``log``."""
        return self.client.spawn(argv, self.env(self.client) | {"RAY_ADDRESS": self.dashboard_url}, log)

    def client_python(self, code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``python -c code *args`` on the client host, run by one long-lived Python there (started on first
        use; environment as :meth:`client_run`'s); a snippet that overruns ``timeout`` ends that process."""
        runner = self._runner
        if runner is None or runner.poll() is not None:
            argv = self.client.wrap([str(BIN / "python"), "-u", "-c", SNIPPET_RUNNER])
            env = self.env(self.client) | {"RAY_ADDRESS": self.dashboard_url}
            with open(self.logs / "client-python.log", "ab") as log:
                runner = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
            self.client.processes.append(runner)
            self._runner = runner
        runner.stdin.write((json.dumps({"code": code, "args": list(args)}) + "\n").encode())
        runner.stdin.flush()
        if not select.select([runner.stdout], [], [], timeout)[0]:
            runner.kill()
            raise subprocess.TimeoutExpired(["client_python", *args], timeout)
        line = runner.stdout.readline()
        if not line:
            raise RuntimeError(f"the client host's Python ended; see {self.logs / 'client-python.log'}")
        done = json.loads(line)
        return subprocess.CompletedProcess(["client_python", *args], done["rc"], done["stdout"], done["stderr"])

    def read_bucket(self, uri: str) -> str | None:
        """The text of the object at ``uri`` (:meth:`s3_uri`), read from the client host; None when absent."""
        code = (
            "import sys, pyarrow.fs as fs\n"
            "s3, path = fs.FileSystem.from_uri(sys.argv[1])\n"
            "if s3.get_file_info(path).type == fs.FileType.File:\n"
            "    sys.stdout.write('+' + s3.open_input_stream(path).read().decode())\n"
        )
        done = self.client_python(code, uri)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout[1:] if done.stdout.startswith("+") else None

    def nodes(self) -> list[dict]:
        """The cluster's nodes as the head's dashboard lists them (its state API over HTTP with the token, from
        the client host; plain urllib, so a poll costs no ``import ray``); empty while the dashboard is down."""
        code = (
            "import json, os, urllib.request\n"
            f"request = urllib.request.Request('{self.dashboard_url}/api/v0/nodes?limit=1000', "
            "headers={'Authorization': 'Bearer ' + os.environ['RAY_AUTH_TOKEN']})\n"
            "nodes = json.load(urllib.request.urlopen(request, timeout=10))['data']['result']['result']\n"
            "print(json.dumps([{'ip': n['node_ip'], 'state': n['state'], 'id': n['node_id']} for n in nodes]))\n"
        )
        done = self.client_python(code)
        if done.returncode != 0:
            return []
        return json.loads(done.stdout.strip().splitlines()[-1])

    def _restart_stopped(self, restart: dict, retries: dict) -> None:
        """Start again each ``ray start`` in ``restart`` (host → how to start it) that gave up: on a loaded
        machine Ray's own start-up timeouts can expire. ``retries``: how many more each host may have."""
        for host, start in restart.items():
            if host.processes and host.processes[-1].poll() is not None and retries[host] > 0:
                retries[host] -= 1
                _kill_namespace_processes(host.netns)
                start()

    def wait_for_nodes(self, count: int, timeout: float = 240, restart: dict | None = None) -> None:
        """Until ``count`` nodes are alive, polled every second; a ``ray start`` in ``restart`` that gave up is
        started again, twice at most."""
        deadline = time.monotonic() + timeout
        retries = dict.fromkeys(restart or {}, 2)
        while time.monotonic() < deadline:
            if sum(n["state"] == "ALIVE" for n in self.nodes()) >= count:
                return
            self._restart_stopped(restart or {}, retries)
            time.sleep(1)
        logs = {p.name: p.read_text()[-1500:] for p in self.logs.glob("*.log")}
        raise TimeoutError(f"{count} nodes not alive within {timeout:.0f} s; logs: {logs}")

    def _wait_for_port(self, address: str, port: int, restart: dict, timeout: float = 240) -> None:
        """Until ``address:port`` accepts a connection from the client host (e.g. the head's GCS)."""
        probe = f"import socket; socket.create_connection(('{address}', {port}), timeout=5).close()"
        deadline = time.monotonic() + timeout
        retries = dict.fromkeys(restart, 2)
        while time.monotonic() < deadline:
            if self.client_python(probe, timeout=30).returncode == 0:
                return
            self._restart_stopped(restart, retries)
            time.sleep(0.5)
        raise TimeoutError(f"{address}:{port} not open within {timeout:.0f} s; head: {self.logs / 'head.log'}")

    def make_bucket(self, bucket: str) -> None:
        code = f"import boto3; boto3.client('s3').create_bucket(Bucket='{bucket}')"
        done = self.client.run([str(BIN / "python"), "-c", code], self.env(self.client), 60)
        assert done.returncode == 0, done.stderr[-2000:]

    def upload(self, local: Path, uri: str) -> None:
        """Copy folder ``local`` to ``uri`` (:meth:`s3_uri`; pyarrow, through the bridge)."""
        code = (
            "import sys, pyarrow.fs as fs\n"
            "s3, path = fs.FileSystem.from_uri(sys.argv[2])\n"
            "fs.copy_files(sys.argv[1], path, source_filesystem=fs.LocalFileSystem(), destination_filesystem=s3)\n"
        )
        done = self.client.run([str(BIN / "python"), "-c", code, str(local), uri], self.env(self.client), 120)
        assert done.returncode == 0, done.stderr[-2000:]

    def list_bucket(self, uri: str) -> list[str]:
        code = (
            "import sys, pyarrow.fs as fs\n"
            "s3, path = fs.FileSystem.from_uri(sys.argv[1])\n"
            "sel = fs.FileSelector(path, recursive=True, allow_not_found=True)\n"
            "print('\\n'.join(i.path for i in s3.get_file_info(sel)))\n"
        )
        done = self.client_python(code, uri)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

