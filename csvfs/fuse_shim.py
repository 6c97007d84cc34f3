"""A C shim between pyfuse3 and libfuse3, for what pyfuse3 lacks.

``_fuse_shim.c`` interposes three libfuse3 functions:

- ``fuse_session_new``, to add a ``.fallocate`` operation that calls back into
  Python (pyfuse3 has no fallocate handler), and the lock operations
  (``.getlk``, ``.setlk``, ``.flock``, and a ``.flush`` that passes the lock
  owner), which make the kernel leave every lock to the filesystem;
- ``fuse_session_process_buf``, to add FUSE_DIRECT_IO_ALLOW_MMAP to the INIT
  reply (libfuse 3.14 cannot ask for it), so that files opened with direct_io
  can still be mapped MAP_SHARED;
- ``fuse_session_receive_buf``, to read /dev/fuse without blocking. pyfuse3
  reads it holding the GIL once trio saw it readable, and a request withdrawn
  in between (its caller was killed) would otherwise freeze the whole node
  until the next request came. See the C file. It is also where the fast lane
  (``_fast_path.c``, `FastLane`) answers the plain reads and writes in C.

Usage::

    from csvfs import fuse_shim
    fuse_shim.load()          # before pyfuse3 is imported anywhere
    import pyfuse3
    fuse_shim.set_handler("fallocate", ops.fallocate)
    fuse_shim.set_handler("setlk", ops.setlk)   # and "getlk", "flush": locks
    pyfuse3.init(ops, mountpoint, options)

See set_handler for each handler's arguments. Each runs as a trio task of its
own, and its request is answered exactly once. Without the shim, fallocate on
the mount fails with EOPNOTSUPP, locks are per node, and a killed caller can
stall the mount.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_SOURCES = (_HERE / "_fuse_shim.c", _HERE / "_fast_path.c")
SHIM_NAME = "_fuse_shim.so"

AsyncHandler = Callable[..., Awaitable[object]]

# The C callbacks, by operation (their C types are in _fuse_shim.c).
_u64, _i64, _int = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int
_C_TYPES = {
    # (req, ino, mode, offset, length, fh)
    "fallocate": ctypes.CFUNCTYPE(None, ctypes.c_void_p, _u64, _int, _i64, _i64, _u64),
    # (req, ino, fh, owner, kind, type, start, end, pid, sleep)
    "setlk": ctypes.CFUNCTYPE(None, ctypes.c_void_p, _u64, _u64, _u64, _int, _int, _i64,
                              _i64, ctypes.c_uint32, _int),
    # (req, ino, fh, owner, type, start, end, pid)
    "getlk": ctypes.CFUNCTYPE(None, ctypes.c_void_p, _u64, _u64, _u64, _int, _i64, _i64,
                              ctypes.c_uint32),
    # (req, ino, fh, owner)
    "flush": ctypes.CFUNCTYPE(None, ctypes.c_void_p, _u64, _u64, _u64),
    # (req): a signal interrupted the process waiting for req
    "interrupt": ctypes.CFUNCTYPE(None, ctypes.c_void_p),
}
OPERATIONS = ("fallocate", "setlk", "getlk", "flush")
LOCK_KINDS = ("posix", "flock")  # the C side's kind 0 and 1
F_UNLCK = 2

_lib: ctypes.CDLL | None = None
# The async handlers by operation, and the C thunks (the C side only holds raw
# pointers; these references keep them alive).
_handlers: dict[str, AsyncHandler] = {}
_thunks: dict[str, object] = {}
# Requests that may be interrupted (blocking locks), while their task runs; and those
# interrupted before their task began.
_scopes: dict[int, object] = {}
_interrupted_early: set[int] = set()


def _pkg_config(*flags: str) -> list[str]:
    out = subprocess.run(
        ["pkg-config", *flags, "fuse3"], check=True, capture_output=True, text=True
    ).stdout
    return shlex.split(out)


def build(dest_dir: str | os.PathLike[str] | None = None) -> Path:
    """Compile the shim; returns the path of the shared library."""
    dest = Path(dest_dir) if dest_dir is not None else _HERE
    out = dest / SHIM_NAME
    cmd = [
        os.environ.get("CC", "cc"),
        "-shared", "-fPIC", "-O2", "-Wall", "-fvisibility=hidden",
        *_pkg_config("--cflags"),
        "-o", str(out), *map(str, _SOURCES),
        # Link libfuse3 so the real fuse_session_new is in the shim's own
        # dependency list, whichever scope dlsym(RTLD_NEXT) searches.
        *_pkg_config("--libs"),
        "-ldl",
    ]
    log.debug("building the FUSE shim: %s", shlex.join(cmd))
    subprocess.run(cmd, check=True)
    return out


def load(path: str | os.PathLike[str] | None = None) -> bool:
    """Load the shim globally; must run before the first ``import pyfuse3``."""
    global _lib
    if _lib is not None:
        return True
    so = Path(path) if path is not None else _HERE / SHIM_NAME
    if not so.exists():
        log.debug("%s missing; fallocate not supported", so)
        return False
    if "pyfuse3" in sys.modules:
        # pyfuse3's symbols are already bound to libfuse3; too late to interpose.
        log.debug("pyfuse3 already imported; FUSE shim not loaded")
        return False
    _lib = _open(so)
    return _lib is not None


def _open(so: Path) -> ctypes.CDLL | None:
    try:
        # RTLD_GLOBAL puts our fuse_session_new ahead of libfuse3's for every
        # library loaded later, including pyfuse3's RTLD_LOCAL extension.
        lib = ctypes.CDLL(str(so), mode=os.RTLD_GLOBAL)
    except OSError as exc:
        log.debug("cannot load %s: %s", so, exc)
        return None
    lib.csvfs_set_handler.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.csvfs_set_handler.restype = ctypes.c_int
    lib.csvfs_reply_lock.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_uint32]
    lib.csvfs_reply_lock.restype = ctypes.c_int
    lib.csvfs_locks_interposed.argtypes = []
    lib.csvfs_locks_interposed.restype = ctypes.c_int
    lib.csvfs_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.csvfs_reply_err.restype = ctypes.c_int
    lib.csvfs_fallocate_interposed.argtypes = []
    lib.csvfs_fallocate_interposed.restype = ctypes.c_int
    lib.csvfs_mmap_allowed.argtypes = []
    lib.csvfs_mmap_allowed.restype = ctypes.c_int
    _declare_lane(lib)
    return lib


def _declare_lane(lib: ctypes.CDLL) -> None:
    """The C signatures of the fast lane (_fast_path.c)."""
    for name, restype, argtypes in (
        ("csvfs_fast_start", _int, [_int, _i64, _i64, _int]),
        ("csvfs_fast_returned_fd", _int, []),
        ("csvfs_fast_take_returned", _int, [ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(_u64),
                                            ctypes.POINTER(_i64), ctypes.POINTER(ctypes.c_uint32),
                                            ctypes.POINTER(ctypes.c_void_p)]),
        ("csvfs_fast_reply", None, [_int, _int, ctypes.c_char_p, ctypes.c_size_t]),
        ("csvfs_fast_stop", None, []),
        ("csvfs_fast_deadline", None, [_i64]),
        ("csvfs_fast_fault", None, [_int]),
        ("csvfs_fast_counts", None, [ctypes.POINTER(_u64)]),
        ("csvfs_fast_handle", _int, [_u64, _u64, _int]),
        ("csvfs_fast_drop_handle", None, [_u64]),
        ("csvfs_fast_file", _int, [_u64, _i64, _i64, _int, _int, ctypes.POINTER(_i64),
                                   ctypes.c_size_t, ctypes.POINTER(_i64), ctypes.c_size_t]),
        ("csvfs_fast_take_stripes", ctypes.c_size_t, [_u64, ctypes.POINTER(_u64),
                                                      ctypes.c_size_t]),
        ("csvfs_fast_take_mtime", _i64, [_u64]),
        ("csvfs_fast_drop_file", _i64, [_u64]),
    ):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes


def active() -> bool:
    """True once pyfuse3.init() went through the shim's fuse_session_new."""
    return _lib is not None and bool(_lib.csvfs_fallocate_interposed())


