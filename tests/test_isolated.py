"""scripts/cluster.py up --isolate: nodes in network and mount namespaces of their own,
on real mounts; a workload run inside them, a node's link cut and healed, and `down`
leaving no namespace, link, process or mount behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.netns import Network, is_holder, teardown
from scripts.nodes import mounts_under, pid_alive, processes_naming, status_json, wait_until

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(os.geteuid() != 0 or not all(map(shutil.which, ("ip", "nsenter",
                                                                        "unshare"))),
                       reason="needs root, ip, nsenter and unshare"),
]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cluster.py"
NAMES = ["node1", "node2", "node3"]
HEAL_WAIT = 15.0


def run_script(command: str, directory: Path, *args: str,
               timeout: float = 90) -> subprocess.CompletedProcess:
    """--dir goes right after the command: after NODE, exec would take it for CMD."""
    return subprocess.run([sys.executable, os.fspath(SCRIPT), command,
                           "--dir", os.fspath(directory), *args],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def exec_in(directory: Path, node: str, *command: str) -> subprocess.CompletedProcess:
    return run_script("exec", directory, node, "--", *command, timeout=30)


def ours(directory: Path, listing: str) -> list[str]:
    """The lines of an `ip` listing that name this test's network."""
    tag = Network.for_directory(directory).tag
    return [line for line in listing.splitlines() if tag in line]


def leftovers(directory: Path) -> dict:
    """Whatever of this test's cluster still exists, by kind; all empty once it is down."""
    ip = lambda *args: subprocess.run(["ip", *args], capture_output=True,  # noqa: E731
                                      text=True).stdout
    return {"netns": ours(directory, ip("netns", "list")),
            "links": ours(directory, ip("-o", "link", "show")),
            "processes": sorted(processes_naming([directory], below=True)),
            "mounts": mounts_under(directory)}


@pytest.fixture
def cluster_dir(tmp_path):
    """The cluster's DIR; `down` afterwards, then by force whatever is left of it."""
    directory = tmp_path / "cluster"
    holders: set[int] = set()
    yield directory, holders
    subprocess.run([sys.executable, os.fspath(SCRIPT), "down", "--dir", os.fspath(directory)],
                   capture_output=True, timeout=90, stdin=subprocess.DEVNULL)
    teardown(Network.for_directory(directory))  # kills what runs in the namespaces, too
    for pid in [*holders, *processes_naming([directory], below=True)]:
        if pid in holders and not is_holder(pid):
            continue  # gone, and the pid maybe reused
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def session(image: Path) -> dict[str, dict]:
    """The nodes in the coordinator's session, by name, as the host's `csvfs status`
    sees them: through the lease region of the shared image and the bridge's address."""
    report = status_json(image)
    assert "error" not in report, report
    return {node["name"]: node for node in report["nodes"] if node["session"]}


def test_isolated_cluster(cluster_dir):
    directory, holders = cluster_dir
    up = run_script("up", directory, "-n", "3", "--isolate", "--lease", "1", "--size", "256M")
    state = json.loads((directory / "cluster.json").read_text())
    holders.update(node["holder"] for node in state["nodes"])
    assert up.returncode == 0, up.stderr
    network = Network(**state["network"])
    image = directory / "vol.img"

    members = session(image)
    assert sorted(members) == NAMES
    for index, name in enumerate(NAMES, 1):  # RPC over each node's namespace address
        assert members[name]["address"].startswith(f"{network.address(index)}:")
    assert mounts_under(directory) == []  # the host does not see the nodes' mounts
    check_mount_namespaces(directory)

    assert exec_in(directory, "node1", "sh", "-c", "echo hi > f").returncode == 0
    assert not (directory / "node1" / "f").exists()  # it went into node1's mount
    read = exec_in(directory, "node3", "cat", "f")
    assert (read.returncode, read.stdout) == (0, "hi\n"), read.stderr
    assert exec_in(directory, "node2", "sh", "-c", "exit 7").returncode == 7

    cut_and_heal(directory, network, image)

    down = run_script("down", directory)
    assert down.returncode == 0, down.stderr
    assert leftovers(directory) == {"netns": [], "links": [], "processes": [], "mounts": []}
    assert not [pid for pid in holders if pid_alive(pid)]


