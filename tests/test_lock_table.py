"""The coordinator's lock table (coordinator/locks.py), without I/O."""

from __future__ import annotations

import errno

import pytest
import trio

from coordinator.arguments import check_arguments
from coordinator.commit import Request
from coordinator.locks import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX, Lock, Locks, LockTable
from csvfs.cluster.errors import MetaError

A = ("n1", 10, "posix")
B = ("n2", 10, "posix")  # the same owner id on another node: another owner
A2 = ("n1", 11, "posix")
FA = ("n1", 1, "flock")
FB = ("n2", 1, "flock")


def ranges(table: LockTable, ino: int, owner) -> list[tuple[int, int, int]]:
    return [(lock.type, lock.start, lock.end) for lock in table.by_ino.get(ino, ())
            if lock.owner == owner]


def test_split_by_unlock_in_the_middle():
    table = LockTable()
    table.set(1, A, F_WRLCK, 0, 99, 5)
    assert table.set(1, A, F_UNLCK, 40, 59, 0) is True
    assert ranges(table, 1, A) == [(F_WRLCK, 0, 39), (F_WRLCK, 60, 99)]
    assert table.conflict(1, B, F_WRLCK, 40, 59) is None
    assert table.conflict(1, B, F_RDLCK, 39, 39) is not None


def test_adjacent_and_overlapping_locks_of_one_type_merge():
    table = LockTable()
    table.set(1, A, F_RDLCK, 0, 9, 5)
    table.set(1, A, F_RDLCK, 10, 19, 5)
    table.set(1, A, F_RDLCK, 15, 30, 5)
    assert ranges(table, 1, A) == [(F_RDLCK, 0, 30)]
    table.set(1, A, F_WRLCK, 31, OFFSET_MAX, 5)  # another type: not merged
    assert ranges(table, 1, A) == [(F_RDLCK, 0, 30), (F_WRLCK, 31, OFFSET_MAX)]


def test_conversion_replaces_the_owners_range():
    table = LockTable()
    table.set(1, A, F_RDLCK, 0, 99, 5)
    assert table.set(1, A, F_WRLCK, 10, 19, 5) is False  # an upgrade gives nothing up
    assert ranges(table, 1, A) == [(F_RDLCK, 0, 9), (F_WRLCK, 10, 19), (F_RDLCK, 20, 99)]
    assert table.set(1, A, F_RDLCK, 10, 19, 5) is True  # a downgrade does
    assert ranges(table, 1, A) == [(F_RDLCK, 0, 99)]


def test_conflicts_only_between_other_owners_and_one_exclusive():
    table = LockTable()
    table.set(1, A, F_RDLCK, 0, 9, 5)
    assert table.conflict(1, A, F_WRLCK, 0, 9) is None  # its own
    assert table.conflict(1, B, F_RDLCK, 0, 9) is None  # shared + shared
    assert table.conflict(1, B, F_WRLCK, 9, 20) == Lock(A, F_RDLCK, 0, 9, 5)
    assert table.conflict(1, A2, F_WRLCK, 5, 5) is not None  # another owner on one node
    assert table.conflict(1, B, F_WRLCK, 10, 20) is None  # no overlap
    assert table.conflict(2, B, F_WRLCK, 0, 9) is None  # another file


def test_flock_and_posix_never_conflict():
    table = LockTable()
    table.set(1, FA, F_WRLCK, 0, OFFSET_MAX, 0)
    assert table.conflict(1, B, F_WRLCK, 0, 10) is None
    assert table.conflict(1, FB, F_RDLCK, 0, OFFSET_MAX) is not None


def test_getlk_answers_the_first_conflicting_lock():
    table = LockTable()
    table.set(1, A, F_RDLCK, 100, 199, 42)
    blocker = table.conflict(1, B, F_WRLCK, 0, OFFSET_MAX)
    assert (blocker.type, blocker.start, blocker.end, blocker.pid) == (F_RDLCK, 100, 199, 42)


def test_drop_node_and_registration_records():
    table = LockTable()
    table.set(1, A, F_WRLCK, 0, 9, 5)
    table.set(2, A2, F_RDLCK, 5, OFFSET_MAX, 6)
    table.set(1, B, F_RDLCK, 20, 29, 7)
    assert sorted(table.of_node("n1")) == [[1, 10, "posix", F_WRLCK, 0, 9, 5],
                                          [2, 11, "posix", F_RDLCK, 5, OFFSET_MAX, 6]]
    assert table.drop_node("n1") == {1, 2}
    assert table.of_node("n1") == []
    assert table.count() == 1
    assert table.drop_owner(1, B) is True
    assert table.by_ino == {}


class FakeSession:
    in_process = False

    def __init__(self, name):
        self.name = name
        self.told: list[int] = []

    def locks_changed(self, ino):
        self.told.append(ino)


