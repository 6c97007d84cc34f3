"""The open-file table: which nodes have each file open, with how many handles.

Counts change on open, create, release and a node's (re)registration, and
drop with a node's session. The table decides who a change must reach (the
holders of a file get its new maps and pauses) and when a file with no name
left may be reclaimed (once nobody holds it). It also notices handoffs: a
file open on one node, then on two, then only on the second, is a VM's live
migration, and goes to the event ring.
"""

from __future__ import annotations

import logging
from collections import Counter

from coordinator.model import MetadataState
from csvfs.cluster.events import EventLog

log = logging.getLogger(__name__)


class Holders:
    def __init__(self, state: MetadataState, events: EventLog):
        self.state = state
        self.events = events
        self.counts: dict[int, Counter[str]] = {}
        # Files open on one node that a second node opened too: inode -> the first node
        self._shared_from: dict[int, str] = {}

    def of(self, ino: int) -> list[str]:
        """The nodes that have ino open."""
        return list(self.counts.get(ino, ()))

    def is_open(self, ino: int) -> bool:
        return bool(self.counts.get(ino))

    def opened(self, node: str, ino: int) -> None:
        holders = self.counts.setdefault(ino, Counter())
        if len(holders) == 1 and node not in holders:
            self._shared_from[ino] = next(iter(holders))  # a handoff may be starting
        holders[node] += 1

    def set(self, node: str, ino: int, handles: int) -> None:
        """A registering node says how many handles of ino it has."""
        self.counts.setdefault(ino, Counter())[node] = handles

    def released(self, node: str, ino: int) -> bool:
        """One handle fewer; True when nobody has ino open any more."""
        holders = self.counts.get(ino)
        if holders is None or holders[node] <= 0:
            return False
        holders[node] -= 1
        if holders[node] == 0:
            del holders[node]
            self._note_handoff(ino)
        if holders:
            return False
        del self.counts[ino]
        return True

    def drop_node(self, node: str) -> list[int]:
        """Forget every file node has open; returns them."""
        forgotten = []
        for ino in list(self.counts):
            holders = self.counts[ino]
            if holders.pop(node, 0):
                forgotten.append(ino)
            if not holders:
                del self.counts[ino]
        return forgotten

    def table(self) -> dict[int, dict[str, int]]:
        return {ino: dict(holders) for ino, holders in self.counts.items()}

    def _note_handoff(self, ino: int) -> None:
        """A file open on one node, then on two, is now open on one again: if that is
        the other node, the file was handed off (a VM's live migration, say)."""
        holders = self.counts.get(ino)
        if holders is not None and len(holders) > 1:
            return
        source = self._shared_from.pop(ino, None)
        target = next(iter(holders), None) if holders else None
        if source is not None and target is not None and target != source:
            path = self.state.paths([ino]).get(ino, f"inode {ino}")
            self.events.emit("handoff", f"{path} (inode {ino}) handed off from {source} "
                             f"to {target}")
