"""Network and mount namespaces for an isolated local cluster (scripts/cluster.py up
--isolate).

A Network belongs to one cluster directory; a short hash of its path (the tag) names
everything made for it, so that two clusters never share a name and a cleanup can find
all of it by name alone:

    bridge          csvfs-br<tag>           host side, address SUBNET.254/24
    per node I      netns csvfs-<tag>-nodeI  with lo and eth0 SUBNET.I/24
                    veth csvfs-<tag>vI       the host end, enslaved to the bridge

The bridge has an address so that the host (`csvfs status`) reaches the nodes' RPC.
Each node also gets a holder: `sleep infinity` in its netns and in a mount namespace of
its own. `ip netns exec` makes a new mount namespace on every call, so the holder is
what keeps one alive; the node and every later command enter it with nsenter, and the
node's FUSE mount is seen there only. The volume image stays a file on the host
filesystem, which every namespace shares.

Cutting a node sets the host end of its veth down: its packets are dropped both ways
until it is healed. teardown() removes everything named with the tag and is idempotent.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

IP_TIMEOUT = 10.0
HOLDER = ["sleep", "infinity"]


class NetnsError(Exception):
    """A namespace or link could not be made or changed; the message says which."""


@dataclass
class Network:
    tag: str  # 5 hex digits: interface names have at most 15 characters
    subnet: str  # "10.X.Y": nodes are 10.X.Y.I, the host's bridge 10.X.Y.254

    @classmethod
    def for_directory(cls, directory: Path) -> Network:
        digest = hashlib.sha1(os.fspath(directory.resolve()).encode()).digest()
        # 10.100-199.*: clear of the low 10.0.* nets that hosts and containers tend to use
        return cls(digest.hex()[:5], f"10.{100 + digest[0] % 100}.{digest[1]}")

    @property
    def bridge(self) -> str:
        return f"csvfs-br{self.tag}"

    @property
    def host_address(self) -> str:
        return f"{self.subnet}.254"

    def netns(self, index: int) -> str:
        return f"csvfs-{self.tag}-node{index}"

    def link(self, index: int) -> str:
        return f"csvfs-{self.tag}v{index}"

    def address(self, index: int) -> str:
        return f"{self.subnet}.{index}"

    def owns(self, name: str) -> bool:
        """name (a link or a netns) was made for this network."""
        return name == self.bridge or name.startswith(f"csvfs-{self.tag}")


def ip(*args: str, check: bool = True) -> str:
    """Run ip(8); returns its stdout, or raises NetnsError with its complaint."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True,
                            timeout=IP_TIMEOUT, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        complaint = result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        raise NetnsError(f"ip {' '.join(args)}: {complaint[0]}")
    return result.stdout


# -- making ---------------------------------------------------------------------------------


def create_bridge(network: Network) -> None:
    if ip("route", "show", f"{network.subnet}.0/24").strip():
        raise NetnsError(f"{network.subnet}.0/24 is already routed on this host; "
                         f"another cluster or network uses it")
    ip("link", "add", network.bridge, "type", "bridge")
    ip("addr", "add", f"{network.host_address}/24", "dev", network.bridge)
    ip("link", "set", network.bridge, "up")


def add_node(network: Network, index: int) -> None:
    """The netns of node index, with its veth on the bridge and its address inside."""
    netns, link = network.netns(index), network.link(index)
    ip("netns", "add", netns)
    ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
    ip("link", "set", link, "master", network.bridge, "up")
    ip("-n", netns, "addr", "add", f"{network.address(index)}/24", "dev", "eth0")
    ip("-n", netns, "link", "set", "eth0", "up")
    ip("-n", netns, "link", "set", "lo", "up")


def start_holder(network: Network, index: int) -> int:
    """The holder of node index's mount namespace (see the module docstring); its pid.
    ip netns exec and unshare both exec, so the pid is that of sleep itself."""
    command = ["ip", "netns", "exec", network.netns(index),
               "unshare", "--mount", "--propagation", "private", *HOLDER]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    if not _wait_for_holder(process):
        process.kill()
        raise NetnsError(f"the namespace holder of {network.netns(index)} did not start")
    return process.pid


def _wait_for_holder(process: subprocess.Popen, tries: int = 100) -> bool:
    """Until the holder is sleep, in a netns that is not ours (up to about 5 s)."""
    for _ in range(tries):
        if process.poll() is not None:
            return False
        if is_holder(process.pid):
            return True
        time.sleep(0.05)
    return False


# -- using ----------------------------------------------------------------------------------


def is_holder(pid: int) -> bool:
    """pid is a holder: sleep infinity in a network namespace other than ours (not a
    reused pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        theirs = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    return [word.decode() for word in argv] == HOLDER and theirs != os.readlink(
        "/proc/self/ns/net")


def enter(holder: int, command: list[str], cwd: str | None = None) -> list[str]:
    """command, run inside the network and mount namespaces of holder (in cwd, if given).
    Not nsenter --wd: it opens the directory before entering, in our mount namespace,
    which would put command below the node's mount instead of inside it."""
    where = ["env", f"--chdir={cwd}"] if cwd is not None else []
    return ["nsenter", f"--target={holder}", "--mount", "--net", "--", *where, *command]


def mounted_in(holder: int, path: str) -> bool:
    """Something is mounted at path in the mount namespace of holder."""
    if not is_holder(holder):  # a reused pid would show some other namespace
        return False
    try:
        lines = Path(f"/proc/{holder}/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[1] == path for line in lines if len(line.split()) > 1)


def unmount(holder: int, path: str, lazy: bool = False) -> str:
    """fusermount3 -u path inside holder's mount namespace; "" or the complaint."""
    command = enter(holder, ["fusermount3", "-u", *(["-z"] if lazy else []), path])
    result = subprocess.run(command, capture_output=True, text=True, timeout=IP_TIMEOUT,
                            stdin=subprocess.DEVNULL)
    return "" if result.returncode == 0 else (result.stderr.strip() or "fusermount3 failed")


def set_link(network: Network, index: int, up: bool) -> None:
    """cut (up=False) or heal node index: the host end of its veth down or up."""
    ip("link", "set", network.link(index), "up" if up else "down")


# -- teardown -------------------------------------------------------------------------------


def teardown(network: Network) -> list[str]:
    """Remove every netns and link of network, killing what still runs in its netns
    (holders; a node that would not stop); returns what was removed. Idempotent, and by
    name, so that it also cleans up after an `up` that crashed half-way."""
    removed = []
    for netns in owned_netns(network):
        kill_processes_in(netns)
        ip("netns", "del", netns, check=False)
        removed.append(f"netns {netns}")
    for link in owned_links(network):  # the veth's other end goes with it
        ip("link", "del", link, check=False)
        removed.append(f"link {link}")
    return removed


def owned_netns(network: Network) -> list[str]:
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    return [name for name in names if network.owns(name)]


def owned_links(network: Network) -> list[str]:
    """The bridge last: its veths are deleted first."""
    names = [line.split(":")[1].strip().split("@")[0]
             for line in ip("-o", "link", "show").splitlines()]
    return sorted((name for name in names if network.owns(name)),
                  key=lambda name: name == network.bridge)


def kill_processes_in(netns: str) -> None:
    """SIGKILL whatever runs in netns: by now only holders, or nodes that would not
    stop. Their mount namespace, and any mount left in it, goes with the last of them."""
    for word in ip("netns", "pids", netns, check=False).split():
        try:
            os.kill(int(word), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass
