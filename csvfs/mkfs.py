"""`csvfs mkfs`: lay out a new volume and its cluster key."""

from __future__ import annotations

import logging
import os
import secrets
import stat
import time
from pathlib import Path

from coordinator import recovery
from coordinator.model import MetadataState
from csvfs.cluster.election import write_free_lease
from csvfs.cluster.events import EventLog
from csvfs.volume import direct
from csvfs.volume import format as fmt
from csvfs.volume.errors import UsageError, VolumeError, VolumeExistsError
from csvfs.volume.image import Volume, default_key_path, read_key
from csvfs.volume.keyfile import write_secret

log = logging.getLogger(__name__)


def make_volume(image: str | os.PathLike, size: int, unit_size: int = fmt.DEFAULT_UNIT,
                force: bool = False, key_path: str | os.PathLike | None = None) -> fmt.Superblock:
    image = Path(image)
    key_path = Path(key_path) if key_path else default_key_path(image)
    block_device = _refuse_to_clobber(image, force)
    if block_device:
        size = _block_device_size(image, size)
    key = _cluster_key(key_path)
    try:
        sb = fmt.plan_layout(size, unit_size, fmt.key_id(key), time.time_ns())
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    fd = _create_image(image, size, block_device)
    # A block device is written past the page cache, as the nodes will read it.
    volume = Volume(image, fd, sb, used_copy=False,
                    sectors=direct.enable(fd) if block_device else None)
    try:
        if block_device:
            for region in (sb.lease, sb.events, sb.journal, sb.checkpoint_a, sb.checkpoint_b):
                volume.zero(region.offset, region.length)
        if not key_path.exists():
            write_secret(key_path, key)
        _write_initial_metadata(volume)
        volume.write_superblocks()  # last: until now the image is not a volume
    finally:
        volume.close()
    return sb


def _cluster_key(key_path: Path) -> bytes:
    """The key already in key_path (the volumes of one cluster may share a key, and
    overwriting it would lock out the volumes it opens), else a new one."""
    if key_path.exists():
        return read_key(key_path)
    return secrets.token_bytes(32)


def _write_initial_metadata(volume: Volume) -> None:
    """A checkpoint holding just the root, a free lease, and the first event."""
    sb = volume.sb
    state = MetadataState.fresh(sb.data_units, sb.created_ns, sb.unit_size)
    # Generation 0 is safe here: the journal is all zeros until its first restart.
    recovery.write_checkpoint(volume, 0, 0, 0, state, gen=0)
    write_free_lease(volume)
    EventLog(volume, "mkfs").emit("mkfs", f"created volume {sb.uuid}: {sb.size} bytes, "
                                  f"{sb.data_units} units of {sb.unit_size}")


def _refuse_to_clobber(image: Path, force: bool) -> bool:
    """Check the target; returns True for a block device."""
    try:
        mode = os.stat(image).st_mode
    except FileNotFoundError:
        return False
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise VolumeError(f"{image}: not a regular file or block device")
    if force:
        return stat.S_ISBLK(mode)
    try:
        existing = Volume.open(image)
    except VolumeError:
        existing = None
    if existing is not None:
        existing.close()
        raise VolumeExistsError(
            f"{image} already holds csvfs volume {existing.sb.uuid}; use --force to overwrite"
        )
    if stat.S_ISREG(mode) and os.stat(image).st_size == 0:
        return False
    if stat.S_ISBLK(mode) and _starts_blank(image):
        return True
    raise VolumeExistsError(f"{image} exists and is not empty; use --force to overwrite it")


def _starts_blank(device: Path) -> bool:
    """A device whose first MiB is zeros holds no file system a mkfs could clobber."""
    with open(device, "rb") as handle:
        return not any(handle.read(1 << 20))


def _block_device_size(image: Path, asked: int) -> int:
    """A volume takes the whole device, which must hold at least the size asked for."""
    fd = os.open(image, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if asked > size:
        raise UsageError(f"{image} holds only {size} bytes, less than the {asked} asked for")
    return size


def _create_image(image: Path, size: int, block_device: bool) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC
    if not block_device:
        flags |= os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(image, flags, 0o600)
        if not block_device:
            os.ftruncate(fd, size)  # sparse: only what is written takes space
    except OSError as exc:
        raise VolumeError(f"{image}: cannot create: {exc.strerror}") from None
    return fd
