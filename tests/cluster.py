"""Test helpers: make volumes and run csvfs nodes as real subprocesses.

What the scripts need too (mounts, /proc, csvfs status and events, starting and
stopping a node) is in scripts/nodes.py; this is the tests' own layer on top of it.

With an Isolation (CSVFS_TEST_ISOLATE=1, see conftest.py) every node runs in a network
and a mount namespace of its own, made by scripts/netns.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from csvfs.volume.image import KEY_ENVIRONMENT
from scripts import netns
from scripts.nodes import MountProcess, csvfs_command, csvfs_mount_command, status_json

CSVFS = csvfs_command()
LOG_PROBLEMS = ("Traceback", " ERROR ", " CRITICAL ")


def csvfs(*args, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([*CSVFS, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"csvfs {args} failed ({result.returncode}): {result.stderr}")
    return result


def status(image: Path) -> dict:
    """`csvfs status --json`; the coordinator must have answered."""
    report = status_json(image)
    assert "error" not in report, report["error"]
    return report


# CSVFS_TEST_VOLUME=loop: the volumes the tests make are loop devices (over a sparse
# file, with `losetup --direct-io=on`), which the nodes open with O_DIRECT, as they
# would a LUN shared by several hosts; their key files are named by CSVFS_KEY.
ON_LOOP_DEVICES = os.environ.get("CSVFS_TEST_VOLUME") == "loop"
LOOP_DEVICES: list[tuple[str, str | None]] = []  # (device, CSVFS_KEY before it)


def make_volume(directory: Path, size: str = "256M", unit: str | None = None) -> Path:
    image = directory / "vol.img"
    unit_args = ["--unit", unit] if unit else []
    if ON_LOOP_DEVICES:
        return make_loop_volume(directory, size, unit_args)
    csvfs("mkfs", image, "--size", size, *unit_args)
    return image


def make_loop_volume(directory: Path, size: str, unit_args: list[str]) -> Path:
    """A volume on a loop device over directory/vol.backing (see ON_LOOP_DEVICES);
    detach_loop_devices() undoes it."""
    backing = directory / "vol.backing"
    # The volumes of one test share a key, as the volumes of one cluster may.
    key = Path(os.environ[KEY_ENVIRONMENT]) if LOOP_DEVICES else directory / "vol.key"
    subprocess.run(["truncate", "-s", size, backing], check=True)
    device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", backing],
                            check=True, capture_output=True, text=True).stdout.strip()
    LOOP_DEVICES.append((device, os.environ.get(KEY_ENVIRONMENT)))
    os.environ[KEY_ENVIRONMENT] = os.fspath(key)  # for the nodes and every csvfs command
    csvfs("mkfs", device, *unit_args)
    return Path(device)


def detach_loop_devices() -> None:
    """Detach the tests' loop devices (after their nodes stopped) and restore CSVFS_KEY."""
    while LOOP_DEVICES:
        device, key_before = LOOP_DEVICES.pop()
        subprocess.run(["losetup", "--detach", device], capture_output=True)
        if key_before is None:
            os.environ.pop(KEY_ENVIRONMENT, None)
        else:
            os.environ[KEY_ENVIRONMENT] = key_before


# On a test that takes the nodes fixture: it runs twice, as CSVFS_TEST_ISOLATE says and
# isolated, so that the default suite exercises isolated nodes too (conftest.py).
BOTH_WAYS = pytest.mark.parametrize("nodes", ["default", "isolated"], indirect=True)
# Twice: as the environment says, and as hosts sharing a LUN would run it: every node
# in namespaces of its own, the volume on a loop device that they open with O_DIRECT.
AS_ON_SEVERAL_HOSTS = pytest.mark.parametrize(
    ("image", "nodes"), [("file", "default"), ("loop-device", "isolated")],
    ids=["default", "isolated-on-a-loop-device"], indirect=True)

ISOLATE_TOOLS = ("ip", "nsenter", "unshare", "mount", "umount")


def isolation_missing() -> str:
    """Why nodes cannot be isolated here ("" if they can)."""
    if os.geteuid() != 0:
        return "isolated nodes need root (namespaces, links, a bridge and mounts)"
    missing = [tool for tool in ISOLATE_TOOLS if shutil.which(tool) is None]
    return f"isolated nodes need {', '.join(missing)}" if missing else ""


