"""The quiesce protocol, coordinator side (csvfs/quiesce.py is the node side).

It protects the hard rule: no node ever writes to an allocation unit that the
coordinator has freed or given to another file.

A change that frees space of a file (a shrinking truncate, a punched hole, a
small file's conversion from 4 KiB blocks to units) runs as a quiesce of that
one inode; every other file goes on meanwhile. Blocks of small files follow
the same rule as units: none is freed before every holder is paused, and a
holder resumes only with the new map, so nobody writes through the old one.

1. Pause. Under the metadata lock, at a moment when no other quiesce of the
   inode runs, the coordinator marks the inode as quiescing (opens and
   registrations of it now wait until it is over), notes the nodes that hold
   it, and frees the lock. It pushes PAUSE to each holder, with a token.
2. Drain and ack. Each holder closes the inode's I/O gate and acknowledges the
   token (ACK) once no I/O of its own is in flight on the inode.
   A holder that has not acknowledged within PAUSE_TIMEOUT is evicted: its
   session is cut, and the coordinator waits until the grant the node last
   renewed has run out (its data path stops well inside it); nodes cut off
   earlier that may still be writing (lingering) are waited out the same way.
3. Commit. Under the metadata lock the change is appended to the journal,
   and the coordinator waits until the record is durable. Only now are the
   units free.
4. Map and resume. Each paused holder gets the new map in one MAP push with
   `resume` set, and acknowledges once the map is in place and its gate open.
   The node that asked gets its reply after that. A quiesce that changed
   nothing sends RESUME instead.
5. Rejoin. An evicted node does no I/O at all until it has registered again:
   the registration waits for any quiesce of its files, and its reply carries
   their current maps and lifts every pause. A file removed meanwhile is gone
   for good on that node (ESTALE).

The same acknowledged push, with the same eviction on timeout, carries new
maps after changes that free nothing (an extend: MAP without a pause first),
and INVALIDATE, which makes a node's kernel drop the attributes and names it
caches of directories, or of a file it has open.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

import trio

from coordinator.commit import Commits, Request
from coordinator.holders import Holders
from csvfs.cluster.events import EventLog

log = logging.getLogger(__name__)

PAUSE_TIMEOUT = 2.0  # a node that has not paused by then is evicted


class NodeSession(Protocol):
    """What the coordinator needs from a node that has files open: a RemoteSession
    (coordinator/endpoint.py) for a member, the node's own FileGates in process."""

    name: str
    # The coordinator's own node: what it is asked is done in this process, so it is
    # waited for however long it takes, and never evicted (nothing would rejoin).
    in_process: bool

    async def pause(self, ino: int) -> None:
        """Stop new I/O on ino and return once in-flight I/O has drained."""

    async def take_map(self, ino: int, reply: dict, resume: bool, forget: bool,
                       wait: bool) -> None:
        """Replace the node's map of ino (Commits.map_of), then lift its pause on ino if
        `resume`, and make its kernel drop the attributes it caches of ino if `forget`.
        With `wait`, return once the node has done all that."""

    def resume(self, ino: int) -> None:
        """Let I/O on ino go on."""

    async def invalidate(self, stale: dict, wait: bool) -> None:
        """Make the node's kernel forget what it caches: the attributes of
        stale["inos"] and the names stale["entries"] ([parent, name] pairs). With
        `wait`, return once it has."""

    async def hold(self) -> list:
        """Hold new I/O on every file and return once none is in flight (the snapshot
        point, coordinator/snapshots.py), with the stripes of tracked files the node
        wrote since its last report: [[ino, [[file unit, stripes mask]...]]...]."""

    def snapshot_set(self, version: int) -> None:
        """End the hold; maps older than `version` now ask first before every write."""

    async def freeze_writers(self, freeze_id: int, inos: list[int],
                             timeout: float) -> dict[int, str]:
        """Freeze the node's writers of these inodes: {ino: "frozen" | "failed: why"} for
        each that has a writer there."""

    def thaw_writers(self, freeze_id: int) -> None:
        """Let the writers that freeze held go on."""

    def locks_changed(self, ino: int) -> None:
        """Locks on ino were released: the node's waiters for them should try again
        (coordinator/locks.py)."""

    def evict(self, reason: str) -> float | None:
        """Cut the session off. Returns the trio time until which the node may still be
        doing I/O on what it was last granted, or None if it surely stopped already."""


