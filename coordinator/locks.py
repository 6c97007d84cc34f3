"""Cluster-wide locks, coordinator side (csvfs/locks.py is the node side).

It protects one invariant: no two nodes' owners ever hold conflicting locks on
one file. flock(2) locks, POSIX record locks (fcntl F_SETLK, lockf) and OFD
locks (F_OFD_SETLK) taken on any node are all granted here, in one table for
the whole volume; the kernels keep none of their own.

An owner is (node, lock owner id, kind). The id is what the node's kernel
names the owner by: for POSIX locks the process's file table, for OFD locks
the open file description (the kernel sends both alike, so they share the
kind "posix" and conflict with each other, as on one machine); for flock the
node uses its file handle, one per open file description. Kind "flock" and
kind "posix" never conflict with each other, as on Linux. Ranges are
inclusive [start, end], with end = OFFSET_MAX for "to the end of the file".
A request of an owner replaces what that owner holds in its range (POSIX
conversion: split, merge, upgrade, downgrade, unlock); only other owners'
locks conflict: any overlap where one of the two is exclusive.

The sequence:

1. SETLK (the op `setlk`) from a node: an unlock always goes through. A lock
   that conflicts with another owner's is refused with EAGAIN; if the node
   says it will wait (F_SETLKW, flock without LOCK_NB) it is remembered as a
   waiter on that inode. A refused flock conversion drops the owner's old
   lock first, as Linux does (so two shared holders that both upgrade do not
   deadlock). Otherwise the lock is granted at once.
2. Whenever locks on an inode are released or downgraded (an unlock, a
   close, a node gone), every waiting node gets a LOCKS_CHANGED {ino} push
   and retries at once. Nodes also retry on their own every half second, so
   a lost push or a failover never strands a waiter.
3. GETLK (F_GETLK, F_OFD_GETLK) answers the first conflicting lock (type,
   range, pid as the holder's node saw it) or nothing.
4. UNLOCK of whole owners on an inode: a node sends it when a process closes
   a file (FLUSH releases that process's POSIX locks on the file) and when
   the last descriptor of an open file description goes (RELEASE drops its
   OFD and flock locks).
5. Sessions. Locks are not journaled: like open files they live in memory,
   and a node registers the locks it holds with its REGISTER (and the
   coordinator's own node in process). A registration replaces what the node
   held before; a registered lock that now conflicts (the node was cut off
   long enough for its locks to go to another node) is refused and reported
   back as lost. When a node's session ends for good (goodbye, eviction once
   its grant ran out, death) its locks are dropped and waiters told; only
   then can another node take them.
6. Failover grace. A new coordinator starts with an empty table. Until every
   node that was alive at the takeover has registered again (or its session
   has been given up, after two lease periods, the bound used for orphans),
   it grants no lock and answers no GETLK: those wait, so that no lock is
   granted over one an old member has not re-registered yet. Unlocks go
   through at once.

There is no deadlock detection (no EDEADLK): two owners that each wait for
the other wait until one is interrupted.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, replace

import trio

from coordinator.arguments import fits
from coordinator.commit import Request
from coordinator.quiesce import Sessions
from csvfs.cluster.errors import MetaError

log = logging.getLogger(__name__)

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2  # as Linux numbers them, and FUSE passes them on
OFFSET_MAX = (1 << 63) - 1
KINDS = ("posix", "flock")
GRACE_POLL = 0.05

Owner = tuple[str, int, str]  # (node, lock owner id, kind)
# What a node registers of one lock: [ino, owner id, kind, type, start, end, pid].
Registered = tuple[int, int, str, int, int, int, int]


@dataclass(frozen=True)
class Lock:
    owner: Owner
    type: int  # F_RDLCK or F_WRLCK
    start: int
    end: int  # inclusive; OFFSET_MAX: to the end of the file
    pid: int

    def overlaps(self, start: int, end: int) -> bool:
        return self.start <= end and start <= self.end

    def record(self) -> list:
        """What a registration carries of it after the inode: [owner id, kind, type,
        start, end, pid]."""
        return [self.owner[1], self.owner[2], self.type, self.start, self.end, self.pid]


class LockTable:
    """Locks by inode. Pure: no I/O, no time; both sides use it (the node keeps its own
    locks in one to register them)."""

    def __init__(self):
        self.by_ino: dict[int, list[Lock]] = {}

    def conflict(self, ino: int, owner: Owner, type: int, start: int, end: int) -> Lock | None:
        """The first lock of another owner of the same kind that a lock of `type` on
        [start, end] would conflict with."""
        for lock in self.by_ino.get(ino, ()):
            if lock.owner == owner or lock.owner[2] != owner[2] or not lock.overlaps(start, end):
                continue
            if type == F_WRLCK or lock.type == F_WRLCK:
                return lock
        return None

    def set(self, ino: int, owner: Owner, type: int, start: int, end: int, pid: int) -> bool:
        """Make owner hold `type` (F_UNLCK: nothing) on [start, end], whatever it held
        there, without looking at other owners. True if it gave anything up there (an
        unlock, or exclusive made shared): others may now get what they wait for."""
        locks = self.by_ino.get(ino, [])
        mine, others = [], []
        for lock in locks:
            (mine if lock.owner == owner else others).append(lock)
        kept, released = [], False
        for lock in mine:
            if not lock.overlaps(start, end):
                kept.append(lock)
                continue
            if lock.start < start:
                kept.append(replace(lock, end=start - 1))
            if lock.end > end:
                kept.append(replace(lock, start=end + 1))
            if type == F_UNLCK or (lock.type == F_WRLCK and type == F_RDLCK):
                released = True
        if type != F_UNLCK:
            new = Lock(owner, type, start, end, pid)
            merged = []
            for lock in kept:  # adjacent or overlapping, same type: one lock
                if lock.type == type and lock.start <= new.end + 1 and new.start <= lock.end + 1:
                    new = Lock(owner, type, min(lock.start, new.start), max(lock.end, new.end),
                               pid)
                else:
                    merged.append(lock)
            kept = [*merged, new]
        kept.sort(key=lambda lock: lock.start)
        if others or kept:
            self.by_ino[ino] = others + kept
        else:
            self.by_ino.pop(ino, None)
        return released

    def drop_owner(self, ino: int, owner: Owner) -> bool:
        """Release everything owner holds on ino; True if it held anything."""
        return self.set(ino, owner, F_UNLCK, 0, OFFSET_MAX, 0)

    def holds(self, ino: int, owner: Owner) -> bool:
        return any(lock.owner == owner for lock in self.by_ino.get(ino, ()))

    def drop_node(self, node: str) -> set[int]:
        """Release every lock of a node; the inodes where it held any."""
        inos = set()
        for ino, locks in list(self.by_ino.items()):
            kept = [lock for lock in locks if lock.owner[0] != node]
            if len(kept) != len(locks):
                inos.add(ino)
                if kept:
                    self.by_ino[ino] = kept
                else:
                    del self.by_ino[ino]
        return inos

    def of_node(self, node: str) -> list[list]:
        """[[ino, owner id, kind, type, start, end, pid]...]: what a node registers."""
        return [[ino, *lock.record()] for ino, locks in self.by_ino.items()
                for lock in locks if lock.owner[0] == node]

    def count(self) -> int:
        return sum(len(locks) for locks in self.by_ino.values())


def check_lock(kind: str, type: int, start: int, end: int) -> None:
    """Bad input is EINVAL before it reaches the table."""
    if kind not in KINDS or type not in (F_RDLCK, F_WRLCK, F_UNLCK) \
            or not 0 <= start <= end <= OFFSET_MAX:
        raise MetaError(errno.EINVAL, f"bad lock: {kind} type {type} [{start}, {end}]")


class Locks:
    """The service's part for locks: the table, the waiters, the failover grace."""

    def __init__(self, sessions: Sessions):
        self.sessions = sessions
        self.table = LockTable()
        self.waiters: dict[int, set[str]] = {}  # ino -> nodes that wait for a change there
        # Failover grace: nodes alive at the takeover that have not registered yet, each
        # with the trio time we stop waiting for it.
        self.awaiting: dict[str, float] = {}

    # -- requests -------------------------------------------------------------------------

    async def op_setlk(self, request: Request, ino: int, owner: int, kind: str, type: int,
                       start: int, end: int, pid: int, wait: bool) -> None:
        check_lock(kind, type, start, end)
        key = (request.session, owner, kind)
        if type != F_UNLCK:
            await self.grace()
            blocker = self.table.conflict(ino, key, type, start, end)
            if blocker is not None:
                if wait:
                    self.waiters.setdefault(ino, set()).add(request.session)
                if kind == "flock" and self.table.drop_owner(ino, key):
                    self._changed(ino)  # a failed flock conversion lets go, as Linux's does
                raise MetaError(errno.EAGAIN, f"inode {ino} is locked by {blocker.owner[0]}")
        if self.table.set(ino, key, type, start, end, pid):
            self._changed(ino)

    async def op_getlk(self, request: Request, ino: int, owner: int, kind: str, type: int,
                       start: int, end: int) -> list | None:
        """The first conflicting lock as [type, start, end, pid], or None."""
        check_lock(kind, type, start, end)
        await self.grace()
        blocker = self.table.conflict(ino, (request.session, owner, kind), type, start, end)
        return None if blocker is None else [blocker.type, blocker.start, blocker.end,
                                             blocker.pid]

    async def op_unlock(self, request: Request, ino: int,
                        owners: list[tuple[int, str]]) -> None:
        """Release whole owners' locks on ino: `owners` is [[owner id, kind]...] (the
        service checked that shape against this signature)."""
        if any(kind not in KINDS for _owner, kind in owners):
            raise MetaError(errno.EINVAL, f"bad lock kinds in {owners!r}")
        changed = False
        for owner, kind in owners:
            changed |= self.table.drop_owner(ino, (request.session, owner, kind))
        if changed:
            self._changed(ino)

    # -- sessions ---------------------------------------------------------------------------

    def join(self, name: str, locks: list) -> list:
        """A node (re)registers the locks it holds, replacing what it held before.
        Returns those refused because another node holds a conflicting lock now."""
        changed = self.table.drop_node(name)
        lost = []
        for record in locks:
            try:
                if not fits(record, Registered) or record[3] == F_UNLCK:
                    raise MetaError(errno.EINVAL)
                ino, owner, kind, type, start, end, pid = record
                check_lock(kind, type, start, end)
            except MetaError:
                log.warning("%s registered a bad lock %r", name, record)
                continue
            if self.table.conflict(ino, (name, owner, kind), type, start, end) is not None:
                lost.append(record)
                continue
            self.table.set(ino, (name, owner, kind), type, start, end, pid)
            changed.discard(ino)
        if lost:
            log.warning("%s lost %d locks to other nodes while it was cut off", name, len(lost))
        if self.awaiting.pop(name, None) is not None:
            log.info("%s re-registered %d locks", name, len(locks))
        for ino in changed:
            self._changed(ino)
        return lost

    def node_gone(self, name: str) -> None:
        """A node's session ended for good: its locks go, and waiters hear of it."""
        self.awaiting.pop(name, None)
        for waiting in self.waiters.values():
            waiting.discard(name)
        inos = self.table.drop_node(name)
        if inos:
            log.info("released the locks of %s on %d files", name, len(inos))
        for ino in inos:
            self._changed(ino)

    def expect(self, names, until: float) -> None:
        """A takeover: grant nothing until these nodes registered again, or until then."""
        for name in names:
            self.awaiting[name] = until

    async def grace(self) -> None:
        """Return once no node alive at the takeover may still hold unregistered locks."""
        while self.awaiting:
            now = trio.current_time()
            for name, until in list(self.awaiting.items()):
                if until <= now:
                    log.warning("%s did not register its locks after the takeover; "
                                "granting locks again", name)
                    del self.awaiting[name]
            if self.awaiting:
                await trio.sleep(GRACE_POLL)

    def _changed(self, ino: int) -> None:
        for name in self.waiters.pop(ino, ()):
            session = self.sessions.by_name.get(name)
            if session is not None:
                session.locks_changed(ino)

    def table_of(self) -> dict[int, list]:
        """What `csvfs status` shows: ino -> [[node, kind, type, start, end, pid]...]."""
        return {ino: [[lock.owner[0], lock.owner[2], lock.type, lock.start, lock.end,
                       lock.pid] for lock in locks]
                for ino, locks in self.table.by_ino.items()}
