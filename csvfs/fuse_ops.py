"""FUSE operations: translate kernel requests into coordinator calls and data-path I/O.

Every handler runs under `_errors` (read and write inline the same guard, to
keep the hot path short), because any exception other than FUSEError would
kill the mount. Metadata goes to the coordinator through
`meta(method, **args)`; file data goes through the DataPath.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable

import pyfuse3

from csvfs import syncs
from csvfs.callers import may_open, setid_killer
from csvfs.cluster.errors import MetaError
from csvfs.datapath import DataPath, OpenFile, map_fields
from csvfs.kernel_cache import DIR_ATTR_TIMEOUT, KernelCache
from csvfs.locks import NodeLocks
from csvfs.quiesce import FileGates

log = logging.getLogger(__name__)

RENAME_EXCHANGE = 2  # renameat2(2): both names stay

# Other nodes change metadata behind this kernel's back, and a change must show on
# every node the moment it returns. So the kernel caches no names of files and no
# attributes of files: every lookup and stat of a file asks the coordinator. File
# data is never cached either (direct_io), nor are directory listings. What a path
# walk needs at every step, the names and attributes of directories, is cached: the
# coordinator makes every other node drop them when they change, and waits for that
# where it matters (a directory renamed or removed, or its mode, owner or times set).
ENTRY_TIMEOUT = 0
ATTR_TIMEOUT = 0
DIR_ENTRY_TIMEOUT = 1.0  # DIR_ATTR_TIMEOUT too (csvfs/kernel_cache.py)
# Attributes of a file open on this node may be cached too: the coordinator makes
# this node drop them (and waits for it) whenever another node changes them.
OPEN_FILE_ATTR_TIMEOUT = 1.0

# pyfuse3 logs an error whenever the kernel refuses a reply. For a release that is no
# error. The kernel sends RELEASE and RELEASEDIR in the background: the process that
# closed the file does not wait for them. It refuses their reply (ENOENT) only once it
# has torn the connection down (an unmount, lazy ones included once nothing holds the
# mount any more, or an abort) and ended the request itself; the release was done all
# the same. A node that is unmounted while its release waits for the coordinator (a
# failover, say) answers too late in just that way.
_REFUSED_RELEASE_REPLIES = frozenset(
    f"{handler}(): fuse_reply_* failed with {os.strerror(errno.ENOENT)}"
    for handler in ("fuse_release", "fuse_releasedir"))


class _RefusedReleaseReplies(logging.Filter):
    """On the pyfuse3 logger: that error about a release becomes a debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        message = record.getMessage()
        if message not in _REFUSED_RELEASE_REPLIES:
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        record.msg, record.args = f"{message}: the connection is gone, the kernel ended it", ()
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


REFUSED_RELEASE_REPLIES = _RefusedReleaseReplies()  # for the pyfuse3 logger


def _io_error(what: str, exc: OSError) -> pyfuse3.FUSEError:
    log.error("%s: I/O error on the image: %s", what, exc)
    return pyfuse3.FUSEError(exc.errno or errno.EIO)


