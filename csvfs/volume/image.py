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
from functools import partial
from pathlib import Path

from csvfs.volume import direct
from csvfs.volume import format as fmt
from csvfs.volume.errors import KeyFileError, UsageError, VolumeError
from csvfs.volume.keyfile import parse_hex, read_secret

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


KEY_ENVIRONMENT = "CSVFS_KEY"


def default_key_path(image: str | os.PathLike) -> Path:
    """The cluster key file when --key is not given: $CSVFS_KEY, else IMAGE.key beside
    an image file. A block device has no place beside it, so it needs one of the two."""
    if os.environ.get(KEY_ENVIRONMENT):
        return Path(os.environ[KEY_ENVIRONMENT])
    if is_block_device(image):
        raise UsageError(f"{image} is a block device: name its cluster key file with "
                         f"--key (or {KEY_ENVIRONMENT})")
    return Path(f"{os.fspath(image)}.key")


def is_block_device(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


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
    """An open volume image with a validated superblock.

    `pread` and `pwrite` are the image's I/O calls (os.pread and os.pwrite bound to
    the image, or their O_DIRECT forms in csvfs/volume/direct.py); every read and write
    of the image, metadata and file data alike, goes through them.
    """

    def __init__(self, path: Path, fd: int, sb: fmt.Superblock, used_copy: bool,
                 sectors: direct.SectorIO | None = None):
        self.path = path
        self.fd = fd
        self.sb = sb
        self.used_copy = used_copy  # primary superblock was bad; the copy was used
        self.direct = sectors is not None  # O_DIRECT: no page cache between us and it
        self.sector = sectors.sector if sectors is not None else 0  # O_DIRECT's alignment
        self.pread, self.pwrite = _calls(fd, sectors)
        self._sectors = sectors

    # -- opening ----------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False,
             direct_io: bool | None = None) -> Volume:
        """direct_io: O_DIRECT or the page cache; None picks O_DIRECT for a block
        device (which other hosts may share) and the page cache for an image file."""
        path = Path(path)
        fd = _open_image(path, writable)
        try:
            sectors = _sector_io(fd, path, direct_io)
            if writable and sectors is not None:
                _check_sector_fits_a_slot(sectors.sector, path)
            sb, used_copy = _read_superblock(fd, path, _calls(fd, sectors)[0])
        except BaseException:
            os.close(fd)
            raise
        if used_copy:
            log.warning("%s: primary superblock is unusable; using the copy at the end", path)
        return cls(path, fd, sb, used_copy, sectors)

    def check_key(self, key: bytes) -> None:
        if fmt.key_id(key) != self.sb.key_id:
            raise KeyFileError(f"the cluster key does not belong to volume {self.path}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- raw I/O -----------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        data = self.pread(length, offset)
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self.pwrite(view, offset)
            view = view[written:]
            offset += written

    def write_durable(self, offset: int, data: bytes) -> None:
        """Write data and return once it is on stable storage, without flushing the
        rest of the image: pwritev2 with RWF_DSYNC syncs this range only (the
        metadata journal's commit)."""
        if self._sectors is not None:
            self._sectors.pwrite(data, offset, os.RWF_DSYNC)
            return
        view = memoryview(data)
        while view:
            written = os.pwritev(self.fd, [view], offset, os.RWF_DSYNC)
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


def _calls(fd: int, sectors: direct.SectorIO | None):
    """pread(length, offset) and pwrite(data, offset) on the image."""
    if sectors is not None:
        return sectors.pread, sectors.pwrite
    return partial(os.pread, fd), partial(os.pwrite, fd)


def _sector_io(fd: int, path: Path, direct_io: bool | None) -> direct.SectorIO | None:
    if direct_io is None:
        direct_io = stat.S_ISBLK(os.fstat(fd).st_mode)
    if not direct_io:
        return None
    try:
        return direct.enable(fd)
    except direct.DirectIOUnsupported as exc:
        raise VolumeError(f"{path}: O_DIRECT does not work here ({exc.strerror}); "
                          "use the page cache (--no-direct-io)") from None


def _check_sector_fits_a_slot(sector: int, path: Path) -> None:
    """Each node writes its own slot of the lease region: with O_DIRECT, a sector
    larger than a slot would make nodes read-modify-write each other's slots."""
    if sector > fmt.NODE_SLOT_SIZE:
        raise VolumeError(f"{path}: its logical sector is {sector} bytes; csvfs writes "
                          f"it with O_DIRECT in {fmt.NODE_SLOT_SIZE}-byte sectors (use a "
                          "device with 512-byte logical sectors, or --no-direct-io on "
                          "one host)")


def _read_superblock(fd: int, path: Path, pread) -> tuple[fmt.Superblock, bool]:
    actual = _device_size(fd)
    primary_error = None
    try:
        sb = fmt.decode_superblock(pread(fmt.SUPERBLOCK_SIZE, 0))
    except fmt.UnsupportedVersion as exc:
        raise VolumeError(f"{path}: unsupported csvfs {exc}") from None
    except fmt.FormatError as exc:
        primary_error = exc
    else:
        _check_size(sb, actual, path)
        return sb, False
    copy = _read_copy(pread, actual)
    if copy is None:
        if "bad magic" in str(primary_error) and actual >= fmt.SUPERBLOCK_SIZE:
            raise VolumeError(f"{path}: not a csvfs volume (no superblock found)")
        if actual < fmt.SUPERBLOCK_SIZE:
            raise VolumeError(f"{path}: not a csvfs volume (only {actual} bytes)")
        raise VolumeError(f"{path}: superblock is corrupt ({primary_error}) and no valid copy")
    _check_size(copy, actual, path)
    return copy, True


def _read_copy(pread, actual: int) -> fmt.Superblock | None:
    if actual < 2 * fmt.SUPERBLOCK_SIZE:
        return None
    try:
        raw = pread(fmt.SUPERBLOCK_SIZE, actual - fmt.SUPERBLOCK_SIZE)
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
