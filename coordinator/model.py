"""The metadata state machine: inodes, directories and extent maps.

`MetadataState.apply(op)` is the one place where a journal record changes
state. The coordinator builds a record after validating a request, commits
it and applies it; recovery applies the same records when it replays the
journal. So `apply` must be deterministic: every decision (inode numbers,
units, timestamps, whether to reclaim) is made beforehand and carried in
the record.

A regular file's map is in allocation units, or, for a small file
(`Inode.blocks`), in 4 KiB blocks inside shared block units (see
csvfs/volume/extents.py and coordinator/allocator.py). "map" records change a
unit-mapped file, "bmap" records a block-mapped one, and one "convert" record
moves a file from blocks to units once its data was copied there.

Snapshots (coordinator/snapshot_state.py) are state too: "snapshot",
"preserve" and "release" records, and a granule a live file frees while a
snapshot holds it is parked there instead of freed.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from coordinator.allocator import Allocator
from coordinator.snapshot_state import BLOCKS, UNITS, Snapshot, SnapshotSet
from csvfs.volume.extents import BLOCK, STRIPE, UnitMap, from_runs, to_runs
from csvfs.volume.format import DEFAULT_UNIT

ROOT_INO = 1
NAME_MAX = 255  # bytes in one name
DONE_PER_NODE = 256  # remembered requests per node; a node has at most 64 in flight
MAX_BASES = 4  # change tracking: the last backups of a file that incrementals can build on


@dataclass
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    size: int = 0
    rdev: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    units: UnitMap = field(default_factory=dict)  # file granule -> volume granule
    blocks: bool = False  # the map is in BLOCKs, not allocation units
    # Change tracking: for each of the last snapshots whose backup took this file (its
    # bases), the file granules that may differ from what it took. Only those need
    # reading again. Several, so that backups into several repositories each have one.
    tracking: dict[int, set[int]] = field(default_factory=dict)
    # Of those, per base, the units where only some 64 KiB stripes may differ: unit ->
    # bitmask of the stripes the nodes reported writing (csvfs/datapath.py). A changed
    # unit not listed may differ anywhere. Masks only grow, until the next base.
    partial: dict[int, dict[int, int]] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def to_list(self) -> list:
        row = [
            self.ino, self.mode, self.uid, self.gid, self.nlink, self.atime_ns,
            self.mtime_ns, self.ctime_ns, self.size, self.rdev, self.target,
            list(self.xattrs.items()), to_runs(self.units),
        ]  # fmt: skip
        if self.tracking:  # a tracked file: the blocks flag, then its bases
            return row + [int(self.blocks), self.tracking_list()]
        return row + ([1] if self.blocks else [])

    def tracking_list(self) -> list:
        """[base, changed granules, [[unit, stripes mask]...]] for each base."""
        return [[base, sorted(changed), sorted(self.partial.get(base, {}).items())]
                for base, changed in self.tracking.items()]

    @classmethod
    def from_list(cls, row: list) -> Inode:
        """Rows end with the runs; a block-mapped file's with 1 after them; a tracked
        file's with the blocks flag and its bases with their changed granules."""
        tracking = ()
        if len(row) > 14:
            *row, tracking = row
        blocks = 0
        if len(row) > 13:
            *row, blocks = row
        *head, xattrs, runs = row
        inode = cls(*head, xattrs=dict(xattrs), units=from_runs(runs), blocks=bool(blocks))
        for base, changed, *partial in tracking:
            inode.tracking[base] = set(changed)
            inode.partial[base] = {unit: mask for unit, mask in (partial[0] if partial else ())}
        return inode

    def mark_changed(self, granules) -> None:
        """Changed anywhere in these granules (allocated, freed, written by the
        coordinator, or by a node with no stripes to report)."""
        granules = list(granules)
        for base, changed in self.tracking.items():
            changed.update(granules)
            partial = self.partial.get(base)
            if partial:
                for granule in granules:
                    partial.pop(granule, None)

    def mark_written_by_nodes(self, units) -> None:
        """A node's first write to these units since a base: the nodes that write them
        report which stripes they wrote (`add_stripes`), so unmarked units start empty."""
        units = list(units)
        for base, changed in self.tracking.items():
            fresh = [unit for unit in units if unit not in changed]
            changed.update(fresh)
            self.partial.setdefault(base, {}).update(dict.fromkeys(fresh, 0))

    def add_stripes(self, masks: dict[int, int]) -> None:
        """Stripes the nodes wrote, in units they wrote since every base."""
        for partial in self.partial.values():
            for unit, mask in masks.items():
                if unit in partial:
                    partial[unit] |= mask

    def tracks_stripes(self, unit_size: int) -> bool:
        """Do the nodes report the stripes they write to this file's units?"""
        return bool(self.tracking) and not self.blocks and unit_size > STRIPE

    def has_partial(self, index: int) -> bool:
        return any(index in partial for partial in self.partial.values())

    def new_base(self, base: int) -> None:
        """Track changes afresh from snapshot `base`; the oldest base beyond
        MAX_BASES goes."""
        self.tracking[base] = set()
        self.partial[base] = {}
        while len(self.tracking) > MAX_BASES:
            self.drop_base(min(self.tracking))

    def drop_base(self, base: int) -> None:
        self.tracking.pop(base, None)
        self.partial.pop(base, None)

    def reset_tracking(self) -> None:
        self.tracking = {}
        self.partial = {}

    def unmarked(self, index: int) -> bool:
        """Must a write to file granule `index` be recorded first (for some base)?"""
        return any(index not in changed for changed in self.tracking.values())

    def granule(self, unit_size: int) -> int:
        """Bytes per map entry: BLOCK for a block-mapped file, else the unit size."""
        return BLOCK if self.blocks else unit_size

    def allocated(self, unit_size: int) -> int:
        """Bytes of data area the file holds."""
        return len(self.units) * self.granule(unit_size)