def check_mount_namespaces(directory: Path) -> None:
    """Each node sees its own mount, and not another node's."""
    for name in NAMES:
        mounts = exec_in(directory, name, "cat", "/proc/self/mounts").stdout
        shown = [line.split()[1] for line in mounts.splitlines() if " fuse" in line]
        assert os.fspath(directory / name) in shown, (name, shown)
        assert not [path for path in shown if path.startswith(os.fspath(directory))
                    and path != os.fspath(directory / name)], (name, shown)


def cut_and_heal(directory: Path, network: Network, image: Path) -> None:
    cut = run_script("cut", directory, "node2")
    assert cut.returncode == 0, cut.stderr
    probe = (f"import socket; socket.create_connection(('{network.address(2)}', 9), "
             f"timeout=2)")
    unreachable = exec_in(directory, "node1", sys.executable, "-c", probe)
    assert "TimeoutError" in unreachable.stderr  # dropped, not refused
    assert wait_until(lambda: session(image).get("node2", {}).get("heartbeat_age_s", 99) > 2,
                      10, interval=0.5), "node2 still heard from while cut"

    heal = run_script("heal", directory, "node2")
    assert heal.returncode == 0, heal.stderr
    assert wait_until(lambda: session(image).get("node2", {}).get("heartbeat_age_s", 99) < 1,
                      HEAL_WAIT, interval=0.5), "node2 not back in session after healing"
    assert sorted(session(image)) == NAMES


def test_isolate_refuses_several_volumes(cluster_dir):
    directory, _holders = cluster_dir
    up = run_script("up", directory, "-n", "2", "--isolate", "--volumes", "2")
    assert up.returncode == 2 and "one volume" in up.stderr
    assert leftovers(directory)["netns"] == []


# -- partitions ---------------------------------------------------------------------------------


def up_isolated(directory: Path, holders: set, *options: str) -> Path:
    up = run_script("up", directory, "-n", "3", "--isolate", "--lease", "1", "--size", "256M",
                    *options)
    state = json.loads((directory / "cluster.json").read_text())
    holders.update(node["holder"] for node in state["nodes"])
    assert up.returncode == 0, up.stderr
    return directory / "vol.img"


def ring(image: Path) -> list[dict]:
    from scripts.nodes import events_json

    return events_json(image)


