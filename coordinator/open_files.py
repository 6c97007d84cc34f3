"""Open files: open and release, the sessions of nodes that come and go with
them, and the reclaim of files that no name and no node holds any more.

A member registers the files it has open when it joins (or rejoins after a
failover or an eviction); that replaces whatever it had registered before,
and its reply carries the current map of each. A node's session that ends
while the node may still be writing (it was cut off, not gone) keeps its
files counted until its grant runs out. A file whose last name went while it
was open (open-unlinked) keeps its space until its last holder lets go.
"""

from __future__ import annotations

import logging

from coordinator.attributes import Attributes
from coordinator.commit import Commits, Request
from coordinator.holders import Holders
from coordinator.model import Inode
from coordinator.quiesce import NodeSession, Quiesce, Sessions
from csvfs.cluster.events import EventLog

log = logging.getLogger(__name__)


class OpenFiles:
    def __init__(self, commits: Commits, holders: Holders, sessions: Sessions,
                 quiesce: Quiesce, attributes: Attributes, events: EventLog):
        self.commits = commits
        self.holders = holders
        self.sessions = sessions
        self.quiesce = quiesce
        self.attributes = attributes
        self.events = events

    def reply(self, inode: Inode) -> dict:
        """What an open or a create returns: the map and the attributes."""
        return dict(self.commits.map_of(inode), attrs=self.attributes.of(inode))

    async def op_open(self, request: Request, ino: int) -> dict:
        # A quiesce of ino counts this node among the holders it pauses, or is over
        # before the map in this reply is taken.
        await self.quiesce.lock_outside([ino])
        try:
            await self.commits.durable()
            inode = self.commits.inode(ino)
            self.holders.opened(request.session, ino)
            return self.reply(inode)
        finally:
            self.commits.lock.release()

    async def op_release(self, request: Request, ino: int) -> None:
        if self.holders.released(request.session, ino):
            await self.reclaim_if_unused(ino)

    # -- sessions ----------------------------------------------------------------------------

    async def join(self, session: NodeSession, opens: list) -> list:
        """A node (re)joins with the files it has open, as [[ino, handles]...].

        Whatever the node had registered before is replaced. The reply gives the
        current map of each of those files, or None for one that no longer exists.
        It waits for any quiesce of those files to finish, so its maps are the new ones.
        """
        await self.quiesce.lock_outside(ino for ino, _ in opens)
        try:
            await self.commits.durable()
            maps, dropped = self._register(session, opens)
        finally:
            self.commits.lock.release()
        log.debug("%s registered %d open files", session.name, len(opens))
        for ino in dropped:  # closed while the node was cut off: its release got lost
            await self.reclaim_if_unused(ino)
        return maps

    def _register(self, session: NodeSession, opens: list) -> tuple[list, set[int]]:
        name = session.name
        self.sessions.joined(session)
        dropped = set(self.holders.drop_node(name))
        maps = []
        for ino, handles in opens:
            inode = self.commits.state.inodes.get(ino)
            if inode is None or not inode.is_reg or handles <= 0:
                maps.append([ino, None])
                continue
            self.holders.set(name, ino, handles)
            dropped.discard(ino)
            maps.append([ino, self.commits.map_of(inode)])
        return maps, dropped

    async def leave(self, name: str, writing_until: float | None = None) -> None:
        """A node's session ended. If it may still be doing I/O until `writing_until`
        (it was cut off rather than gone), its open files count until then."""
        if not await self.sessions.ended(name, writing_until):
            return  # it came back and registered afresh
        log.debug("%s left; forgetting its open files", name)
        for ino in self.holders.drop_node(name):
            await self.reclaim_if_unused(ino)

    # -- reclaiming -------------------------------------------------------------------------

    async def reclaim_if_unused(self, ino: int) -> bool:
        """Free an inode with no name once no node has it open; True if it did."""
        inode = self.commits.state.inodes.get(ino)
        if inode is None or inode.nlink != 0 or self.holders.is_open(ino):
            return False
        await self.commits.commit({"op": "reclaim", "ino": ino})
        return True

    async def reclaim_orphans(self) -> None:
        """Free inodes with no name that no node has open: a crash left them behind."""
        for ino in self.commits.state.orphans():
            if await self.reclaim_if_unused(ino):
                self.events.emit("reclaim", f"reclaimed orphaned inode {ino} left by a crash")
