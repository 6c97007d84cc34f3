"""`csvfs backup mount`: one backup's files, read-only through FUSE, so that a file
can be found, compared or copied out without restoring anything (like `restic
mount` or `borg mount`).

The manifest is read once at mount and turned into an inode table held in memory:

- a volume backup shows its tree as it was: directories, files, symlinks, fifos,
  devices and sockets, with their modes, owners, times and xattrs; the names of one
  source inode (hard links) share one inode here, their link count counted;
- a VM backup has no tree, only files: their directories are made up from their
  paths (mode 0555, owned by whoever mounts, with the backup's time).

A read maps its byte range to the file's chunk references (slice_refs, a bisect),
each all of a chunk or a slice of one; what no reference covers is a hole and reads
as zeros. Chunks are fetched with Repository.get_chunk on a worker thread, which
authenticates and re-hashes them, and the last few decoded ones are kept (an LRU),
since the kernel reads a file in pieces much smaller than a chunk. A chunk that is
corrupt, missing or too short for the bytes a read takes of it fails that read with
EIO and is logged once; the mount goes on serving everything else.

Nothing here ever changes, so the kernel may cache names, attributes and pages for
long (and negative lookups too). Every request that would write gets EROFS; the
mount is read-only besides ("ro"), so the kernel refuses most of them itself.

The mount runs in the foreground, on plain pyfuse3 under trio (without csvfs's C
shim: nothing here needs fallocate, locks or a withdrawn-request guard), until
SIGINT, SIGTERM, SIGHUP or `fusermount3 -u MOUNTPOINT`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from csvfs.backup.manifest import ChunkRef, file_chunks, slice_refs
from csvfs.backup.repository import (
    CorruptChunk,
    CorruptManifest,
    Repository,
    RepositoryCorrupt,
)
from csvfs.backup.restore_file import ChunkCache
from csvfs.volume.errors import MountpointError

log = logging.getLogger(__name__)

# A backup never changes: let the kernel keep what it learns for a long while.
ENTRY_TIMEOUT = ATTR_TIMEOUT = 60.0
CHUNK_CACHE = 32  # decoded chunks kept (32 MiB at the default chunk size)
MOUNT_OPTIONS = ("ro", "fsname=csvfs-backup", "default_permissions")
BLOCK_SIZE = 4096
NAME_MAX = 255
TYPES = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK,
         "fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "sock": stat.S_IFSOCK}
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(eq=False)
class Node:
    """One inode of the mounted backup."""

    ino: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    path: str  # its first name, for log lines
    size: int = 0
    rdev: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    nlink: int = 1
    chunks: list[ChunkRef] = field(default_factory=list)
    stored: int = 0  # bytes its chunks give it: less than its size where it has holes
    parent: int = pyfuse3.ROOT_INODE  # directories only, for ".."
    children: dict[bytes, int] = field(default_factory=dict)
    listing: list[tuple[bytes, int]] = field(default_factory=list)  # children, in order

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def set_chunks(self, chunks: list[ChunkRef]) -> None:
        self.chunks = chunks
        self.stored = sum(ref.length for ref in chunks)


# -- the inode table, from a manifest ------------------------------------------------------


class _Table:
    """Builds the inodes: the root first, then every name under a parent already there."""

    def __init__(self, root: Node):
        self.nodes: dict[int, Node] = {root.ino: root}
        self.by_path: dict[str, Node] = {"/": root}
        root.nlink, root.parent = 2, root.ino

    def new_ino(self) -> int:
        return pyfuse3.ROOT_INODE + len(self.nodes)

    def add(self, path: str, node: Node) -> None:
        """A new inode at path (its parent directory must be there)."""
        self.link(path, node)
        self.nodes[node.ino] = node
        if node.is_dir:
            node.nlink, node.parent = 2, self.by_path[_parent_of(path)].ino

    def link(self, path: str, node: Node) -> None:
        """One more name of node (a new node's first one, or a hard link)."""
        parent = self.by_path.get(_parent_of(path))
        name = os.fsencode(path.rpartition("/")[2])
        if parent is None or not parent.is_dir:
            raise CorruptManifest(f"{path}: its parent directory is not in the backup")
        if not name or len(name) > NAME_MAX or name in (b".", b"..") \
                or name in parent.children:
            raise CorruptManifest(f"{path}: not a valid new name")
        if node.ino in self.nodes:  # a further name: one more link
            node.nlink += 1
        if node.is_dir:
            parent.nlink += 1  # the child's ".."
        parent.children[name] = node.ino
        self.by_path[path] = node

    def finish(self) -> dict[int, Node]:
        for node in self.nodes.values():
            node.listing = list(node.children.items())
        return self.nodes


def _parent_of(path: str) -> str:
    return path.rpartition("/")[0] or "/"


def build_nodes(manifest: dict) -> dict[int, Node]:
    """The inode table of a backup, by inode number; CorruptManifest if it does not
    make one."""
    kind = manifest.get("kind")
    try:
        if kind == "volume":
            return _from_tree(manifest)
        if kind == "vm":
            return _from_files(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptManifest(f"backup {manifest.get('id')}: malformed manifest "
                              f"({type(exc).__name__}: {exc})") from None
    raise CorruptManifest(f"backup {manifest.get('id')} is of unknown kind {kind!r}")


def _from_tree(manifest: dict) -> dict[int, Node]:
    """A volume backup: its tree, the content of each file from its files entry."""
    contents = {entry["ino"]: entry for entry in manifest["files"]}
    tree = manifest["tree"]
    if not tree or tree[0]["path"] != "/" or tree[0]["type"] != "dir":
        raise CorruptManifest(f"backup {manifest['id']}: its tree does not start at /")
    table = _Table(_node(pyfuse3.ROOT_INODE, tree[0]))
    by_source = {tree[0]["ino"]: table.nodes[pyfuse3.ROOT_INODE]}
    for entry in tree[1:]:
        known = by_source.get(entry["ino"])
        if known is not None:
            if known.is_dir or entry["type"] == "dir":
                raise CorruptManifest(f"{entry['path']}: a second name of a directory")
            table.link(entry["path"], known)  # a hard link
            continue
        node = _node(table.new_ino(), entry)
        if entry["type"] == "file":
            _take_content(node, contents.get(entry["ino"]))
        table.add(entry["path"], node)
        by_source[entry["ino"]] = node
    return table.finish()


def _node(ino: int, entry: dict) -> Node:
    kind = TYPES.get(entry["type"])
    if kind is None:
        raise CorruptManifest(f"{entry['path']}: unknown type {entry['type']!r}")
    target = _bytes(entry.get("target", b""))
    return Node(ino=ino, mode=kind | stat.S_IMODE(entry["mode"]), uid=entry["uid"],
                gid=entry["gid"], atime_ns=entry["atime_ns"], mtime_ns=entry["mtime_ns"],
                ctime_ns=entry["ctime_ns"], path=entry["path"], rdev=entry.get("rdev", 0),
                target=target, size=len(target),
                xattrs={_bytes(name): _bytes(value) for name, value in entry.get("xattrs", ())})


def _take_content(node: Node, content: dict | None) -> None:
    if content is None:  # as a restore does: shown, but empty
        log.warning("%s: the backup holds no content for it; shown empty", node.path)
        return
    node.size = content["size"]
    node.set_chunks(file_chunks(content))


def _from_files(manifest: dict) -> dict[int, Node]:
    """A VM backup: its files, under directories made up from their paths."""
    t_ns = manifest["time_ns"]
    table = _Table(_made_up_dir(pyfuse3.ROOT_INODE, "/", t_ns))
    for entry in manifest["files"]:
        path = "/" + entry["path"].strip("/")
        _make_parents(table, path, t_ns)
        node = _node(table.new_ino(), dict(entry, path=path, type="file"))
        _take_content(node, entry)
        table.add(path, node)
    return table.finish()


def _made_up_dir(ino: int, path: str, t_ns: int) -> Node:
    # Directories exist only in this view, so they belong to whoever mounted it.
    return Node(ino=ino, mode=stat.S_IFDIR | 0o555, uid=os.getuid(), gid=os.getgid(),
                atime_ns=t_ns, mtime_ns=t_ns, ctime_ns=t_ns, path=path)


def _make_parents(table: _Table, path: str, t_ns: int) -> None:
    parts = path.strip("/").split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        directory = "/" + "/".join(parts[:depth])
        if directory not in table.by_path:
            table.add(directory, _made_up_dir(table.new_ino(), directory, t_ns))


def _bytes(value) -> bytes:
    """Names and values are bytes in a manifest; a str is taken as os takes it."""
    return os.fsencode(value) if isinstance(value, str) else bytes(value)


# -- the filesystem ------------------------------------------------------------------------


def _guarded(handler):
    """Any exception but FUSEError would end pyfuse3.main and with it the mount."""

    @functools.wraps(handler)
    async def guarded(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s failed unexpectedly", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


class BackupOperations(pyfuse3.Operations):
    """The read-only filesystem of one backup."""

    def __init__(self, repo: Repository, manifest: dict):
        super().__init__()
        self.repo = repo
        self.backup_id = manifest["id"]
        self.nodes = build_nodes(manifest)
        self.logical = sum(node.size for node in self.nodes.values() if stat.S_ISREG(node.mode))
        self._cache = ChunkCache(repo, CHUNK_CACHE)
        self._fetching: dict[bytes, trio.Event] = {}  # so that one thread decodes a chunk
        self._reported: set[bytes] = set()  # bad chunks already logged

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.ino
        entry.generation = 0
        entry.entry_timeout, entry.attr_timeout = ENTRY_TIMEOUT, ATTR_TIMEOUT
        entry.st_mode = node.mode
        entry.st_nlink = node.nlink
        entry.st_uid, entry.st_gid = node.uid, node.gid
        entry.st_rdev = node.rdev
        entry.st_size = node.size
        entry.st_blksize = BLOCK_SIZE
        # What the backup stores of the file: holes take nothing, as on a sparse file.
        entry.st_blocks = -(-node.stored // 512)
        entry.st_atime_ns, entry.st_mtime_ns = node.atime_ns, node.mtime_ns
        entry.st_ctime_ns = node.ctime_ns
        return entry

    # -- names and attributes -----------------------------------------------------------

    @_guarded
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        if name == b".":
            return self._entry(parent)
        if name == b"..":
            return self._entry(self._node(parent.parent))
        ino = parent.children.get(name)
        if ino is None:
            entry = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the absence
            entry.entry_timeout = ENTRY_TIMEOUT
            return entry
        return self._entry(self.nodes[ino])

    @_guarded
    async def getattr(self, inode, ctx=None):
        return self._entry(self._node(inode))

    @_guarded
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    @_guarded
    async def getxattr(self, inode, name, ctx):
        value = self._node(inode).xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_guarded
    async def listxattr(self, inode, ctx):
        return list(self._node(inode).xattrs)

    @_guarded
    async def statfs(self, ctx):
        result = pyfuse3.StatvfsData()
        result.f_bsize = result.f_frsize = BLOCK_SIZE
        result.f_blocks = -(-self.logical // BLOCK_SIZE)
        result.f_bfree = result.f_bavail = 0
        result.f_files = len(self.nodes)
        result.f_ffree = result.f_favail = 0
        result.f_namemax = NAME_MAX
        return result

    # -- directories --------------------------------------------------------------------

    @_guarded
    async def opendir(self, inode, ctx):
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode  # the listing never changes: the inode is handle enough

    @_guarded
    async def readdir(self, fh, start_id, token):
        listing = self._node(fh).listing
        for index in range(start_id, len(listing)):
            name, ino = listing[index]
            if not pyfuse3.readdir_reply(token, name, self._entry(self.nodes[ino]), index + 1):
                break

    async def releasedir(self, fh):
        pass

    async def fsyncdir(self, fh, datasync):
        pass

    # -- files --------------------------------------------------------------------------

    @_guarded
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not stat.S_ISREG(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR if node.is_dir else errno.EINVAL)
        # keep_cache: pages read once stay good for as long as the mount lives
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        node = self.nodes.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            return await self._read(node, off, size)
        except RepositoryCorrupt as exc:
            if exc.args[0] not in self._reported:  # once per chunk, not per page
                self._reported.add(exc.args[0])
                log.error("%s: read at %d failed: %s", node.path, off, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:  # a bug must not end the mount either
            log.exception("%s: read at %d failed unexpectedly", node.path, off)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _read(self, node: Node, off: int, size: int) -> bytes:
        end = min(off + size, node.size)
        if off >= end:
            return b""
        out = bytearray(end - off)  # zeros: what no chunk covers is a hole
        for ref in slice_refs(node.chunks, off, end):
            data = await self._chunk(ref.chunk_id, ref.needed)
            out[ref.offset - off:ref.end - off] = ref.piece(data)
        return bytes(out)

    async def _chunk(self, chunk_id: bytes, needed: int) -> bytes:
        """A chunk's data, from the cache or the repository (checked there), which
        must hold at least the bytes needed of it."""
        while (data := self._cache.cached(chunk_id)) is None:
            pending = self._fetching.get(chunk_id)
            if pending is None:
                data = await self._fetch(chunk_id)
                break
            await pending.wait()  # then look again: the fetch may have failed
        if len(data) < needed:
            raise CorruptChunk(f"chunk {chunk_id.hex()[:16]}… holds {len(data)} bytes where "
                               f"the manifest needs {needed} (too short)")
        return data

    async def _fetch(self, chunk_id: bytes) -> bytes:
        done = self._fetching[chunk_id] = trio.Event()
        try:
            # decompressing and hashing a chunk takes milliseconds: not on the loop
            return await trio.to_thread.run_sync(self._cache.get, chunk_id)
        finally:
            del self._fetching[chunk_id]
            done.set()

    async def release(self, fh):
        pass

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    # -- every change: refused ----------------------------------------------------------

    async def _read_only(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = symlink = link = unlink = rmdir = rename = _read_only
    create = write = setxattr = removexattr = _read_only


# -- mounting ------------------------------------------------------------------------------


def mount(repo: Repository, manifest: dict, mountpoint: Path,
          mounted: Callable[[], None] = lambda: None) -> None:
    """Serve the backup at mountpoint until a signal or an unmount; mounted() is
    called once it shows."""
    operations = BackupOperations(repo, manifest)
    # Until trio's receiver is installed, a signal is remembered instead of killing the
    # process with its mount left behind.
    pending: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: pending.append(signum))
                for signum in _STOP_SIGNALS}
    try:
        try:
            pyfuse3.init(operations, os.fspath(mountpoint), list(MOUNT_OPTIONS))
        except RuntimeError as exc:
            raise MountpointError(f"cannot mount on {mountpoint}: {exc}") from None
        try:
            trio.run(_serve, pending, mounted)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


async def _serve(pending: list[int], mounted: Callable[[], None]) -> None:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        if pending:
            log.info("received %s while mounting: unmounting", signal.Signals(pending[0]).name)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals)
            mounted()
            await pyfuse3.main()  # returns on terminate() or an unmount from outside
            nursery.cancel_scope.cancel()


async def _stop_on_signal(signals) -> None:
    async for signum in signals:
        log.info("received %s: unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()
        return
