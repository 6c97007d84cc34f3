"""VM-like workloads on real mounts of several nodes: migration, growth, node crashes.

Each VM is a `vmload run` process writing stamped blocks through one node's mount;
`vmload verify` then reads the disk through every node and checks each sector against
the VM's own record of what it last wrote there.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from scripts.nodes import events_json as events
from tests.cluster import csvfs, make_volume, status

pytestmark = pytest.mark.timeout(120)

VMLOAD = [sys.executable, "-m", "vmload"]


class VMs:
    """`vmload run` processes; every one still running is killed at teardown."""

    def __init__(self, state):
        self.state = state
        self.running: list[subprocess.Popen] = []

    def start(self, mount, vm, *extra) -> subprocess.Popen:
        command = [*VMLOAD, "run", "--mount", mount, "--vm", vm, "--state", self.state,
                   "--json", *extra]
        process = subprocess.Popen(list(map(str, command)), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.running.append(process)
        return process

    def finish(self, process: subprocess.Popen, timeout: float = 60) -> tuple[int, dict]:
        out, err = process.communicate(timeout=timeout)
        try:
            summary = json.loads(out)
        except ValueError:
            raise AssertionError(f"vmload run printed no summary: {out!r} {err!r}") from None
        return process.returncode, dict(summary, stderr=err)

    def verify(self, mount, vm) -> dict:
        result = subprocess.run(
            list(map(str, [*VMLOAD, "verify", "--mount", mount, "--vm", vm, "--state",
                           self.state, "--json"])),
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode in (0, 1), result.stderr
        report = json.loads(result.stdout)
        assert (result.returncode == 0) == report["ok"]
        return report

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=10)


@pytest.fixture
def vms(tmp_path):
    runner = VMs(tmp_path / "vmstate")
    yield runner
    runner.stop_all()


def start_cluster(nodes, image, count):
    return [nodes.start(image, f"n{index}") for index in range(1, count + 1)]


def assert_verifies_everywhere(vms, cluster, vm) -> list[dict]:
    reports = [vms.verify(node.mountpoint, vm) for node in cluster]
    for node, report in zip(cluster, reports, strict=True):
        assert report["ok"], (node.name, report)
        assert report["written"] > 0
    return reports


def unmount_and_fsck(cluster, image) -> None:
    for node in cluster:
        node.unmount()
    report = csvfs("fsck", image, check=False)
    assert report.returncode == 0, report.stdout


# -- migration -------------------------------------------------------------------------------


@pytest.mark.parametrize("iodepth", [1, 8])
def test_migration_in_the_middle_of_writes(image, nodes, vms, iodepth):
    """With several writes in flight, the source drains them before it closes."""
    cluster = start_cluster(nodes, image, 3)
    first, *others = cluster
    vm = vms.start(first.mountpoint, "mover", "--size", "32M", "--seconds", "4",
                   "--iodepth", str(iodepth), "--migrate-every", "0.5",
                   *sum((["--peer", n.mountpoint] for n in others), []))
    code, summary = vms.finish(vm)
    assert code == 0, summary
    moves = summary["migrations"]
    assert len(moves) >= 4, moves
    assert {m["to"] for m in moves} == {str(n.mountpoint) for n in cluster}
    reports = assert_verifies_everywhere(vms, cluster, "mover")
    assert reports[0]["clean_end"]
    handoffs = [e for e in events(image) if e["kind"] == "handoff"]
    assert len(handoffs) == len(moves), handoffs
    assert "/mover.img" in handoffs[0]["msg"] and "from n1 to n2" in handoffs[0]["msg"]
    unmount_and_fsck(cluster, image)


def test_a_commanded_migration_shows_in_the_open_file_table(image, nodes, vms):
    """`vmload migrate` moves a running VM; while the target has opened the disk and the
    source still writes, the coordinator's table lists both, then only the target."""
    source, target = start_cluster(nodes, image, 2)
    vm = vms.start(source.mountpoint, "vm1", "--size", "16M", "--seconds", "8",
                   "--overlap", "2")
    deadline = time.monotonic() + 20
    while not holders(image, "/vm1.img"):
        assert time.monotonic() < deadline and vm.poll() is None
        time.sleep(0.05)
    assert holders(image, "/vm1.img") == {"n1"}
    mover = subprocess.Popen(list(map(str, [*VMLOAD, "migrate", "--vm", "vm1", "--to",
                                            target.mountpoint, "--state", vms.state])),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = set()
    deadline = time.monotonic() + 20
    while mover.poll() is None and time.monotonic() < deadline:
        seen.add(frozenset(holders(image, "/vm1.img")))
        time.sleep(0.05)
    out, err = mover.communicate(timeout=30)
    assert mover.returncode == 0, err
    assert "moved from" in out and str(target.mountpoint) in out
    assert frozenset({"n1", "n2"}) in seen, seen
    assert holders(image, "/vm1.img") == {"n2"}
    code, summary = vms.finish(vm)
    assert code == 0 and len(summary["migrations"]) == 1, summary
    assert summary["migrations"][0]["overlap_ms"] >= 1900
    assert_verifies_everywhere(vms, [source, target], "vm1")
    assert any(e["kind"] == "handoff" and "from n1 to n2" in e["msg"] for e in events(image))


def holders(image, path) -> set[str]:
    return {name for entry in status(image)["open_files"] if entry["path"] == path
            for name in entry["nodes"]}


def test_migration_during_an_extend(image, nodes, vms):
    """The disk grows every 50 ms, and every handoff keeps the source writing (and
    growing) for 300 ms after the target opened it: extends land while both hold it,
    and the target writes straight into the space they added."""
    cluster = start_cluster(nodes, image, 2)
    vm = vms.start(cluster[0].mountpoint, "grower", "--size", "4M", "--seconds", "4",
                   "--grow", "--grow-every", "0.05", "--grow-by", "256K",
                   "--max-size", "96M", "--migrate-every", "0.6", "--overlap", "0.3",
                   "--peer", cluster[1].mountpoint)
    code, summary = vms.finish(vm)
    assert code == 0, summary
    assert summary["grows"] > 20 and len(summary["migrations"]) >= 3, summary
    reports = assert_verifies_everywhere(vms, cluster, "grower")
    assert reports[0]["size"] == summary["size"] > 4 << 20
    unmount_and_fsck(cluster, image)


# -- crashes and concurrency ---------------------------------------------------------------


@pytest.mark.parametrize("victim", ["member", "coordinator"])
def test_sigkill_of_the_node_under_a_vm_loses_no_write(image, nodes, vms, victim):
    """The node the VM writes through dies: the VM stops with an I/O error, and the
    disk, read through a surviving node, holds every write the VM had done (every
    fsynced one, and the acknowledged ones too: they went straight to the image)."""
    coordinator, member = start_cluster(nodes, image, 2)
    dying, survivor = (member, coordinator) if victim == "member" else (coordinator, member)
    vm = vms.start(dying.mountpoint, "doomed", "--size", "8M", "--seconds", "30",
                   "--grow", "--grow-every", "0.2", "--grow-by", "1M", "--max-size", "64M",
                   "--fsync-every", "16", "--iodepth", "4")
    time.sleep(1.5)
    assert vm.poll() is None
    dying.kill(signal.SIGKILL, unmount=False)  # the VM must not fall into the bare directory
    code, summary = vms.finish(vm)
    assert code == 4, summary
    assert summary["writes"] > 100 and summary["grows"] >= 3, summary
    nodes.allow_log_errors = victim == "coordinator"  # the survivor logs the lost lease
    report = vms.verify(survivor.mountpoint, "doomed")
    assert report["ok"], report
    assert not report["clean_end"]
    assert report["size"] >= summary["size"]
    # the VM starts again on the surviving node, where it stopped
    code, again = vms.finish(vms.start(survivor.mountpoint, "doomed", "--seconds", "1"))
    assert code == 0 and again["writes"] > 0, again
    report = vms.verify(survivor.mountpoint, "doomed")
    assert report["ok"] and report["clean_end"], report


def test_two_vms_on_different_nodes_extend_at_once(image, nodes, vms):
    cluster = start_cluster(nodes, image, 2)
    grow = ["--size", "4M", "--seconds", "4", "--grow", "--grow-every", "0.03",
            "--grow-by", "128K", "--max-size", "64M"]
    running = [vms.start(node.mountpoint, f"vm-{node.name}", *grow) for node in cluster]
    for process in running:
        code, summary = vms.finish(process)
        assert code == 0 and summary["grows"] > 30, summary
    for node in cluster:
        assert_verifies_everywhere(vms, cluster, f"vm-{node.name}")
    unmount_and_fsck(cluster, image)


@pytest.fixture
def image(tmp_path):
    return make_volume(tmp_path, size="512M")
