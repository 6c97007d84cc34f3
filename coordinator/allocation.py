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

Small files. A file whose allocation fits in its first unit is block-mapped:
it gets 4 KiB blocks out of shared block units (coordinator/allocator.py),
packed together. The first change that needs allocation beyond the first
unit converts it to whole units, as a quiesce, since it frees the blocks:
with its holders paused, new units are zeroed, the blocks' data is copied
into the first of them (not yet referenced by anything, so a crash leaves it
simply free) and made durable, and only then one "convert" record switches
the map and frees the blocks. Once unit-mapped, a file stays so until its map
is empty again; a VM disk never sees blocks beyond a first conversion.

Whatever the coordinator writes into a file's existing granules itself (the
tail it clears, a zeroed range, an append's data) is preserved first for the
snapshots that hold it (coordinator/snapshots.py), like a node's first write.
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
from coordinator.snapshots import Snapshots
from csvfs.cluster.errors import MetaError
from csvfs.volume.extents import BLOCK, from_runs, pieces, to_runs

log = logging.getLogger(__name__)

ALLOCATE_AHEAD_MAX = 64  # units
ZERO_INLINE_MAX = 64 << 10  # bytes zeroed by a write in the event loop, not a punch
FALLOC_KEEP_SIZE = 0x01
FALLOC_PUNCH_HOLE = 0x02
FALLOC_ZERO_RANGE = 0x10


