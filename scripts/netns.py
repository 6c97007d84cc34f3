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
its own, which keeps that namespace alive; the node and every later command enter it
with nsenter, and the node's FUSE mount is seen there only. The volume image stays a
file on the host filesystem, which every namespace shares.

The tests' helper (tests/cluster.py) wants the nodes' mounts seen from the host too, as
a container's volume is: share_directory() makes the test's directory a shared mount,
and a holder started with shared=that directory keeps its copy of it a peer of the
host's, so that a mount made below it in either namespace shows in the other (and an
unmount too). Everything else in a holder's namespace is cut off from the host's
propagation, and copies of FUSE mounts outside the shared directory are dropped: a
copy of another process's FUSE mount kept in a namespace of ours would keep its
connection alive after its owner unmounted it, and its server would never hear.

Cutting a node sets the host end of its veth down: its packets are dropped both ways
until it is healed. teardown() removes everything named with the tag and is idempotent.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

IP_TIMEOUT = 10.0
HOLDER = ["sleep", "infinity"]
# The holders this process started, by netns: teardown() reaps them (a script that
# exits leaves its holders running, and a later `down` kills them by netns).
_holders: dict[str, subprocess.Popen] = {}


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


# Run by a holder between `unshare --mount` and becoming sleep: argv[1] is the shared
# directory ("" for none). Every shared mount outside it becomes a slave (it still hears
# of the host's unmounts, but sends nothing back); then every FUSE mount outside it,
# which is someone else's, is detached from this namespace only.
HOLDER_SETUP = r"""
import ctypes, os, re, sys
MS_SLAVE, MNT_DETACH = 1 << 19, 2
libc = ctypes.CDLL(None, use_errno=True)
shared = sys.argv[1]
def ours(path):
    return bool(shared) and (path == shared or path.startswith(shared.rstrip("/") + "/"))
mounts = []
with open("/proc/self/mountinfo") as table:
    for line in table:
        fields, _, rest = line.partition(" - ")
        fields = fields.split()
        path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        kind = rest.split()[0]
        mounts.append((path, kind, any(f.startswith("shared:") for f in fields[6:])))
for path, _kind, is_shared in mounts:
    if is_shared and not ours(path):
        libc.mount(None, path.encode(), None, MS_SLAVE, None)
for path, kind, _shared in reversed(mounts):
    if (kind in ("fuse", "fuseblk") or kind.startswith("fuse.")) and not ours(path):
        libc.umount2(path.encode(), MNT_DETACH)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def start_holder(network: Network, index: int, shared: str | os.PathLike | None = None) -> int:
    """The holder of node index's mount namespace (see the module docstring); its pid.
    With shared (a directory that share_directory() made a shared mount), mounts below
    it are seen both in the namespace and on the host. nsenter, unshare and the setup
    all exec, so the pid is that of sleep itself."""
    where = os.fspath(Path(shared).resolve()) if shared is not None else ""
    command = ["nsenter", f"--net=/run/netns/{network.netns(index)}", "--",
               "unshare", "--mount", "--propagation", "unchanged" if where else "private",
               "--", sys.executable, "-c", HOLDER_SETUP, where, *HOLDER]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    if not _wait_for_holder(process):
        process.kill()
        process.wait()
        raise NetnsError(f"the namespace holder of {network.netns(index)} did not start")
    _holders[network.netns(index)] = process
    return process.pid


def share_directory(directory: str | os.PathLike) -> None:
    """Make directory a shared mount of its own (a bind mount onto itself, in a peer
    group of its own), for start_holder(shared=directory)."""
    path = os.fspath(Path(directory).resolve())
    for args in (["--bind", path, path], ["--make-private", path], ["--make-shared", path]):
        _run(["mount", *args])


def unshare_directory(directory: str | os.PathLike) -> None:
    """Undo share_directory: detach the bind mount, with whatever is still mounted below
    it (the dead mount of a node that was killed). Nothing if it is not there."""
    path = os.fspath(Path(directory).resolve())
    while path in _mountpoints():
        _run(["umount", "--lazy", path])


def _mountpoints() -> list[str]:
    with open("/proc/self/mounts") as table:
        return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[1])
                for line in table if line.strip()]


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=IP_TIMEOUT,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        complaint = result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        raise NetnsError(f"{' '.join(command)}: {complaint[0]}")


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
        holder = _holders.pop(netns, None)
        if holder is not None:
            holder.kill()
            holder.wait(timeout=IP_TIMEOUT)
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
