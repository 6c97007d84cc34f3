"""Sizes and allocation: extend, fallocate, truncate and punch.

A change that adds units or grows a file frees nothing, so it needs no pause:
the new units are zeroed, the record committed, and the new map handed to the
file's other holders before the requester gets it. A growing file gets
allocate-ahead, so that a disk image growing by small writes does not pay a
round trip per write. A change that frees units (shrink, punch) runs as a
quiesce of the inode (coordinator/quiesce.py).

An append (a write through O_APPEND) carries its data here, so that it lands
whole at the end of the file as it is at that moment, whichever node sent it:
under the metadata lock the coordinator allocates past the end, writes the
data there, and only then commits the new size. No node can see the new size
before the data is on the image, and two appends never get the same offset.
"""

from __future__ import annotations

import errno
import logging
from functools import partial

import trio

from coordinator.allocator import NoSpace
from coordinator.commit import Commits, Request
from coordinator.model import Inode
from coordinator.quiesce import Quiesce, Sessions
from csvfs.cluster.errors import MetaError
from csvfs.volume.extents import from_runs, pieces, to_runs

log = logging.getLogger(__name__)

ALLOCATE_AHEAD_MAX = 64  # units
FALLOC_KEEP_SIZE = 0x01
FALLOC_PUNCH_HOLE = 0x02
FALLOC_ZERO_RANGE = 0x10


