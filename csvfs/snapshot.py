"""The snapshot hold and copy-on-write protocols, node side (coordinator/snapshots.py
is the coordinator's side, and tells the whole sequence).

What a node does:

1. HOLD: stop new data I/O on every file (DataPath.hold). Requests run inline
   in the node's event loop, so once the push is handled none is in flight:
   acknowledge at once, with the stripes of tracked files written since the
   last report (DataPath.stripe_report), which the snapshot record carries.
2. SNAPSHOT_SET(version): the point is set. If it is one (version > 0), the
   record holds this node's report, which it forgets. Every map this node has that is
   older than `version` asks first before any write, in all its granules, and
   so does every older map that arrives later (a reply already on its way);
   maps from the coordinator after the point say themselves which granules
   ask first. The hold ends. A version of 0 ends a hold that set no point.
3. A write that meets an "ask first" granule calls `first_write` instead
   (DataPath.write) and goes ahead, in place, with the map of the reply.
Before the point of an application-consistent backup, FREEZE(id, inos) asks
this node's writers of those files to flush and hold (csvfs/writers.py). It
must not hold up the pushes behind it, so it runs in the background, and the
node answers with a WRITERS_FROZEN request once its writers have; THAW(id)
lets them go on.

4. A node that rejoins a coordinator (after a failover or an eviction) ends
   any hold it was left in, and forgets the last point it heard of: the maps
   of its registration say what to ask, and the new coordinator's versions
   need not reach a point the old one set but did not make durable.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from csvfs.cluster import messages
from csvfs.datapath import DataPath
from csvfs.writers import Writers

log = logging.getLogger(__name__)


class SnapshotHold:
    def __init__(self, datapath: DataPath):
        self.datapath = datapath
        self.writers: Writers | None = None  # the node's writer socket, once it listens
        # Where a member runs a freeze, and how it answers (csvfs/member_role.py).
        self.nursery: trio.Nursery | None = None
        self.report: Callable[[int, dict], Awaitable[None]] | None = None

    def push_handlers(self) -> dict[str, Callable[[dict], Awaitable[None]]]:
        return {messages.HOLD: self._on_hold, messages.SNAPSHOT_SET: self._on_set,
                messages.FREEZE: self._on_freeze, messages.THAW: self._on_thaw}

    async def freeze_writers(self, freeze_id: int, inos: list[int],
                             timeout: float) -> dict[int, str]:
        if self.writers is None:
            return {}
        return await self.writers.freeze(freeze_id, inos, timeout)

    def thaw_writers(self, freeze_id: int) -> None:
        if self.writers is not None:
            self.writers.thaw(freeze_id)

    async def _on_freeze(self, body: dict) -> None:
        if self.nursery is not None:
            self.nursery.start_soon(self._freeze_and_report, body)

    async def _freeze_and_report(self, body: dict) -> None:
        results = await self.freeze_writers(body["id"], body["inos"], body["timeout"])
        if self.report is not None:
            await self.report(body["id"], {str(ino): outcome for ino, outcome in results.items()})

    async def _on_thaw(self, body: dict) -> None:
        self.thaw_writers(body["id"])

    async def hold(self) -> list:
        """Hold; returns the stripes written since the last report."""
        log.debug("snapshot hold")
        self.datapath.hold()
        return self.datapath.stripe_report()

    def snapshot_set(self, version: int) -> None:
        log.debug("snapshot point at version %d; hold over", version)
        if version and self.datapath.holding:
            self.datapath.stripes_reported()
        self.datapath.end_hold(version)

    def rejoined(self) -> None:
        if self.datapath.holding:
            log.info("ending a snapshot hold left by the coordinator before")
        self.datapath.snapshot_version = 0
        self.datapath.end_hold(0)

    async def _on_hold(self, body: dict) -> list:
        return await self.hold()

    async def _on_set(self, body: dict) -> None:
        self.snapshot_set(body["version"])