def locks_active() -> bool:
    """True once pyfuse3.init() went through the shim with the lock handlers set."""
    return _lib is not None and bool(_lib.csvfs_locks_interposed())


def mmap_allowed() -> bool:
    """True once the kernel took FUSE_DIRECT_IO_ALLOW_MMAP from the INIT reply."""
    return _lib is not None and bool(_lib.csvfs_mmap_allowed())


class FastLane:
    """The shim's fast lane (_fast_path.c): the reads, writes and fdatasyncs it does
    in C, from tables that csvfs/datapath.py keeps exact through these calls. The lane
    takes requests on the trio thread, inside pyfuse3's read of /dev/fuse, and its
    worker threads do them; it returns to trio only once no read or write is in
    flight, so no table changes under one."""

    INT64_MAX = 2**63 - 1
    READ, WRITE, FSYNC = 15, 16, 20  # FUSE opcodes
    STRIPES_AT_ONCE = 4096

    def __init__(self, fd: int, data_offset: int, sector: int, threads: int):
        """sector: 0 for an image read through the page cache, else O_DIRECT's;
        threads: how many requests may be in flight at once (0: one at a time, on the
        trio thread)."""
        assert _lib is not None
        if _lib.csvfs_fast_start(fd, data_offset, sector, threads) != 0:
            raise OSError("cannot start the fast lane")
        self._lib = _lib
        self.returned_fd = _lib.csvfs_fast_returned_fd()

    async def serve_returned(self, read, write, fsync) -> None:
        """Do again, through the Python handlers read(fh, offset, size),
        write(fh, offset, data) and fsync(fh, datasync), each request that failed in the
        lane: they see the failure themselves (and send the node to redirected I/O)."""
        import pyfuse3
        import trio

        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(self.returned_fd)
                with contextlib.suppress(BlockingIOError):
                    os.read(self.returned_fd, 8)
                while (job := self._take_returned()) is not None:
                    nursery.start_soon(self._redo, pyfuse3.FUSEError,
                                       (read, write, fsync), *job)

    def _take_returned(self) -> tuple | None:
        opcode, size = ctypes.c_uint32(), ctypes.c_uint32()
        fh, offset, data = _u64(), _i64(), ctypes.c_void_p()
        slot = self._lib.csvfs_fast_take_returned(ctypes.byref(opcode), ctypes.byref(fh),
                                                  ctypes.byref(offset), ctypes.byref(size),
                                                  ctypes.byref(data))
        if slot < 0:
            return None
        payload = ctypes.string_at(data, size.value) if opcode.value == self.WRITE else None
        return slot, opcode.value, fh.value, offset.value, size.value, payload

    async def _redo(self, fuse_error, handlers, slot, opcode, fh, offset, size, payload):
        read, write, fsync = handlers
        try:
            if opcode == self.READ:
                answer = bytes(await read(fh, offset, size))
                self._lib.csvfs_fast_reply(slot, 0, answer, len(answer))
            elif opcode == self.FSYNC:
                await fsync(fh, True)
                self._lib.csvfs_fast_reply(slot, 0, None, 0)
            else:
                written = await write(fh, offset, payload)
                self._lib.csvfs_fast_reply(slot, 0, None, written)
        except fuse_error as exc:
            self._lib.csvfs_fast_reply(slot, exc.errno, None, 0)
        except BaseException:
            self._lib.csvfs_fast_reply(slot, errno.EIO, None, 0)
            raise

    def stop(self) -> None:
        """No request goes to the lane any more (before the image is closed)."""
        self._lib.csvfs_fast_stop()

    def deadline(self, valid_until: float | None) -> None:
        """Serve until this time.monotonic(); None serves nothing."""
        if valid_until is None or valid_until <= 0:
            ns = 0
        else:
            ns = self.INT64_MAX if valid_until == float("inf") else int(valid_until * 1e9)
        self._lib.csvfs_fast_deadline(ns)

    def fault(self, on: bool) -> None:
        """`csvfs fault ... storage-down`: the lane's calls fail, as the node's do."""
        self._lib.csvfs_fast_fault(int(on))

    def file(self, ino: int, size: int, granule: int, runs: list,
             sync_here: bool = True, note_stripes: bool = False,
             asks: list | None = None) -> None:
        """Serve ino with this map: its writes too, except to the granules of `asks`
        ([first, count] runs: their first write asks the coordinator), noting the
        stripes they touch if `note_stripes`; fdatasyncs if `sync_here` (the
        coordinator holds nothing of it to make durable)."""
        flat = [number for run in sorted(runs) for number in run]
        array = (_i64 * len(flat))(*flat)
        asks = sorted(asks or ())
        flat_asks = [number for run in asks for number in run]
        ask_array = (_i64 * len(flat_asks))(*flat_asks)
        if self._lib.csvfs_fast_file(ino, size, granule, int(sync_here), int(note_stripes),
                                     array, len(runs), ask_array, len(asks)):
            raise MemoryError("cannot allocate the fast lane's map")

    def take_stripes(self, ino: int) -> list[tuple[int, int]]:
        """(file granule, stripes mask) of the lane's writes to ino since the last
        take, which it forgets."""
        taken: list[tuple[int, int]] = []
        pairs = (_u64 * (2 * self.STRIPES_AT_ONCE))()
        while True:
            count = self._lib.csvfs_fast_take_stripes(ino, pairs, self.STRIPES_AT_ONCE)
            taken.extend(zip(pairs[0 : 2 * count : 2], pairs[1 : 2 * count : 2], strict=True))
            if count < self.STRIPES_AT_ONCE:
                return taken

    def drop_file(self, ino: int) -> int:
        """Python serves ino from now on; the time of the lane's last write to it.
        Take its stripes first: they go with it."""
        return self._lib.csvfs_fast_drop_file(ino)

    def take_mtime(self, ino: int) -> int:
        """The time of the lane's last write to ino since the last take, or 0."""
        return self._lib.csvfs_fast_take_mtime(ino)

    def handle(self, fh: int, ino: int, writes: bool) -> None:
        """Requests on fh are for ino; its writes may go to the lane if `writes`."""
        if self._lib.csvfs_fast_handle(fh, ino, int(writes)):
            raise MemoryError("cannot allocate a fast lane handle")

    def drop_handle(self, fh: int) -> None:
        self._lib.csvfs_fast_drop_handle(fh)

    def counts(self) -> tuple[int, int, int, int, int]:
        """The reads and the writes the lane answered, the requests it handed to Python,
        how many of those after a failed pread, pwrite or fdatasync, and the fdatasyncs
        it answered."""
        out = (_u64 * 5)()
        self._lib.csvfs_fast_counts(out)
        return tuple(out)


