"""SIGKILL the node in the middle of a metadata storm; nothing acknowledged may be lost."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests import storm
from tests.cluster import csvfs

pytestmark = pytest.mark.timeout(120)


def _diff(actual: dict, expected: dict) -> list[str]:
    problems = []
    for path in sorted(set(actual) | set(expected)):
        if path not in actual:
            problems.append(f"missing {path}")
        elif path not in expected:
            problems.append(f"unexpected {path}")
        elif actual[path] != expected[path]:
            problems.append(f"differs {path}: {actual[path][:2]} vs {expected[path][:2]}")
    return problems


@pytest.mark.parametrize("seed,checkpoint_at", [(1, "0.5"), (2, "0.5"), (3, "0.002"),
                                                (4, "0.002"), (5, "0.0005")])
def test_sigkill_during_metadata_storm(tmp_path, image, nodes, seed, checkpoint_at):
    """With a tiny checkpoint threshold, kills also land during checkpoints."""
    node = nodes.start(image, "victim", env={"CSVFS_CHECKPOINT_AT": checkpoint_at})
    ack_log = tmp_path / "acks.log"
    worker = subprocess.Popen([sys.executable, "-m", "tests.storm", str(node.mountpoint),
                               str(ack_log), str(seed)], stderr=subprocess.PIPE)
    try:
        time.sleep(random.Random(seed).uniform(0.6, 2.0))
        node.kill(signal.SIGKILL, unmount=False)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        worker.stderr.close()
        node.stop()
    acked, in_flight = storm.expected_states(ack_log)
    assert len(acked.tree) > 3, "the storm did too little before the kill"

    survivor = nodes.start(image, "survivor")
    actual = storm.actual_tree(survivor.mountpoint)
    # The operation in flight at the kill was never acknowledged: its paths may be in any state.
    for path in in_flight:
        actual.pop(path, None)
        acked.tree.pop(path, None)
    problems = _diff(actual, acked.tree)
    assert not problems, f"acknowledged changes lost: {problems[:10]}"
    survivor.unmount()

    result = csvfs("fsck", image, check=False)
    assert result.returncode == 0, result.stdout
    assert "free-space map disagrees" not in result.stdout


def test_sigkill_then_fsck_before_remount_sees_no_leak(tmp_path, image, nodes):
    """Orphans left by a crash are reported by fsck and reclaimed by --repair."""
    node = nodes.start(image, "victim")
    path = node.path("open-unlinked")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x" * (3 << 20))
    os.unlink(path)
    node.kill(signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.close(fd)  # the mount is gone; the close has nowhere to go
    report = csvfs("fsck", image, check=False)
    assert report.returncode == 4, report.stdout
    assert "orphan inode" in report.stdout
    repaired = csvfs("fsck", "--repair", image, check=False)
    assert repaired.returncode == 1, repaired.stdout
    assert "reclaimed orphan inode" in repaired.stdout
    assert csvfs("fsck", image, check=False).returncode == 0
