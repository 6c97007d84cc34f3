"""What a local csvfs cluster (scripts/cluster.py) records, and its node processes.

DIR/cluster.json holds a Cluster: its images, and a NodeRecord for every `csvfs mount`
process that `up` started. Here are loading, saving and removing it, the lock that lets
one cluster.py at a time work on DIR, finding the pid of a node that just mounted,
telling which recorded nodes are still live, and stopping them: volume by volume, each
volume's coordinator last. An isolated cluster (up --isolate) also records its Network
(scripts/netns.py), and each node the holder of its namespaces, through which it is
unmounted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# scripts/netns.py, scripts/nodes.py: run as a script, this directory is on sys.path
import netns
from nodes import (
    NodeError,
    Waits,
    is_mounted,
    is_process_of,
    processes_naming,
    status_json,
    stop_daemon,
    wait_until,
)

STATE_FILE = "cluster.json"

STATUS_TIMEOUT = 15.0
UNMOUNT_WAIT = 15.0  # after fusermount3 -u, for the node to write its checkpoint and exit
TERM_WAIT = 10.0  # after SIGTERM
KILL_WAIT = 5.0  # after SIGKILL
LOCK_WAIT = 120.0  # for another cluster.py working on the same DIR


class ClusterError(Exception):
    """A failure cluster.py reports in one line. exit_code is one of its EXIT_* codes;
    None stands for EXIT_FAILURE (an unexpected failure)."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code


# -- recorded state -----------------------------------------------------------------------


@dataclass
class NodeRecord:
    """One `csvfs mount` process: a node on one volume."""

    name: str
    mountpoint: str
    log: str
    pid: int
    slot: int | None = None
    image: str = ""  # a cluster.json of before --volumes has none: the cluster's image
    holder: int = 0  # isolated: the pid holding its namespaces (scripts/netns.py)

    @property
    def index(self) -> int:
        """I of nodeI: its place in the Network of an isolated cluster."""
        return int(self.name.removeprefix("node"))