def fast_lane(fd: int, data_offset: int, sector: int, threads: int) -> FastLane | None:
    """The fast lane, or None without the shim."""
    return FastLane(fd, data_offset, sector, threads) if _lib is not None else None


def set_handler(op: str, async_handler: AsyncHandler | None) -> bool:
    """Register the async handler of one operation (None unregisters it):

    - "fallocate": ``(inode, mode, offset, length, fh) -> None``;
    - "setlk": ``(inode, fh, owner, kind, type, start, end, pid, wait) -> None``, kind
      "posix" (POSIX and OFD locks) or "flock", end inclusive; a blocking one (`wait`)
      is cancelled when a signal interrupts its caller, who then gets EINTR;
    - "getlk": ``(inode, fh, owner, type, start, end, pid)`` -> None for no conflict,
      else the conflicting lock as (type, start, end, pid);
    - "flush": ``(inode, fh, lock_owner) -> None``, in place of pyfuse3's flush.

    Each may raise ``pyfuse3.FUSEError``. The lock handlers ("setlk", "getlk" and
    "flush" all three) must be set before pyfuse3.init(). Returns False when the shim
    is not loaded; the operation then stays as pyfuse3 has it.
    """
    if op not in OPERATIONS:
        raise ValueError(f"no such operation: {op}")
    if _lib is None:
        log.debug("FUSE shim not loaded; %s handler ignored", op)
        return False
    if async_handler is None:  # the C side falls back to what it does without one
        _handlers.pop(op, None)
        _lib.csvfs_set_handler(op.encode(), None)
        return True
    _handlers[op] = async_handler
    for name in (op, "interrupt") if op == "setlk" else (op,):
        if name not in _thunks:
            _thunks[name] = _C_TYPES[name](_CALLBACKS[name])
        _lib.csvfs_set_handler(name.encode(), ctypes.cast(_thunks[name], ctypes.c_void_p))
    return True


