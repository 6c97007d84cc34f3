"""Opening a volume image: superblock validation, key checks and raw region I/O.

Both the node's data path and the coordinator use a `Volume`. Opening is
read-only until the caller asks for a writable handle, so that bad input is
rejected before anything touches the image.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import stat
from pathlib import Path

from csvfs.volume import format as fmt
from csvfs.volume.errors import KeyFileError, VolumeError
from csvfs.volume.keyfile import parse_hex, read_secret

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def default_key_path(image: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(image)}.key")


def read_key(path: str | os.PathLike) -> bytes:
    """The cluster key in a key file: hex text, readable by its owner only (like an ssh
    private key: whoever can read it can join the cluster and read every file)."""
    raw = read_secret(path, "cluster key", KeyFileError,
                      ": anyone who can read it can join the cluster")
    key = parse_hex(raw)
    if key is None:
        raise KeyFileError(f"cluster key file {path} is not a csvfs key (expected hex)")
    if len(key) < 16:
        raise KeyFileError(f"cluster key file {path} is too short to be a csvfs key")
    return key


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


class Volume:
    """An open volume image with a validated superblock."""

    def __init__(self, path: Path, fd: int, sb: fmt.Superblock, used_copy: bool):
        self.path = path
        self.fd = fd
        self.sb = sb
        self.used_copy = used_copy  # primary superblock was bad; the copy was used

    # -- opening ----------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False) -> Volume:
        path = Path(path)
        fd = _open_image(path, writable)
        try:
            sb, used_copy = _read_superblock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if used_copy:
            log.warning("%s: primary superblock is unusable; using the copy at the end", path)
        return cls(path, fd, sb, used_copy)

    def check_key(self, key: bytes) -> None:
        if fmt.key_id(key) != self.sb.key_id:
            raise KeyFileError(f"the cluster key does not belong to volume {self.path}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- raw I/O -----------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def zero(self, offset: int, length: int) -> None:
        """Make a byte range read as zeros, punching a hole where the image allows it."""
        if length <= 0:
            return
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self.fd, mode, offset, length) == 0:
            return
        errno = ctypes.get_errno()
        log.debug("punch hole failed (%s); writing zeros", os.strerror(errno))
        chunk = bytes(min(length, 1 << 20))
        while length > 0:
            step = min(length, len(chunk))
            self.write(offset, chunk[:step])
            offset += step
            length -= step

    def write_superblocks(self) -> None:
        block = fmt.encode_superblock(self.sb)
        self.write(0, block)
        self.write(self.sb.copy_offset, block)
        self.sync()


def _open_image(path: Path, writable: bool) -> int:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise VolumeError(f"{path}: no such file") from None
    except OSError as exc:
        raise VolumeError(f"{path}: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise VolumeError(f"{path}: not a csvfs volume (not a regular file or block device)")
    try:
        return os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        raise VolumeError(f"{path}: cannot open: {exc.strerror}") from None


def _read_superblock(fd: int, path: Path) -> tuple[fmt.Superblock, bool]:
    actual = _device_size(fd)
    primary_error = None
    try:
        sb = fmt.decode_superblock(os.pread(fd, fmt.SUPERBLOCK_SIZE, 0))
    except fmt.UnsupportedVersion as exc:
        raise VolumeError(f"{path}: unsupported csvfs {exc}") from None
    except fmt.FormatError as exc:
        primary_error = exc
    else:
        _check_size(sb, actual, path)
        return sb, False
    copy = _read_copy(fd, actual)
    if copy is None:
        if "bad magic" in str(primary_error) and actual >= fmt.SUPERBLOCK_SIZE:
            raise VolumeError(f"{path}: not a csvfs volume (no superblock found)")
        if actual < fmt.SUPERBLOCK_SIZE:
            raise VolumeError(f"{path}: not a csvfs volume (only {actual} bytes)")
        raise VolumeError(f"{path}: superblock is corrupt ({primary_error}) and no valid copy")
    _check_size(copy, actual, path)
    return copy, True


def _read_copy(fd: int, actual: int) -> fmt.Superblock | None:
    if actual < 2 * fmt.SUPERBLOCK_SIZE:
        return None
    try:
        raw = os.pread(fd, fmt.SUPERBLOCK_SIZE, actual - fmt.SUPERBLOCK_SIZE)
        copy = fmt.decode_superblock(raw)
    except fmt.FormatError:
        return None
    return copy if copy.size == actual else None


def _check_size(sb: fmt.Superblock, actual: int, path: Path) -> None:
    if actual < sb.size:
        raise VolumeError(
            f"{path}: image is truncated: the superblock says {sb.size} bytes, "
            f"the image has {actual}"
        )
