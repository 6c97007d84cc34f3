"""The metadata state machine: inodes, directories and extent maps.

`MetadataState.apply(op)` is the one place where a journal record changes
state. The coordinator builds a record after validating a request, commits
it and applies it; recovery applies the same records when it replays the
journal. So `apply` must be deterministic: every decision (inode numbers,
units, timestamps, whether to reclaim) is made beforehand and carried in
the record.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from coordinator.allocator import Allocator
from csvfs.volume.extents import UnitMap, from_runs, to_runs

ROOT_INO = 1
NAME_MAX = 255  # bytes in one name
DONE_PER_NODE = 256  # remembered requests per node; a node has at most 64 in flight


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
    units: UnitMap = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def to_list(self) -> list:
        return [
            self.ino, self.mode, self.uid, self.gid, self.nlink, self.atime_ns,
            self.mtime_ns, self.ctime_ns, self.size, self.rdev, self.target,
            list(self.xattrs.items()), to_runs(self.units),
        ]  # fmt: skip

    @classmethod
    def from_list(cls, row: list) -> Inode:
        *head, xattrs, runs = row
        return cls(*head, xattrs=dict(xattrs), units=from_runs(runs))


class MetadataState:
    def __init__(self, data_units: int):
        self.inodes: dict[int, Inode] = {}
        self.entries: dict[int, dict[bytes, int]] = {}  # directory ino -> name -> ino
        self.parents: dict[int, int] = {}  # directory ino -> its parent directory
        self.next_ino = ROOT_INO + 1
        self.allocator = Allocator(data_units)
        self.damage: list[str] = []  # inconsistencies found while loading a checkpoint
        # node name -> request id -> inode (0 if none): requests already carried out, so
        # that a node retrying one after a failover gets its answer instead of EEXIST.
        self.done: dict[str, dict[int, int]] = {}

    # -- construction ------------------------------------------------------------

    @classmethod
    def fresh(cls, data_units: int, now_ns: int) -> MetadataState:
        state = cls(data_units)
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
        }

    @classmethod
    def from_image(cls, image: dict, data_units: int) -> MetadataState:
        state = cls(data_units)
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
        return state

    def _claim_units(self, inode: Inode) -> None:
        """Mark an inode's units used; a unit outside the data area or already taken
        is damage: it is dropped from the map (a hole) and reported, never shared."""
        for file_unit, unit in sorted(inode.units.items()):
            if not 0 <= unit < self.allocator.units:
                problem = "lies outside the data area"
            elif self.allocator.is_used(unit):
                problem = "is already mapped by another inode"
            else:
                self.allocator.mark_used(unit)
                continue
            del inode.units[file_unit]
            self.damage.append(f"inode {inode.ino} maps unit {unit}, which {problem}; "
                               f"its file unit {file_unit} becomes a hole")

    # -- queries ------------------------------------------------------------------

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
        for unit in inode.units.values():
            self.allocator.mark_free(unit)
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
        inode = self.inodes[op["ino"]]
        for file_unit, count in op.get("drop", ()):
            for index in range(file_unit, file_unit + count):
                unit = inode.units.pop(index, None)
                if unit is not None:
                    self.allocator.mark_free(unit)
        for file_unit, volume_unit, count in op.get("add", ()):
            for step in range(count):
                self.allocator.mark_used(volume_unit + step)
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
