import os

import pytest

from scripts.nodes import events_json, fd_flags, fds_open_on
from tests.cluster import csvfs

pytestmark = pytest.mark.timeout(60)


def test_write_read_remount(mount, nodes):
    path = mount.path("hello")
    with open(path, "wb") as handle:
        handle.write(b"hello world")
    os.mkdir(mount.path("dir"))
    assert sorted(os.listdir(mount.mountpoint)) == ["dir", "hello"]
    assert mount.unmount() == 0
    again = nodes.start(mount.image, "node2")
    assert again.path("hello").read_bytes() == b"hello world"


def test_clean_unmount_leaves_a_checkpoint_and_an_empty_journal(mount):
    for index in range(20):
        (mount.path(f"f{index}")).write_bytes(b"x" * index)
    assert mount.unmount() == 0
    report = csvfs("fsck", mount.image)
    assert "volume is clean" in report.stdout
    assert "journal: 0 record(s) replayed" in report.stdout
    assert "namespace: 21 inodes" in report.stdout


def test_fresh_volume_is_clean_and_logs_its_creation(image):
    report = csvfs("fsck", image)
    assert "volume is clean" in report.stdout
    assert [event["kind"] for event in events_json(image)] == ["mkfs"]


def test_event_ring_records_election_mount_and_unmount(mount):
    mount.unmount()
    kinds = [event["kind"] for event in events_json(mount.image)]
    assert kinds == ["mkfs", "election", "unmount"]
    text = csvfs("events", mount.image).stdout
    assert "became coordinator, epoch 1" in text


def test_node_reads_dev_fuse_without_blocking(mount):
    """The FUSE shim is in the node (see tests/test_fuse_shim.py for why it matters):
    once the node served a request, its /dev/fuse descriptor is non-blocking."""
    os.stat(mount.path(""))
    pid = mount.process.pid
    fuse_fds = fds_open_on(pid, "/dev/fuse")
    assert fuse_fds
    for fd in fuse_fds:
        flags = fd_flags(pid, fd)
        assert flags & os.O_NONBLOCK, f"fd {fd}: flags {flags:o}"