class Allocation:
    def __init__(self, commits: Commits, sessions: Sessions, quiesce: Quiesce,
                 snapshots: Snapshots):
        self.commits = commits
        self.sessions = sessions
        self.quiesce = quiesce
        self.snapshots = snapshots
        snapshots.on_copied = self._copied
        self.unit = commits.unit
        self._clean_tails: set[int] = set()  # inodes known to hold only zeros past EOF
        self._data_unsynced = False  # appends wrote data through this process's descriptor
        self._clean_blocks: set[int] = set()  # free blocks known to read as zeros

    # -- requests ------------------------------------------------------------------------

    async def op_extend(self, request: Request, ino: int, offset: int, end: int) -> dict:
        """Allocate the units under [offset, end) and grow the size to `end` if needed."""
        commits = self.commits
        async with commits.mutation():
            inode = commits.regular(ino)
            convert = self._must_convert(inode, end)
            if not convert:
                growing = end > inode.size
                ahead = self._ahead_units(inode) if growing else 0
                op = self._allocation_record(inode, offset, end, ahead)
                if growing:
                    op["size"] = end
                    op["t"] = commits.now()
                seq = await self._commit_map(inode, op, request)
                reply = commits.map_of(inode)
        if convert:
            return await self._convert(request, ino, offset, end, keep_size=False, zero=False)
        await self._publish_map(ino, seq, reply, request)
        return reply

    async def op_append(self, request: Request, ino: int, data: bytes) -> dict:
        """Write `data` at the end of the file; the reply has the new map and `offset`,
        where the data landed."""
        commits = self.commits
        while True:
            async with commits.mutation():
                inode = commits.regular(ino)
                offset, end = inode.size, inode.size + len(data)
                if not data:
                    return dict(commits.map_of(inode), offset=offset)
                convert = self._must_convert(inode, end)
                if not convert:
                    op = self._allocation_record(inode, offset, end, self._ahead_units(inode))
                    op["size"], op["t"] = end, commits.now()
                    await self._prepare(inode, op)
                    await self.snapshots.before_write(inode, offset, end)
                    self._write_at(inode, op, offset, data)
                    seq = commits.append(op, request)
                    reply = dict(commits.map_of(inode), offset=offset)
                    break
            await self._convert_for_append(request, ino, offset, end)
        await self._publish_map(ino, seq, reply, request)
        return reply

    async def _convert_for_append(self, request: Request, ino: int, offset: int,
                                  end: int) -> None:
        """Take a small file to units before an append that outgrows its first unit. The
        conversion is not the append: the request's once-only id stays for the record
        that carries the data."""
        once_only, request.once_only = request.once_only, None
        try:
            await self._convert(request, ino, offset, end, keep_size=True, zero=False)
        finally:
            request.once_only = once_only

    def _write_at(self, inode: Inode, op: dict, offset: int, data: bytes) -> None:
        """Write data at the file's offset through its map plus what `op` adds (before
        the record commits: nobody sees the new size before the data is there)."""
        granule = BLOCK if op["op"] == "bmap" else self.unit
        mapped = dict(inode.units)
        mapped.update(from_runs(op.get("add", [])))
        self.commits.write_data(mapped, granule, offset, data)
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
            convert = self._must_convert(inode, end)
            if not convert:
                seq = await self._allocated(inode, offset, end, keep_size, zero, request)
                reply = commits.map_of(inode)
        if convert:
            return await self._convert(request, ino, offset, end, keep_size, zero)
        await self._publish_map(ino, seq, reply, request)
        return reply

    async def _allocated(self, inode: Inode, offset: int, end: int, keep_size: bool,
                         zero: bool, request: Request, ahead: int = 0) -> int | None:
        """Allocate under [offset, end) (zeroing what is mapped there if `zero`) and
        grow the size to `end` unless `keep_size`: the record's seq, or None."""
        if zero:
            await self._zero_mapped(inode, offset, min(end, inode.size))
        op = self._allocation_record(inode, offset, end, ahead)
        if not keep_size and end > inode.size:
            op["size"] = end
        if op["add"] or "size" in op or zero:
            op["t"] = self.commits.now()
        return await self._commit_map(inode, op, request)

    # -- small files -----------------------------------------------------------------------

    def _must_convert(self, inode: Inode, end: int) -> bool:
        """Would allocating up to `end` take a block-mapped file past its first unit?"""
        return inode.blocks and bool(inode.units) and end > self.unit

    def _in_blocks(self, inode: Inode, end: int) -> bool:
        """Does an allocation up to `end` come in blocks? A file with a map keeps its
        kind (until _must_convert); an empty one gets blocks if it stays below one
        unit (a whole unit wastes nothing)."""
        return inode.blocks if inode.units else end < self.unit

    async def _convert(self, request: Request, ino: int, offset: int, end: int,
                       keep_size: bool, zero: bool) -> dict:
        """Allocate [offset, end) for a block-mapped file that outgrows its first unit:
        a quiesce, since the blocks are freed. The requester has the map once it ends."""
        await self.quiesce.run(request, ino, partial(
            self._converted, offset=offset, end=end, keep_size=keep_size, zero=zero,
            request=request))
        await self.commits.durable()
        return self.commits.map_of(self.commits.inode(ino))

    async def _converted(self, inode: Inode, offset: int, end: int, keep_size: bool,
                         zero: bool, request: Request) -> tuple[int | None, dict]:
        ahead = 0 if keep_size or end <= inode.size else self._ahead_units(inode)
        if not self._must_convert(inode, end):  # another request converted it meanwhile
            seq = await self._allocated(inode, offset, end, keep_size, zero, request, ahead)
            return seq, self.commits.map_of(inode)
        log.debug("inode %d: converting %d blocks to units", inode.ino, len(inode.units))
        if zero:
            await self._zero_mapped(inode, offset, min(end, inode.size))
        # units for [offset, end) and for file unit 0, which takes the blocks' data
        op = self._unit_record(inode, {}, offset, end, ahead, also=[0])
        op["op"] = "convert"
        if not keep_size and end > inode.size:
            op["size"] = end
        op["t"] = self.commits.now()
        seq = await self._commit_map(inode, op, request)
        return seq, self.commits.map_of(inode)

    async def _copy_blocks(self, inode: Inode, first_unit: int) -> None:
        """Copy a block-mapped file's data into the unit that will hold its first unit
        of file, and make it durable: before the record that points there."""
        volume = self.commits.volume
        base = volume.sb.data.offset
        moves = [(base + block * BLOCK, base + first_unit * self.unit + index * BLOCK)
                 for index, block in sorted(inode.units.items())]

        self.commits.check_lease()

        def copy() -> None:
            for read_at, write_at in moves:
                volume.write(write_at, volume.read(read_at, BLOCK))
            volume.sync()

        await trio.to_thread.run_sync(copy)

    def _ahead_units(self, inode: Inode) -> int:
        if inode.blocks:  # converting: as for a file of one unit
            return 1
        return min(ALLOCATE_AHEAD_MAX, max(1, len(inode.units) // 4))

    def _allocation_record(self, inode: Inode, offset: int, end: int, ahead: int = 0) -> dict:
        """A map record adding units for [offset, end), plus up to `ahead` units past it;
        or, for a small file, a "bmap" record adding blocks for [offset, end)."""
        if self._in_blocks(inode, end):
            return self._block_record(inode, offset, end)
        return self._unit_record(inode, inode.units, offset, end, ahead)

    def _unit_record(self, inode: Inode, mapped: dict, offset: int, end: int, ahead: int,
                     also=()) -> dict:
        first, last = offset // self.unit, (end - 1) // self.unit
        required = sorted({i for i in range(first, last + 1) if i not in mapped} | set(also))
        optional = [i for i in range(last + 1, last + 1 + ahead) if i not in mapped]
        near = mapped[max(mapped)] + 1 if mapped else None
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

    def _block_record(self, inode: Inode, offset: int, end: int) -> dict:
        first, last = offset // BLOCK, (end - 1) // BLOCK
        required = [i for i in range(first, last + 1) if i not in inode.units]
        near = inode.units[max(inode.units)] + 1 if inode.units else None
        try:
            chosen = self.commits.state.allocator.find_blocks(len(required), near)
        except NoSpace:
            raise MetaError(errno.ENOSPC) from None
        added = dict(zip(required, chosen, strict=True))
        return {"op": "bmap", "ino": inode.ino, "add": to_runs(added)}

    def _map_op(self, inode: Inode) -> str:
        """The record kind that changes this file's map: in blocks or in units."""
        return "bmap" if inode.blocks else "map"

    async def _commit_map(self, inode: Inode, op: dict, request: Request) -> int | None:
        """Zero what the change exposes, then append and apply a map record. Call with
        the metadata lock held: nothing else may allocate meanwhile.

        The caller sends the new map to the other nodes once the record is durable.
        """
        if not op.get("add") and op.get("size", inode.size) == inode.size and "t" not in op:
            return None  # nothing to change: a node asked with a stale map
        await self._prepare(inode, op)
        return self.commits.append(op, request)

    async def _prepare(self, inode: Inode, op: dict) -> None:
        """Before a map record commits: zero what it adds, and the old tail if it grows
        the file; for a conversion, copy the blocks' data into the new first unit."""
        if op["op"] == "bmap":
            await self._zero_blocks(op.get("add", ()))
        else:
            for _file_unit, volume_unit, count in op.get("add", ()):
                await self._zero(self.commits.unit_offset(volume_unit), count * self.unit)
        if op.get("size", 0) > inode.size:
            await self._zero_tail(inode)
        if op["op"] == "convert":
            first_unit = next(unit for file_unit, unit, _count in op["add"] if file_unit == 0)
            await self._copy_blocks(inode, first_unit)

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
        granule = inode.granule(self.unit)
        keep = -(-size // granule)
        drop = [index for index in inode.units if index >= keep]
        self._clean_tails.discard(inode.ino)  # the cut unit keeps old bytes past EOF
        seq = self.commits.append({"op": self._map_op(inode), "ino": inode.ino, "size": size,
                                   "t": self.commits.now(),
                                   "drop": [[index, 1] for index in sorted(drop)]}, request)
        return seq, self.commits.map_of(inode)

    async def _punch(self, request: Request, ino: int, offset: int, end: int) -> None:
        self.commits.regular(ino)
        await self.quiesce.run(request, ino, partial(self._drop_range, start=offset, end=end,
                                                     request=request))

    async def _drop_range(self, inode: Inode, start: int, end: int,
                          request: Request) -> tuple[int, dict]:
        """Free the whole units (or blocks) in [start, end) and zero the partial ones at
        its edges."""
        granule = inode.granule(self.unit)
        first_whole, end_whole = -(-start // granule), end // granule
        drop = [index for index in inode.units if first_whole <= index < end_whole]
        await self._zero_mapped(inode, start, min(end, first_whole * granule))
        await self._zero_mapped(inode, max(start, end_whole * granule), end)
        seq = self.commits.append({"op": self._map_op(inode), "ino": inode.ino,
                                   "t": self.commits.now(),
                                   "drop": [[index, 1] for index in sorted(drop)]}, request)
        return seq, self.commits.map_of(inode)

    # -- zeroing ---------------------------------------------------------------------------

    def _copied(self, kind: str, granules: list[int]) -> None:
        """A preserve wrote these copies: blocks among them are not clean any more."""
        if kind == "b":
            self._clean_blocks.difference_update(granules)

    async def _zero(self, offset: int, length: int) -> None:
        """Make a range of the image read as zeros. A few blocks (a small file's new
        ones) are written over inline, like a node's own writes: the trip to a worker
        thread would cost more than the write. Anything larger is punched out in a
        worker thread: a punched hole may first wait for the kernel to write out dirty
        pages there (ext4 does), and the event loop must go on renewing the lease and
        answering nodes meanwhile."""
        self.commits.check_lease()
        if length <= ZERO_INLINE_MAX:
            self.commits.volume.write(offset, bytes(length))
        else:
            await trio.to_thread.run_sync(self.commits.volume.zero, offset, length)
        self.commits.data_written()  # once written: a flush already under way missed it

    async def _zero_blocks(self, runs) -> None:
        """Zero the blocks a record adds. A unit split into blocks now is cleared whole,
        once, and its blocks are known clean until they are first handed out: so a
        small file growing by 4 KiB at a time does not dirty a page of the image, to
        be flushed with the journal, for every block."""
        allocator = self.commits.state.allocator
        per, base = allocator.per_unit, self.commits.volume.sb.data.offset
        split_now: set[int] = set()
        for _file_block, first, count in runs:
            for block in range(first, first + count):
                unit = block // per
                if not allocator.is_used(unit) and unit not in split_now:
                    split_now.add(unit)
                    await self._zero(self.commits.unit_offset(unit), self.unit)
                    self._clean_blocks.update(range(unit * per, (unit + 1) * per))
                if block in self._clean_blocks:
                    self._clean_blocks.discard(block)
                else:
                    await self._zero(base + block * BLOCK, BLOCK)

    async def _zero_tail(self, inode: Inode) -> None:
        """Bytes past EOF in the last unit may hold data from before a shrink: clear them.

        Once cleared they stay zero (nothing writes past EOF directly), so a growing
        file pays for this once, not on every extend. After a restart nothing is
        known clean, and each file clears its tail on its first growth.
        """
        if inode.ino in self._clean_tails:
            return
        granule = inode.granule(self.unit)
        within = inode.size % granule
        position = self.commits.position(inode, inode.size)
        if within and position is not None:
            await self.snapshots.before_write(inode, inode.size, inode.size + granule - within)
            await self._zero(position, granule - within)
        self._clean_tails.add(inode.ino)

    async def _zero_mapped(self, inode: Inode, start: int, end: int) -> None:
        await self.snapshots.before_write(inode, start, end)
        for piece_start, piece_end, _file_granule in pieces(start, end,
                                                            inode.granule(self.unit)):
            position = self.commits.position(inode, piece_start)
            if position is not None:
                await self._zero(position, piece_end - piece_start)