class Allocation:
    def __init__(self, commits: Commits, sessions: Sessions, quiesce: Quiesce):
        self.commits = commits
        self.sessions = sessions
        self.quiesce = quiesce
        self.unit = commits.unit
        self._clean_tails: set[int] = set()  # inodes known to hold only zeros past EOF
        self._data_unsynced = False  # appends wrote data through this process's descriptor

    # -- requests ------------------------------------------------------------------------

    async def op_extend(self, request: Request, ino: int, offset: int, end: int) -> dict:
        """Allocate the units under [offset, end) and grow the size to `end` if needed."""
        commits = self.commits
        async with commits.mutation():
            inode = commits.regular(ino)
            growing = end > inode.size
            ahead = self._ahead_units(inode) if growing else 0
            op = self._allocation_record(inode, offset, end, ahead)
            if growing:
                op["size"] = end
                op["t"] = commits.now()
            seq = await self._commit_map(inode, op, request)
            reply = commits.map_of(inode)
        await self._publish_map(ino, seq, reply, request)
        return reply

    async def op_append(self, request: Request, ino: int, data: bytes) -> dict:
        """Write `data` at the end of the file; the reply has the new map and `offset`,
        where the data landed."""
        commits = self.commits
        async with commits.mutation():
            inode = commits.regular(ino)
            offset, end = inode.size, inode.size + len(data)
            if not data:
                return dict(commits.map_of(inode), offset=offset)
            op = self._allocation_record(inode, offset, end, self._ahead_units(inode))
            op["size"], op["t"] = end, commits.now()
            await self._zero_exposed(inode, op)
            self._write_at(inode, op, offset, data)
            seq = commits.append(op, request)
            reply = dict(commits.map_of(inode), offset=offset)
        await self._publish_map(ino, seq, reply, request)
        return reply

    def _write_at(self, inode: Inode, op: dict, offset: int, data: bytes) -> None:
        """Write data at the file's offset through its map plus the units `op` adds."""
        units = dict(inode.units)
        units.update(from_runs(op.get("add", [])))
        view = memoryview(data)
        for start, end, file_unit in pieces(offset, offset + len(data), self.unit):
            position = self.commits.unit_offset(units[file_unit]) + start % self.unit
            self.commits.volume.write(position, view[start - offset : end - offset])
        self._data_unsynced = True

    async def sync_data(self) -> None:
        """fsync on a node covers its appends too, which this process wrote: a node's
        fdatasync of the image flushes them only where both share one page cache."""
        if self._data_unsynced:
            self._data_unsynced = False
            await trio.to_thread.run_sync(self.commits.volume.sync)

    async def op_fallocate(self, request: Request, ino: int, mode: int, offset: int,
                           length: int) -> dict:
        if offset < 0 or length <= 0:
            raise MetaError(errno.EINVAL)
        end = offset + length
        if mode & FALLOC_PUNCH_HOLE:
            if not mode & FALLOC_KEEP_SIZE or mode & ~(FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE):
                raise MetaError(errno.EOPNOTSUPP)
            await self._punch(request, ino, offset, end)
        elif mode & ~(FALLOC_KEEP_SIZE | FALLOC_ZERO_RANGE):
            raise MetaError(errno.EOPNOTSUPP)
        else:
            return await self._allocate(request, ino, offset, end,
                                        keep_size=bool(mode & FALLOC_KEEP_SIZE),
                                        zero=bool(mode & FALLOC_ZERO_RANGE))
        await self.commits.durable()
        return self.commits.map_of(self.commits.inode(ino))

    async def resize(self, request: Request, ino: int, size: int) -> None:
        """setattr's size: growing frees nothing; shrinking is a quiesce."""
        async with self.commits.mutation():
            grows = size >= self.commits.regular(ino).size
            if grows:
                seq, reply = await self._grow(ino, size, request)
        if grows:
            await self._publish_map(ino, seq, reply, request, to_requester=True)
            return
        await self.quiesce.run(request, ino, partial(self._shrink, size=size,
                                                     request=request))

    # -- growing -------------------------------------------------------------------------

    async def _grow(self, ino: int, size: int, request: Request) -> tuple[int | None, dict]:
        inode = self.commits.inode(ino)
        seq = await self._commit_map(inode, {"op": "map", "ino": ino, "size": size,
                                             "t": self.commits.now()}, request)
        return seq, self.commits.map_of(inode)

    async def _allocate(self, request: Request, ino: int, offset: int, end: int,
                        keep_size: bool, zero: bool) -> dict:
        commits = self.commits
        async with commits.mutation():
            inode = commits.regular(ino)
            if zero:
                await self._zero_mapped(inode, offset, min(end, inode.size))
            op = self._allocation_record(inode, offset, end)
            if not keep_size and end > inode.size:
                op["size"] = end
            if op["add"] or "size" in op or zero:
                op["t"] = commits.now()
            seq = await self._commit_map(inode, op, request)
            reply = commits.map_of(inode)
        await self._publish_map(ino, seq, reply, request)
        return reply

    def _ahead_units(self, inode: Inode) -> int:
        return min(ALLOCATE_AHEAD_MAX, max(1, len(inode.units) // 4))

    def _allocation_record(self, inode: Inode, offset: int, end: int, ahead: int = 0) -> dict:
        """A map record adding units for [offset, end), plus up to `ahead` units past it."""
        first, last = offset // self.unit, (end - 1) // self.unit
        required = [i for i in range(first, last + 1) if i not in inode.units]
        optional = [i for i in range(last + 1, last + 1 + ahead) if i not in inode.units]
        near = inode.units[max(inode.units)] + 1 if inode.units else None
        allocator = self.commits.state.allocator
        try:
            try:
                chosen = allocator.find(len(required) + len(optional), near)
            except NoSpace:
                chosen = allocator.find(len(required), near)  # allocate-ahead is best effort
        except NoSpace:
            raise MetaError(errno.ENOSPC) from None
        added = dict(zip(required + optional, chosen, strict=False))
        return {"op": "map", "ino": inode.ino, "add": to_runs(added)}

    async def _commit_map(self, inode: Inode, op: dict, request: Request) -> int | None:
        """Zero what the change exposes, then append and apply a map record. Call with
        the metadata lock held: nothing else may allocate meanwhile.

        The caller sends the new map to the other nodes once the record is durable.
        """
        if not op.get("add") and op.get("size", inode.size) == inode.size and "t" not in op:
            return None  # nothing to change: a node asked with a stale map
        await self._zero_exposed(inode, op)
        return self.commits.append(op, request)

    async def _zero_exposed(self, inode: Inode, op: dict) -> None:
        """Zero the units a map record adds, and the old tail if it grows the file."""
        for _file_unit, volume_unit, count in op.get("add", ()):
            await self._zero(self.commits.unit_offset(volume_unit), count * self.unit)
        if op.get("size", 0) > inode.size:
            await self._zero_tail(inode)

    async def _publish_map(self, ino: int, seq: int | None, reply: dict, request: Request,
                           to_requester: bool = False) -> None:
        """Once the map record `seq` is durable, hand its map to the file's holders."""
        await self.commits.durable(seq)
        if seq is not None:
            names = [name for name in self.sessions.holding(ino)
                     if to_requester or name != request.session]
            await self.sessions.hand_out_map(ino, reply, request, names)

    # -- freeing (under a quiesce) ---------------------------------------------------------

    async def _shrink(self, inode: Inode, size: int, request: Request) -> tuple[int | None, dict]:
        if size >= inode.size:  # it grew meanwhile
            return await self._grow(inode.ino, size, request)
        keep = -(-size // self.unit)
        drop = [index for index in inode.units if index >= keep]
        self._clean_tails.discard(inode.ino)  # the cut unit keeps old bytes past EOF
        seq = self.commits.append({"op": "map", "ino": inode.ino, "size": size,
                                   "t": self.commits.now(),
                                   "drop": [[index, 1] for index in sorted(drop)]}, request)
        return seq, self.commits.map_of(inode)

    async def _punch(self, request: Request, ino: int, offset: int, end: int) -> None:
        self.commits.regular(ino)
        await self.quiesce.run(request, ino, partial(self._drop_range, start=offset, end=end,
                                                     request=request))

    async def _drop_range(self, inode: Inode, start: int, end: int,
                          request: Request) -> tuple[int, dict]:
        """Free the whole units in [start, end) and zero the partial ones at its edges."""
        first_whole, end_whole = -(-start // self.unit), end // self.unit
        drop = [index for index in inode.units if first_whole <= index < end_whole]
        await self._zero_mapped(inode, start, min(end, first_whole * self.unit))
        await self._zero_mapped(inode, max(start, end_whole * self.unit), end)
        seq = self.commits.append({"op": "map", "ino": inode.ino, "t": self.commits.now(),
                                   "drop": [[index, 1] for index in sorted(drop)]}, request)
        return seq, self.commits.map_of(inode)

    # -- zeroing ---------------------------------------------------------------------------

    async def _zero(self, offset: int, length: int) -> None:
        """Make a range of the image read as zeros, in a worker thread: a punched hole
        may first wait for the kernel to write out dirty pages there (ext4 does), and
        the event loop must go on renewing the lease and answering nodes meanwhile."""
        await trio.to_thread.run_sync(self.commits.volume.zero, offset, length)

    async def _zero_tail(self, inode: Inode) -> None:
        """Bytes past EOF in the last unit may hold data from before a shrink: clear them.

        Once cleared they stay zero (nothing writes past EOF directly), so a growing
        file pays for this once, not on every extend. After a restart nothing is
        known clean, and each file clears its tail on its first growth.
        """
        if inode.ino in self._clean_tails:
            return
        within = inode.size % self.unit
        volume_unit = inode.units.get(inode.size // self.unit)
        if within and volume_unit is not None:
            await self._zero(self.commits.unit_offset(volume_unit) + within, self.unit - within)
        self._clean_tails.add(inode.ino)

    async def _zero_mapped(self, inode: Inode, start: int, end: int) -> None:
        for piece_start, piece_end, file_unit in pieces(start, end, self.unit):
            mapped = inode.units.get(file_unit)
            if mapped is not None:
                within = piece_start % self.unit
                await self._zero(self.commits.unit_offset(mapped) + within,
                                 piece_end - piece_start)
