"""Every node checked before training, when a command joins a Ray cluster (``ray job submit``).

On one machine every process sees the same disk, names and addresses; on a cluster of separate hosts they do
not, and what differs fails late (inside a worker, after retries) and far from its cause. So before any
training worker starts, the driver runs one small task on every node that can host a worker or a Ray Data
task, and each reports what it sees (:func:`probe_node`):

- the run's checkpoint storage: a remote ``run.storage`` (``s3://``, ``gs://``…) must answer there with its
  bucket (the prefix may not exist yet: the first checkpoint makes it); a local one (or none: checkpoints
  beside the run folder) must be the same folder on every node, which a probe file the driver writes proves;
- every input it may read: the data splits and the teacher's weights file (:func:`read_inputs`);
- its hostname's addresses: a name that resolves to a loopback address (stock Ubuntu images map theirs to
  127.0.1.1) makes DDP's gloo advertise an address no other node can reach.

:func:`plan` turns the reports into one line per problem, naming the field, the node and the fix, or into
settings: the collective backend's interface when the hostnames are the problem and every node holds its
address on an interface of the same name (safe to name for all). :func:`max_failures` chooses the restarts
of a run that leaves ``run.max_failures`` unset (docs/cluster.md says why). Nodes that an autoscaler adds
later cannot be checked; docs/cluster.md says so.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ega_ray.config import is_uri
from ega_ray.errors import ConfigError

if TYPE_CHECKING:
    from ega_ray.config import Config

CLUSTER_MAX_FAILURES = 3  # restarts from the last checkpoint where a restart can find them (docs/cluster.md)
PROBE_PREFIX = ".ega-ray-node-probe-"
PROBE_TIMEOUT_S = 300  # a fresh node first unpacks the job's working directory
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


@dataclass
class NodeReport:
    """What one node sees (:func:`probe_node`)."""

    node_ip: str
    hostname: str
    hostname_addresses: list[str]  # what the hostname resolves to on that node
    interface: str | None  # the interface that holds node_ip
    unreadable: dict[str, str] = field(default_factory=dict)  # field → why it cannot be read there
    storage_problem: str | None = None  # why the checkpoint storage is not usable from there


@dataclass(frozen=True)
class Written:
    """Where a command's Ray tasks and workers write what others read back: every node must reach the same
    place. ``field`` names it in messages; ``fix`` says why it must be shared and how."""

    field: str
    location: str  # a URI, or a local folder whose sameness on every node a probe file proves
    fix: str


def checkpoints_written(cfg: Config) -> Written:
    """A training run's checkpoints (``Config.checkpoint_root``): what a restarted worker restores from."""
    field = "run.storage" if cfg.run.storage else "run.storage (unset: checkpoints beside the run folder)"
    fix = (
        "a restarted worker must find the checkpoints: set run.storage to s3://…, gs://… or a path every node "
        "mounts"
    )
    return Written(field, cfg.checkpoint_root, fix)


def read_inputs(cfg: Config) -> dict[str, str]:
    """The inputs a run's workers, teacher actors and Ray Data tasks read on their nodes.

    The teacher cache is not among them: the cached mode loads it on the driver and hands it to the Ray
    Data stage (``teacher_modes.Cached.wire``), so it only has to be readable where the driver runs.

    Args:
        cfg: the resolved config.

    Returns:
        Config field → resolved path or URI.
    """
    inputs = {f"data.{name}": getattr(cfg.data, name) for name in ("train", "test", "validation")}
    inputs["teacher.weights"] = cfg.teacher.weights
    weights = cfg.teacher.weights
    if weights is not None and not is_uri(weights) and not os.path.isabs(weights):
        inputs.pop("teacher.weights")  # a hub tag ('openai'), not a file
    return {k: v for k, v in inputs.items() if v is not None}


def _interface_of(address: str) -> str | None:
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        if socket.inet_ntoa(packed[20:24]) == address:
            return name
    return None


def _readable(value: str) -> str | None:
    """Why ``value`` (a local path or a URI) cannot be read here; None when it can."""
    if is_uri(value):
        import pyarrow.fs as pafs

        try:
            filesystem, path = pafs.FileSystem.from_uri(value)
            info = filesystem.get_file_info(path)
        except (OSError, ValueError) as err:
            return " ".join(str(err).split())[:160]
        return "not found" if info.type == pafs.FileType.NotFound else None
    if not os.path.exists(value):
        return "no such file or folder"
    return None if os.access(value, os.R_OK) else "not readable (permissions)"


def probe_node(node_ip: str, inputs: dict[str, str], storage: str, probe_name: str | None) -> NodeReport:
    """What this node sees. Runs on each node (a Ray task pinned there); plain Python, testable in place.

    Args:
        node_ip: the node's address in the cluster (Ray's node IP).
        inputs: config field → the path or URI a worker would read.
        storage: the checkpoint root (``Config.checkpoint_root``).
        probe_name: a file the driver wrote into a local ``storage``; None for a remote one.

    Returns:
        The node's report.
    """
    hostname = socket.gethostname()
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(hostname, None)})
    except OSError:
        addresses = []
    report = NodeReport(node_ip, hostname, addresses, _interface_of(node_ip))
    for name, value in inputs.items():
        why = _readable(value)
        if why:
            report.unreadable[name] = f"{value}: {why}"
    if probe_name is not None:
        if not os.path.exists(os.path.join(storage, probe_name)):
            report.storage_problem = "a folder on this node's own disk, not the driver's"
    else:
        report.storage_problem = _bucket_problem(storage)
    return report