def _reply_err(req: int, err: int) -> None:
    assert _lib is not None
    ret = _lib.csvfs_reply_err(req, err)
    if ret != 0:
        log.error("fuse_reply_err failed: %s", os.strerror(-ret))


def _reply_done(req: int, result: object) -> None:
    _reply_err(req, 0)


def _reply_lock(req: int, result: object) -> None:
    assert _lib is not None
    type_, start, end, pid = result if result is not None else (F_UNLCK, 0, 0, 0)
    ret = _lib.csvfs_reply_lock(req, type_, start, end, pid)
    if ret != 0:
        log.error("fuse_reply_lock failed: %s", os.strerror(-ret))


def _dispatch(op: str, req: int, args: tuple, reply=_reply_done,
              interruptible: bool = False) -> None:
    """Called from C inside fuse_session_process_buf, on pyfuse3's trio thread.

    It must neither block nor raise: an exception here would be swallowed by
    ctypes and the request would never be answered.
    """
    try:
        handler = _handlers.get(op)
        if handler is None:
            _interrupted_early.discard(req)
            _reply_err(req, errno.EOPNOTSUPP if op == "fallocate" else errno.ENOLCK)
            return
        _spawn(_serve, op, handler, req, args, reply, interruptible)
    except BaseException:
        log.exception("%s: cannot dispatch request", op)
        _interrupted_early.discard(req)
        _reply_err(req, errno.EIO)


