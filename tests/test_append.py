"""O_APPEND across nodes, on real mounts: every append lands whole at the end of the
file as it is at that moment, whatever node it comes from (coordinator/allocation.py)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys

import pytest

from tests.appender import check, record
from tests.cluster import csvfs

pytestmark = pytest.mark.timeout(120)


def appender(path, tag, count, size=None):
    args = [sys.executable, "-m", "tests.appender", "append", str(path), tag, str(count)]
    if size is not None:
        args.append(str(size))
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True)


def reader(path, seconds):
    return subprocess.Popen([sys.executable, "-m", "tests.appender", "read", str(path),
                             str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process, timeout=90):
    _out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err


def append_from_each(nodes_and_tags, count, size=None):
    """One appender process per (node, tag) on that node's log, all at once; waits for
    every one to finish without an error."""
    workers = [appender(node.path("log"), tag, count, size) for node, tag in nodes_and_tags]
    for worker in workers:
        finish(worker)


def by_tag(records):
    tags = collections.defaultdict(list)
    for tag, number in records:
        tags[tag].append(number)
    return tags


def test_two_nodes_appending_10_byte_lines_keep_all_4000(image, nodes):
    first, second = nodes.start(image, "n1"), nodes.start(image, "n2")
    first.path("log").write_bytes(b"")
    append_from_each([(first, "A"), (second, "B")], 2000, 10)
    data = second.path("log").read_bytes()
    assert len(data) == 4000 * 10
    tags = by_tag(check(data))
    assert tags["A"] == list(range(2000)) and tags["B"] == list(range(2000))
    assert os.stat(first.path("log")).st_size == 4000 * 10


def test_appends_from_three_nodes_with_readers_are_never_torn_or_lost(image, nodes):
    cluster = [nodes.start(image, f"n{index}") for index in (1, 2, 3)]
    cluster[0].path("log").write_bytes(b"")
    readers = [reader(node.path("log"), 4) for node in cluster]
    append_from_each(zip(cluster, "XYZ", strict=True), 700)
    for each in readers:
        finish(each)
    for node in cluster:
        tags = by_tag(check(node.path("log").read_bytes()))
        assert dict(tags) == {tag: list(range(700)) for tag in "XYZ"}


def test_appends_from_two_nodes_take_a_small_file_past_its_first_unit(image, nodes):
    """The file starts in 4 KiB blocks and is converted to units under the appends."""
    first, second = nodes.start(image, "n1"), nodes.start(image, "n2")
    first.path("log").write_bytes(b"")
    append_from_each([(first, "K"), (second, "L")], 700, 1000)
    data = first.path("log").read_bytes()
    assert len(data) == 1400 * 1000 > 1 << 20
    tags = by_tag(check(data))
    assert tags["K"] == list(range(700)) and tags["L"] == list(range(700))


def test_append_goes_to_the_end_another_node_made(image, nodes):
    first, second = nodes.start(image, "n1"), nodes.start(image, "n2")
    fd = os.open(first.path("f"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"one\n")
        with open(second.path("f"), "ab") as other:
            other.write(b"two\n")
        os.write(fd, b"three\n")
        os.truncate(second.path("f"), 2)
        os.write(fd, b"four\n")
    finally:
        os.close(fd)
    assert second.path("f").read_bytes() == b"onfour\n"
    assert first.path("f").read_bytes() == b"onfour\n"


def test_a_large_append_lands_whole(image, nodes):
    first, second = nodes.start(image, "n1"), nodes.start(image, "n2")
    big = os.urandom(3 << 20)
    with open(second.path("f"), "wb") as out:
        out.write(b"head")
    fd = os.open(first.path("f"), os.O_WRONLY | os.O_APPEND)
    try:
        assert os.write(fd, big) == len(big)
    finally:
        os.close(fd)
    assert second.path("f").read_bytes() == b"head" + big


def test_appends_survive_a_coordinator_sigkill_once_each(tmp_path, image, nodes):
    nodes.allow_log_errors = True  # the victim's peers log the broken connections
    victim, second, third = (nodes.start(image, name) for name in ("n1", "n2", "n3"))
    victim.path("log").write_bytes(b"")
    workers = [appender(second.path("log"), "P", 3000, 24),
               appender(third.path("log"), "Q", 3000, 24)]
    try:
        while os.stat(second.path("log")).st_size < 1500 * 24:
            pass
        victim.kill(signal.SIGKILL)
        for worker in workers:
            finish(worker)
    finally:
        for worker in workers:
            worker.kill()
    data = second.path("log").read_bytes()
    tags = by_tag(check(data))
    assert tags["P"] == list(range(3000)) and tags["Q"] == list(range(3000))
    second.unmount()
    third.unmount()
    result = csvfs("fsck", image, check=False)
    assert result.returncode == 0, result.stdout


def test_record_format_catches_a_torn_record():
    good = record("A", 7) + record("B", 8) + record("C", 9, 10) + record("D", 10, 40)
    assert check(good) == [("A", 7), ("B", 8), ("C", 9), ("D", 10)]
    with pytest.raises(ValueError):
        check(good[:-3])
    with pytest.raises(ValueError):
        check(record("A", 7)[:5] + record("B", 8))
    with pytest.raises(ValueError):
        check(record("A", 7, 10)[:4] + record("B", 8, 10))
