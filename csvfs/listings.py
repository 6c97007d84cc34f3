"""The directory listings the coordinator lent this node: it answers "no such name"
there itself, so that the lookup the kernel makes before a create, mkdir or rename
costs no round trip. coordinator/listings.py tells the whole sequence.

A listing is good while this node's session is (`valid`), until the coordinator
takes it back (an INVALIDATE naming the directory) or the session ends; this node's
own changes keep it current. Only absence is answered from it: a name that is there
is still looked up at the coordinator, which has its attributes.

A listing is taken only if none of this node's own changes returned while it was
on its way (`changes`): such a change may have been made after the coordinator
read the names, and its own update may have run before the listing arrived.

A directory whose listing was taken back is not asked for again for a while
(`TAKEN_BACK_PAUSE`): another node is changing it, and lending it back and forth
would cost every change there a round trip more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

NAME_MAX = 255  # a longer name is ENAMETOOLONG, which the coordinator says
TAKEN_BACK_PAUSE = 1.0  # seconds a directory taken back is not asked for again
MAX_TAKEN_BACK = 1024  # directories remembered as taken back


class Listings:
    def __init__(self, valid: Callable[[], bool]):
        self.valid = valid
        self._names: dict[int, set[bytes]] = {}
        self.answered = 0  # lookups answered here, for the log
        self.changes = 0  # this node's own changes to names so far
        self._taken_back: dict[int, float] = {}  # directory -> when (time.monotonic())

    def absent(self, parent: int, name: bytes) -> bool:
        """True if the name is surely not in the directory (a lent listing says so)."""
        names = self._names.get(parent)
        if names is None or name in names or len(name) > NAME_MAX or not self.valid():
            return False
        self.answered += 1
        return True

    def wanted(self, parent: int) -> bool:
        """Ask for this directory's listing? Not while another node is changing it."""
        when = self._taken_back.get(parent)
        if when is None:
            return True
        if time.monotonic() - when < TAKEN_BACK_PAUSE:
            return False
        del self._taken_back[parent]
        return True

    def take(self, parent: int, names: list[bytes] | None, changes_before: int) -> None:
        """A listing the coordinator lent (None: the directory is too large to lend),
        asked for when `changes` was `changes_before`."""
        if names is not None and changes_before == self.changes:
            self._names[parent] = set(names)

    def added(self, parent: int, name: bytes) -> None:
        """This node's own change made the name."""
        self.changes += 1
        names = self._names.get(parent)
        if names is not None:
            names.add(name)

    def removed(self, parent: int, name: bytes) -> None:
        self.changes += 1
        names = self._names.get(parent)
        if names is not None:
            names.discard(name)

    def drop(self, directories: Iterable[int]) -> None:
        """This node's listing was not current."""
        for directory in directories:
            self._names.pop(directory, None)

    def taken_back(self, directories: Iterable[int]) -> None:
        """The coordinator took these back: another node changes them."""
        now = time.monotonic()
        for directory in directories:
            self._names.pop(directory, None)
            self._taken_back[directory] = now
        if len(self._taken_back) > MAX_TAKEN_BACK:  # the oldest go first
            for directory in sorted(self._taken_back, key=self._taken_back.get)[
                    :len(self._taken_back) - MAX_TAKEN_BACK]:
                del self._taken_back[directory]

    def drop_all(self) -> None:
        """The session ended: the next coordinator lent nothing."""
        self._names.clear()