class MetadataState:
    def __init__(self, data_units: int, unit_size: int = DEFAULT_UNIT):
        self.inodes: dict[int, Inode] = {}
        self.entries: dict[int, dict[bytes, int]] = {}  # directory ino -> name -> ino
        self.parents: dict[int, int] = {}  # directory ino -> its parent directory
        self.next_ino = ROOT_INO + 1
        self.unit_size = unit_size
        self.allocator = Allocator(data_units, unit_size // BLOCK)
        self.snapshots = SnapshotSet(self.allocator)
        self.damage: list[str] = []  # inconsistencies found while loading a checkpoint
        # node name -> request id -> inode (0 if none): requests already carried out, so
        # that a node retrying one after a failover gets its answer instead of EEXIST.
        self.done: dict[str, dict[int, int]] = {}

    # -- construction ------------------------------------------------------------

    @classmethod
    def fresh(cls, data_units: int, now_ns: int, unit_size: int = DEFAULT_UNIT) -> MetadataState:
        state = cls(data_units, unit_size)
        root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, 0, 0, 2, now_ns, now_ns, now_ns)
        state.inodes[ROOT_INO] = root
        state.entries[ROOT_INO] = {}
        state.parents[ROOT_INO] = ROOT_INO
        return state

    def to_image(self) -> dict:
        return {
            "next_ino": self.next_ino,
            "inodes": [inode.to_list() for inode in self.inodes.values()],
            "dirs": [[ino, list(names.items())] for ino, names in self.entries.items()],
            "done": [[node, list(requests.items())] for node, requests in self.done.items()],
            "snapshots": self.snapshots.to_image(),
        }

    @classmethod
    def from_image(cls, image: dict, data_units: int,
                   unit_size: int = DEFAULT_UNIT) -> MetadataState:
        state = cls(data_units, unit_size)
        state.next_ino = image["next_ino"]
        for row in image["inodes"]:
            inode = Inode.from_list(row)
            state.inodes[inode.ino] = inode
            state._claim_units(inode)
        for ino, names in image["dirs"]:
            state.entries[ino] = dict(names)
            for child in state.entries[ino].values():
                if state.inodes[child].is_dir:
                    state.parents[child] = ino
        state.parents[ROOT_INO] = ROOT_INO
        state.done = {node: dict(requests) for node, requests in image.get("done", [])}
        state.snapshots.load(image.get("snapshots", []), Inode.from_list)
        return state

    def _claim_units(self, inode: Inode) -> None:
        """Mark an inode's units used; a unit outside the data area or already taken
        is damage: it is dropped from the map (a hole) and reported, never shared.
        The same for the blocks of a block-mapped file, which must also lie in its
        first unit of file (a larger one is unit-mapped)."""
        allocator = self.allocator
        what = "block" if inode.blocks else "unit"
        for file_unit, unit in sorted(inode.units.items()):
            if inode.blocks:
                if not 0 <= unit < allocator.total_blocks:
                    problem = "lies outside the data area"
                elif file_unit >= allocator.per_unit:
                    problem = f"is beyond the first unit of the file (file block {file_unit})"
                elif allocator.is_block_used(unit):
                    problem = "is already mapped by another inode"
                elif allocator.is_used(unit // allocator.per_unit) and \
                        not allocator.is_block_unit(unit // allocator.per_unit):
                    problem = "lies in a unit that another inode maps whole"
                else:
                    allocator.mark_block_used(unit)
                    continue
            elif not 0 <= unit < allocator.units:
                problem = "lies outside the data area"
            elif allocator.is_block_unit(unit):
                problem = "is split into blocks of small files"
            elif allocator.is_used(unit):
                problem = "is already mapped by another inode"
            else:
                allocator.mark_used(unit)
                continue
            del inode.units[file_unit]
            self.damage.append(f"inode {inode.ino} maps {what} {unit}, which {problem}; "
                               f"its file {what} {file_unit} becomes a hole")

    def free_map(self, inode: Inode) -> None:
        """Give back everything an inode's map holds, and empty the map."""
        for granule in inode.units.values():
            self._free(inode.blocks, granule)
        inode.units = {}

    def _free(self, block: bool, granule: int) -> None:
        """Free a granule a live file let go of, unless a snapshot holds it (parked)."""
        if self.snapshots.park(BLOCKS if block else UNITS, granule):
            return
        if block:
            self.allocator.mark_block_free(granule)
        else:
            self.allocator.mark_free(granule)

    # -- queries ------------------------------------------------------------------

    def lookup_path(self, path: str) -> int | None:
        """The inode a slash-separated path from the root names, or None."""
        ino = ROOT_INO
        for name in (part for part in path.split("/") if part):
            ino = self.entries.get(ino, {}).get(name.encode("utf-8", "surrogateescape"))
            if ino is None:
                return None
        return ino

    def paths(self, inos) -> dict[int, str]:
        """A path of each of `inos` that still has a name (for status displays)."""
        named = {child: (parent, name) for parent, names in self.entries.items()
                 for name, child in names.items()}
        found = {}
        for ino in inos:
            parts, cursor = [], ino
            while cursor in named:
                cursor, name = named[cursor]
                parts.append(name.decode(errors="replace"))
            if cursor == ROOT_INO and (parts or ino == ROOT_INO):
                found[ino] = "/" + "/".join(reversed(parts))
        return found

    def orphans(self) -> list[int]:
        """Inodes with no name left: kept only while some node has them open."""
        return [ino for ino, inode in self.inodes.items() if inode.nlink == 0]

    # -- applying records ------------------------------------------------------------

    def apply(self, op: dict) -> None:
        handler = getattr(self, f"_apply_{op['op']}", None)
        if handler is None:
            raise ValueError(f"unknown journal operation {op['op']!r}")
        handler(op)
        if "req" in op:
            self._remember(op)

    def _remember(self, op: dict) -> None:
        node, request = op["req"]
        requests = self.done.setdefault(node, {})
        requests[request] = op.get("ino", 0)
        if len(requests) > DONE_PER_NODE:
            del requests[next(iter(requests))]  # the oldest: its node has long had the reply

    def _apply_mknod(self, op: dict) -> None:
        t = op["t"]
        mode = op["mode"]
        inode = Inode(op["ino"], mode, op["uid"], op["gid"], 1, t, t, t, rdev=op.get("rdev", 0))
        if stat.S_ISLNK(mode):
            inode.target = op["target"]
            inode.size = len(inode.target)
        self.inodes[inode.ino] = inode
        self.next_ino = max(self.next_ino, inode.ino + 1)
        parent = self.inodes[op["parent"]]
        self.entries[parent.ino][op["name"]] = inode.ino
        if stat.S_ISDIR(mode):
            inode.nlink = 2
            self.entries[inode.ino] = {}
            self.parents[inode.ino] = parent.ino
            parent.nlink += 1
        parent.mtime_ns = parent.ctime_ns = t

    def _apply_link(self, op: dict) -> None:
        t = op["t"]
        inode = self.inodes[op["ino"]]
        self.entries[op["parent"]][op["name"]] = inode.ino
        inode.nlink += 1
        inode.ctime_ns = t
        parent = self.inodes[op["parent"]]
        parent.mtime_ns = parent.ctime_ns = t

    def _apply_unlink(self, op: dict) -> None:
        t = op["t"]
        parent = self.inodes[op["parent"]]
        ino = self.entries[parent.ino].pop(op["name"])
        parent.mtime_ns = parent.ctime_ns = t
        self._drop_link(ino, parent, t, op.get("reclaim", False))

    def _drop_link(self, ino: int, parent: Inode, t: int, reclaim: bool) -> None:
        inode = self.inodes[ino]
        inode.ctime_ns = t
        if inode.is_dir:
            inode.nlink = 0
            parent.nlink -= 1
            del self.entries[ino]
            del self.parents[ino]
        else:
            inode.nlink -= 1
        if inode.nlink == 0 and reclaim:
            self._reclaim(inode)

    def _apply_reclaim(self, op: dict) -> None:
        self._reclaim(self.inodes[op["ino"]])

    def _reclaim(self, inode: Inode) -> None:
        self.free_map(inode)
        del self.inodes[inode.ino]

    def _apply_rename(self, op: dict) -> None:
        t = op["t"]
        old_parent, new_parent = self.inodes[op["old_parent"]], self.inodes[op["new_parent"]]
        old_name, new_name = op["old_name"], op["new_name"]
        moving = self.entries[old_parent.ino][old_name]
        if op.get("exchange"):
            other = self.entries[new_parent.ino][new_name]
            self.entries[old_parent.ino][old_name] = other
            self.entries[new_parent.ino][new_name] = moving
            self._reparent(other, new_parent, old_parent)
            self._reparent(moving, old_parent, new_parent)
            for ino in (moving, other):
                self.inodes[ino].ctime_ns = t
        else:
            replaced = self.entries[new_parent.ino].get(new_name)
            del self.entries[old_parent.ino][old_name]
            if replaced is not None:
                self._drop_link(replaced, new_parent, t, op.get("reclaim", False))
            self.entries[new_parent.ino][new_name] = moving
            self._reparent(moving, old_parent, new_parent)
            self.inodes[moving].ctime_ns = t
        for parent in (old_parent, new_parent):
            parent.mtime_ns = parent.ctime_ns = t

    def _reparent(self, ino: int, old_parent: Inode, new_parent: Inode) -> None:
        if not self.inodes[ino].is_dir or old_parent is new_parent:
            return
        self.parents[ino] = new_parent.ino
        old_parent.nlink -= 1
        new_parent.nlink += 1

    def _apply_setattr(self, op: dict) -> None:
        inode = self.inodes[op["ino"]]
        for name in ("mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns"):
            if name in op:
                setattr(inode, name, op[name])

    def _apply_map(self, op: dict) -> None:
        """Change a file's size and/or allocation: extend, truncate, fallocate, punch."""
        self._change_map(op, block=False)

    def _apply_bmap(self, op: dict) -> None:
        """The same for a block-mapped file: "add" and "drop" count in blocks."""
        self._change_map(op, block=True)

    def _apply_convert(self, op: dict) -> None:
        """A block-mapped file moves to whole units: its data was copied to the units
        in "add" before this record was written; its blocks are free from now on."""
        inode = self.inodes[op["ino"]]
        self.free_map(inode)
        inode.blocks = False
        inode.reset_tracking()  # its granules changed size: the next backup reads it whole
        self._change_map(op, block=False)

    def _change_map(self, op: dict, block: bool) -> None:
        inode = self.inodes[op["ino"]]
        if inode.units and inode.blocks != block and (op.get("add") or op.get("drop")):
            raise ValueError(f"{op['op']} record for inode {inode.ino}, whose map is in "
                             f"{'blocks' if inode.blocks else 'units'}")
        allocator = self.allocator
        take = allocator.mark_block_used if block else allocator.mark_used
        for file_unit, count in op.get("drop", ()):
            inode.mark_changed(range(file_unit, file_unit + count))  # holes now
            for index in range(file_unit, file_unit + count):
                unit = inode.units.pop(index, None)
                if unit is not None:
                    self._free(block, unit)
        if op.get("add"):
            inode.blocks = block
        # A unit added where the base had a hole reads as zeros, as it did: only what
        # is written to it differs, which the nodes report (the coordinator's own
        # writes mark the whole unit). One changed since the base stays whole.
        mark_added = inode.mark_written_by_nodes if inode.tracks_stripes(self.unit_size) \
            else inode.mark_changed
        for file_unit, volume_unit, count in op.get("add", ()):
            mark_added(range(file_unit, file_unit + count))
            for step in range(count):
                take(volume_unit + step)
                inode.units[file_unit + step] = volume_unit + step
        if "size" in op:
            inode.size = op["size"]
        if "t" in op:
            inode.mtime_ns = inode.ctime_ns = op["t"]

    def _apply_setxattr(self, op: dict) -> None:
        inode = self.inodes[op["ino"]]
        inode.xattrs[op["name"]] = op["value"]
        inode.ctime_ns = op["t"]

    def _apply_removexattr(self, op: dict) -> None:
        inode = self.inodes[op["ino"]]
        del inode.xattrs[op["name"]]
        inode.ctime_ns = op["t"]

    # -- snapshots (coordinator/snapshot_state.py) ---------------------------------------

    def _apply_snapshot(self, op: dict) -> None:
        """Freeze the whole namespace and every map as they are now. The files the backup
        takes ("inos", default all) start tracking changes afresh from this point; the
        snapshot keeps what they had tracked before, for the backup to read."""
        self._take_stripe_reports(op)
        inodes = {ino: Inode.from_list(inode.to_list()) for ino, inode in self.inodes.items()}
        entries = {ino: dict(names) for ino, names in self.entries.items()}
        snapshot = Snapshot(op["id"], op["t"], op.get("requester", ""), inodes, entries,
                            op.get("timeout", 60.0))
        taken = op.get("inos")
        for ino in self.inodes if taken is None else taken:
            inode = self.inodes.get(ino)
            if inode is not None and inode.is_reg:
                snapshot.tracking[ino] = inode.tracking_list()
                inode.new_base(snapshot.id)
        self.snapshots.take(snapshot)

    def _take_stripe_reports(self, op: dict) -> None:
        """The stripes the nodes wrote up to a snapshot point count for the bases before
        it: "written", as they reported them ([[ino, [[unit, mask]...]]...]). If some
        node's report is lost ("stripes_lost": it died, or the coordinator did), every
        changed unit may differ anywhere."""
        if op.get("stripes_lost"):
            for inode in self.inodes.values():
                inode.partial = {base: {} for base in inode.partial}
        for ino, masks in op.get("written", ()):
            inode = self.inodes.get(ino)
            if inode is not None:
                inode.add_stripes(dict(masks))

    def _apply_changed(self, op: dict) -> None:
        """The first write to these granules of a tracked file since its base: by a
        node ("by_node", which reports its stripes later), or by the coordinator."""
        inode = self.inodes[op["ino"]]
        if op.get("by_node"):
            inode.mark_written_by_nodes(op["granules"])
        else:
            inode.mark_changed(op["granules"])

    def _apply_preserve(self, op: dict) -> None:
        """Held granules' old contents were copied (and made durable) before this record."""
        for kind, granule, copy in op["copies"]:
            self.snapshots.preserve(kind, granule, copy)

    def _apply_unhold(self, op: dict) -> None:
        if op["id"] in self.snapshots.by_id:
            self.snapshots.unhold(op["id"], op["kind"], op["granules"])

    def _apply_release(self, op: dict) -> None:
        """The end of a snapshot. If its backup failed, it is no base for the files it
        was to take (their other bases went on tracking meanwhile)."""
        snapshot = self.snapshots.by_id.get(op["id"])
        if snapshot is None:
            return
        if op.get("failed"):
            for ino in snapshot.tracking:
                inode = self.inodes.get(ino)
                if inode is not None:
                    inode.drop_base(snapshot.id)
        self.snapshots.release(op["id"])
