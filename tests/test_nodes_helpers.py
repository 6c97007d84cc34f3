"""scripts/nodes.py, the helpers the scripts and the tests share, on real processes and
real mounts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.nodes import (
    MountProcess,
    NodeError,
    Waits,
    cmdline,
    cpu_seconds,
    events_json,
    fds_open_on,
    force_unmount,
    is_mounted,
    is_process_of,
    mounts_under,
    pid_alive,
    proc_stat,
    process_state,
    processes_naming,
    status_json,
    stop_daemon,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent

# A FUSE server that outlives its mount and ignores SIGTERM: only SIGKILL ends it.
STUBBORN_SERVER = """
import signal, stat, sys, time
import pyfuse3, trio

class Root(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino, attr.st_mode, attr.st_nlink = inode, stat.S_IFDIR | 0o755, 2
        return attr

signal.signal(signal.SIGTERM, signal.SIG_IGN)
pyfuse3.init(Root(), sys.argv[1], set())
try:
    trio.run(pyfuse3.main)  # returns once the mount is gone
finally:
    pyfuse3.close(unmount=False)
while True:
    time.sleep(1)
"""


@pytest.fixture
def servers():
    """The MountProcesses a test appends here, started or not; whatever it leaves is
    killed, and its mount detached, afterwards. Plainly, without the helpers under test:
    a broken one must fail its test, not leave a node or a mount behind."""
    started: list[MountProcess] = []
    yield started
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)
        subprocess.run(["fusermount3", "-u", "-z", os.fspath(server.mountpoint)],
                       capture_output=True)


def csvfs_node(tmp_path, image, mountpoint, name="n1") -> MountProcess:
    return MountProcess.csvfs_node(image, mountpoint, name, tmp_path / f"{name}.log")


def test_is_mounted_through_a_symlink_with_a_space_in_the_path(tmp_path, image, servers):
    real_parent = tmp_path / "dir with space"
    mountpoint = real_parent / "mnt 1"
    alias = tmp_path / "alias"
    alias.symlink_to(real_parent)
    straight = tmp_path / "straight"
    straight.symlink_to(mountpoint)
    node = csvfs_node(tmp_path, image, mountpoint)
    servers.append(node)
    node.start()

    with open("/proc/mounts") as mounts:  # the kernel escapes the space: the test needs it
        assert any(os.fspath(real_parent).replace(" ", "\\040") in line for line in mounts)
    assert is_mounted(mountpoint)
    assert is_mounted(alias / "mnt 1")
    assert is_mounted(straight)  # the link is the last component
    assert not is_mounted(real_parent) and not is_mounted(alias)
    assert mounts_under(real_parent) == [os.fspath(mountpoint)]
    assert mounts_under(alias) == [os.fspath(alias / "mnt 1")]  # spelled as given
    assert mounts_under(tmp_path / "elsewhere") == []

    assert processes_naming([alias / "mnt 1"]) == {node.pid}
    assert fds_open_on(node.pid, "/dev/fuse")
    assert status_json(image)["coordinator"]["name"] == "n1"
    assert "election" in [event["kind"] for event in events_json(image)]

    assert node.stop() == (True, "unmounted, exited")
    assert node.process.returncode == 0
    assert not is_mounted(mountpoint) and mounts_under(real_parent) == []


def test_proc_readers_on_a_live_and_a_zombie_child(tmp_path):
    marker = os.fspath(tmp_path / "marker path")
    burn = ("import time\nstart = time.process_time()\n"
            "while time.process_time() - start < 0.3:\n    pass\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", burn, marker])
    try:
        assert wait_until(lambda: process_state(child.pid) == "S", 20)  # done burning
        assert pid_alive(child.pid) and proc_stat(child.pid)[0] == "S"
        assert cmdline(child.pid) == [sys.executable, "-c", burn, marker]
        assert cpu_seconds(child.pid) >= 0.25
        assert processes_naming([marker]) == {child.pid}
        assert processes_naming([tmp_path], below=True) == {child.pid}
        assert processes_naming([tmp_path]) == set()  # only inside it, and below=False
        assert is_process_of(child.pid, [marker]) and not is_process_of(child.pid, ["other"])

        os.kill(child.pid, signal.SIGKILL)  # not reaped: a zombie
        assert wait_until(lambda: process_state(child.pid) == "Z", 10)
        assert not pid_alive(child.pid)
        assert cmdline(child.pid) == []
        assert processes_naming([marker]) == set()
        assert not is_process_of(child.pid, [marker])
    finally:
        child.kill()
        child.wait(timeout=10)
    assert process_state(child.pid) is None and proc_stat(child.pid) == []
    assert cpu_seconds(child.pid) == 0 and not pid_alive(child.pid)


def test_stop_wakes_a_stopped_node_and_unmounts_it_cleanly(tmp_path, image, servers):
    node = csvfs_node(tmp_path, image, tmp_path / "mnt")
    servers.append(node)
    node.start()
    node.process.send_signal(signal.SIGSTOP)
    assert wait_until(lambda: process_state(node.pid) == "T", 10)
    time.sleep(1.2)  # the kernel's copy of the root's attributes runs out (csvfs: 1 s)
    # A stat of the mount now waits for the node, and only SIGKILL ends that wait: ask
    # in a process of our own, so that a helper that stats it fails the test, not hangs it.
    asked = subprocess.run(
        [sys.executable, "-c", "import sys; from scripts.nodes import is_mounted; "
         "print(is_mounted(sys.argv[1]))", node.mountpoint],
        capture_output=True, text=True, timeout=10, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert asked.stdout == "True\n", asked.stderr
    stopped, steps = node.stop()
    assert (stopped, steps) == (True, "unmounted, exited")
    assert node.process.returncode == 0  # its own clean stop, no SIGTERM or SIGKILL
    assert not is_mounted(node.mountpoint)


def test_stop_kills_a_server_that_ignores_its_unmount(tmp_path, servers):
    mountpoint = tmp_path / "mnt"
    server = MountProcess([sys.executable, "-c", STUBBORN_SERVER, mountpoint], mountpoint,
                          label="stubborn", waits=Waits(unmount=1, term=1, kill=10))
    servers.append(server)
    server.start()
    stopped, steps = server.stop()
    assert stopped, steps
    assert steps == ("unmounted, still running after 1 s, SIGTERM, still running after 1 s, "
                     "fusermount3 -u -z, SIGKILL, exited")
    assert server.process.returncode == -signal.SIGKILL
    assert not is_mounted(mountpoint)


def test_stop_detaches_the_dead_mount_of_a_killed_node(tmp_path, image, servers):
    node = csvfs_node(tmp_path, image, tmp_path / "mnt")
    servers.append(node)
    node.start()
    node.kill(signal.SIGKILL, unmount=False)
    assert is_mounted(node.mountpoint)  # dead (ENOTCONN), but still in the table
    assert node.stop() == (True, "had already exited, fusermount3 -u -z on its dead mount")
    assert not is_mounted(node.mountpoint)
    assert force_unmount(node.mountpoint) == ""  # nothing left to detach


def test_a_node_that_cannot_mount_says_why_and_leaves_nothing(tmp_path, servers):
    node = csvfs_node(tmp_path, tmp_path / "missing.img", tmp_path / "mnt")
    servers.append(node)
    with pytest.raises(NodeError, match=r"^node n1 exited 10: csvfs: error: .*missing\.img"):
        node.start()
    assert not node.running() and not is_mounted(node.mountpoint)


def test_stop_daemon_leaves_a_pid_that_is_not_the_node_alone(tmp_path):
    other = subprocess.Popen(["sleep", "60"])
    try:
        assert stop_daemon(other.pid, tmp_path / "mnt") == (True, "was not running")
        assert other.poll() is None  # its argv does not name the mount: never signalled
    finally:
        other.kill()
        other.wait(timeout=10)
