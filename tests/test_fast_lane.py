"""The fast lane (csvfs/_fast_path.c): the FUSE shim's reads and writes in C, with
requests in flight at once, on real mounts driven through os calls.

What the lane does is checked against a model of the file, through the page cache and
with O_DIRECT on a loop device (also_on_a_loop_device), one request at a time and
with workers; that it did
the work is read from the count each node logs when it unmounts. The pause and the
snapshot hold racing requests in flight are in test_cluster.py (the hard rule, "in-flight")
and test_backup.py ("eight-in-flight").
"""

from __future__ import annotations

import os
import random
import re
import threading
from pathlib import Path

import pytest

from tests.cluster import csvfs, make_volume, status

pytestmark = pytest.mark.timeout(120)

M = 1 << 20
LANE_COUNTS = re.compile(r"fast lane: (\d+) reads and (\d+) writes answered, "
                         r"(\d+) handed to Python, (\d+) of them after failing; "
                         r"(\d+) fdatasyncs answered")


def lane_counts(node) -> dict[str, int]:
    """What the node's lane did, from the line it logs at unmount."""
    found = LANE_COUNTS.findall(node.log.read_text())
    assert found, "the node logged no fast lane counts"
    reads, writes, handed, failed, syncs = map(int, found[-1])
    return {"reads": reads, "writes": writes, "handed": handed, "failed": failed,
            "syncs": syncs}


class Model:
    """A file's expected bytes; each thread owns a region of its own, so that the
    model stays exact while the threads' requests are in flight at once."""

    def __init__(self, size: int):
        self.data = bytearray(size)

    def write(self, fd: int, offset: int, data: bytes) -> None:
        assert os.pwrite(fd, data, offset) == len(data)
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def check_read(self, fd: int, offset: int, length: int) -> None:
        got = os.pread(fd, length, offset)
        want = bytes(self.data[offset:offset + length])
        assert got == want, f"read of {length} at {offset} differs from the model"


def drive(path: Path, model: Model, regions: list[tuple[int, int]], seconds: float) -> int:
    """One thread per region: random reads and writes of random lengths (across unit
    and block boundaries, over holes, some past the end), checked as they go."""
    failures: list[BaseException] = []
    done = [0]

    def run(seed: int, start: int, end: int) -> None:
        rng = random.Random(seed)
        fd = os.open(path, os.O_RDWR)
        try:
            for _ in range(400):
                # mostly aligned, as a VM's disk I/O is (and O_DIRECT needs for the lane)
                offset = rng.randrange(start, end, rng.choice([1, 4096, 4096, 4096]))
                length = rng.choice([1, 512, 4096, 4096, 65536, 196_608, 300_000])
                length = min(length, end - offset)
                if rng.random() < 0.5:
                    model.write(fd, offset, rng.randbytes(length))
                else:
                    model.check_read(fd, offset, length)
                done[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=run, args=(seed, start, end))
               for seed, (start, end) in enumerate(regions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds)
    assert not failures, failures
    return done[0]


def regions_of(size: int, count: int) -> list[tuple[int, int]]:
    step = size // count
    return [(index * step, (index + 1) * step) for index in range(count)]