@dataclass
class Cluster:
    directory: Path
    images: list[str]
    nodes: list[NodeRecord]
    lease: float | None = None
    started: str = ""
    volumes_file: str | None = None  # the --cluster FILE of every node, with several volumes
    network: netns.Network | None = None  # up --isolate: each node in its own namespaces
    io_timeout: float | None = None  # up --io-timeout, passed to every node

    @property
    def image(self) -> str:
        """The first (with one volume, the only) image."""
        return self.images[0]

    @property
    def several(self) -> bool:
        return len(self.images) > 1

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def label(self, node: NodeRecord) -> str:
        """node in messages: with several volumes, a name is on one process per volume."""
        return f"{node.name} on {Path(node.image).name}" if self.several else node.name

    def describe_images(self) -> str:
        return f"images {', '.join(self.images)}" if self.several else f"image {self.image}"

    def save(self) -> None:
        data = {"image": self.image, "images": self.images, "volumes_file": self.volumes_file,
                "lease": self.lease, "io_timeout": self.io_timeout, "started": self.started,
                "network": asdict(self.network) if self.network else None,
                "nodes": [asdict(node) for node in self.nodes]}
        temporary = self.state_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(temporary, self.state_path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    @classmethod
    def load(cls, directory: Path) -> Cluster | None:
        path = directory / STATE_FILE
        try:
            data = json.loads(path.read_text())
            images = data.get("images") or [data["image"]]
            nodes = [NodeRecord(**node) for node in data["nodes"]]
            for node in nodes:
                node.image = node.image or images[0]
            network = netns.Network(**data["network"]) if data.get("network") else None
            return cls(directory, images, nodes, data.get("lease"), data.get("started", ""),
                       data.get("volumes_file"), network, data.get("io_timeout"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClusterError(f"{path} is unreadable ({exc}); stop its nodes by hand "
                               f"(fusermount3 -u DIR/nodeN) and remove it") from None


@contextlib.contextmanager
def locked(directory: Path):
    """One cluster.py at a time per DIR: a second `up` waits, then sees the cluster is up."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"another cluster.py has been working on {directory} "
                                       f"for over {LOCK_WAIT:.0f} s") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


# -- node processes -----------------------------------------------------------------------


def status_report(image: str) -> dict | None:
    """`csvfs status --json` as a dict, or None. Its JSON comes even when it exits 15."""
    try:
        return status_json(image, timeout=STATUS_TIMEOUT)
    except NodeError:
        return None


def node_argv(node: NodeRecord) -> list[str]:
    """Words only the `csvfs mount` daemon started for node has in its argv."""
    return ["mount", node.mountpoint, node.name]


def is_our_node(pid: int, node: NodeRecord) -> bool:
    """pid is still the `csvfs mount` daemon this script started for node (not a reused pid)."""
    return is_process_of(pid, node_argv(node))


def find_pid(node: NodeRecord) -> tuple[int, int | None]:
    """The pid and slot of a node that just mounted: from `csvfs status --json` of its
    image by name, or else from /proc (the daemon is a fork of `csvfs mount`, so it has
    its argv)."""
    report = status_report(node.image) or {}
    for entry in report.get("nodes", []):
        if entry.get("name") == node.name and entry.get("alive"):
            pid = int(entry.get("pid", 0))
            if is_our_node(pid, node):
                return pid, entry.get("slot")
    for pid in sorted(processes_naming([node.mountpoint])):
        if is_our_node(pid, node):
            return pid, None
    return 0, None


def stop_node(cluster: Cluster, node: NodeRecord) -> tuple[bool, str]:
    """Stop one node, gently first; returns (stopped, what was done)."""
    if node.holder:
        return stop_isolated(node)
    stopped, steps = stop_daemon(node.pid, node.mountpoint, argv=node_argv(node),
                                 waits=Waits(UNMOUNT_WAIT, TERM_WAIT, KILL_WAIT))
    if stopped:
        remove_mountpoint(cluster, node)
    return stopped, steps


def stop_isolated(node: NodeRecord) -> tuple[bool, str]:
    """Stop a node of an isolated cluster: its mount is seen only inside its namespace,
    so the clean unmount goes through nsenter; then signals if need be, and the holder
    goes too, taking the mount namespace (and a dead mount in it) along."""
    steps = []
    if is_our_node(node.pid, node) and netns.mounted_in(node.holder, node.mountpoint):
        complaint = netns.unmount(node.holder, node.mountpoint)
        steps.append(f"fusermount3 -u failed ({complaint})" if complaint else "unmounted")
        wait_until(lambda: not is_our_node(node.pid, node), UNMOUNT_WAIT)
    stopped, more = stop_daemon(node.pid, None, argv=node_argv(node),
                                waits=Waits(UNMOUNT_WAIT, TERM_WAIT, KILL_WAIT))
    steps.append("exited" if steps and more == "was not running" else more)
    if stopped and netns.is_holder(node.holder):
        os.kill(node.holder, signal.SIGKILL)
        steps.append("holder killed")
    with contextlib.suppress(OSError):
        os.rmdir(node.mountpoint)  # only if empty: what `up` created
    return stopped, ", ".join(steps)


def remove_mountpoint(cluster: Cluster, node: NodeRecord) -> None:
    """Remove node's mountpoint if it is empty, and with several volumes DIR/NAME above
    it too once its last volume has gone: what `up` created, never files."""
    mountpoint = Path(node.mountpoint)
    directories = [mountpoint, mountpoint.parent] if cluster.several else [mountpoint]
    for directory in directories:
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # only if empty


def stop_order(nodes: list[NodeRecord], image: str) -> list[NodeRecord]:
    """The nodes of one volume: members first, newest first; the coordinator last, so
    nobody needs to take over."""
    report = status_report(image) or {}
    coordinator = (report.get("coordinator") or {}).get("name")
    ours = [node for node in reversed(nodes) if node.image == image]
    return sorted(ours, key=lambda node: node.name == coordinator)  # stable


def stop_all(cluster: Cluster) -> list[NodeRecord]:
    """Stop every node of cluster, printing one line each; returns those that would not stop.

    Volume by volume, the last started first: each volume's coordinator goes last, so
    that no volume has a takeover, and a node keeps its other volumes meanwhile.
    """
    left = []
    images = list(dict.fromkeys(node.image for node in cluster.nodes))  # every record's
    for image in reversed(images):
        for node in stop_order(cluster.nodes, image):
            stopped, steps = stop_node(cluster, node)
            print(f"{node.name} (pid {node.pid}, {node.mountpoint}): {steps}")
            if not stopped:
                left.append(node)
    return left


def live_nodes(cluster: Cluster) -> list[NodeRecord]:
    return [node for node in cluster.nodes
            if is_our_node(node.pid, node) or is_mounted(node.mountpoint)
            or netns.mounted_in(node.holder, node.mountpoint)]


def remove_network(cluster: Cluster) -> None:
    """After its nodes: every namespace and link of an isolated cluster, by name, so
    that also what a crashed `up` made goes."""
    if cluster.network is not None:
        removed = netns.teardown(cluster.network)
        if removed:
            print(f"removed {', '.join(removed)}")
