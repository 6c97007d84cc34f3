"""Image I/O that bypasses the page cache (O_DIRECT): aligned buffers, whole sectors.

Why: nodes on several hosts share one block device, and no host's page cache sees
what another host wrote. A node that read the lease region, the journal or a file's
data through its own cache could act on bytes that are no longer on the device. With
O_DIRECT every read goes to the device and every write leaves the host at once.

O_DIRECT asks three things of each request: the file offset, the length and the
memory address must be multiples of the device's logical sector. `SectorIO` gives
callers the ordinary pread/pwrite shape on top of that:

- memory comes from a page-aligned buffer (an anonymous mmap), one per thread, grown
  as needed and reused, so a request costs one copy and no allocation;
- a read of an unaligned range reads the whole sectors around it and keeps the part
  asked for;
- a write of an unaligned range reads the partial first and last sectors, lays the
  new bytes over them and writes whole sectors back: a read-modify-write on this node.
  Two nodes doing that to one sector at the same moment would race, as on any shared
  disk; csvfs never lets two nodes share a metadata sector (node slots are one sector
  each, and only the coordinator writes the journal, checkpoints and events), and
  applications that write one file from several nodes at once align their writes or
  take a cluster-wide byte-range lock.

O_DIRECT does not make a write durable: the device may still hold it in its cache, so
fdatasync stays where it was.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import threading

_BLKSSZGET = 0x1268  # the logical sector size of a block device
_PROBE_SIZES = (512, 4096)


class DirectIOUnsupported(OSError):
    """The file system holding the image refuses O_DIRECT."""


def sector_size(fd: int) -> int:
    """The alignment O_DIRECT asks of this open image: the logical sector size of a
    block device, or for a file the smallest size its file system accepts."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        return struct.unpack("i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
    for size in _PROBE_SIZES:
        buffer = mmap.mmap(-1, size)
        try:
            os.preadv(fd, [buffer], 0)
            return size
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        finally:
            buffer.close()
    raise DirectIOUnsupported(errno.EINVAL, "no sector size works with O_DIRECT")


def enable(fd: int) -> SectorIO:
    """Switch an open image to O_DIRECT; the SectorIO to read and write it with."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError as exc:
        raise DirectIOUnsupported(exc.errno, exc.strerror) from None
    return SectorIO(fd, sector_size(fd))


class _Buffers(threading.local):
    """One page-aligned scratch buffer per thread (the data path is one thread; the
    backup reads from worker threads)."""

    def __init__(self):
        self.buffer = mmap.mmap(-1, mmap.PAGESIZE)

    def get(self, size: int) -> memoryview:
        if len(self.buffer) < size:
            # Not closed: a view of it may still be alive; it goes with its last one.
            self.buffer = mmap.mmap(-1, 1 << (size - 1).bit_length())
        return memoryview(self.buffer)[:size]


class SectorIO:
    """pread and pwrite on an image opened with O_DIRECT, at any offset and length."""

    def __init__(self, fd: int, sector: int):
        self.fd = fd
        self.sector = sector
        self._buffers = _Buffers()

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """The whole sectors that hold [offset, offset + length)."""
        start = offset - offset % self.sector
        end = -(-(offset + length) // self.sector) * self.sector
        return start, end

    def pread(self, length: int, offset: int) -> bytes:
        """Like os.pread: fewer bytes at the end of the image."""
        start, end = self._span(offset, length)
        view = self._buffers.get(end - start)
        try:
            got = os.preadv(self.fd, [view], start)
            skip = offset - start
            return bytes(view[skip : max(skip, min(got, skip + length))])
        finally:
            view.release()

    def pwrite(self, data, offset: int, flags: int = 0) -> int:
        """Write all of data at offset (reading the partial sectors at its ends first);
        flags as pwritev2's (os.RWF_DSYNC)."""
        length = len(data)
        start, end = self._span(offset, length)
        view = self._buffers.get(end - start)
        try:
            if offset != start:
                self._fill(view[: self.sector], start)
            if offset + length != end and (end - start > self.sector or offset == start):
                self._fill(view[-self.sector :], end - self.sector)
            view[offset - start : offset - start + length] = data
            self._write_all(view, start, flags)
        finally:
            view.release()
        return length

    def _fill(self, view: memoryview, position: int) -> None:
        """Read one sector into view; past the end of the image it reads as zeros."""
        got = os.preadv(self.fd, [view], position)
        view[got:] = bytes(len(view) - got)

    def _write_all(self, view: memoryview, position: int, flags: int = 0) -> None:
        while view:
            written = os.pwritev(self.fd, [view], position, flags)
            if written <= 0:
                raise OSError(errno.EIO, "the device took no bytes of an O_DIRECT write")
            view, position = view[written:], position + written