def sparse_file(path: Path, size: int) -> Model:
    """A file with data in some units and holes elsewhere, and its model."""
    model = Model(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        rng = random.Random(7)
        for offset in range(0, size, 3 * M):  # 64 KiB in every third MiB; holes elsewhere
            model.write(fd, offset + 100_000, rng.randbytes(64 * 1024))
    finally:
        os.close(fd)
    return model


@pytest.mark.also_on_a_loop_device  # O_DIRECT: unaligned requests are Python's
@pytest.mark.parametrize("threads", [0, 4])
def test_the_lane_reads_and_writes_as_the_model_says(image, nodes, threads):
    node = nodes.start(image, "n1", "--io-threads", str(threads))
    size = 6 * M
    model = sparse_file(node.path("disk"), size)
    assert drive(node.path("disk"), model, regions_of(size, 6), 60) == 6 * 400
    # a file that grows as it is written: its extends are Python's, the rest the lane's
    grown = Model(0)
    fd = os.open(node.path("grown"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for offset in range(0, 2 * M, 100_000):
            grown.write(fd, offset, os.urandom(100_000))
            grown.check_read(fd, 0, offset + 100_000 + 5000)  # past the end too
    finally:
        os.close(fd)
    assert node.path("disk").read_bytes() == bytes(model.data)
    assert node.path("grown").read_bytes() == bytes(grown.data)
    node.unmount()
    counts = lane_counts(node)
    # the lane did most of the work, and gave Python what is Python's (holes, extends)
    assert counts["reads"] > 500 and counts["writes"] > 500, counts
    assert counts["handed"] > 0 and counts["failed"] == 0, counts
    assert csvfs("fsck", image, check=False).returncode == 0


def test_requests_that_fail_in_the_lane_are_done_again_through_the_coordinator(
        tmp_path, nodes):
    image = make_volume(tmp_path, size="64M", unit="64K")
    coordinator = nodes.start(image, "n1")
    member = nodes.start(image, "n2", "--io-threads", "4")
    size = 4 * M
    model = Model(0)  # written whole: the lane, not an extend, meets the fault first
    fd = os.open(member.path("disk"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        model.write(fd, 0, os.urandom(size))
    finally:
        os.close(fd)
    # the member's path to the image fails under requests in flight: the lane's
    # workers fail, Python does each request again, and the node goes Redirected
    csvfs("fault", image, "--node", "n2", "storage-down")
    assert drive(member.path("disk"), model, regions_of(size, 4), 90) == 4 * 400
    state = next(n for n in status(image)["nodes"] if n["name"] == "n2")
    assert state["io_mode"] == "redirected", state
    assert coordinator.path("disk").read_bytes() == bytes(model.data)
    member.unmount()
    counts = lane_counts(member)
    assert counts["failed"] > 0, counts


def test_fdatasync_is_the_lanes_unless_the_coordinator_holds_data_of_the_file(image, nodes):
    """The lane's fdatasync is the image's: enough only while the coordinator has not
    written data of the file (an append) since its last fsync."""
    node = nodes.start(image, "n1")
    block = os.urandom(64 << 10)
    fd = os.open(node.path("plain"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for index in range(20):
            os.pwrite(fd, block, index * len(block))
            os.fdatasync(fd)
    finally:
        os.close(fd)
    node.unmount()
    counts = lane_counts(node)
    assert counts["syncs"] >= 10 and counts["failed"] == 0, counts

    node = nodes.start(image, "n1")
    fd = os.open(node.path("log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"appended by the coordinator\n")
        os.fdatasync(fd)  # so the coordinator must flush it: Python's, not the lane's
    finally:
        os.close(fd)
    assert node.path("plain").read_bytes() == block * 20
    node.unmount()
    assert lane_counts(node)["syncs"] == 0


def test_an_fdatasync_that_fails_in_the_lane_is_done_through_the_coordinator(
        tmp_path, nodes):
    image = make_volume(tmp_path, size="64M", unit="64K")
    coordinator = nodes.start(image, "n1")
    member = nodes.start(image, "n2")
    data = os.urandom(M)
    fd = os.open(member.path("disk"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        csvfs("fault", image, "--node", "n2", "storage-down")
        os.fdatasync(fd)  # fails in the lane first: no error reaches the caller
    finally:
        os.close(fd)
    state = next(n for n in status(image)["nodes"] if n["name"] == "n2")
    assert state["io_mode"] == "redirected", state
    assert coordinator.path("disk").read_bytes() == data
    member.unmount()
    counts = lane_counts(member)
    assert counts["failed"] >= 1 and counts["syncs"] == 0, counts