class Sessions:
    """The nodes in session with the coordinator, and every push that waits for an
    acknowledgement, with eviction of a node that does not give one in time."""

    def __init__(self, holders: Holders, events: EventLog):
        self.holders = holders
        self.events = events
        self.by_name: dict[str, NodeSession] = {}
        # Nodes whose session ended while they may still be doing I/O: name -> the trio
        # time their last grant runs out. Their open files count until then.
        self.lingering: dict[str, float] = {}
        self.pause_timeout = PAUSE_TIMEOUT

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def joined(self, session: NodeSession) -> None:
        """A node (re)registered: it is in session, and no longer lingering."""
        self.by_name[session.name] = session
        self.lingering.pop(session.name, None)

    async def ended(self, name: str, writing_until: float | None = None) -> bool:
        """A node's session ended. If it may still be doing I/O until `writing_until`
        (it was cut off rather than gone), it lingers until then. True if it is still
        gone afterwards, False if it came back and registered afresh meanwhile."""
        self.by_name.pop(name, None)
        if writing_until is not None and writing_until > trio.current_time():
            self.lingering[name] = writing_until
            await trio.sleep_until(writing_until)
            if self.lingering.get(name) != writing_until:
                return False
        self.lingering.pop(name, None)
        return name not in self.by_name

    def holding(self, ino: int) -> list[str]:
        """The nodes in session that have ino open."""
        return [name for name in self.holders.of(ino) if name in self.by_name]

    def evict(self, name: str, reason: str) -> float | None:
        """Cut a node off; returns until when it may still do I/O (see NodeSession)."""
        session = self.by_name.get(name)
        if session is None:
            return None
        if session.in_process:  # cut off from itself, it could never rejoin
            log.error("not evicting this node's own session (%s): %s", name, reason)
            return None
        del self.by_name[name]
        log.warning("evicting %s: %s", name, reason)
        self.events.emit("evict", f"evicted {name}: {reason}", level="warning")
        until = session.evict(reason)
        if until is not None:
            self.lingering[name] = max(until, self.lingering.get(name, until))
        return until

    async def acknowledged(self, name: str, what: str,
                           ask: Callable[[NodeSession], Awaitable[None]]) -> bool:
        """`await ask(session)`: a push the node says it has carried out (a pause, a
        map, an invalidation). A node that does not answer in time is evicted; False
        then."""
        session = self.by_name.get(name)
        if session is None:
            return False
        with trio.move_on_after(math.inf if session.in_process else self.pause_timeout):
            try:
                await ask(session)
                log.debug("%s acknowledged %s", name, what)
                return True
            except Exception as exc:  # its connection broke: it is going anyway
                log.info("%s did not acknowledge %s: %s", name, what, exc)
        self.evict(name, f"did not acknowledge {what} within {self.pause_timeout:g} s")
        return False

    async def hand_out_map(self, ino: int, reply: dict, request: Request, names: list[str],
                           resume: bool = False) -> None:
        """Send a durable map (taken when its record was appended) to these nodes, and
        wait until they have it. Every one but the requester also drops the attributes
        its kernel caches of ino; with `resume`, each lifts its pause on ino as well.
        One acknowledged push per node: for a holder that is the whole cost of a change
        to a file it has open. A node drops a map if a newer one got there first."""
        requester = request.session
        names = [name for name in names if name in self.by_name]
        log.debug("inode %d: map version %d to %s%s", ino, reply["version"], names or "nobody",
                  " with resume" if resume else "")
        if requester in names:  # it has nothing to forget, and waits for our reply anyway
            await self.by_name[requester].take_map(ino, reply, resume, forget=False,
                                                   wait=False)
        others = [name for name in names if name != requester]
        if others:  # none for a file open on one node only, like a VM's disk
            async with trio.open_nursery() as nursery:
                for name in others:
                    nursery.start_soon(self.acknowledged, name, f"map of inode {ino}",
                                       partial(_take_map_now, ino, reply, resume))
        if not self._untold_holder(ino, requester, names):
            request.touched.discard(ino)  # every holder has dropped what it cached

    def _untold_holder(self, ino: int, requester: str, told: list[str]) -> bool:
        return any(name != requester and name not in told for name in self.holding(ino))

    async def tell_holders(self, request: Request) -> None:
        """Nodes that have a file open let their kernel cache its attributes: make every
        holder of a file the request changed, but the requester, drop them, and wait
        until they have, so that the change shows there the moment the request
        returns. A file open on one node only (a VM's disk) costs nothing here."""
        await self.invalidate([
            (name, {"inos": [ino], "entries": []})
            for ino in request.touched for name in self.holding(ino)
            if name != request.session])

    async def invalidate(self, targets: list[tuple[str, dict]]) -> None:
        """Push each (node, stale) invalidation and wait until every node has done it."""
        if not targets:
            return
        async with trio.open_nursery() as nursery:
            for name, stale in targets:
                nursery.start_soon(self.acknowledged, name, f"invalidation of {stale}",
                                   partial(_invalidate_now, stale))

    async def forget(self, requester: str, wait: bool, inos=(), entries=()) -> None:
        """Other nodes' kernels cache what there is of directories: their attributes,
        and the names that lead to them (never names of files, nor attributes of
        files). Make them drop what a change made stale. `wait` where the change must
        show at once: a directory renamed, removed, or chmod/chown/utimens'd. Times and
        link counts that other namespace changes move are pushed without waiting."""
        stale = {"inos": list(inos), "entries": [[parent, name] for parent, name in entries]}
        names = [name for name in self.by_name if name != requester]
        if wait:
            await self.invalidate([(name, stale) for name in names])
        else:
            for name in names:
                await self.by_name[name].invalidate(stale, wait=False)

    async def outlast_lingering(self, ino: int) -> None:
        """Nodes cut off while holding ino may still write to it until their grant ends."""
        for name in self.holders.of(ino):
            until = self.lingering.get(name)
            if until is not None and until > trio.current_time():
                log.info("inode %d: waiting %.2f s for %s's grant to run out", ino,
                         until - trio.current_time(), name)
                await trio.sleep_until(until)