class Isolation:
    """The namespaces of one test's nodes, as containers on a bridge of their own.

    Every node name gets, the first time a node of that name starts, a network
    namespace with a veth on the test's bridge and its own address (scripts/netns.py:
    10.X.Y.I; the host is 10.X.Y.254 on the bridge), and a holder of a mount namespace
    of its own. Every later node of that name (a restart, or its mount of another
    volume) runs in the same namespaces. A node listens for RPC on its own address
    unless the test says --listen itself, so RPC between nodes crosses the veths and
    the bridge; `csvfs status` and the like, run by the test on the host, reach the
    coordinator through the bridge's address.

    The test's directory is made a shared mount, and each holder's copy of it a peer
    of it (netns.share_directory, start_holder(shared=...)): a node's FUSE mount, made
    in its own mount namespace below that directory, shows at the same path on the
    host, where the test reads and writes it with plain os calls and unmounts it with
    fusermount3, as a container's volume is seen from its host.

    close() removes all of it, whatever state the nodes are in.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory).resolve()
        self.network = netns.Network.for_directory(self.directory)
        self.holders: dict[str, int] = {}  # node name -> the holder of its namespaces
        self.indices: dict[str, int] = {}  # node name -> I of its address 10.X.Y.I
        self.shared = False

    @property
    def host_address(self) -> str:
        """The test process's own address, as the nodes see it."""
        return self.network.host_address

    def open(self) -> Isolation:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            netns.create_bridge(self.network)
            netns.share_directory(self.directory)
            self.shared = True
        except BaseException:
            self.close()
            raise
        return self

    def address(self, name: str) -> str:
        return self.network.address(self.index(name))

    def index(self, name: str) -> int:
        if name not in self.indices:
            if len(self.indices) >= 253:
                raise netns.NetnsError("more than 253 node names in one isolated test")
            self.indices[name] = len(self.indices) + 1
        return self.indices[name]

    def holder(self, name: str) -> int:
        """The holder of name's namespaces, made the first time it is asked for."""
        if name not in self.holders:
            index = self.index(name)
            netns.add_node(self.network, index)
            self.holders[name] = netns.start_holder(self.network, index,
                                                    shared=self.directory)
        return self.holders[name]

    def command(self, name: str, command: list[str]) -> list[str]:
        """command, run in name's namespaces, in the current directory."""
        return netns.enter(self.holder(name), [os.fspath(arg) for arg in command],
                           cwd=os.getcwd())

    def cut(self, name: str) -> None:
        """Drop every packet to and from name's namespace."""
        netns.set_link(self.network, self.index(name), up=False)

    def heal(self, name: str) -> None:
        netns.set_link(self.network, self.index(name), up=True)

    def close(self) -> None:
        """Kill whatever still runs in the namespaces (holders, a node that would not
        stop), remove them with their links and the bridge, and detach the shared
        directory with anything left mounted below it."""
        try:
            netns.teardown(self.network)
        finally:
            self.holders.clear()
            if self.shared:
                netns.unshare_directory(self.directory)
                self.shared = False

    def leftovers(self) -> list[str]:
        """What of this isolation still exists (nothing, once closed)."""
        left = [*(f"netns {name}" for name in netns.owned_netns(self.network)),
                *(f"link {name}" for name in netns.owned_links(self.network))]
        with open("/proc/self/mounts") as mounts:
            root = os.fspath(self.directory)
            left += [f"mount {line.split()[1]}" for line in mounts
                     if line.split()[1] == root or line.split()[1].startswith(root + "/")]
        return left


class Node(MountProcess):
    """One `csvfs mount --foreground` process with its own mountpoint and log
    (scripts/nodes.py starts and stops it); with isolation, in the namespaces of its
    name (Isolation)."""

    def __init__(self, image: Path, mountpoint: Path, name: str = "node1", *extra: str,
                 env: dict | None = None, isolation: Isolation | None = None):
        self.image = image
        self.name = name
        self.log = mountpoint.parent / f"{name}.log"
        self.isolation = isolation
        if isolation is not None:  # first, so that a --listen of the test's own wins
            extra = ("--listen", f"{isolation.address(name)}:0", *extra)
        command = csvfs_mount_command(image, mountpoint, "--name", name, "--log", self.log,
                                      *extra)
        super().__init__(command, mountpoint, label=f"node {name}", log=self.log, env=env)
        self.plain_command = self.command

    def start(self, timeout: float = 20.0) -> Node:
        if self.isolation is not None:  # the holder only now: a Node may never start
            self.command = self.isolation.command(self.name, self.plain_command)
        return super().start(timeout)

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def slot(self) -> dict:
        """This node's record in the volume's lease region."""
        from csvfs.cluster.election import read_slot
        from csvfs.volume import format as fmt
        from csvfs.volume.image import Volume

        volume = Volume.open(self.image)
        try:
            for slot in range(fmt.MAX_NODES):
                record = read_slot(volume, slot)
                if record and record["name"] == self.name and record["pid"] == self.process.pid:
                    return record
        finally:
            volume.close()
        raise AssertionError(f"node {self.name} has no slot")

    def rpc_address(self) -> str:
        return self.slot()["address"]

    def log_problems(self) -> list[str]:
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines()
                if any(marker in line for marker in LOG_PROBLEMS)]


class FdHolder:
    """tests/fd_holder.py: a file held open on a mount by a process of its own.

    Use it as a context manager; it is killed on the way out. See fd_holder.py for
    why the test process must not hold the file itself.
    """

    def __init__(self, path: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "tests.fd_holder", str(path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def answer(self) -> str:
        return self.process.stdout.readline().strip()

    def ask(self, command: str) -> str:
        self.send(command)
        return self.answer()

    def __enter__(self) -> FdHolder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self.process.stdin.close()
        self.process.stdout.close()


class LockHolder(FdHolder):
    """tests/lock_holder.py: a process of its own that takes and holds locks on
    mounts; `ask` one command, or `send` a blocking one and read its `answer` later."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-m", "tests.lock_holder"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def pid(self) -> int:
        return int(self.ask("pid").split()[1])

    def ready(self) -> bool:
        """An answer is waiting (a blocking command returned)."""
        import select

        return bool(select.select([self.process.stdout], [], [], 0)[0])
