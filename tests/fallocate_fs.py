"""A one-file in-memory pyfuse3 filesystem used by test_fuse_fallocate.py.

Run as ``python fallocate_fs.py MOUNTPOINT RECORD_FILE [--no-shim] [--no-handler]``.
Every fallocate call the handler sees is appended to RECORD_FILE as a JSON line.
"""

import errno
import json
import logging
import os
import stat
import sys

from csvfs import fuse_fallocate

# Must happen before pyfuse3 is imported; that is the whole point of the shim.
SHIM_LOADED = "--no-shim" not in sys.argv and fuse_fallocate.load()

import pyfuse3  # noqa: E402
import trio  # noqa: E402

FILE_NAME = b"data"
FILE_INODE = pyfuse3.ROOT_INODE + 1
FIRST_FH = 42
MAX_SIZE = 1 << 30  # larger allocations fail with ENOSPC
BOOM_OFFSET = 13  # KEEP_SIZE at this offset raises a plain exception (-> EIO)
SLOW_OFFSET = 777  # the handler sleeps here, to show the loop keeps serving

KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
ZERO_RANGE = 0x10


class OneFileFs(pyfuse3.Operations):
    def __init__(self, record_path: str) -> None:
        super().__init__()
        self.data = bytearray()
        self.record_path = record_path
        self.next_fh = FIRST_FH

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

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
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
        return bytes(self.data[off : off + size])

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


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    mountpoint, record_path = sys.argv[1], sys.argv[2]
    fs = OneFileFs(record_path)
    if "--no-handler" not in sys.argv:
        fuse_fallocate.set_handler(fs.fallocate)
    pyfuse3.init(fs, mountpoint, {"fsname=csvfs_fallocate_test"})
    logging.info("shim loaded=%s active=%s", SHIM_LOADED, fuse_fallocate.active())
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
