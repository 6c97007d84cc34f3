"""A one-file in-memory pyfuse3 filesystem used by test_fuse_shim.py.

Run from the repository root as
``python -m tests.shim_fs MOUNTPOINT RECORD_FILE [--no-shim] [--no-handler]``.
Every fallocate call the handler sees is appended to RECORD_FILE as a JSON line.
RECORD_FILE.tick has its mtime set every TICK seconds from the trio loop, so a
test can tell whether the loop still runs; RECORD_FILE.victim names the process
that a read at WITHDRAW_OFFSET kills (see OneFileFs.read).
"""

import errno
import json
import logging
import os
import select
import signal
import stat
import sys
import time
from pathlib import Path

from csvfs import fuse_shim
from scripts.nodes import fds_open_on, pid_alive

# Must happen before pyfuse3 is imported; that is the whole point of the shim.
SHIM_LOADED = "--no-shim" not in sys.argv and fuse_shim.load()

import pyfuse3  # noqa: E402
import trio  # noqa: E402

FILE_NAME = b"data"
FILE_INODE = pyfuse3.ROOT_INODE + 1
FIRST_FH = 42
MAX_SIZE = 1 << 30  # larger allocations fail with ENOSPC
BOOM_OFFSET = 13  # KEEP_SIZE at this offset raises a plain exception (-> EIO)
SLOW_OFFSET = 777  # the handler sleeps here, to show the loop keeps serving
WITHDRAW_OFFSET = 1 << 20  # a read here gets a request withdrawn under the reader
TICK = 0.02

KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
ZERO_RANGE = 0x10


class OneFileFs(pyfuse3.Operations):
    def __init__(self, record_path: str) -> None:
        super().__init__()
        self.data = bytearray()
        self.record_path = record_path
        self.next_fh = FIRST_FH
        self.victim_requests = 0

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        # Zero timeouts: every stat() asks us, so st_size shows our state,
        # not the kernel's guess.
        attr.entry_timeout = 0
        attr.attr_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_nlink = 1
            attr.st_size = len(self.data)
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.st_blksize = 4096
        attr.st_blocks = (attr.st_size + 511) // 512
        return attr

    def _count(self, ctx) -> None:
        victim = Path(self.record_path + ".victim")
        if ctx is not None and victim.exists() and str(ctx.pid) == victim.read_text():
            self.victim_requests += 1

    async def getattr(self, inode, ctx=None):
        self._count(ctx)
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        self._count(ctx)
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attr(FILE_INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        self.next_fh += 1
        return pyfuse3.FileInfo(fh=self.next_fh - 1)

    async def read(self, fh, off, size):
        if off == WITHDRAW_OFFSET:
            await self._withdraw_a_request()
        return bytes(self.data[off : off + size])

    async def _withdraw_a_request(self) -> None:
        """Make the kernel drop a request after trio saw /dev/fuse readable and before
        pyfuse3 read it, as when a caller is killed while its node is busy.

        The victim stats the file in a loop. Blocking the loop lets its next request
        queue up; once pyfuse3's reader waits for the device, the checkpoint lets trio
        poll, see it readable and wake the reader. If we run before the reader (trio
        orders each batch at random), the victim is killed now, and its request
        leaves the queue unread.
        """
        victim = int(Path(self.record_path + ".victim").read_text())
        device = select.poll()
        device.register(_fuse_fd(), select.POLLIN)
        while self.victim_requests < 10:  # the victim is under way
            await trio.sleep(0.01)
        for _ in range(500):
            await trio.sleep(0.002)
            served = self.victim_requests
            time.sleep(0.01)
            reader_waits = trio.lowlevel.current_statistics().io_statistics.tasks_waiting_read
            if not (reader_waits and device.poll(0)):
                continue  # trio would not wake the reader at the checkpoint
            await trio.sleep(0)
            if self.victim_requests == served:
                os.kill(victim, signal.SIGKILL)
                _wait_dead(victim)
                return
        raise pyfuse3.FUSEError(errno.ETIMEDOUT)

    async def write(self, fh, off, buf):
        self._grow(off + len(buf))
        self.data[off : off + len(buf)] = buf
        return len(buf)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            del self.data[attr.st_size :]
            self._grow(attr.st_size)
        return self._attr(inode)

    def _grow(self, size: int) -> None:
        if size > len(self.data):
            self.data.extend(bytes(size - len(self.data)))

    async def fallocate(self, inode, mode, offset, length, fh):
        with open(self.record_path, "a") as f:
            record = {"inode": inode, "mode": mode, "offset": offset, "length": length, "fh": fh}
            f.write(json.dumps(record) + "\n")
        if offset == SLOW_OFFSET:
            await trio.sleep(2)
        if mode == KEEP_SIZE and offset == BOOM_OFFSET:
            raise RuntimeError("injected handler bug")
        end = offset + length
        if end > MAX_SIZE:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if mode & (PUNCH_HOLE | ZERO_RANGE):
            stop = min(end, len(self.data))
            self.data[offset:stop] = bytes(max(0, stop - offset))
        if not mode & KEEP_SIZE:
            self._grow(end)


def _fuse_fd() -> int:
    fds = fds_open_on("self", "/dev/fuse")
    if not fds:
        raise pyfuse3.FUSEError(errno.EBADF)
    return fds[0]


def _wait_dead(pid: int) -> None:
    """Until the process has exited (a zombie or gone): blocking, on purpose."""
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.001)


async def serve(tick_path: Path) -> None:
    """pyfuse3's loop, and a ticker beside it that shows the loop is alive."""
    tick_path.touch()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_tick, tick_path)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _tick(tick_path: Path) -> None:
    while True:
        os.utime(tick_path)
        await trio.sleep(TICK)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    mountpoint, record_path = sys.argv[1], sys.argv[2]
    fs = OneFileFs(record_path)
    if "--no-handler" not in sys.argv:
        fuse_shim.set_handler("fallocate", fs.fallocate)
    pyfuse3.init(fs, mountpoint, {"fsname=csvfs_fallocate_test"})
    logging.info("shim loaded=%s active=%s", SHIM_LOADED, fuse_shim.active())
    try:
        trio.run(serve, Path(record_path + ".tick"))
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