@contextlib.contextmanager
def in_background(directory: Path, node: str, *command: str):
    """CMD running inside a node's namespaces; killed at the end if still running."""
    process = subprocess.Popen([sys.executable, os.fspath(SCRIPT), "exec", "--dir",
                                os.fspath(directory), "--cwd", "/", node, "--", *command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


WRITER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
end, count = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end:
    os.pwrite(fd, count.to_bytes(8, "little") * 512, count * 4096)
    os.fsync(fd)
    count += 1
    time.sleep(0.01)
print(count)
"""


def test_a_cut_off_member_waits_is_evicted_and_rejoins_with_nothing_lost(cluster_dir):
    directory, holders = cluster_dir
    image = up_isolated(directory, holders)
    path = os.fspath(directory / "node2" / "records")
    with in_background(directory, "node2", sys.executable, "-c", WRITER, path,
                       "6") as writer:
        assert wait_until(lambda: run_script("cut", directory, "node2").returncode == 0, 5)
        assert wait_until(lambda: any(e["kind"] == "evict" and "node2" in e["msg"]
                                      for e in ring(image)), 10, interval=0.5)
        assert run_script("heal", directory, "node2").returncode == 0
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err  # it waited through the cut: not one error
    count = int(out)
    read = exec_in(directory, "node1", sys.executable, "-c",
                   f"import os; print(os.path.getsize('{directory}/node1/records'))")
    assert int(read.stdout) == count * 4096  # every acknowledged record, seen from node1
    assert wait_until(lambda: "node2" in session(image), HEAL_WAIT, interval=0.5)


def test_a_long_cut_fails_the_members_io_after_its_io_timeout(cluster_dir):
    directory, holders = cluster_dir
    image = up_isolated(directory, holders, "--io-timeout", "2")
    assert exec_in(directory, "node2", "sh", "-c", "echo before > f").returncode == 0
    assert run_script("cut", directory, "node2").returncode == 0
    started = time.monotonic()
    write = run_script("exec", directory, "--cwd", "/", "node2", "--", "sh", "-c",
                       f"echo during >> {directory}/node2/f", timeout=60)
    waited = time.monotonic() - started
    assert write.returncode != 0 and "Input/output error" in write.stderr, write
    assert 1.5 < waited < 20, waited
    assert run_script("heal", directory, "node2").returncode == 0
    assert wait_until(lambda: "node2" in session(image), HEAL_WAIT, interval=0.5)
    after = exec_in(directory, "node2", "sh", "-c", "echo after >> f && cat f")
    assert (after.returncode, after.stdout) == (0, "before\nafter\n"), after


def test_a_coordinator_cut_off_from_both_members_steps_down(cluster_dir):
    directory, holders = cluster_dir
    image = up_isolated(directory, holders)
    assert exec_in(directory, "node1", "sh", "-c", "echo kept > f && sync f").returncode == 0
    epoch = status_json(image)["coordinator"]["epoch"]
    assert run_script("cut", directory, "node1").returncode == 0
    assert wait_until(lambda: (status_json(image).get("coordinator") or {}).get("name")
                      in ("node2", "node3"), 20, interval=0.5), "no new coordinator"
    assert status_json(image)["coordinator"]["epoch"] > epoch
    steps = [e["msg"] for e in ring(image) if e["kind"] == "partition"]
    assert steps and steps[0].startswith("node1 hears from too few of the other nodes")
    written = exec_in(directory, "node3", "sh", "-c", "cat f && echo more >> f")
    assert (written.returncode, written.stdout) == (0, "kept\n"), written
    assert run_script("heal", directory, "node1").returncode == 0
    assert wait_until(lambda: sorted(session(image)) == NAMES, HEAL_WAIT, interval=0.5)
    read = exec_in(directory, "node1", "cat", "f")
    assert (read.returncode, read.stdout) == (0, "kept\nmore\n"), read


def test_vmload_through_ten_cuts_and_heals_of_a_member(cluster_dir):
    directory, holders = cluster_dir
    image = up_isolated(directory, holders)
    state = directory / "vmstate"
    with in_background(directory, "node2", sys.executable, "-m", "vmload", "run", "--mount",
                       os.fspath(directory / "node2"), "--vm", "guest", "--state",
                       os.fspath(state), "--json", "--size", "16M", "--seconds", "18",
                       "--iodepth", "4", "--fsync-every", "16") as vm:
        time.sleep(1.0)
        for _ in range(10):  # each cut outlasts node2's heartbeat: it has to rejoin
            assert run_script("cut", directory, "node2").returncode == 0
            time.sleep(0.7)
            assert run_script("heal", directory, "node2").returncode == 0
            time.sleep(0.7)
        out, err = vm.communicate(timeout=90)
    assert vm.returncode == 0, err
    assert json.loads(out)["error"] is None
    rejoins = [e for e in ring(image) if e["kind"] == "join" and e["msg"].startswith("node2")]
    assert len(rejoins) >= 10, rejoins  # the first join, and one after most cuts
    for node in ("node1", "node3"):
        check = run_script("exec", directory, "--cwd", "/", node, "--", sys.executable, "-m",
                           "vmload", "verify", "--mount", os.fspath(directory / node), "--vm",
                           "guest", "--state", os.fspath(state), "--json", timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
