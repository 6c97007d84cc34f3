#!/usr/bin/env python3
"""Minimal pass-through FUSE filesystem (pyfuse3 + trio): the baseline for `make bench`.

Usage: python scripts/passthrough.py SOURCE_DIR MOUNTPOINT

Runs in the foreground and forwards every request to SOURCE_DIR. Files are opened with
direct_io (like csvfs) and read/write are plain os.pread/os.pwrite on the backing fd,
made inline in the handler without worker threads, so what this measures is the cost of
the kernel FUSE round trip plus pyfuse3 and trio. Only what a benchmark needs is
implemented: no mkdir, rename, links or xattrs. SIGTERM/SIGINT unmount cleanly.
"""

import argparse
import errno
import functools
import logging
import os
import signal
import stat
import sys
from dataclasses import dataclass

import pyfuse3
import trio

TIMEOUT = 1.0  # entry and attribute cache timeout, seconds
MOUNT_OPTIONS = ["fsname=passthrough", "default_permissions", "allow_other"]


def forward_errors(method):
    """Report OSError as FUSEError: any other exception would end the pyfuse3 main loop."""

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    return wrapper


@dataclass
class Node:
    path: str  # backing path
    key: tuple[int, int]  # (st_dev, st_ino) of the backing file
    lookups: int = 0  # kernel lookup count


class PassthroughFS(pyfuse3.Operations):
    def __init__(self, source: str):
        super().__init__()
        self.source = source
        st = os.lstat(source)
        root_key = (st.st_dev, st.st_ino)
        self.nodes = {pyfuse3.ROOT_INODE: Node(source, root_key)}
        self.by_key = {root_key: pyfuse3.ROOT_INODE}
        self.next_inode = pyfuse3.ROOT_INODE + 1

    def path_of(self, inode: int) -> str:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node.path

    def child_path(self, parent_inode: int, name: bytes) -> str:
        return os.path.join(self.path_of(parent_inode), os.fsdecode(name))

    def entry(self, path: str, count: bool) -> pyfuse3.EntryAttributes:
        """Stat a backing path and map it to our inode; count=True adds a kernel lookup."""
        st = os.lstat(path)
        key = (st.st_dev, st.st_ino)
        inode = self.by_key.get(key)
        if inode is None:
            inode = self.next_inode
            self.next_inode += 1
            self.by_key[key] = inode
            self.nodes[inode] = Node(path, key)
        node = self.nodes[inode]
        node.path = path
        if count:
            node.lookups += 1

        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    # --- inodes -------------------------------------------------------------------------

    @forward_errors
    async def lookup(self, parent_inode, name, ctx):
        return self.entry(self.child_path(parent_inode, name), count=True)

    async def forget(self, inode_list):
        for inode, nlookup in inode_list:
            node = self.nodes.get(inode)
            if node is None or inode == pyfuse3.ROOT_INODE:
                continue
            node.lookups -= nlookup
            if node.lookups <= 0:
                del self.nodes[inode]
                if self.by_key.get(node.key) == inode:
                    del self.by_key[node.key]

    @forward_errors
    async def getattr(self, inode, ctx):
        return self.entry(self.path_of(inode), count=False)

    @forward_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self.path_of(inode)
        if fields.update_size:
            os.truncate(fh if fh is not None else path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime))
        return self.entry(path, count=False)

    @forward_errors
    async def unlink(self, parent_inode, name, ctx):
        path = self.child_path(parent_inode, name)
        st = os.lstat(path)
        os.unlink(path)
        if st.st_nlink <= 1:
            # The backing inode number may be reused by a new file: don't map it to the
            # inode the kernel may still hold for the deleted one.
            self.by_key.pop((st.st_dev, st.st_ino), None)

    @forward_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        """Plain rename of files, enough for the metadata-latency baseline."""
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = (self.child_path(parent_inode_old, name_old),
                    self.child_path(parent_inode_new, name_new))
        os.rename(old, new)
        self.entry(new, count=False)  # the moved inode now lives at the new path

    # --- files --------------------------------------------------------------------------

    @forward_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self.child_path(parent_inode, name)
        fd = os.open(path, flags | os.O_CREAT, stat.S_IMODE(mode))
        try:
            attr = self.entry(path, count=True)
        except BaseException:
            os.close(fd)
            raise
        return pyfuse3.FileInfo(fh=fd, direct_io=True), attr

    @forward_errors
    async def open(self, inode, flags, ctx):
        fd = os.open(self.path_of(inode), flags & ~os.O_CREAT)
        return pyfuse3.FileInfo(fh=fd, direct_io=True)

    @forward_errors
    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    @forward_errors
    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        pass  # nothing is buffered here

    @forward_errors
    async def fsync(self, fh, datasync):
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    @forward_errors
    async def release(self, fh):
        os.close(fh)

    # --- directories and file system ---------------------------------------------------

    @forward_errors
    async def opendir(self, inode, ctx):
        path = self.path_of(inode)
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @forward_errors
    async def readdir(self, fh, start_id, token):
        path = self.path_of(fh)
        names = sorted(os.listdir(path))
        for index in range(start_id, len(names)):
            try:
                attr = self.entry(os.path.join(path, names[index]), count=False)
            except FileNotFoundError:
                continue  # removed while listing
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), attr, index + 1):
                break
            self.nodes[attr.st_ino].lookups += 1  # readdirplus counts as a lookup

    async def releasedir(self, fh):
        pass

    @forward_errors
    async def statfs(self, ctx):
        st = os.statvfs(self.source)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(data, name, getattr(st, name))
        return data


async def serve(pending_signals: list[int]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        if pending_signals:
            return  # asked to stop while mounting
        async with trio.open_nursery() as nursery:

            async def stop_on_signal():
                async for _ in signals:
                    pyfuse3.terminate()
                    return

            nursery.start_soon(stop_on_signal)
            await pyfuse3.main()  # returns on terminate() or an external unmount
            nursery.cancel_scope.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="directory to forward to")
    parser.add_argument("mountpoint", help="where to mount")
    args = parser.parse_args()
    if not os.path.isdir(args.source):
        parser.error(f"not a directory: {args.source}")
    if not os.path.isdir(args.mountpoint):
        parser.error(f"not a directory: {args.mountpoint}")
    logging.basicConfig(level=logging.WARNING, format="passthrough: %(message)s")

    # Until trio's signal receiver is installed, remember signals instead of dying with
    # the filesystem still mounted.
    pending: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: pending.append(signum))

    fs = PassthroughFS(os.path.abspath(args.source))
    try:
        pyfuse3.init(fs, args.mountpoint, MOUNT_OPTIONS)
    except RuntimeError as exc:
        print(f"passthrough: cannot mount {args.mountpoint}: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(serve, pending)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