class FakeSessions:
    def __init__(self, *names):
        self.by_name = {name: FakeSession(name) for name in names}

    def __contains__(self, name):
        return name in self.by_name


async def setlk(locks, node, ino, owner, type, start=0, end=OFFSET_MAX, wait=False,
                kind="posix"):
    await locks.op_setlk(Request(node), ino=ino, owner=owner, kind=kind, type=type,
                         start=start, end=end, pid=1, wait=wait)


async def test_waiters_are_told_when_locks_are_released():
    sessions = FakeSessions("n1", "n2")
    locks = Locks(sessions)
    await setlk(locks, "n1", 7, 1, F_WRLCK)
    with pytest.raises(MetaError) as refused:
        await setlk(locks, "n2", 7, 1, F_WRLCK, wait=True)
    assert refused.value.errno == errno.EAGAIN
    await locks.op_unlock(Request("n1"), ino=7, owners=[[1, "posix"]])
    assert sessions.by_name["n2"].told == [7]
    await setlk(locks, "n2", 7, 1, F_WRLCK)


async def test_a_refused_flock_conversion_lets_the_old_lock_go():
    locks = Locks(FakeSessions("n1", "n2"))
    await setlk(locks, "n1", 7, 1, F_RDLCK, kind="flock")
    await setlk(locks, "n2", 7, 1, F_RDLCK, kind="flock")
    with pytest.raises(MetaError):
        await setlk(locks, "n1", 7, 1, F_WRLCK, kind="flock")
    await setlk(locks, "n2", 7, 1, F_WRLCK, kind="flock")  # n1's shared lock is gone


async def test_a_node_gone_releases_its_locks_and_others_reregister_theirs():
    sessions = FakeSessions("n1", "n2")
    locks = Locks(sessions)
    await setlk(locks, "n1", 7, 1, F_WRLCK, 0, 9)
    locks.node_gone("n1")
    await setlk(locks, "n2", 7, 1, F_WRLCK, 0, 99)
    # n1 comes back claiming what it held: n2 has it now, so n1 lost it
    lost = locks.join("n1", [[7, 1, "posix", F_WRLCK, 0, 9, 1], [8, 1, "posix", F_RDLCK, 0, 9, 1]])
    assert lost == [[7, 1, "posix", F_WRLCK, 0, 9, 1]]
    assert locks.table.of_node("n1") == [[8, 1, "posix", F_RDLCK, 0, 9, 1]]


async def test_grace_after_a_takeover_holds_grants_until_members_registered(autojump_clock):
    locks = Locks(FakeSessions("n1", "n2"))
    locks.expect(["n2"], trio.current_time() + 6)
    outcome = []

    async def try_lock():
        try:
            await setlk(locks, "n1", 7, 1, F_WRLCK)
            outcome.append("granted")
        except MetaError as exc:
            outcome.append(errno.errorcode[exc.errno])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(try_lock)
        await trio.sleep(1)
        assert not outcome  # held back
        await locks.op_unlock(Request("n1"), ino=7, owners=[[1, "posix"]])  # never held back
        assert locks.join("n2", [[7, 5, "posix", F_RDLCK, 0, 0, 3]]) == []
    # decided only once n2's lock was back, and well before the grace would have ended
    assert outcome == ["EAGAIN"]
    assert trio.current_time() < 2


async def test_grace_ends_when_a_member_never_comes_back(autojump_clock):
    locks = Locks(FakeSessions("n1"))
    locks.expect(["gone"], trio.current_time() + 6)
    await setlk(locks, "n1", 7, 1, F_WRLCK)
    assert trio.current_time() >= 6


async def test_bad_locks_are_refused():
    locks = Locks(FakeSessions("n1"))
    with pytest.raises(MetaError) as bad:
        await setlk(locks, "n1", 7, 1, F_WRLCK, start=10, end=5)
    assert bad.value.errno == errno.EINVAL
    with pytest.raises(MetaError):
        await setlk(locks, "n1", 7, 1, F_WRLCK, kind="lease")
    with pytest.raises(MetaError):  # the shape, as the service checks every request
        check_arguments("unlock", locks.op_unlock, {"ino": 7, "owners": [["x", "posix"]]})
    with pytest.raises(MetaError):
        await locks.op_unlock(Request("n1"), ino=7, owners=[[1, "lease"]])


async def test_a_registration_skips_bad_records():
    locks = Locks(FakeSessions("n1", "n2"))
    good = [7, 1, "posix", F_WRLCK, 0, 10, 5]
    bad = [["x"], [7, 2, "posix", F_UNLCK, 0, 1, 0], [7, "3", "posix", F_RDLCK, 0, 1, 0],
           [7, 4, "lease", F_RDLCK, 0, 1, 0]]
    assert locks.join("n2", [good, *bad]) == []
    assert locks.table.of_node("n2") == [good]
