"""The last close of a file (FUSE release) on a member while its coordinator is stopped.

The kernel sends RELEASE in the background: the closing process does not wait for
it, and the mount can go away while the node is still asking the coordinator.
The coordinator's open-file table must come out right whatever happens meanwhile.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from scripts.nodes import force_unmount, is_mounted
from tests.cluster import FdHolder, status

pytestmark = pytest.mark.timeout(90)


def wait_for_log(node, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.log.read_text():
        assert time.monotonic() < deadline, f"{node.name} never logged {text!r}"
        time.sleep(0.05)


def close_and_wait_until_read(holder: FdHolder, dir_fd: int) -> None:
    """Kill the holder, so that its file is closed, and return once the node has read
    the RELEASE; closes dir_fd. The holder's exit queues the RELEASE before wait()
    returns; a READDIR on dir_fd, a directory of the mount opened earlier (the node
    answers it alone), is queued behind it, and the kernel hands requests over in
    order."""
    try:
        holder.process.kill()
        holder.process.wait(timeout=10)
        os.listdir(dir_fd)
    finally:
        os.close(dir_fd)


def test_a_release_still_waiting_when_its_mount_goes_away_is_not_an_error(image, nodes):
    coordinator = nodes.start(image, "n1")
    member = nodes.start(image, "n2")
    coordinator.path("f").write_bytes(b"")
    with FdHolder(coordinator.path("f")) as kept, FdHolder(member.path("f")) as closing:
        # Both have it open. No writes before the stop: the flush of a file written to
        # on this node would wait for the coordinator.
        assert kept.ask("ping") == "ok" and closing.ask("ping") == "ok"
        [entry] = status(image)["open_files"]
        assert entry["nodes"] == {"n1": 1, "n2": 1}
        dir_fd = os.open(member.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        coordinator.process.send_signal(signal.SIGSTOP)
        try:
            # The member's release handler now waits for the stopped coordinator.
            close_and_wait_until_read(closing, dir_fd)
            # Nothing holds the mount any more: the kernel tears the connection down
            # at once, ending the RELEASE the member is still working on.
            force_unmount(member.mountpoint)
            assert not is_mounted(member.mountpoint)
        finally:
            coordinator.process.send_signal(signal.SIGCONT)
        # The coordinator answers the release; the member's reply finds no request in
        # the kernel, then the member, whose mount is gone, leaves.
        assert member.process.wait(timeout=20) == 0
        assert member.log_problems() == []
        assert status(image)["open_files"] == [dict(entry, nodes={"n1": 1})]
        assert kept.ask("poke") == "ok"


def test_a_release_that_waits_out_a_takeover_is_counted_once(image, nodes):
    hung = nodes.start(image, "n1", "--lease", "1")
    member = nodes.start(image, "n2", "--lease", "1")
    member.path("f").write_bytes(b"")
    with FdHolder(member.path("f")) as closing, FdHolder(member.path("f")) as staying:
        assert closing.ask("ping") == "ok" and staying.ask("ping") == "ok"
        [entry] = status(image)["open_files"]
        assert entry["nodes"] == {"n2": 2}
        dir_fd = os.open(member.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        hung.process.send_signal(signal.SIGSTOP)
        try:
            close_and_wait_until_read(closing, dir_fd)
            # The member's release waits until the member takes over (the stopped
            # coordinator's lease lapses), registers what it has open, and retries.
            wait_for_log(member, "coordinator of")
        finally:
            hung.process.send_signal(signal.SIGCONT)
        wait_for_log(hung, "joined coordinator n2")
        report = status(image)
        assert report["coordinator"]["name"] == "n2"
        # One handle is still open on n2: counted once, not closed twice.
        assert report["open_files"] == [dict(entry, nodes={"n2": 1})]
        assert staying.ask("poke") == "ok"
    deadline = time.monotonic() + 10
    while status(image)["open_files"]:  # the last close takes the entry away
        assert time.monotonic() < deadline, status(image)
        time.sleep(0.05)
