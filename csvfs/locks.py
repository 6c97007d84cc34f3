"""Cluster-wide locks, node side (coordinator/locks.py is the coordinator's side
and tells the whole protocol).

The kernel keeps no locks of its own on a mount: it sends every flock,
fcntl/lockf and OFD lock request to the node (through the FUSE shim,
csvfs/fuse_shim.py), and the node asks the coordinator:

1. Lock (setlk, flock): try at the coordinator (SETLK). A lock that is
   refused (EAGAIN) fails at once for a non-blocking try. A blocking one
   (F_SETLKW, F_OFD_SETLKW, flock without LOCK_NB) waits until the
   coordinator pushes LOCKS_CHANGED for that inode (csvfs/inbox.py routes it
   here), or POLL_INTERVAL has passed, whichever comes first, and tries
   again. A signal to the waiting process (the kernel's FUSE_INTERRUPT)
   cancels the wait: the process gets EINTR. The request to the coordinator
   itself is never cut short, so that a lock granted there is always known
   here too. Every request runs as a task of its own: a process waiting for
   a lock stalls nothing else on the node.
2. Unlock, and closes: FLUSH (a process closed a descriptor of the file)
   releases that process's POSIX locks on the file; RELEASE (the last
   descriptor of an open file description went) releases its flock and OFD
   locks, and any POSIX locks taken through it. Either asks the coordinator
   only if this node holds such locks.
3. F_GETLK / F_OFD_GETLK ask the coordinator which lock conflicts, if any.
4. Re-registration: the node keeps the locks it was granted in a LockTable of
   its own, and registers them whenever it (re)joins a coordinator (the
   member's REGISTER, or in process on the coordinator's own node). Locks
   the coordinator refuses then (another node holds them now) are lost, and
   logged.

flock owners are the node's file handles (one per open file description);
POSIX and OFD owners are the kernel's lock owner ids.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

import trio

from coordinator.locks import F_UNLCK, LockTable
from csvfs.cluster import messages
from csvfs.cluster.errors import MetaError

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5  # a waiter tries again this often even without a push

Meta = Callable[..., Awaitable]


class NodeLocks:
    def __init__(self, name: str, meta: Meta):
        """`meta(method, **args)` is a metadata request to the coordinator."""
        self.name = name
        self.meta = meta
        self.table = LockTable()  # the locks this node holds, as the coordinator granted them
        # Open file descriptions (fh) -> the (ino, owner, kind) that took locks through
        # it, and the other way round.
        self._through: dict[int, set[tuple[int, int, str]]] = {}
        self._handles_of: dict[tuple[int, int, str], set[int]] = {}
        self._changes: dict[int, trio.Event] = {}  # ino -> set at its next LOCKS_CHANGED
        self._waiting: Counter[int] = Counter()
        self.closing = False

    # -- what the FUSE handlers ask --------------------------------------------------------

    async def setlk(self, ino: int, fh: int, owner: int, kind: str, type: int, start: int,
                    end: int, pid: int, wait: bool) -> None:
        """Take, change or drop a lock; raises MetaError(EAGAIN) when refused without
        waiting. Cancelled (an interrupt) only while it waits."""
        if kind == "flock":
            owner = fh
        key = (self.name, owner, kind)
        if type == F_UNLCK:
            if not self.table.holds(ino, key):
                return  # nothing to give up: no round trip
            # Forgotten here first: a lock granted meanwhile to an owner with a reused id
            # must not be dropped here once the coordinator answers.
            self.table.set(ino, key, type, start, end, pid)
        self._waiting[ino] += wait
        try:
            while True:
                changed = self._changes.setdefault(ino, trio.Event()) if wait else None
                if await self._try(ino, owner, kind, type, start, end, pid, wait):
                    break
                with trio.move_on_after(POLL_INTERVAL):
                    await changed.wait()
                if self.closing:
                    raise MetaError(errno.ENOLCK, "the node is unmounting")
        finally:
            self._waiting[ino] -= wait
            if self._waiting[ino] <= 0:
                del self._waiting[ino]
                self._changes.pop(ino, None)
        if type != F_UNLCK:
            self.table.set(ino, key, type, start, end, pid)
            self._through.setdefault(fh, set()).add((ino, owner, kind))
            self._handles_of.setdefault((ino, owner, kind), set()).add(fh)

    async def _try(self, ino: int, owner: int, kind: str, type: int, start: int, end: int,
                   pid: int, wait: bool) -> bool:
        """One SETLK; True if granted, False if refused and `wait`."""
        # Shielded: once asked, the answer must be heard, or a granted lock would be
        # held by the coordinator for an owner that believes it failed.
        with trio.CancelScope(shield=True):
            try:
                await self.meta("setlk", ino=ino, owner=owner, kind=kind, type=type,
                                start=start, end=end, pid=pid, wait=wait)
                return True
            except MetaError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
                if kind == "flock":  # a refused conversion gave up the old lock
                    self.table.drop_owner(ino, (self.name, owner, kind))
                if not wait:
                    raise
                return False

    async def getlk(self, ino: int, owner: int, type: int, start: int,
                    end: int) -> list | None:
        """[type, start, end, pid] of the first conflicting lock, or None."""
        return await self.meta("getlk", ino=ino, owner=owner, kind="posix", type=type,
                               start=start, end=end)

    async def flushed(self, ino: int, owner: int) -> None:
        """A process closed a descriptor of ino: its POSIX locks on ino go, whatever
        open file they were taken through (so a later RELEASE of one of those, by
        another process that shared it, no longer speaks for them)."""
        through = (ino, owner, "posix")
        for fh in self._handles_of.pop(through, ()):
            self._through[fh].discard(through)
            if not self._through[fh]:
                del self._through[fh]
        await self._unlock(ino, [(owner, "posix")])

    async def released(self, fh: int) -> None:
        """An open file description went: the locks taken through it go."""
        by_ino: dict[int, list] = {}
        for through in self._through.pop(fh, ()):
            handles = self._handles_of.get(through, set())
            handles.discard(fh)
            if not handles:
                self._handles_of.pop(through, None)
            ino, owner, kind = through
            by_ino.setdefault(ino, []).append((owner, kind))
        for ino, owners in by_ino.items():
            await self._unlock(ino, owners)

    async def _unlock(self, ino: int, owners: list[tuple[int, str]]) -> None:
        held = [[owner, kind] for owner, kind in owners
                if self.table.holds(ino, (self.name, owner, kind))]
        if not held:
            return
        for owner, kind in held:  # first, as in setlk
            self.table.drop_owner(ino, (self.name, owner, kind))
        with trio.CancelScope(shield=True):
            await self.meta("unlock", ino=ino, owners=held)

    def close(self) -> None:
        """The node is unmounting: processes waiting for a lock get ENOLCK."""
        self.closing = True
        for ino in list(self._changes):
            self.changed(ino)

    # -- what the coordinator says -----------------------------------------------------------

    def changed(self, ino: int) -> None:
        """LOCKS_CHANGED: waiters for ino try again now."""
        event = self._changes.pop(ino, None)
        if event is not None:
            event.set()

    def push_handlers(self) -> dict[str, Callable[[dict], Awaitable[None]]]:
        return {messages.LOCKS_CHANGED: self._on_changed}

    async def _on_changed(self, body: dict) -> None:
        self.changed(body["ino"])

    def held(self) -> list[list]:
        """[[ino, owner, kind, type, start, end, pid]...]: what this node registers."""
        return self.table.of_node(self.name)

    def registered(self, lost: list) -> None:
        """The coordinator refused these at a registration: another node has them now."""
        for ino, owner, kind, _type, start, end, _pid in lost:
            log.error("lost a %s lock on inode %d [%d, %d]: another node took it while this "
                      "node was cut off", kind, ino, start, end)
            self.table.set(ino, (self.name, owner, kind), F_UNLCK, start, end, 0)
        # Every waiter tries again: the coordinator's waiters may be another's now.
        for ino in list(self._changes):
            self.changed(ino)
