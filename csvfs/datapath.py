"""The data path: reads and writes go straight to the image at the mapped offsets.

A request inside the file's size and allocated units costs one dict lookup
and one pread/pwrite; anything else (a hole, a write past EOF) asks the
coordinator to extend the file first. Nothing here knows about FUSE or RPC:
the coordinator is reached through the `meta` callable given at start.

The per-inode I/O gate is a flag and an event. I/O runs inline in the trio
thread, so once a request passes the gate it completes without yielding;
a pause therefore never has in-flight I/O to drain beyond the request that
is already running. If I/O ever moves to worker threads, the gate must
count in-flight requests instead.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable

import trio

from csvfs.extents import UnitMap, from_runs, pieces

log = logging.getLogger(__name__)

MetaCall = Callable[..., Awaitable]


class OpenFile:
    """This node's view of one open inode, shared by all its handles."""

    __slots__ = ("ino", "size", "units", "version", "refs", "paused", "resumed", "dirty_mtime")

    def __init__(self, ino: int, size: int, units: UnitMap, version: int):
        self.ino = ino
        self.size = size
        self.units = units
        self.version = version
        self.refs = 0
        self.paused = False
        self.resumed = trio.Event()
        self.dirty_mtime = 0  # time of the last local write not yet sent to the coordinator


class DataPath:
    def __init__(self, name: str, fd: int, data_offset: int, unit_size: int, meta: MetaCall):
        self.name = name
        self.fd = fd
        self.base = data_offset
        self.unit = unit_size
        self.meta = meta
        self.files: dict[int, OpenFile] = {}
        self.fenced = False  # the session is cut: no I/O at all until a remount
        # Direct I/O is allowed until this time.monotonic() deadline, which the node moves
        # on while its session (today: the coordinator lease) is valid. Past it, the slow
        # path asks `revalidate` first, so a node that was stalled cannot write a single
        # byte before it knows it still owns the volume. `revalidate` returns the new
        # deadline, or None when the session is gone.
        self.valid_until = math.inf
        self.revalidate: Callable[[], float | None] = lambda: math.inf

    # -- open files ------------------------------------------------------------------

    def opened(self, ino: int, size: int, runs: list, version: int) -> OpenFile:
        self._check_fenced()
        handle = self.files.get(ino)
        if handle is None:
            handle = self.files[ino] = OpenFile(ino, size, from_runs(runs), version)
        else:
            self.update_map(ino, size, runs, version)
        handle.refs += 1
        return handle

    def closed(self, handle: OpenFile) -> bool:
        """Drop one reference; True when this node no longer has the inode open."""
        handle.refs -= 1
        if handle.refs > 0:
            return False
        self.files.pop(handle.ino, None)
        return True

    # -- the coordinator's side of the session -----------------------------------------------

    async def pause(self, ino: int) -> None:
        handle = self.files.get(ino)
        if handle is not None and not handle.paused:
            handle.paused = True
            handle.resumed = trio.Event()

    def resume(self, ino: int) -> None:
        handle = self.files.get(ino)
        if handle is not None and handle.paused and not self.fenced:
            handle.paused = False
            handle.resumed.set()

    def update_map(self, ino: int, size: int, runs: list, version: int = 0) -> None:
        handle = self.files.get(ino)
        if handle is None or (version and version < handle.version):
            return  # a reply overtaken by a newer map
        handle.size = size
        handle.units = from_runs(runs)
        handle.version = max(handle.version, version)

    # -- I/O ------------------------------------------------------------------------------

    def read_direct(self, handle: OpenFile, offset: int, length: int) -> bytes | None:
        """The fast path: the whole request, or None if the file is paused or the
        session needs revalidating first."""
        if handle.paused or time.monotonic() > self.valid_until:
            return None
        end = min(offset + length, handle.size)
        if offset >= end:
            return b""
        unit = self.unit
        file_unit = offset // unit
        if (end - 1) // unit != file_unit:
            return b"".join(self._read_pieces(handle, offset, end))
        volume_unit = handle.units.get(file_unit)
        if volume_unit is None:
            return bytes(end - offset)
        return self._pread(end - offset, self.base + volume_unit * unit + offset % unit)

    async def read(self, handle: OpenFile, offset: int, length: int) -> bytes:
        while (data := self.read_direct(handle, offset, length)) is None:
            if not self._ensure_valid() and handle.paused:
                await handle.resumed.wait()
        return data

    def _ensure_valid(self) -> bool:
        """Raise EIO if fenced; revalidate an expired session. True if it had to."""
        self._check_fenced()
        if time.monotonic() <= self.valid_until:
            return False
        deadline = self.revalidate()
        if deadline is None or deadline <= time.monotonic():
            self.fence()
            self._check_fenced()
        self.valid_until = deadline
        return True

    def fence(self) -> None:
        """Cut this node off: pause every file for good and fail what waits."""
        self.fenced = True
        for handle in self.files.values():
            handle.paused = True
            handle.resumed.set()  # wake waiters so they see the fence

    def _check_fenced(self) -> None:
        if self.fenced:
            raise OSError(errno.EIO, "this node was fenced off the volume")

    def _read_pieces(self, handle: OpenFile, offset: int, end: int):
        for start, piece_end, file_unit in pieces(offset, end, self.unit):
            volume_unit = handle.units.get(file_unit)
            if volume_unit is None:
                yield bytes(piece_end - start)
            else:
                position = self.base + volume_unit * self.unit + start % self.unit
                yield self._pread(piece_end - start, position)

    def _pread(self, length: int, position: int) -> bytes:
        data = os.pread(self.fd, length, position)
        if len(data) < length:  # only past the end of a short image
            data += bytes(length - len(data))
        return data

    def write_direct(self, handle: OpenFile, offset: int, data: bytes) -> bool:
        """The fast path: write inside size and allocated units, or return False."""
        if handle.paused or offset + len(data) > handle.size:
            return False
        if time.monotonic() > self.valid_until:
            return False
        if not self._write_direct(handle, offset, data):
            return False
        handle.dirty_mtime = time.time_ns()
        return True

    async def write(self, handle: OpenFile, offset: int, data: bytes) -> int:
        end = offset + len(data)
        while not self.write_direct(handle, offset, data):
            if self._ensure_valid():
                continue
            if handle.paused:
                await handle.resumed.wait()
                continue
            reply = await self.meta("extend", ino=handle.ino, offset=offset, end=end)
            self.update_map(handle.ino, reply["size"], reply["runs"], reply["version"])
        return len(data)

    def _write_direct(self, handle: OpenFile, offset: int, data: bytes) -> bool:
        """Write if every byte lands in an allocated unit; False (nothing written) if not."""
        unit = self.unit
        units = handle.units
        file_unit = offset // unit
        last_unit = (offset + len(data) - 1) // unit
        if file_unit == last_unit:
            volume_unit = units.get(file_unit)
            if volume_unit is None:
                return False
            os.pwrite(self.fd, data, self.base + volume_unit * unit + offset % unit)
            return True
        if any(index not in units for index in range(file_unit, last_unit + 1)):
            return False
        view = memoryview(data)
        for start, end, index in pieces(offset, offset + len(data), unit):
            position = self.base + units[index] * unit + start % unit
            os.pwrite(self.fd, view[start - offset : end - offset], position)
        return True

    def sync(self) -> None:
        os.fdatasync(self.fd)