def _on_fallocate(req: int, ino: int, mode: int, offset: int, length: int, fh: int) -> None:
    _dispatch("fallocate", req, (ino, mode, offset, length, fh))


def _on_setlk(req: int, ino: int, fh: int, owner: int, kind: int, type_: int, start: int,
              end: int, pid: int, sleep: int) -> None:
    _dispatch("setlk", req, (ino, fh, owner, LOCK_KINDS[kind], type_, start, end, pid,
                             bool(sleep)), interruptible=bool(sleep))


def _on_getlk(req: int, ino: int, fh: int, owner: int, type_: int, start: int, end: int,
              pid: int) -> None:
    _dispatch("getlk", req, (ino, fh, owner, type_, start, end, pid), reply=_reply_lock)


def _on_flush(req: int, ino: int, fh: int, owner: int) -> None:
    _dispatch("flush", req, (ino, fh, owner))


def _on_interrupt(req: int) -> None:
    """The kernel interrupted req (its caller got a signal); maybe before it began."""
    try:
        scope = _scopes.get(req)
        if scope is None:
            _interrupted_early.add(req)
        else:
            scope.cancel()
    except BaseException:
        log.exception("cannot interrupt a request")


_CALLBACKS = {"fallocate": _on_fallocate, "setlk": _on_setlk, "getlk": _on_getlk,
              "flush": _on_flush, "interrupt": _on_interrupt}


def _spawn(fn: Callable[..., Awaitable[None]], *args: object) -> None:
    import trio

    # We run inside one of pyfuse3's _session_loop tasks, whose parent is the
    # nursery of pyfuse3.main().  Starting there means main() waits for us, so
    # the reply is sent before pyfuse3.close() can destroy the session.
    nursery = trio.lowlevel.current_task().parent_nursery
    name = f"csvfs-{args[0]}"
    if nursery is not None:
        nursery.start_soon(fn, *args, name=name)
    else:
        trio.lowlevel.spawn_system_task(fn, *args, name=name)


async def _serve(op: str, handler: AsyncHandler, req: int, args: tuple, reply,
                 interruptible: bool) -> None:
    import pyfuse3  # already imported by now; importing earlier would be too early
    import trio

    err = errno.EINTR  # what the caller gets if we are cancelled
    result = None
    try:
        with trio.CancelScope() as scope:
            if interruptible:
                _scopes[req] = scope
                if req in _interrupted_early:
                    scope.cancel()
            result = await handler(*args)
            err = 0
    except pyfuse3.FUSEError as exc:
        err = exc.errno
    except Exception:
        log.exception("%s handler failed for inode %d", op, args[0])
        err = errno.EIO
    finally:
        if interruptible:
            _scopes.pop(req, None)
            _interrupted_early.discard(req)
        # Exactly one reply per request, whatever happened.
        if err:
            _reply_err(req, err)
        else:
            reply(req, result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the csvfs FUSE shim.")
    parser.add_argument("--build", action="store_true", help="compile the C shim")
    parser.add_argument("--dest", default=None, help="output directory")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 2
    print(build(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