def _errors(handler):
    @functools.wraps(handler)
    async def guarded(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except MetaError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise _io_error(handler.__name__, exc) from None
        except Exception:
            log.exception("%s failed unexpectedly", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


class _Handle:
    __slots__ = ("file", "ino")

    def __init__(self, ino: int, file: OpenFile | None):
        self.ino = ino
        self.file = file


class CsvfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, datapath: DataPath, gates: FileGates, meta,
                 forget_later: Callable[[list[int]], None], locks: NodeLocks | None = None):
        """`meta(method, **args)` is a metadata request to the coordinator;
        `forget_later(inos)` drops kernel attributes soon, outside the handler;
        `locks` serves the lock handlers the FUSE shim adds (csvfs/locks.py)."""
        super().__init__()
        self.locks = locks
        self.data = datapath
        self.gates = gates
        self.meta = meta
        self.forget_later = forget_later
        self._handles: dict[int, _Handle] = {}
        self._files: dict[int, OpenFile] = {}  # fh -> data-path state, regular files only
        self._dir_listings: dict[int, list] = {}
        self._setid_killers: dict[int, list[int]] = {}  # fh -> groups, until its first write
        self._appending: set[int] = set()  # fh opened with O_APPEND
        self._next_fh = 1
        self.cache = KernelCache(lambda: time.monotonic() <= datapath.valid_until)
        self.listings = self.cache.listings

    def drop_stale(self, stale: dict) -> None:
        """The coordinator says what other nodes changed, or this node let a file go:
        drop it (the node then tells the kernel)."""
        self.cache.dropped(stale)

    async def _ask(self, method: str, **args):
        """meta(), and whether what comes back may be cached."""
        mark = self.cache.mark()
        reply = await self.meta(method, **args)
        return reply, self.cache.cacheable(mark, reply)

    # -- attributes -------------------------------------------------------------------

    def _entry(self, attrs: dict, cacheable: bool = False) -> pyfuse3.EntryAttributes:
        """The kernel's view of attrs; `cacheable` if no invalidation raced the reply."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attrs["ino"]
        entry.generation = 0
        if stat.S_ISDIR(attrs["mode"]) and cacheable:
            entry.entry_timeout, entry.attr_timeout = DIR_ENTRY_TIMEOUT, DIR_ATTR_TIMEOUT
            self.cache.remember_dir(attrs)
        elif cacheable and attrs["ino"] in self.data.files:
            entry.entry_timeout, entry.attr_timeout = ENTRY_TIMEOUT, OPEN_FILE_ATTR_TIMEOUT
        else:
            entry.entry_timeout, entry.attr_timeout = ENTRY_TIMEOUT, ATTR_TIMEOUT
        entry.st_mode = attrs["mode"]
        entry.st_nlink = attrs["nlink"]
        entry.st_uid = attrs["uid"]
        entry.st_gid = attrs["gid"]
        entry.st_rdev = attrs["rdev"]
        entry.st_blksize = 4096
        entry.st_blocks = attrs["blocks"]
        entry.st_atime_ns = attrs["atime_ns"]
        entry.st_mtime_ns = attrs["mtime_ns"]
        entry.st_ctime_ns = attrs["ctime_ns"]
        entry.st_size = attrs["size"]
        handle = self.data.files.get(attrs["ino"])
        # this node's writes, unless an explicit time set since supersedes them
        written = handle.dirty_mtime if handle is not None else 0
        if written > max(entry.st_mtime_ns, attrs.get("mtime_set_ns", 0)):
            entry.st_mtime_ns = entry.st_ctime_ns = written
        return entry

    @_errors
    async def getattr(self, inode, ctx=None):
        cached = self.cache.dir_attrs_left(inode)
        if cached is not None and (left := cached[1]) > 0.01:
            entry = self._entry(cached[0])  # for no longer than the copy is good
            entry.entry_timeout, entry.attr_timeout = DIR_ENTRY_TIMEOUT, left
            return entry
        return self._entry(*await self._ask("getattr", ino=inode))

    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        """A name not in a listing this node holds needs no round trip; otherwise the
        coordinator answers, and lends the listing if the name is not there."""
        if self.listings.absent(parent_inode, name):
            raise pyfuse3.FUSEError(errno.ENOENT)
        changes = self.listings.changes
        reply, cacheable = await self._ask("lookup", parent=parent_inode, name=name,
                                           lease=self.listings.wanted(parent_inode))
        if reply.get("absent"):
            if cacheable:  # no invalidation crossed it: the listing is current
                self.listings.take(parent_inode, reply["names"], changes)
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(reply, cacheable)

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        changes = {}
        if fields.update_size:
            await self._flush_mtime(inode)
            changes["size"] = attr.st_size
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
            handle = self.data.files.get(inode)
            if handle is not None:
                handle.dirty_mtime = 0  # an explicit time wins over earlier writes
        if fields.update_ctime:
            changes["ctime_ns"] = attr.st_ctime_ns
        return self._entry(*await self._ask("setattr", ino=inode, changes=changes))

    async def _flush_mtime(self, inode: int) -> None:
        """Send the time of this node's last write to the coordinator."""
        handle = self.data.files.get(inode)
        if handle is None or not handle.dirty_mtime:
            return
        mtime, handle.dirty_mtime = handle.dirty_mtime, 0
        await self.meta("setattr", ino=inode, changes={"mtime_ns": mtime, "ctime_ns": mtime,
                                                       "written": True})

    # -- namespace --------------------------------------------------------------------

    async def _make(self, parent, name, mode, ctx, rdev=0, target=b""):
        attrs, cacheable = await self._made((parent, name), "mknod", parent=parent, name=name,
                                            mode=mode, uid=ctx.uid, gid=ctx.gid, rdev=rdev,
                                            target=target)
        self.cache.remember_dirs(attrs, cacheable)
        return self._entry(attrs, cacheable)

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return await self._make(parent_inode, name, mode, ctx, rdev=rdev)

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return await self._make(parent_inode, name, (mode & 0o7777) | 0o040000, ctx)

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return await self._make(parent_inode, name, 0o120777, ctx, target=target)

    @_errors
    async def readlink(self, inode, ctx):
        return await self.meta("readlink", ino=inode)

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        attrs, cacheable = await self._made((new_parent_inode, new_name), "link", ino=inode,
                                            parent=new_parent_inode, name=new_name)
        self.cache.remember_dirs(attrs, cacheable)
        return self._entry(attrs)

    async def _made(self, made: tuple[int, bytes], method: str, **args):
        """_ask for a change that makes the name `made` (parent, name): the listing this
        node holds of the parent has it now. EEXIST means that listing was not
        current: drop it."""
        try:
            reply = await self._ask(method, **args)
        except MetaError as exc:
            if exc.errno == errno.EEXIST:
                self.listings.drop([made[0]])
            raise
        self.listings.added(*made)
        return reply

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        self.cache.remember_dirs(*await self._ask("unlink", parent=parent_inode, name=name,
                                             is_dir=False))
        self.listings.removed(parent_inode, name)

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        self.cache.remember_dirs(*await self._ask("unlink", parent=parent_inode, name=name,
                                             is_dir=True))
        self.listings.removed(parent_inode, name)

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.cache.remember_dirs(*await self._ask(
            "rename", old_parent=parent_inode_old, old_name=name_old,
            new_parent=parent_inode_new, new_name=name_new, flags=flags))
        if not flags & RENAME_EXCHANGE:
            self.listings.removed(parent_inode_old, name_old)
        self.listings.added(parent_inode_new, name_new)

    # -- directories ------------------------------------------------------------------

    @_errors
    async def opendir(self, inode, ctx):
        listing = await self.meta("readdir", ino=inode)
        fh = self._new_fh()
        self._dir_listings[fh] = listing
        return fh

    @_errors
    async def readdir(self, fh, start_id, token):
        listing = self._dir_listings.get(fh, [])
        for index in range(start_id, len(listing)):
            name, attrs = listing[index]
            # not cached: the listing may be older than an invalidation since
            if not pyfuse3.readdir_reply(token, name, self._entry(attrs), index + 1):
                break

    @_errors
    async def releasedir(self, fh):
        self._dir_listings.pop(fh, None)

    @_errors
    async def fsyncdir(self, fh, datasync):
        await self.meta("sync")

    # -- files ------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def _open_handle(self, ino: int, setid_killer: list[int] | None, flags: int) -> int:
        async with self.gates.opening(ino):
            reply = await self.meta("open", ino=ino)
            return self._new_handle(reply, setid_killer, flags)

    def _new_handle(self, reply: dict, setid_killer: list[int] | None, flags: int) -> int:
        """A file handle for the reply of an open or a create."""
        attrs = reply["attrs"]
        ino = attrs["ino"]
        handle = None
        if attrs["mode"] & 0o170000 == 0o100000:
            handle = self.gates.opened(ino, attrs["size"], reply["runs"], reply["version"],
                                       reply.get("granule"), reply.get("ask"),
                                       bool(reply.get("stripes")))
        fh = self._new_fh()
        self._handles[fh] = _Handle(ino, handle)
        if handle is not None:
            self._files[fh] = handle
            if setid_killer is not None:
                self._setid_killers[fh] = setid_killer
            if flags & os.O_APPEND:
                self._appending.add(fh)
            # The fast lane takes its writes once they need nothing from Python.
            self.data.lane.handle(fh, ino, setid_killer is None and not flags & os.O_APPEND)
        return fh

    @staticmethod
    def _writer_setid_killer(flags: int, ctx) -> list[int] | None:
        """setid_killer for an open that may write or truncate, else None."""
        return setid_killer(ctx) if flags & (os.O_ACCMODE | os.O_TRUNC) else None

    @_errors
    async def open(self, inode, flags, ctx):
        killer = self._writer_setid_killer(flags, ctx)
        if flags & os.O_TRUNC:
            # libfuse turns on atomic_o_trunc, so the kernel leaves O_TRUNC to us
            await self._flush_mtime(inode)
            await self.meta("setattr", ino=inode, changes={"size": 0})
            if killer is not None:  # as truncate(2) would; the kernel skips it for us
                await self.meta("kill_setid", ino=inode, groups=killer)
        fh = await self._open_handle(inode, killer, flags)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        # A brand-new file has no units: a pause or map pushed before this reply is
        # processed has nothing stale to protect, so no gates.opening() is needed here.
        try:
            reply, cacheable = await self._made((parent_inode, name), "create",
                                                parent=parent_inode, name=name, mode=mode,
                                                uid=ctx.uid, gid=ctx.gid)
        except MetaError as exc:
            if exc.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            # Another node made the name since the kernel looked: open(O_CREAT) without
            # O_EXCL opens what is there, as it would have on one node.
            return await self._open_existing(parent_inode, name, flags, ctx)
        self.cache.remember_dirs(reply, cacheable)
        fh = self._new_handle(reply, self._writer_setid_killer(flags, ctx), flags)
        return (pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False),
                self._entry(reply["attrs"], cacheable))

    async def _open_existing(self, parent_inode, name, flags, ctx):
        attrs, cacheable = await self._ask("lookup", parent=parent_inode, name=name)
        if stat.S_ISDIR(attrs["mode"]):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not stat.S_ISREG(attrs["mode"]):
            raise pyfuse3.FUSEError(errno.EEXIST)
        if not may_open(attrs, flags, ctx):  # the kernel checked nothing: it was a create
            raise pyfuse3.FUSEError(errno.EACCES)
        info = await self.open(attrs["ino"], flags & ~os.O_CREAT, ctx)
        return info, self._entry(attrs, cacheable)

    # read and write are the hot path: no decorator layer, one dict lookup for the
    # handle, then the data path's synchronous fast path; coroutines only when slow.

    async def read(self, fh, off, size):
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            data = self.data.read_direct(handle, off, size)
            return data if data is not None else await self.data.read(handle, off, size)
        except OSError as exc:
            raise _io_error("read", exc) from None
        except Exception:  # a bug must not kill the mount
            log.exception("read failed unexpectedly")
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def write(self, fh, off, buf):
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            if self._setid_killers and fh in self._setid_killers:  # first write only
                await self.meta("kill_setid", ino=handle.ino, groups=self._setid_killers.pop(fh))
                self.data.lane.handle(fh, handle.ino, fh not in self._appending)
            if self._appending and fh in self._appending:
                return await self._append(handle, buf)
            if self.data.write_direct(handle, off, buf):
                return len(buf)
            return await self.data.write(handle, off, buf)
        except MetaError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise _io_error("write", exc) from None
        except Exception:  # a bug must not kill the mount
            log.exception("write failed unexpectedly")
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _append(self, handle: OpenFile, data: bytes) -> int:
        """O_APPEND: the kernel's offset is its idea of the end, which another node may
        have moved; the coordinator writes at the real end (coordinator/allocation.py)."""
        handle.dirty_mtime = 0  # the append's own time is later than any write before it
        handle.coordinator_wrote = True
        reply = await self.meta("append", ino=handle.ino, data=bytes(data))
        self.data.update_map(handle.ino, *map_fields(reply))
        return len(data)

    @_errors
    async def flush(self, fh):
        handle = self._handles.get(fh)
        if handle is not None:
            await self._flush_mtime(handle.ino)

    @_errors
    async def fsync(self, fh, datasync):
        handle = self._handles.get(fh)
        ino, file = (handle.ino, handle.file) if handle is not None else (None, None)
        await syncs.fsync(self.data, self.meta, ino, file, datasync)

    @_errors
    async def release(self, fh):
        if self.locks is not None:  # the OFD and flock locks of this open file go
            await self.locks.released(fh)
        handle = self._handles.pop(fh, None)
        self.data.lane.drop_handle(fh)
        self._files.pop(fh, None)
        self._setid_killers.pop(fh, None)
        self._appending.discard(fh)
        if handle is None:
            return
        if handle.file is not None:
            await self._flush_mtime(handle.ino)
        try:
            # The handle counts in what this node registers until the coordinator has
            # released it: if the node registers anew meanwhile (a failover while this
            # waits), the retried release takes it off there once, not twice.
            await self.meta("release", ino=handle.ino)
        finally:
            if handle.file is not None and self.data.closed(handle.file):
                # No more changes come to this node for it: the kernel must forget its
                # attributes, and a reply on its way must not be cached either.
                self.cache.released(handle.ino)
                self.forget_later([handle.ino])

    async def fallocate(self, inode, mode, offset, length, fh):
        """Called through the FUSE shim (pyfuse3 has no fallocate handler)."""
        try:
            reply = await self.meta("fallocate", ino=inode, mode=mode, offset=offset,
                                    length=length)
        except MetaError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        self.data.update_map(inode, *map_fields(reply))

    # -- locks: called through the FUSE shim (pyfuse3 has no lock handlers) ------------------

    @_errors
    async def setlk(self, inode, fh, owner, kind, type, start, end, pid, wait):
        await self.locks.setlk(inode, fh, owner, kind, type, start, end, pid, wait)

    @_errors
    async def getlk(self, inode, fh, owner, type, start, end, pid):
        return await self.locks.getlk(inode, owner, type, start, end)

    @_errors
    async def flush_locks(self, inode, fh, lock_owner):
        """flush() with the lock owner pyfuse3 does not pass: a close of any descriptor
        of a file releases the closing process's POSIX locks on it."""
        await self.locks.flushed(inode, lock_owner)
        await self.flush(fh)

    # -- xattrs and the volume ---------------------------------------------------------------

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        await self.meta("setxattr", ino=inode, name=name, value=value)

    @_errors
    async def getxattr(self, inode, name, ctx):
        try:
            return await self.meta("getxattr", ino=inode, name=name)
        except MetaError as exc:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR if exc.errno == errno.ENODATA
                                    else exc.errno) from None

    @_errors
    async def listxattr(self, inode, ctx):
        return await self.meta("listxattr", ino=inode)

    @_errors
    async def removexattr(self, inode, name, ctx):
        try:
            await self.meta("removexattr", ino=inode, name=name)
        except MetaError as exc:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR if exc.errno == errno.ENODATA
                                    else exc.errno) from None

    @_errors
    async def statfs(self, ctx):
        info = await self.meta("statfs")
        result = pyfuse3.StatvfsData()
        result.f_bsize = info["block_size"]  # 4 KiB blocks, as small files take space
        result.f_frsize = info["block_size"]
        result.f_blocks = info["blocks"]
        result.f_bfree = info["free_blocks"]
        result.f_bavail = info["free_blocks"]
        result.f_files = info["files"] + info["free_blocks"]  # a small file takes a block
        result.f_ffree = info["free_blocks"]
        result.f_favail = result.f_ffree
        result.f_namemax = info["name_max"]
        return result
