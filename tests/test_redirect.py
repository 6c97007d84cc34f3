"""Redirected I/O on real mounts: a node whose path to the image fails goes on
through the coordinator with no error, and comes back to Direct when it heals."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import signal
import subprocess
import threading
import time

import pytest

from csvfs.redirect import (
    DIRECT,
    PATH_LOST,
    REDIRECT_OFF,
    REDIRECT_ON,
    REDIRECTED,
    STORAGE_DOWN,
    STORAGE_UP,
    USER_REQUEST,
    StoragePath,
)
from scripts.nodes import events_json as events
from tests.cluster import CSVFS, csvfs, status

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def io_state(image, name: str) -> dict:
    return next(node for node in status(image)["nodes"] if node["name"] == name)


def wait_for_mode(image, name: str, mode: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        node = io_state(image, name)
        if node["io_mode"] == mode:
            return node
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} is {node['io_mode']}, not {mode}: {node}")
        time.sleep(0.1)


def workload(root, tag: str) -> None:
    """Every kind of data and metadata operation, the same on every node."""
    path = os.path.join(root, f"{tag}.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pattern = bytes(range(256)) * 16
        os.pwrite(fd, pattern * 256, 0)  # 1 MiB: an extend
        os.pwrite(fd, b"\xab" * 5000, MiB - 100)  # across a unit boundary, past EOF
        os.pwrite(fd, b"overwrite", 12345)  # inside allocated units
        os.fsync(fd)
        os.ftruncate(fd, 3 * MiB + 17)  # grows: a hole
        os.pwrite(fd, b"in the hole", 2 * MiB + 5)
        os.posix_fallocate(fd, 4 * MiB, MiB)  # allocates, grows
        os.ftruncate(fd, 4 * MiB + 4096)  # shrinks
        os.fdatasync(fd)
        assert os.pread(fd, 9, 12345) == b"overwrite"
    finally:
        os.close(fd)
    os.rename(path, os.path.join(root, f"{tag}.renamed"))
    os.mkdir(os.path.join(root, f"{tag}.dir"))
    with open(os.path.join(root, f"{tag}.dir", "small"), "wb") as small:
        small.write(b"a small file\n" * 10)
        small.flush()
        os.fsync(small.fileno())


def digest(root, tag: str) -> tuple:
    with open(os.path.join(root, f"{tag}.renamed"), "rb") as image_file:
        big = hashlib.sha256(image_file.read()).hexdigest()
    with open(os.path.join(root, f"{tag}.dir", "small"), "rb") as small:
        return big, os.path.getsize(os.path.join(root, f"{tag}.renamed")), small.read()


# -- the node's state machine, in process ---------------------------------------------------


def test_a_failed_call_redirects_until_a_probe_works(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    try:
        changes = []
        storage = StoragePath(fd)
        storage.on_change = lambda: changes.append((storage.mode, storage.reason))
        assert storage.pread(4, 0) == bytes(4) and storage.mode == DIRECT
        storage.control(STORAGE_DOWN)
        assert storage.mode == DIRECT  # a fault shows at the next call, as a real one does
        with pytest.raises(OSError) as failure:
            storage.pwrite(b"x", 0)
        assert failure.value.errno == errno.EIO
        storage.failed("pwrite", failure.value)
        assert storage.mode == REDIRECTED and storage.reason.startswith(PATH_LOST)
        assert not storage.probe()
        storage.probed()  # a stale success while the fault stands changes nothing
        assert storage.mode == REDIRECTED
        storage.control(STORAGE_UP)
        assert storage.probe()
        storage.probed()
        assert storage.mode == DIRECT and changes[-1] == (DIRECT, "storage path works again")
        assert len(changes) == 2
    finally:
        os.close(fd)


def test_a_user_request_outlasts_a_healed_path(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    try:
        storage = StoragePath(fd)
        storage.control(REDIRECT_ON)
        assert storage.mode == REDIRECTED and storage.reason.startswith(USER_REQUEST)
        storage.failed("pread", OSError(errno.EIO, "Input/output error"))
        storage.probed()
        assert storage.mode == REDIRECTED and storage.reason.startswith(USER_REQUEST)
        storage.failed("pread", OSError(errno.EIO, "Input/output error"))
        storage.control(REDIRECT_OFF)  # the path is still lost: redirected, for that reason
        assert storage.mode == REDIRECTED and storage.reason.startswith(PATH_LOST)
        storage.probed()
        assert storage.mode == DIRECT
        with pytest.raises(ValueError):
            storage.control("sideways")
    finally:
        os.close(fd)


# -- real mounts ------------------------------------------------------------------------------


def test_a_member_whose_storage_fails_works_on_redirected_like_direct(image, nodes):
    first, second = [nodes.start(image, name) for name in ("n1", "n2")]
    workload(first.mountpoint, "warmup")  # both nodes have maps of something
    csvfs("fault", image, "--node", "n2", "storage-down")
    assert io_state(image, "n2")["io_mode"] == DIRECT  # until its next I/O fails

    workload(second.mountpoint, "redirected")  # not one error reaches the application
    node = io_state(image, "n2")
    assert node["io_mode"] == REDIRECTED
    assert node["io_reason"].startswith(f"{PATH_LOST}: ") and "injected" in node["io_reason"]
    assert node["io_since_ns"] <= time.time_ns()
    served = node["redirected_io"]
    assert served["writes"] > 0 and served["reads"] > 0 and served["syncs"] > 0, served
    assert served["bytes"] >= MiB
    assert io_state(image, "n1")["redirected_io"] == {}
    workload(first.mountpoint, "direct")

    same = digest(first.mountpoint, "direct")
    assert digest(second.mountpoint, "redirected") == same
    assert digest(first.mountpoint, "redirected") == same  # what n2 wrote, n1 reads
    assert digest(second.mountpoint, "direct") == same  # and n2 reads what n1 wrote

    table = csvfs("status", image).stdout
    assert "redirected" in table and PATH_LOST in table

    csvfs("fault", image, "--node", "n2", "storage-up")
    healed = wait_for_mode(image, "n2", DIRECT)
    assert healed["io_reason"] == "storage path works again"
    workload(second.mountpoint, "healed")
    assert digest(first.mountpoint, "healed") == same

    transitions = [e["msg"] for e in events(image) if e["kind"] == "io_mode"]
    assert [msg.split(":")[0] for msg in transitions] == ["n2 is redirected", "n2 is direct"]


def test_redirect_on_request_and_back(image, nodes):
    first, second = [nodes.start(image, name) for name in ("n1", "n2")]
    result = csvfs("redirect", image, "--node", "n2", "on")
    assert result.stdout.strip() == "n2: redirected (user request (csvfs redirect on))"
    node = io_state(image, "n2")
    assert node["io_mode"] == REDIRECTED and node["io_reason"].startswith(USER_REQUEST)
    workload(second.mountpoint, "asked")
    workload(first.mountpoint, "direct")
    assert digest(first.mountpoint, "asked") == digest(second.mountpoint, "direct")

    csvfs("redirect", image, "--node", "n1", "on")  # the coordinator's own node too
    workload(first.mountpoint, "own")
    assert io_state(image, "n1")["io_mode"] == REDIRECTED
    assert digest(second.mountpoint, "own") == digest(first.mountpoint, "direct")

    for name in ("n1", "n2"):
        csvfs("redirect", image, "--node", name, "off")
        assert io_state(image, name)["io_mode"] == DIRECT


def test_a_redirected_node_that_rejoins_tells_the_new_coordinator(image, nodes):
    first, second = [nodes.start(image, name) for name in ("n1", "n2")]
    csvfs("redirect", image, "--node", "n2", "on")
    first.stop()  # n2 takes over, still redirected, and says so in its own status
    node = wait_for_mode(image, "n2", REDIRECTED)
    assert node["coordinator"]
    third = nodes.start(image, "n3")
    csvfs("redirect", image, "--node", "n3", "on")
    second.stop()  # n3 becomes coordinator; it was redirected on request
    assert wait_for_mode(image, "n3", REDIRECTED)["io_reason"].startswith(USER_REQUEST)
    workload(third.mountpoint, "after")


def test_fault_and_redirect_refuse_bad_requests(image, nodes):
    result = csvfs("fault", image, "--node", "n1", "storage-down", check=False)
    assert result.returncode == 15
    assert result.stderr.strip().splitlines() == [
        f"csvfs: error: {image}: no coordinator (no node has the volume mounted)"]
    nodes.start(image, "n1")
    result = csvfs("fault", image, "--node", "nobody", "storage-down", check=False)
    assert result.returncode == 16
    assert result.stderr.strip().splitlines() == [
        f"csvfs: error: {image}: no node named nobody is in session"]
    result = csvfs("redirect", image, "--node", "n1", "sideways", check=False)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_a_coordinator_whose_path_fails_hands_the_role_to_a_node_whose_path_works(image, nodes):
    first, second = [nodes.start(image, name) for name in ("n1", "n2")]
    workload(second.mountpoint, "before")
    csvfs("fault", image, "--node", "n1", "storage-down")
    workload(first.mountpoint, "during")  # its first failed I/O sends the role away
    deadline = time.monotonic() + 10
    while status(image)["coordinator"]["name"] != "n2":
        assert time.monotonic() < deadline, status(image)
        time.sleep(0.1)
    node = wait_for_mode(image, "n1", REDIRECTED)  # a member now, redirected to n2
    assert node["io_reason"].startswith(PATH_LOST) and not node["coordinator"]
    workload(first.mountpoint, "member")
    assert io_state(image, "n1")["redirected_io"]["writes"] > 0
    same = digest(second.mountpoint, "before")
    for tag in ("during", "member"):
        assert digest(second.mountpoint, tag) == same
    moves = [e["msg"] for e in events(image) if e["kind"] == "move"]
    assert moves == ["coordinator role moves from n1 to n2 (n1's storage path was lost)"]
    csvfs("fault", image, "--node", "n1", "storage-up")
    wait_for_mode(image, "n1", DIRECT)


def test_events_follow_prints_new_events_as_they_come(image, nodes):
    nodes.start(image, "n1")
    follower = subprocess.Popen([*CSVFS, "events", str(image), "--follow", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = read_lines(follower, until=lambda event: event["kind"] == "election")
        assert lines[0]["seq"] == 1  # the whole ring first
        nodes.start(image, "n2")
        csvfs("redirect", image, "--node", "n2", "on")
        seen = read_lines(follower, until=lambda event: event["kind"] == "io_mode")
        assert [e["kind"] for e in seen if e["kind"] in ("join", "io_mode")] == \
            ["join", "io_mode"]
        seqs = [e["seq"] for e in lines + seen]
        assert seqs == list(range(1, len(seqs) + 1))  # each once, in order
    finally:
        follower.send_signal(signal.SIGINT)  # how a user stops it, as with tail -f
        follower.wait(timeout=10)
        while _line_queue(follower).get(timeout=10):
            pass  # the pump saw the end of its output
        err = follower.stderr.read()
        follower.stdout.close()
        follower.stderr.close()
    assert follower.returncode == 0 and err == ""


def read_lines(process, until, timeout: float = 10.0) -> list[dict]:
    """JSON lines from the process's stdout up to the first that `until` accepts."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = _line_queue(process).get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        assert line, "the follower ended"
        lines.append(json.loads(line))
        if until(lines[-1]):
            return lines
    raise AssertionError(f"no such event within {timeout} s: {lines}")


def _line_queue(process) -> queue.Queue:
    """The process's stdout lines, read by a thread of their own ("" at the end)."""
    if not hasattr(process, "lines"):
        process.lines = queue.Queue()

        def pump():
            for line in process.stdout:
                process.lines.put(line)
            process.lines.put("")

        threading.Thread(target=pump, daemon=True).start()
    return process.lines
