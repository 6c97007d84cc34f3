"""The coordinator dies or hangs while other nodes work: they carry on without an error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from coordinator.journal import raw_records
from csvfs.volume.image import Volume
from scripts.nodes import events_json
from tests import storm
from tests.cluster import AS_ON_SEVERAL_HOSTS, FdHolder, csvfs, status

pytestmark = pytest.mark.timeout(120)


class Storm:
    """tests/storm.py in a process of its own, on one node, in a directory of its own."""

    def __init__(self, node, area: str, seed: int, log_dir):
        os.mkdir(node.path(area))
        self.root = node.path(area)
        self.area = area
        self.log = log_dir / f"{area}.acks"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.storm", str(self.root), str(self.log), str(seed)],
            stderr=subprocess.PIPE, text=True)

    def still_running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self.process.stderr.close()

    def errors(self) -> str:
        return self.process.stderr.read() if self.process.poll() not in (None, -9) else ""

    def check(self, node) -> int:
        """Every acknowledged change is visible through `node`; returns how many."""
        acked, in_flight = storm.expected_states(self.log)
        actual = storm.actual_tree(node.path(self.area))
        for path in in_flight:  # killed mid-operation by the test: any state
            actual.pop(path, None)
            acked.tree.pop(path, None)
        missing = sorted(set(acked.tree) - set(actual))
        differ = sorted(p for p in set(acked.tree) & set(actual) if acked.tree[p] != actual[p])
        unexpected = sorted(set(actual) - set(acked.tree))
        assert not (missing or differ or unexpected), (node.name, missing[:5], differ[:5],
                                                       unexpected[:5])
        return len(acked.tree)


def seconds_until_done(action) -> float:
    """How long `action` takes; it must not fail (pytest-timeout bounds a hang)."""
    started = time.monotonic()
    action()
    return time.monotonic() - started


@AS_ON_SEVERAL_HOSTS
def test_coordinator_sigkill_under_load(tmp_path, image, nodes):
    victim, second, third = (nodes.start(image, name) for name in ("n1", "n2", "n3"))
    storms = [Storm(second, "on-n2", 11, tmp_path), Storm(third, "on-n3", 12, tmp_path)]
    try:
        time.sleep(1.5)
        victim.kill(signal.SIGKILL)
        takeover = seconds_until_done(lambda: os.mkdir(second.path("first-after-kill")))
        time.sleep(1.5)  # the storms go on under the new coordinator
        assert all(s.still_running() for s in storms), [s.errors() for s in storms]
    finally:
        for each in storms:
            each.stop()
    assert takeover < 5, takeover  # the target (< 1 s) is measured by make bench
    for each in storms:
        changes = each.check(second)
        assert changes > 5, f"{each.area} did too little"
        each.check(third)
    report = status(image)
    assert report["coordinator"]["name"] in ("n2", "n3")
    assert report["coordinator"]["epoch"] == 2
    dead = [node for node in report["nodes"] if node["name"] == "n1"]
    assert dead and dead[0]["state"] == "dead"
    second.unmount()
    third.unmount()
    result = csvfs("fsck", image, check=False)
    assert result.returncode == 0, result.stdout


def test_hung_coordinator_is_replaced_and_rejoins(tmp_path, image, nodes):
    lease = 1.5
    hung, other = (nodes.start(image, name, "--lease", str(lease)) for name in ("n1", "n2"))
    # A storm on the node that will hang: its requests queue up in the kernel while the
    # node is stopped, and must complete without an error once it wakes, as a member.
    storms = [Storm(hung, "on-n1", 21, tmp_path), Storm(other, "on-n2", 22, tmp_path)]
    try:
        time.sleep(1.0)
        hung.process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        os.mkdir(other.path("first-after-stop"))
        takeover = time.monotonic() - stopped
        report = status(image)
        assert report["coordinator"]["name"] == "n2", report
        assert report["coordinator"]["epoch"] == 2
        time.sleep(0.5)
        hung.process.send_signal(signal.SIGCONT)
        time.sleep(1.5)
        assert all(s.still_running() for s in storms), [s.errors() for s in storms]
        os.mkdir(hung.path("after-rejoining"))
    finally:
        hung.process.send_signal(signal.SIGCONT)
        for each in storms:
            each.stop()
    assert takeover < lease + 1.0, takeover
    log = hung.log.read_text()
    assert "stepping down as coordinator" in log and "joined coordinator n2" in log
    report = status(image)
    roles = {node["name"]: (node["coordinator"], node["session"]) for node in report["nodes"]}
    assert roles == {"n1": (False, True), "n2": (True, True)}
    assert other.path("after-rejoining").is_dir()
    for each in storms:
        assert each.check(other) > 3
        each.check(hung)
    hung.unmount()
    other.unmount()
    assert csvfs("fsck", image, check=False).returncode == 0
    volume = Volume.open(image)
    try:
        records = raw_records(volume)
    finally:
        volume.close()
    old = [record.seq for record in records if record.epoch == 1]
    new = [record.seq for record in records if record.epoch == 2]
    assert new, "the new coordinator committed nothing"
    assert not old or max(old) < min(new), "the hung coordinator committed after the takeover"


def test_open_unlinked_file_survives_a_takeover_then_is_reclaimed(image, nodes):
    lease = 1.0
    # With a third node, whichever survivor takes over, the orphan must stay: either the
    # keeper itself registers it, or the other waits for the keeper's re-registration.
    victim, keeper, _ = (nodes.start(image, name, "--lease", str(lease))
                         for name in ("n1", "n2", "n3"))
    free_before = os.statvfs(keeper.mountpoint).f_bfree
    with FdHolder(keeper.path("scratch")) as holder:
        for _ in range(256):  # 2 MiB
            assert holder.ask("write") == "ok"
        os.unlink(victim.path("scratch"))
        victim.kill(signal.SIGKILL)
        time.sleep(3 * lease)  # past the new coordinator's wait for re-registrations
        assert holder.ask("poke") == "ok"  # still open, still its own units
        assert status(image)["open_files"][0]["nodes"] == {"n2": 1}
    deadline = time.monotonic() + 10
    while os.statvfs(keeper.mountpoint).f_bfree != free_before:  # the last close reclaims
        assert time.monotonic() < deadline, "the orphan was not reclaimed after its last close"
        time.sleep(0.1)
    for node in nodes.started[1:]:
        node.unmount()
    assert csvfs("fsck", image, check=False).returncode == 0


def test_clean_unmount_of_the_coordinator_hands_the_volume_over(image, nodes):
    leaving, staying, third = (nodes.start(image, name) for name in ("n1", "n2", "n3"))
    staying.path("before").write_bytes(b"1")
    assert leaving.unmount() == 0
    started = time.monotonic()
    staying.path("after").write_bytes(b"2")
    assert time.monotonic() - started < 2  # the lease was given back: no waiting it out
    assert third.path("after").read_bytes() == b"2" and third.path("before").exists()
    report = status(image)
    assert report["coordinator"]["name"] in ("n2", "n3")
    states = {node["name"]: node["state"] for node in report["nodes"]}
    assert states == {"n1": "stopped", "n2": "alive", "n3": "alive"}
    takeovers = [e for e in events_json(image) if e["kind"] == "takeover"]
    assert takeovers == []  # a handover, not a takeover
