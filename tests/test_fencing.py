"""A coordinator that stalls past its lease is replaced, and then never commits again."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cluster import csvfs

pytestmark = pytest.mark.timeout(60)
LEASE = "1"


def _send(holder, command):
    holder.stdin.write(command + "\n")
    holder.stdin.flush()


def _ask(holder, command):
    _send(holder, command)
    return holder.stdout.readline().strip()


def _wait_for_errno(action, expected, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            action()
        except OSError as exc:
            if exc.errno == expected:
                return
            raise
        assert time.monotonic() < deadline, f"still no errno {expected} after {timeout}s"
        time.sleep(0.05)


def test_stalled_coordinator_is_fenced_after_a_takeover(image, nodes):
    nodes.allow_log_errors = True  # the stale node logs its fencing as an error
    stale = nodes.start(image, "stale", "--lease", LEASE)
    holder = subprocess.Popen([sys.executable, "-m", "tests.fd_holder", str(stale.path("shared"))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert _ask(holder, "write") == "ok"
        stale.process.send_signal(signal.SIGSTOP)
        time.sleep(1.5)  # the lease lapses while the node is stopped
        fresh = nodes.start(image, "fresh", "--lease", LEASE)
        fresh.path("from-fresh").write_bytes(b"fresh")
        # Queue a write while the node is stopped, so that it is the first thing the
        # node sees when it wakes, before its lease timer. It must not reach the image:
        # the data path revalidates the lapsed lease first, finds it gone and cuts off.
        _send(holder, "poke")
        time.sleep(0.2)
        stale.process.send_signal(signal.SIGCONT)
        assert holder.stdout.readline().strip() == "EIO"
        _wait_for_errno(lambda: os.mkdir(stale.path("too-late")), errno.EIO)
    finally:
        stale.process.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait(timeout=10)
        holder.stdin.close()
        holder.stdout.close()

    assert not fresh.path("too-late").exists()
    assert fresh.path("shared").read_bytes() == b"a" * 8192  # not one stale byte landed
    assert fresh.path("from-fresh").read_bytes() == b"fresh"
    stale.stop()
    fresh.unmount()
    assert csvfs("fsck", image, check=False).returncode == 0
    events = [json.loads(line) for line in csvfs("events", image, "--json").stdout.splitlines()]
    takeovers = [event for event in events if event["kind"] == "takeover"]
    assert len(takeovers) == 1 and takeovers[0]["node"] == "fresh"
    assert "took over from stale" in takeovers[0]["msg"]
    elections = [event["msg"] for event in events if event["kind"] == "election"]
    assert elections == ["stale became coordinator, epoch 1",
                         "fresh became coordinator, epoch 2"]


def test_stall_without_a_rival_renews_and_goes_on(image, nodes):
    node = nodes.start(image, "sleepy", "--lease", LEASE)
    node.process.send_signal(signal.SIGSTOP)
    time.sleep(1.5)
    node.process.send_signal(signal.SIGCONT)
    os.mkdir(node.path("after-the-stall"))  # nobody took the lease: renew and commit
    assert node.path("after-the-stall").is_dir()