class Quiesce:
    """Steps 1 to 4 above, one inode at a time."""

    def __init__(self, commits: Commits, sessions: Sessions):
        self.commits = commits
        self.sessions = sessions
        # Inodes whose I/O is being paused for a change, each with an event set when
        # that is over. Opens and registrations of such an inode wait for it.
        self._quiescing: dict[int, trio.Event] = {}

    async def lock_outside(self, inos) -> None:
        """Take the metadata lock at a moment when none of `inos` is being quiesced."""
        inos = list(inos)
        lock = self.commits.lock
        while True:
            await lock.acquire()
            busy = next((self._quiescing[ino] for ino in inos if ino in self._quiescing), None)
            if busy is None:
                return
            lock.release()
            await busy.wait()

    async def run(self, request: Request, ino: int, change) -> None:
        """A change that may free ino's space: with ino paused at every node that has it
        open, `await change(inode)` under the metadata lock (it appends its record and
        returns (seq, map), seq None for no change), commit, then hand the new map out
        with the resume."""
        async with self._quiesced(ino) as paused:
            async with self.commits.mutation():
                seq, reply = await change(self.commits.regular(ino))
            await self.commits.durable(seq)
            if seq is None:
                return  # _paused resumes them
            names = list(paused)
            paused.clear()  # nothing left for _paused to resume
            log.debug("inode %d: record %d is durable", ino, seq)
            await self.sessions.hand_out_map(ino, reply, request, names, resume=True)

    @contextlib.asynccontextmanager
    async def _quiesced(self, ino: int):
        """Hold I/O on ino paused at every node that has it open. The metadata lock is
        free while the nodes answer (or while an evicted one's grant runs out). Yields
        the nodes that paused, to send the new map to."""
        await self.lock_outside([ino])
        done = self._quiescing[ino] = trio.Event()
        holders = self.sessions.holding(ino)
        self.commits.lock.release()
        log.debug("inode %d: quiesce begins; pausing %s", ino, holders or "nobody")
        try:
            async with self._paused(ino, holders) as paused:
                yield paused
        finally:
            del self._quiescing[ino]
            done.set()
            log.debug("inode %d: quiesce over", ino)

    @contextlib.asynccontextmanager
    async def _paused(self, ino: int, holders: list[str]):
        """Pause I/O on ino at these nodes. A node that does not ack in time is evicted,
        and we wait until whatever it was granted has run out."""
        paused = []
        try:
            async with trio.open_nursery() as nursery:
                for name in holders:
                    nursery.start_soon(self._pause_one, name, ino, paused)
            await self.sessions.outlast_lingering(ino)
            yield paused
        finally:
            for name in paused:
                session = self.sessions.by_name.get(name)
                if session is not None:
                    log.debug("inode %d: resuming %s", ino, name)
                    session.resume(ino)

    async def _pause_one(self, name: str, ino: int, paused: list) -> None:
        if await self.sessions.acknowledged(name, f"pause of inode {ino}",
                                            lambda session: session.pause(ino)):
            paused.append(name)


async def _invalidate_now(stale: dict, session: NodeSession) -> None:
    await session.invalidate(stale, wait=True)


async def _take_map_now(ino: int, reply: dict, resume: bool, session: NodeSession) -> None:
    await session.take_map(ino, reply, resume, forget=True, wait=True)
