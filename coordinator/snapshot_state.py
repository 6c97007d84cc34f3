"""Snapshots in the metadata state: what each one holds, and the copies that keep it.

A snapshot is a frozen copy of the inode table and the namespace, taken by one
"snapshot" record at its point (coordinator/snapshots.py sets the point). From
then on every *granule* of the volume that its frozen maps reference (a unit
of a unit-mapped file, a 4 KiB block of a block-mapped one) is *held* by it:

- Before anything writes to a held granule of a live file, its old contents
  are copied to a fresh granule, and a "preserve" record says so. The snapshot
  then reads that granule from the copy. One copy serves every snapshot that
  held the granule at that moment, since nothing wrote to it in between.
- A live file that frees a held granule (truncate, punch, unlink, a small
  file's conversion) *parks* it: it stays in use, unwritten, until the last
  snapshot that holds it is released. So a held granule is never reused.
- A "release" record ends a snapshot: granules it alone held and that were
  parked become free, and so do copies no other snapshot uses.

Everything here is derived from records and checkpoints, deterministically:
recovery replays the same decisions, so snapshots survive a failover.
Granules are keyed by kind: "u" for units, "b" for blocks.
"""

from __future__ import annotations

from coordinator.allocator import Allocator

UNITS, BLOCKS = "u", "b"
KINDS = (UNITS, BLOCKS)


class Snapshot:
    """One snapshot's frozen state, and the copies made for it since its point."""

    def __init__(self, snap_id: int, t_ns: int, requester: str, inodes: dict,
                 entries: dict[int, dict[bytes, int]], timeout: float = 60.0):
        self.id = snap_id
        self.t_ns = t_ns
        self.requester = requester
        self.timeout = timeout  # seconds its requester may go without renewing it
        self.inodes = inodes  # ino -> Inode, as at the point
        self.entries = entries  # directory ino -> name -> ino, as at the point
        self.copies: dict[str, dict[int, int]] = {UNITS: {}, BLOCKS: {}}  # held -> its copy
        # Preserves in the order they happened, [kind, granule, copy]: a reader that
        # read a live granule checks here afterwards whether it was preserved meanwhile.
        self.preserved: list[list] = []
        # ino -> [[base, changed granules]...] of each file it took, as tracked up to it
        self.tracking: dict[int, list] = {}

    def held(self):
        """(kind, granule) of every live granule the frozen maps reference."""
        for inode in self.inodes.values():
            if inode.is_reg and inode.units:
                kind = BLOCKS if inode.blocks else UNITS
                for granule in inode.units.values():
                    yield kind, granule

    def to_list(self) -> list:
        return [self.id, self.t_ns, self.requester,
                [inode.to_list() for inode in self.inodes.values()],
                [[ino, list(names.items())] for ino, names in self.entries.items()],
                self.preserved, self.timeout, list(self.tracking.items())]

    @classmethod
    def from_list(cls, row: list, inode_from_list) -> Snapshot:
        snap_id, t_ns, requester, inodes, dirs, preserved, timeout, tracking = row
        inodes = {inode.ino: inode for inode in map(inode_from_list, inodes)}
        snapshot = cls(snap_id, t_ns, requester, inodes,
                       {ino: dict(names) for ino, names in dirs}, timeout)
        for kind, granule, copy in preserved:
            snapshot.copies[kind][granule] = copy
        snapshot.preserved = [list(entry) for entry in preserved]
        snapshot.tracking = {ino: list(pair) for ino, pair in tracking}
        return snapshot


