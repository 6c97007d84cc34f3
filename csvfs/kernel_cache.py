"""What this node's kernel may cache of the metadata, and what it must drop.

Other nodes change metadata behind this kernel's back, so a reply may be cached only
if nothing made it stale while it was on its way: an invalidation from the
coordinator (`dropped`), or, for a file, this node letting it go (`released`: no
change to it is pushed here any more). Next to the kernel's cache, the node keeps
what it needs itself to answer without a round trip: the attributes of directories
(like the kernel keeps them, dropped by the same invalidations, so that permission
checks on a directory this node just changed need no round trip), and the
directory listings the coordinator lent it (csvfs/listings.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from csvfs.listings import Listings

DIR_ATTR_TIMEOUT = 1.0  # seconds the kernel, and this node, keep a directory's attributes
MAX_RELEASED_NOTED = 4096  # files let go of whose replies in flight are told apart


class KernelCache:
    def __init__(self, session_valid: Callable[[], bool]):
        self.dir_attrs: dict[int, tuple[dict, float]] = {}  # ino -> (attrs, good until)
        self.listings = Listings(session_valid)
        # Invalidations received so far: a reply in flight when one arrived may predate it.
        self._forgets = 0
        # Files this node stopped holding: ino -> the count of releases when it did.
        self._releases = 0
        self._released: dict[int, int] = {}

    def mark(self) -> tuple[int, int]:
        """Taken before a request; `cacheable` tells, with its reply, what it may keep."""
        return self._forgets, self._releases

    def cacheable(self, mark: tuple[int, int], reply) -> bool:
        forgets, releases = mark
        return self._forgets == forgets and not self._released_since(releases, reply)

    def _released_since(self, releases: int, reply) -> bool:
        """Was the inode the reply is about let go of since `releases`? (Directories,
        as in parent_attrs, are never.)"""
        if self._releases == releases or not isinstance(reply, dict):
            return False
        attrs = reply.get("attrs", reply)
        return self._released.get(attrs.get("ino"), 0) > releases

    def dropped(self, stale: dict) -> None:
        """The coordinator says what other nodes changed, or this node let a file go."""
        if not stale.get("released"):  # those count in _released instead
            self._forgets += 1
        for ino in stale["inos"]:
            self.dir_attrs.pop(ino, None)
        self.listings.taken_back(stale.get("dirs", ()))
        if stale.get("all_dirs"):
            self.listings.drop_all()

    def released(self, ino: int) -> None:
        """This node no longer holds ino: replies about it on their way are stale."""
        if len(self._released) >= MAX_RELEASED_NOTED:  # forget them all, to be safe
            self._released.clear()
            self._forgets += 1
        self._releases += 1
        self._released[ino] = self._releases

    def remember_dirs(self, reply, cacheable: bool) -> None:
        """Take the parents' attributes a namespace change returns."""
        for attrs in (reply or {}).get("parent_attrs", ()):
            if cacheable:
                self.remember_dir(attrs)
            else:
                self.dir_attrs.pop(attrs["ino"], None)

    def remember_dir(self, attrs: dict) -> None:
        self.dir_attrs[attrs["ino"]] = (attrs, time.monotonic() + DIR_ATTR_TIMEOUT)

    def dir_attrs_left(self, ino: int) -> tuple[dict, float] | None:
        """A directory's attributes and how long they are good for, if known."""
        cached = self.dir_attrs.get(ino)
        if cached is None:
            return None
        return cached[0], cached[1] - time.monotonic()
