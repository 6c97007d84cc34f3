"""Directory listings lent to nodes, so that a create from a member is one round trip.

Before a create, mkdir, mknod, symlink, link or rename the kernel looks the new name
up, and a member would ask the coordinator that too: two round trips where the
coordinator's own node has one. A node that holds the listing of a directory answers
"no such name" there itself. The sequence, with the node's side in
csvfs/listings.py:

1. A lookup that finds no such name, from a node that asks for the listing
   (`lease`), answers with the directory's names, and the node becomes a holder
   (`lend`) in the same step as the names are read, so no change slips in between.
2. The holder answers a lookup of a name not in its listing with ENOENT itself, while
   its session with this coordinator is valid; a name in it is still asked for (the
   attributes come from here). Its own changes to the directory update its listing
   from their replies.
3. A change to the names of a directory takes its listing back from every other
   holder before the change is answered (`take_back`): an INVALIDATE with "dirs",
   each acknowledged. A holder that does not acknowledge in time is evicted, and the
   change waits until its grant runs out, since it may answer from the listing until
   then.
4. A node drops every listing when its session ends, and a listing whose reply
   crossed an invalidation, or one of the node's own changes, is not taken
   (csvfs/kernel_cache.py, csvfs/listings.py). So holders are this coordinator's
   memory only: a new coordinator starts with none.
"""

from __future__ import annotations

import logging

import trio

from coordinator.quiesce import Sessions

log = logging.getLogger(__name__)

MAX_NAMES = 4096  # a larger directory is not lent: its names would cost more than lookups


class Listings:
    def __init__(self, sessions: Sessions):
        self.sessions = sessions
        self.holders: dict[int, set[str]] = {}  # directory -> nodes holding its listing

    def lend(self, directory: int, node: str, names: dict[bytes, int]) -> list[bytes] | None:
        """The names to lend `node`, who now holds the listing; None if too many."""
        if len(names) > MAX_NAMES:
            return None
        self.holders.setdefault(directory, set()).add(node)
        return list(names)

    async def take_back(self, requester: str, directories) -> None:
        """Before a change to the names of these directories is answered: every holder
        but the requester (who updates its own from the reply) drops its listing."""
        targets = []
        for directory in set(directories):
            holders = self.holders.pop(directory, set())
            if requester in holders:
                self.holders[directory] = {requester}
            targets += [(node, {"inos": [], "entries": [], "dirs": [directory]})
                        for node in holders if node != requester]
        if not targets:
            return
        await self.sessions.invalidate(targets)
        for node, _stale in targets:  # evicted, it may answer from the listing until...
            until = self.sessions.lingering.get(node)
            if until is not None and until > trio.current_time():
                log.info("waiting %.2f s for %s's grant to run out before a directory "
                         "change", until - trio.current_time(), node)
                await trio.sleep_until(until)
