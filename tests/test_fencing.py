"""A coordinator that stalls past its lease is replaced, never commits again, and rejoins."""

import os
import signal
import time

import pytest

from coordinator.journal import raw_records
from csvfs.volume.image import Volume
from scripts.nodes import events_json
from tests.cluster import FdHolder, csvfs

pytestmark = pytest.mark.timeout(60)
LEASE = "1"


def test_stalled_coordinator_steps_down_and_rejoins_after_a_takeover(image, nodes):
    stale = nodes.start(image, "stale", "--lease", LEASE)
    with FdHolder(stale.path("shared")) as holder:
        try:
            assert holder.ask("write") == "ok"
            stale.process.send_signal(signal.SIGSTOP)
            time.sleep(1.5)  # the lease lapses while the node is stopped
            fresh = nodes.start(image, "fresh", "--lease", LEASE)
            fresh.path("from-fresh").write_bytes(b"fresh")
            # Queue a write while the node is stopped, so that it is the first thing the
            # node sees when it wakes, before its lease timer. The data path must find the
            # lease gone before it touches the image, step down, rejoin under the new
            # coordinator and only then write, through the maps that coordinator gives it.
            holder.send("poke")
            time.sleep(0.2)
            stale.process.send_signal(signal.SIGCONT)
            assert holder.answer() == "ok"
            os.mkdir(stale.path("after-stepping-down"))
        finally:
            stale.process.send_signal(signal.SIGCONT)

    assert fresh.path("after-stepping-down").is_dir()
    assert fresh.path("shared").read_bytes() == b"x" * 10 + b"a" * 8182
    assert fresh.path("from-fresh").read_bytes() == b"fresh"
    assert "stepping down as coordinator" in stale.log.read_text()
    stale.unmount()
    fresh.unmount()
    assert csvfs("fsck", image, check=False).returncode == 0
    events = events_json(image)
    takeovers = [event for event in events if event["kind"] == "takeover"]
    assert len(takeovers) == 1 and takeovers[0]["node"] == "fresh"
    assert "took over from stale" in takeovers[0]["msg"]
    elections = [event["msg"] for event in events if event["kind"] == "election"]
    assert elections == ["stale became coordinator, epoch 1",
                         "fresh became coordinator, epoch 2"]
    assert any(e["kind"] == "join" and e["msg"].startswith("stale joined") for e in events)
    assert_epochs_in_order(image, old=1, new=2)


def assert_epochs_in_order(image, old, new):
    """No record of the old epoch was written after the new epoch began."""
    volume = Volume.open(image)
    try:
        records = raw_records(volume)
    finally:
        volume.close()
    old_seqs = [r.seq for r in records if r.epoch == old]
    new_seqs = [r.seq for r in records if r.epoch == new]
    assert new_seqs, "the new coordinator committed nothing"
    assert not old_seqs or max(old_seqs) < min(new_seqs), (old_seqs, new_seqs)


def test_stall_without_a_rival_renews_and_goes_on(image, nodes):
    node = nodes.start(image, "sleepy", "--lease", LEASE)
    node.process.send_signal(signal.SIGSTOP)
    time.sleep(1.5)
    node.process.send_signal(signal.SIGCONT)
    os.mkdir(node.path("after-the-stall"))  # nobody took the lease: renew and commit
    assert node.path("after-the-stall").is_dir()