def _bucket_problem(storage: str) -> str | None:
    """Why the bucket of URI ``storage`` cannot be used from here (None when it answers)."""
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(storage)
        bucket = path.strip("/").split("/", 1)[0]
        info = filesystem.get_file_info(bucket)
    except (OSError, ValueError) as err:
        return "not reachable: " + " ".join(str(err).split())[:160]
    return None if info.type == pafs.FileType.Directory else f"bucket {bucket!r} not found"


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def _where(report: NodeReport) -> str:
    return f"node {report.hostname} ({report.node_ip})"


def plan(
    cfg: Config, reports: list[NodeReport], written: Written | None = None
) -> tuple[list[str], dict[str, object]]:
    """The problems the node reports show, one line each, and the settings to apply when there is none.

    Args:
        cfg: the run's config (resolved).
        reports: one per node that can host a worker or a Ray Data task.
        written: where the nodes write (default: the run's checkpoints, :func:`checkpoints_written`).

    Returns:
        (problems, settings): ``settings`` maps a config field (``scaling.socket_ifname``) to its value.
    """
    problems: list[str] = []
    settings: dict[str, object] = {}
    written = written or checkpoints_written(cfg)
    for report in reports:
        for name, why in report.unreadable.items():
            problems.append(
                f"{name}: {why} on {_where(report)}; every node reads it: use s3:// or gs://, or a path every "
                "node mounts"
            )
        if report.storage_problem:
            problems.append(
                f"{written.field}: {written.location} is {report.storage_problem} on {_where(report)}; {written.fix}"
            )
    looping = [r for r in reports if r.hostname_addresses and all(map(_is_loopback, r.hostname_addresses))]
    if looping and cfg.scaling.num_workers > 1 and cfg.scaling.socket_ifname is None:
        interfaces = {r.interface for r in reports}
        if len(interfaces) == 1 and None not in interfaces:
            settings["scaling.socket_ifname"] = interfaces.pop()
        else:
            first = looping[0]
            shown = ", ".join(sorted(f"{r.node_ip}: {r.interface or '?'}" for r in reports))
            problems.append(
                f"{_where(first)}: its hostname resolves to {', '.join(first.hostname_addresses)}, so DDP "
                f"cannot reach it from other nodes, and the nodes' interfaces differ ({shown}): map each "
                "hostname to the node's address in /etc/hosts, or set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME "
                "on every node"
            )
    return problems, settings


def max_failures(configured: int | None, storage: str | None, alive_nodes: int) -> int:
    """The worker-group restarts of a run: ``run.max_failures`` when set; else :data:`CLUSTER_MAX_FAILURES`
    where a restart can resume on another node (remote ``run.storage``, or a cluster of several nodes, whose
    checkpoint folder :func:`check_cluster` proved shared) and 0 on one machine, where a failure is a bug
    that a restart would only repeat.

    Args:
        configured: ``run.max_failures`` (None: unset).
        storage: ``run.storage`` (None: beside the run folder).
        alive_nodes: the cluster's nodes now.

    Returns:
        The value for Ray Train's FailureConfig (-1: without limit).
    """
    if configured is not None:
        return configured
    remote = storage is not None and is_uri(storage)
    return CLUSTER_MAX_FAILURES if remote or alive_nodes > 1 else 0


def check_cluster(cfg: Config, written: Written | None = None) -> list[str]:
    """Check every alive node before training when this process joined a cluster; set
    ``scaling.socket_ifname`` in ``cfg`` when the checks find it needed and safe.

    Args:
        cfg: the resolved config, changed in place.
        written: where the nodes write (default: the run's checkpoints, :func:`checkpoints_written`).

    Returns:
        Notes for the console (what was set and why). Raises ConfigError with one line per problem.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not os.environ.get("RAY_ADDRESS"):
        return []  # a local Ray: one machine
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    written = written or checkpoints_written(cfg)
    storage = written.location
    probe_name = None
    if not is_uri(storage):
        probe_name = f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
        Path(storage).mkdir(parents=True, exist_ok=True)
        (Path(storage) / probe_name).touch()
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(probe_node)
        refs = [
            task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                n["NodeManagerAddress"], read_inputs(cfg), storage, probe_name
            )
            for n in nodes
        ]
        reports = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as err:
        why = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"the node checks got no answer from every node within {PROBE_TIMEOUT_S} s ({why}); a node may be "
            "starting or lost: submit again, or see `ray status`"
        ) from None
    finally:
        if probe_name is not None:
            (Path(storage) / probe_name).unlink(missing_ok=True)
    problems, settings = plan(cfg, reports, written)
    if problems:
        raise ConfigError("\n".join(problems))
    notes = [f"checked {len(reports)} node(s): every input and {storage} reachable"] if reports else []
    if "scaling.socket_ifname" in settings:
        cfg.scaling.socket_ifname = settings["scaling.socket_ifname"]
        notes.append(
            f"hostnames resolve to loopback addresses: DDP binds to interface {cfg.scaling.socket_ifname} "
            "(scaling.socket_ifname)"
        )
    if not nodes:
        notes.append("no node with CPUs yet (the autoscaler adds them): nodes added later are not checked")
    return notes