class SnapshotSet:
    """Every snapshot in progress, and which granules they hold."""

    def __init__(self, allocator: Allocator):
        self.allocator = allocator
        self.by_id: dict[int, Snapshot] = {}
        # granule -> ids of the snapshots that hold it and have no copy of it yet
        self.waiting: dict[str, dict[int, set[int]]] = {UNITS: {}, BLOCKS: {}}
        # granules a live file freed while held: in use until no snapshot holds them
        self.parked: dict[str, set[int]] = {UNITS: set(), BLOCKS: set()}

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def is_held(self, kind: str, granule: int) -> bool:
        return bool(self.waiting[kind].get(granule))

    def asks(self, inode) -> list[list[int]]:
        """Runs [first file granule, count] of inode's map where a node must ask the
        coordinator before its first write: a snapshot holds the granule, or the file
        is tracked and the granule not yet marked changed."""
        waiting = self.waiting[BLOCKS if inode.blocks else UNITS] if self.by_id else {}
        if not inode.units or not (waiting or inode.tracking):
            return []
        ask: set[int] = set()
        if inode.tracking:  # set operations: a VM disk has thousands of units
            ask = inode.units.keys() - set.intersection(*inode.tracking.values())
        if waiting:
            ask |= {index for index, granule in inode.units.items() if granule in waiting}
        runs: list[list[int]] = []
        for index in sorted(ask):
            if runs and runs[-1][0] + runs[-1][1] == index:
                runs[-1][1] += 1
            else:
                runs.append([index, 1])
        return runs

    def kind_of(self, inode) -> str:
        return BLOCKS if inode.blocks else UNITS

    # -- records ---------------------------------------------------------------------------

    def take(self, snapshot: Snapshot) -> None:
        """A "snapshot" record: from now on it holds every granule its maps reference."""
        self.by_id[snapshot.id] = snapshot
        for kind, granule in snapshot.held():
            self.waiting[kind].setdefault(granule, set()).add(snapshot.id)

    def preserve(self, kind: str, granule: int, copy: int) -> None:
        """A "preserve" record: granule's old contents are now in copy, for every
        snapshot that still waited for one."""
        self._take(kind, copy)
        for snap_id in sorted(self.waiting[kind].pop(granule, ())):
            snapshot = self.by_id[snap_id]
            snapshot.copies[kind][granule] = copy
            snapshot.preserved.append([kind, granule, copy])

    def release(self, snap_id: int) -> None:
        """A "release" record: free what only this snapshot kept."""
        snapshot = self.by_id[snap_id]
        for kind in KINDS:
            self.unhold(snap_id, kind, [granule for held_kind, granule in snapshot.held()
                                        if held_kind == kind])
        del self.by_id[snap_id]
        for kind, copies in snapshot.copies.items():
            still_used = {copy for other in self.by_id.values()
                          for copy in other.copies[kind].values()}
            for copy in set(copies.values()) - still_used:
                self._free(kind, copy)

    def unhold(self, snap_id: int, kind: str, granules) -> None:
        """An "unhold" record: the snapshot's reader has what it needs of these
        granules, so writes there need no copy for it any more."""
        for granule in granules:
            waiting = self.waiting[kind].get(granule)
            if waiting is None or snap_id not in waiting:
                continue
            waiting.discard(snap_id)
            if not waiting:
                del self.waiting[kind][granule]
                if granule in self.parked[kind]:
                    self.parked[kind].discard(granule)
                    self._free(kind, granule)

    def park(self, kind: str, granule: int) -> bool:
        """A live file frees granule: True if a snapshot holds it, which keeps it."""
        if not self.is_held(kind, granule):
            return False
        self.parked[kind].add(granule)
        return True

    # -- checkpoints -------------------------------------------------------------------------

    def to_image(self) -> list:
        return [snapshot.to_list() for snapshot in self.by_id.values()]

    def load(self, rows: list, inode_from_list) -> None:
        """From a checkpoint, after the live maps have claimed their granules: claim
        what the snapshots keep besides (parked granules and copies)."""
        for row in rows:
            snapshot = Snapshot.from_list(row, inode_from_list)
            self.by_id[snapshot.id] = snapshot
            for kind, granule in snapshot.held():
                if granule in snapshot.copies[kind]:
                    continue
                self.waiting[kind].setdefault(granule, set()).add(snapshot.id)
                if not self._in_use(kind, granule):
                    self._take(kind, granule)
                    self.parked[kind].add(granule)
            for kind, copies in snapshot.copies.items():
                for copy in copies.values():
                    if not self._in_use(kind, copy):
                        self._take(kind, copy)

    def kept(self) -> dict[str, set[int]]:
        """Granules in use for snapshots only (parked ones and copies), for fsck."""
        kept = {kind: set(self.parked[kind]) for kind in KINDS}
        for snapshot in self.by_id.values():
            for kind in KINDS:
                kept[kind].update(snapshot.copies[kind].values())
        return kept

    # -- the allocator, by kind ------------------------------------------------------------------

    def _in_use(self, kind: str, granule: int) -> bool:
        allocator = self.allocator
        return allocator.is_used(granule) if kind == UNITS else allocator.is_block_used(granule)

    def _take(self, kind: str, granule: int) -> None:
        if kind == UNITS:
            self.allocator.mark_used(granule)
        else:
            self.allocator.mark_block_used(granule)

    def _free(self, kind: str, granule: int) -> None:
        if kind == UNITS:
            self.allocator.mark_free(granule)
        else:
            self.allocator.mark_block_free(granule)
