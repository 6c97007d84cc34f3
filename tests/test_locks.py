"""Cluster-wide locks on real mounts: flock, POSIX record locks and OFD locks taken
through plain os/fcntl calls on several nodes (coordinator/locks.py, csvfs/locks.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from scripts.nodes import fds_open_on, wait_until
from tests.cluster import LockHolder, status

pytestmark = pytest.mark.timeout(120)

EVERYTHING = 0  # l_len 0: to the end of the file


@pytest.fixture
def two(image, nodes):
    return nodes.start(image, "n1"), nodes.start(image, "n2")


@pytest.fixture
def three(image, nodes):
    return tuple(nodes.start(image, name) for name in ("n1", "n2", "n3"))


def holders(count: int):
    return [LockHolder() for _ in range(count)]


def opened(holder: LockHolder, path, name: str = "f") -> LockHolder:
    assert holder.ask(f"open {name} {path}") == "ok"
    return holder


def answer_within(holder: LockHolder, seconds: float) -> str | None:
    """The answer of a blocking command, or None if it has not come within seconds."""
    if not wait_until(holder.ready, seconds, interval=0.02):
        return None
    return holder.answer()


def test_flock_across_nodes(two):
    n1, n2 = two
    a, b = holders(2)
    with a, b:
        opened(a, n1.path("f")), opened(b, n2.path("f"))
        assert a.ask("flock f ex nb") == "ok"
        assert b.ask("flock f ex nb") == "EAGAIN"
        assert b.ask("flock f sh nb") == "EAGAIN"
        # the flock(1) tool, as the issue tried it
        tool = subprocess.run(["flock", "-n", "-x", str(n2.path("f")), "true"])
        assert tool.returncode == 1
        assert a.ask("flock f sh nb") == "ok"  # converted: shared now
        assert b.ask("flock f sh nb") == "ok"  # shared + shared
        assert b.ask("flock f ex nb") == "EAGAIN"  # exclusive vs shared
        assert a.ask("flock f un") == "ok"
        assert b.ask("flock f ex nb") == "ok"
        assert subprocess.run(["flock", "-n", "-s", str(n1.path("f")), "true"]).returncode == 1
    # both holders are gone: their open files were released, and the locks with them
    assert subprocess.run(["flock", "-n", "-x", str(n1.path("f")), "true"]).returncode == 0


def test_flock_across_three_nodes(three):
    a, b, c = holders(3)
    with a, b, c:
        for holder, node in zip((a, b, c), three, strict=True):
            opened(holder, node.path("f"))
        assert b.ask("flock f ex nb") == "ok"
        assert a.ask("flock f sh nb") == "EAGAIN"
        assert c.ask("flock f ex nb") == "EAGAIN"
        assert b.ask("flock f sh") == "ok"
        assert a.ask("flock f sh nb") == "ok"
        assert c.ask("flock f sh nb") == "ok"
        a.send("flock f ex")  # waits for both others
        assert answer_within(a, 0.5) is None
        assert b.ask("close f") == "ok"
        assert answer_within(a, 0.5) is None
        assert c.ask("flock f un") == "ok"
        assert answer_within(a, 10) == "ok"
        assert c.ask("flock f sh nb") == "EAGAIN"


def test_directory_locks_stay_per_node(two):
    """The kernel sends no lock requests for directories (FUSE's directory operations
    have none), so flock on a directory is local to each node: documented."""
    n1, n2 = two
    os.mkdir(n1.path("dir"))
    a, b = holders(2)
    with a, b:
        assert a.ask(f"open d {n1.path('dir')} ro") == "ok"
        assert b.ask(f"open d {n2.path('dir')} ro") == "ok"
        assert a.ask("flock d ex nb") == "ok"
        assert b.ask("flock d ex nb") == "ok"


def test_flock_and_posix_locks_do_not_conflict(two):
    n1, n2 = two
    a, b = holders(2)
    with a, b:
        opened(a, n1.path("f")), opened(b, n2.path("f"))
        assert a.ask("flock f ex nb") == "ok"
        assert b.ask("lock f w 0 0") == "ok"


@pytest.mark.parametrize("release", ["unlock", "close", "exit", "sigkill"])
@pytest.mark.parametrize("kind", ["flock", "posix"])
def test_blocking_wait_is_granted_when_the_holder_lets_go(two, kind, release):
    n1, n2 = two
    a, b = holders(2)
    take, unlock = (("flock f ex", "flock f un") if kind == "flock"
                    else ("lock f w 0 0 wait", "lock f u 0 0"))
    with a, b:
        opened(a, n1.path("f")), opened(b, n2.path("f"))
        assert a.ask(take) == "ok"
        b.send(take)
        assert answer_within(b, 1.0) is None  # waits
        started = time.monotonic()
        if release == "unlock":
            assert a.ask(unlock) == "ok"
        elif release == "close":
            assert a.ask("close f") == "ok"
        elif release == "exit":
            a.process.stdin.close()  # it reads EOF and exits
            a.process.wait(timeout=10)
        else:
            a.process.kill()
            a.process.wait(timeout=10)
        assert answer_within(b, 10) == "ok"
        # told by the coordinator's push, not found by polling
        assert time.monotonic() - started < 0.4


@pytest.mark.parametrize("take", ["flock f ex", "lock f w 0 0 wait", "ofd f w 0 0 wait"])
def test_a_signal_interrupts_a_blocking_wait_and_the_node_stays_responsive(two, take):
    n1, n2 = two
    a, b = holders(2)
    with a, b:
        opened(a, n1.path("f")), opened(b, n2.path("f"))
        assert a.ask(take.removesuffix(" wait").replace("flock f ex", "flock f ex nb")) == "ok"
        assert b.ask("alarm 1.5") == "ok"
        started = time.monotonic()
        b.send(take)
        # while b waits, its node serves everything else
        n2.path("other").write_bytes(b"x" * 4096)
        assert n2.path("other").read_bytes() == b"x" * 4096
        assert "f" in os.listdir(n2.mountpoint)
        assert time.monotonic() - started < 1.0
        assert answer_within(b, 10) == "EINTR"
        assert 1.4 < time.monotonic() - started < 5
        # b holds nothing, a still holds its lock
        assert b.ask(take.replace(" wait", "").replace("flock f ex", "flock f ex nb")) == "EAGAIN"
        assert a.ask("close f") == "ok"
        assert b.ask(take) == "ok"


def test_a_node_stops_while_a_process_waits_for_a_lock(two):
    n1, n2 = two
    a, b = holders(2)
    with a, b:
        opened(a, n1.path("f")), opened(b, n2.path("f"))
        assert a.ask("flock f ex nb") == "ok"
        b.send("flock f ex")
        assert answer_within(b, 0.5) is None
        n2.process.send_signal(signal.SIGTERM)
        n2.process.wait(timeout=15)  # the waiter does not hold the node up
        assert answer_within(b, 5) == "ENOLCK"


def test_byte_ranges_conversion_and_getlk(two):
    n1, n2 = two
    a, b = holders(2)
    with a, b:
        opened(a, n1.path("f")), opened(b, n2.path("f"))
        assert a.ask("lock f w 0 100") == "ok"
        assert b.ask("lock f w 100 100") == "ok"  # no overlap: both hold theirs
        assert b.ask("lock f r 50 60") == "EAGAIN"  # overlaps a's
        assert b.ask("lock f w 99 1") == "EAGAIN"
        assert a.ask(f"getlk f r 150 {EVERYTHING}") == f"ok w 100 100 {b.pid()}"
        assert b.ask("getlk f r 0 10") == f"ok w 0 100 {a.pid()}"
        assert b.ask("getlk f r 300 10") == "ok unlocked"
        # conversion: a takes shared over part of its range, then b may share it
        assert a.ask("lock f r 0 50") == "ok"
        assert b.ask("lock f r 0 50") == "ok"
        assert b.ask("lock f w 0 10") == "EAGAIN"  # upgrade refused while a shares it
        assert a.ask("lock f u 0 50") == "ok"  # a keeps [50, 100) exclusive
        assert b.ask("lock f w 0 50") == "ok"  # now b's upgrade goes through
        assert b.ask("lock f r 50 1") == "EAGAIN"
        assert a.ask(f"getlk f w 0 {EVERYTHING}") == f"ok w 0 50 {b.pid()}"


def test_three_nodes_byte_ranges(three):
    holder_of = holders(3)
    with holder_of[0], holder_of[1], holder_of[2]:
        for holder, node in zip(holder_of, three, strict=True):
            opened(holder, node.path("f"))
        for index, holder in enumerate(holder_of):
            assert holder.ask(f"lock f w {index * 10} 10") == "ok"
        for index, holder in enumerate(holder_of):
            other = (index + 1) % 3
            assert holder.ask(f"lock f r {other * 10 + 5} 1") == "EAGAIN"
        assert holder_of[0].ask(f"getlk f r 20 {EVERYTHING}") == \
            f"ok w 20 10 {holder_of[2].pid()}"


def test_ofd_locks_conflict_across_nodes_and_go_at_close(two):
    n1, n2 = two
    a, b = holders(2)
    with a, b:
        opened(a, n1.path("f")), opened(b, n2.path("f"))
        assert a.ask("ofd f w 0 10") == "ok"
        assert b.ask("ofd f r 5 1") == "EAGAIN"
        assert b.ask("lock f r 5 1") == "EAGAIN"  # OFD and POSIX locks conflict
        assert b.ask("ofdgetlk f r 0 0").startswith("ok w 0 10 ")
        # another open file description in the same process is another owner
        opened(a, n1.path("f"), "g")
        assert a.ask("ofd g w 0 1") == "EAGAIN"
        assert a.ask("close g") == "ok"
        assert a.ask("close f") == "ok"  # the last descriptor: RELEASE drops the lock
        assert wait_until(lambda: b.ask("ofd f w 0 10") == "ok", 5)


def test_posix_lock_goes_when_the_process_closes_any_descriptor(two):
    n1, n2 = two
    a, b = holders(2)
    with a, b:
        opened(a, n1.path("f")), opened(a, n1.path("f"), "g"), opened(b, n2.path("f"))
        assert a.ask("lock f w 0 0") == "ok"
        # a child closing its inherited copy is another process: the lock stays
        assert a.ask("fork-close f") == "ok"
        assert b.ask("lock f r 0 1") == "EAGAIN"
        assert a.ask("close g") == "ok"  # another descriptor of the same file
        assert b.ask("lock f r 0 1") == "ok"


def test_a_shared_open_file_released_later_leaves_the_owners_new_lock(two):
    """A process locks through a descriptor it shares with a child, closes it (its
    locks go), locks again through another descriptor; the child's last close of the
    first one later must not take the new lock away."""
    n1, n2 = two
    a, b = holders(2)
    with a, b:
        opened(a, n1.path("f")), opened(b, n2.path("f"))
        assert a.ask("lock f w 0 0") == "ok"
        assert a.ask("fork-linger 1.5") == "ok"
        assert a.ask("close f") == "ok"
        assert b.ask("lock f r 0 1") == "ok"
        assert b.ask("lock f u 0 1") == "ok"
        opened(a, n1.path("f"), "g")
        assert a.ask("lock g w 0 0") == "ok"
        time.sleep(2.5)  # the child exited: the first open file is released now
        assert b.ask("lock f r 0 1") == "EAGAIN"


@pytest.mark.parametrize("victim", ["member", "coordinator"])
def test_locks_of_a_dead_node_go_with_it(three, victim):
    n1, n2, n3 = three  # n1 coordinates
    dead = n2 if victim == "member" else n1
    a, c = holders(2)
    with a, c:
        opened(a, dead.path("f")), opened(c, n3.path("f"))
        assert a.ask("flock f ex nb") == "ok"
        assert a.ask("lock f w 0 0") == "ok"
        held = {(lock["path"], lock["node"], lock["kind"], lock["type"], lock["pid"])
                for lock in status(n1.image)["locks"]}
        assert held == {("/f", dead.name, kind, "exclusive", pid)
                        for kind, pid in (("flock", 0), ("posix", a.pid()))}
        c.send("flock f ex")
        assert answer_within(c, 0.5) is None
        dead.kill(signal.SIGKILL)
        assert answer_within(c, 10) == "ok"
        assert c.ask("lock f w 0 0") == "ok"
        assert {lock["node"] for lock in status(n1.image)["locks"]} == {"n3"}


def test_locks_of_an_evicted_member_go_once_its_grant_ran_out(image, nodes):
    """A member that hangs while a file is quiesced is evicted; its locks go only when
    the grant it last renewed has run out, and when it comes back they are lost."""
    nodes.allow_log_errors = True  # the evicted node logs the locks it lost
    lease = 1.5
    n1, n2, n3 = (nodes.start(image, name, "--lease", str(lease)) for name in ("n1", "n2", "n3"))
    n1.path("f").write_bytes(b"x" * (1 << 20))
    a, c = holders(2)
    with a, c:
        opened(a, n2.path("f")), opened(c, n3.path("f"))
        assert a.ask("flock f ex nb") == "ok"
        c.send("flock f ex")
        n2.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            os.truncate(n1.path("f"), 0)  # pauses n2, which does not answer: evicted
            evicted = time.monotonic() - started
            assert answer_within(c, 10) == "ok"
            granted = time.monotonic() - started
        finally:
            n2.process.send_signal(signal.SIGCONT)
        assert granted >= 2.0  # not before the pause timed out and the grant ran out
        assert evicted >= 2.0
        assert wait_until(lambda: "lost a flock lock" in n2.log.read_text(), 15)
        assert {lock["node"] for lock in status(image)["locks"]} == {"n3"}
        assert a.ask("flock f un") == "ok"  # what it no longer holds: nothing to do


def test_a_lock_on_a_member_survives_a_sigkill_of_the_coordinator(three):
    n1, n2, n3 = three  # n1 coordinates
    a, c, d = holders(3)
    with a, c, d:
        opened(a, n2.path("f")), opened(c, n3.path("f")), opened(d, n3.path("f"))
        assert a.ask("flock f ex nb") == "ok"
        assert a.ask("lock f w 10 10") == "ok"
        d.send("lock f w 10 10 wait")  # waits across the failover
        assert answer_within(d, 0.5) is None
        n1.kill(signal.SIGKILL)
        # the first requests after the kill go to the new coordinator, which has
        # n2's locks back from its re-registration, or waits for it
        assert c.ask("flock f ex nb") == "EAGAIN"
        assert c.ask("lock f r 15 1") == "EAGAIN"
        assert c.ask(f"getlk f w 0 {EVERYTHING}") == f"ok w 10 10 {a.pid()}"
        assert c.ask("lock f w 0 10") == "ok"  # what n2 does not hold
        c.send("flock f ex")
        assert answer_within(c, 1.0) is None
        assert answer_within(d, 0) is None
        assert a.ask("flock f un") == "ok"
        assert answer_within(c, 10) == "ok"
        assert answer_within(d, 0) is None
        assert a.ask("close f") == "ok"
        assert answer_within(d, 10) == "ok"


def test_the_coordinators_own_locks_survive_its_stepping_down(image, nodes):
    """The coordinator hangs, another node takes over, and the old one comes back as a
    member: the locks its processes hold must be in the new coordinator's table, and
    until it has re-registered them the new one grants nothing."""
    lease = 1.5
    n1, n2 = (nodes.start(image, name, "--lease", str(lease)) for name in ("n1", "n2"))
    a, b = holders(2)
    with a, b:
        opened(a, n1.path("f")), opened(b, n2.path("f"))
        assert a.ask("lock f w 0 0") == "ok"
        n1.process.send_signal(signal.SIGSTOP)
        try:
            os.mkdir(n2.path("after-the-takeover"))  # waits until n2 coordinates
            assert status(image)["coordinator"]["name"] == "n2"
            b.send("lock f r 0 1")
            assert answer_within(b, 0.5) is None  # held back: n1 has not re-registered
        finally:
            n1.process.send_signal(signal.SIGCONT)
        assert answer_within(b, 10) == "EAGAIN"
        assert wait_until(lambda: "joined coordinator n2" in n1.log.read_text(), 10)
        b.send("lock f w 0 0 wait")
        assert answer_within(b, 0.5) is None
        assert a.ask("close f") == "ok"
        assert answer_within(b, 10) == "ok"


QEMU_LOCK_ERROR = 'Failed to get "write" lock'


def test_qemu_image_locking_across_nodes(tmp_path, two):
    n1, n2 = two
    image = n1.path("disk.qcow2")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "64M"], check=True,
                   capture_output=True)
    # held open read-write, interactive, its stdin kept open
    holder = subprocess.Popen(["qemu-io", str(image)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        holder.stdin.write(b"write -P 0x5a 0 4k\n")
        holder.stdin.flush()
        assert wait_until(lambda: fds_open_on(holder.pid, str(image)), 10)
        time.sleep(0.5)  # and its locks taken
        for node in (n2, n1):  # the other node, and the same one
            second = subprocess.run(["qemu-io", "-c", "write 0 4k", str(node.path("disk.qcow2"))],
                                    capture_output=True, text=True, timeout=60)
            assert second.returncode != 0
            assert QEMU_LOCK_ERROR in second.stderr + second.stdout, second
        # reading with shared permissions is allowed
        reader = subprocess.run(["qemu-io", "-r", "-U", "-c", "read -P 0x5a 0 4k",
                                 str(n2.path("disk.qcow2"))], capture_output=True, text=True,
                                timeout=60)
        assert reader.returncode == 0, reader
    finally:
        holder.stdin.close()  # it reads EOF and exits
        holder.wait(timeout=30)
    after = subprocess.run(["qemu-io", "-c", "write 0 4k", str(n2.path("disk.qcow2"))],
                           capture_output=True, text=True, timeout=60)
    assert after.returncode == 0, after
    assert QEMU_LOCK_ERROR not in after.stderr + after.stdout


def test_no_two_holders_ever_overlap(tmp_path, three):
    """Processes on three nodes take an exclusive lock on one file in turn; while one
    holds it, it creates a marker with O_EXCL and bumps a counter in the file."""
    seconds = 4
    workers = []
    for index, node in enumerate(three):
        for kind in ("flock", "posix"):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "tests.lock_stress", str(node.mountpoint), kind,
                 str(seconds), f"{node.name}-{kind}-{index}"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        results.append(out.split())
    rounds = {kind: sum(int(r[1]) for r in results if r[0] == kind) for kind in ("flock", "posix")}
    assert all(r[2] == "0" for r in results), results  # no overlap seen
    for kind in ("flock", "posix"):
        counter = int(three[0].path(f"counter-{kind}").read_bytes() or b"0")
        assert counter == rounds[kind], (kind, counter, rounds)
        assert rounds[kind] > 20, rounds
