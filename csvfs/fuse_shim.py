"""A C shim between pyfuse3 and libfuse3, for what pyfuse3 lacks.

``_fuse_shim.c`` interposes two libfuse3 functions:

- ``fuse_session_new``, to add a ``.fallocate`` operation that calls back into
  Python (pyfuse3 has no fallocate handler);
- ``fuse_session_process_buf``, to add FUSE_DIRECT_IO_ALLOW_MMAP to the INIT
  reply (libfuse 3.14 cannot ask for it), so that files opened with direct_io
  can still be mapped MAP_SHARED;
- ``fuse_session_receive_buf``, to read /dev/fuse without blocking. pyfuse3
  reads it holding the GIL once trio saw it readable, and a request withdrawn
  in between (its caller was killed) would otherwise freeze the whole node
  until the next request came. See the C file.

Usage::

    from csvfs import fuse_shim
    fuse_shim.load()          # before pyfuse3 is imported anywhere
    import pyfuse3
    fuse_shim.set_handler(ops.fallocate)
    pyfuse3.init(ops, mountpoint, options)

``ops.fallocate`` is ``async def (inode, mode, offset, length, fh) -> None`` and
may raise ``pyfuse3.FUSEError``.  Without the shim, fallocate on the mount
fails with EOPNOTSUPP, and a killed caller can stall the mount.
"""

from __future__ import annotations

import argparse
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
_SOURCE = _HERE / "_fuse_shim.c"
SHIM_NAME = "_fuse_shim.so"

AsyncHandler = Callable[[int, int, int, int, int], Awaitable[None]]

# void cb(fuse_req_t req, uint64_t ino, int mode, int64_t off, int64_t len, uint64_t fh)
_CALLBACK = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_uint64,
)

_lib: ctypes.CDLL | None = None
# The C side only holds a raw pointer; this reference keeps the thunk alive.
_c_callback = None
_handler: AsyncHandler | None = None


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
        "-o", str(out), str(_SOURCE),
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
    lib.csvfs_set_fallocate_handler.argtypes = [_CALLBACK]
    lib.csvfs_set_fallocate_handler.restype = None
    lib.csvfs_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.csvfs_reply_err.restype = ctypes.c_int
    lib.csvfs_fallocate_interposed.argtypes = []
    lib.csvfs_fallocate_interposed.restype = ctypes.c_int
    lib.csvfs_mmap_allowed.argtypes = []
    lib.csvfs_mmap_allowed.restype = ctypes.c_int
    return lib


def active() -> bool:
    """True once pyfuse3.init() went through the shim's fuse_session_new."""
    return _lib is not None and bool(_lib.csvfs_fallocate_interposed())


def mmap_allowed() -> bool:
    """True once the kernel took FUSE_DIRECT_IO_ALLOW_MMAP from the INIT reply."""
    return _lib is not None and bool(_lib.csvfs_mmap_allowed())


def set_handler(async_handler: AsyncHandler | None) -> bool:
    """Register the async fallocate handler (None unregisters it).

    Returns False when the shim is not loaded; fallocate then stays
    unsupported.
    """
    global _c_callback, _handler
    if _lib is None:
        log.debug("FUSE shim not loaded; fallocate handler ignored")
        return False
    _handler = async_handler
    if _c_callback is None:
        _c_callback = _CALLBACK(_on_fallocate)
        _lib.csvfs_set_fallocate_handler(_c_callback)
    return True


def _reply(req: int, err: int) -> None:
    assert _lib is not None
    ret = _lib.csvfs_reply_err(req, err)
    if ret != 0:
        log.error("fallocate: fuse_reply_err failed: %s", os.strerror(-ret))


def _on_fallocate(req: int, ino: int, mode: int, offset: int, length: int, fh: int) -> None:
    """Called from C inside fuse_session_process_buf, on pyfuse3's trio thread.

    It must neither block nor raise: an exception here would be swallowed by
    ctypes and the request would never be answered.
    """
    try:
        handler = _handler
        if handler is None:
            _reply(req, errno.EOPNOTSUPP)
            return
        _spawn(_serve, handler, req, (ino, mode, offset, length, fh))
    except BaseException:
        log.exception("fallocate: cannot dispatch request")
        _reply(req, errno.EIO)


def _spawn(fn: Callable[..., Awaitable[None]], *args: object) -> None:
    import trio

    # We run inside one of pyfuse3's _session_loop tasks, whose parent is the
    # nursery of pyfuse3.main().  Starting there means main() waits for us, so
    # the reply is sent before pyfuse3.close() can destroy the session.
    nursery = trio.lowlevel.current_task().parent_nursery
    if nursery is not None:
        nursery.start_soon(fn, *args, name="csvfs-fallocate")
    else:
        trio.lowlevel.spawn_system_task(fn, *args, name="csvfs-fallocate")


async def _serve(handler: AsyncHandler, req: int, args: tuple[int, ...]) -> None:
    import pyfuse3  # already imported by now; importing earlier would be too early

    err = errno.EINTR  # what the caller gets if we are cancelled
    try:
        await handler(*args)
        err = 0
    except pyfuse3.FUSEError as exc:
        err = exc.errno
    except Exception:
        log.exception("fallocate handler failed for inode %d", args[0])
        err = errno.EIO
    finally:
        # Exactly one reply per request, whatever happened.
        _reply(req, err)


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
