"""Reading a snapshot straight from the image, exactly as the volume was at its point.

The coordinator hands out the snapshot's frozen namespace and maps
(`snapshot_files`): each granule of a file lies either where the live file
still has it, or, once something wrote there after the point, in the copy
that was preserved first. Reading a live granule races its preservation, so
reads go in batches, each followed by `snapshot_check`: a granule that is
still unpreserved then was read as it was at the point (nothing writes a held
granule before its preserve is applied); one preserved meanwhile is read again
from its copy. coordinator/snapshots.py tells the protocol.

Nothing here does RPC or FUSE: the caller passes the coordinator's replies in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from coordinator.model import Inode
from csvfs.volume.extents import STRIPE, stripe_runs

UNITS, BLOCKS = "u", "b"


def attributes(inode: Inode) -> dict:
    """What a manifest keeps of an inode besides its data."""
    return {"ino": inode.ino, "mode": inode.mode, "uid": inode.uid, "gid": inode.gid,
            "atime_ns": inode.atime_ns, "mtime_ns": inode.mtime_ns, "ctime_ns": inode.ctime_ns,
            "xattrs": [list(pair) for pair in inode.xattrs.items()]}


class SnapshotView:
    """One snapshot's namespace and where each of its granules is on the image now."""

    def __init__(self, files: dict, read_image: Callable[[int, int], bytes]):
        """read_image(offset, length): the image's bytes, zeros past its end
        (Volume.read, which bypasses the page cache where the nodes do)."""
        self.read_image = read_image
        self.id = files["id"]
        self.t_ns = files["t_ns"]
        self.volume = files.get("volume", "")
        self.unit_size = files["unit_size"]
        self.base = files["data_offset"]
        self.inodes = {inode.ino: inode for inode in map(Inode.from_list, files["inodes"])}
        self.entries = {ino: dict(names) for ino, names in files["dirs"]}
        # ino -> {base snapshot: (granules changed since, {unit: stripes mask} of those
        # where only some stripes did)}: what an incremental reads
        self.tracking = {ino: {base: (changed, dict(partial[0]) if partial else {})
                               for base, changed, *partial in bases}
                         for ino, bases in files.get("tracking", [])}
        self.copies: dict[str, dict[int, int]] = {UNITS: {}, BLOCKS: {}}
        self.preserved = 0
        self.take_copies(files["copies"], files["preserved"])

    def reset_copies(self, files: dict) -> None:
        """Take another coordinator's copies instead of those known so far."""
        self.copies = {UNITS: {}, BLOCKS: {}}
        self.take_copies(files["copies"], files["preserved"])

    def take_copies(self, copies: list, preserved: int) -> set[tuple[str, int]]:
        """Apply a check's answer; returns the (kind, granule)s newly preserved."""
        fresh = set()
        for kind, granule, copy in copies:
            self.copies[kind][granule] = copy
            fresh.add((kind, granule))
        self.preserved = preserved
        return fresh

    # -- the namespace ---------------------------------------------------------------------

    def walk(self) -> Iterator[tuple[str, Inode]]:
        """(path, inode) of every name, parents before their children, "/" first."""
        root = 1
        yield "/", self.inodes[root]
        stack = [(root, "")]
        while stack:
            directory, prefix = stack.pop()
            for name, ino in sorted(self.entries.get(directory, {}).items()):
                path = f"{prefix}/{name.decode('utf-8', 'surrogateescape')}"
                inode = self.inodes[ino]
                yield path, inode
                if inode.is_dir:
                    stack.append((ino, path))

    def lookup(self, path: str) -> Inode | None:
        ino = 1
        for part in [p for p in path.split("/") if p]:
            ino = self.entries.get(ino, {}).get(part.encode("utf-8", "surrogateescape"))
            if ino is None:
                return None
        return self.inodes.get(ino)

    # -- data ---------------------------------------------------------------------------

    def granule(self, inode: Inode) -> int:
        return inode.granule(self.unit_size)

    def read(self, inode: Inode, offset: int, length: int,
             live: set[tuple[str, int]] | None = None) -> bytes | None:
        """Bytes [offset, offset+length) of the file at the point; None if all of it is
        a hole. Granules read where the live file has them are added to `live`."""
        end = min(offset + length, inode.size)
        if offset >= end:
            return None
        granule = self.granule(inode)
        pieces, mapped = [], False
        position = offset
        while position < end:
            index = position // granule
            piece_end = min(end, (index + 1) * granule)
            where = self._where(inode, index, live)
            if where is None:
                pieces.append(bytes(piece_end - position))
            else:
                mapped = True
                pieces.append(self.read_image(where + position % granule, piece_end - position))
            position = piece_end
        return b"".join(pieces) if mapped else None

    def changed_since(self, inode: Inode, base: int) -> list[tuple[int, int]]:
        """Byte ranges [start, end) of the file that may differ from snapshot `base`
        (which must be one of its bases): whole granules, or the stripes written of
        those where the nodes reported them."""
        changed, partial = self.tracking[inode.ino][base]
        granule = self.granule(inode)
        ranges = []
        for index in sorted(changed):
            mask = partial.get(index)
            if mask is None:
                ranges.append((index * granule, (index + 1) * granule))
                continue
            for first, count in stripe_runs(mask):
                start = index * granule + first * STRIPE
                ranges.append((start, start + count * STRIPE))
        return ranges

    def granules_of(self, inode: Inode, offset: int, length: int) -> set[tuple[str, int]]:
        """The volume granules under a byte range of the file."""
        granule = self.granule(inode)
        end = min(offset + length, inode.size)
        return {(_kind(inode), inode.units[index])
                for index in range(offset // granule, (max(end, offset + 1) - 1) // granule + 1)
                if index in inode.units}

    def _where(self, inode: Inode, index: int, live: set | None) -> int | None:
        volume_granule = inode.units.get(index)
        if volume_granule is None:
            return None
        copy = self.copies[_kind(inode)].get(volume_granule)
        if copy is not None:
            return self.base + copy * self.granule(inode)
        if live is not None:
            live.add((_kind(inode), volume_granule))
        return self.base + volume_granule * self.granule(inode)


def _kind(inode: Inode) -> str:
    return BLOCKS if inode.blocks else UNITS
