"""What backupbench's sections share: the volume and its two nodes (Setup), the disks
they write, and small helpers for files and reports (scripts/backupbench.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from backup_tools import Tools
from bench_targets import BenchError, log
from nodes import MountProcess

MiB = 1 << 20
GiB = 1 << 30
SPOT = 64 << 10  # the incremental's rewrites
MOUNT_TIMEOUT = 30.0


# -- small helpers ----------------------------------------------------------------------------


def rounds(count: int) -> str:
    return f"{count} round{'' if count == 1 else 's'}"


def allocated(path: Path) -> int:
    """Bytes a file or a directory tree takes on disk."""
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def size_text(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / MiB:.0f} MiB"


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def only_file_under(directory: Path) -> Path:
    """The one regular file a restore left somewhere under directory."""
    found = [Path(root) / name for root, _dirs, files in os.walk(directory) for name in files]
    if len(found) != 1:
        raise BenchError(f"expected one restored file under {directory}, found {len(found)}")
    return found[0]


def helper_python(csvfs: list[str]) -> str:
    """An interpreter that can import csvfs, for the snapshot driver."""
    if importlib.util.find_spec("csvfs") is not None:
        return sys.executable
    sibling = Path(csvfs[0]).parent / "python"
    if sibling.exists():
        return os.fspath(sibling)
    return csvfs[0] if "python" in Path(csvfs[0]).name else sys.executable


# -- the commands -------------------------------------------------------------------------------


def fill_random(path: Path, data_bytes: int, size: int) -> None:
    """A disk of size bytes whose first data_bytes are random, the rest never written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        piece = 4 * MiB
        for offset in range(0, data_bytes, piece):
            os.pwrite(fd, os.urandom(min(piece, data_bytes - offset)), offset)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_spots(path: Path, size: int, fraction: float, seed: int) -> list[int]:
    """Rewrite fraction of the disk in seeded random 64 KiB spots; their offsets."""
    rng = random.Random(seed)
    spots = sorted(rng.sample(range(size // SPOT), max(1, int(size * fraction) // SPOT)))
    fd = os.open(path, os.O_WRONLY)
    try:
        for spot in spots:
            os.pwrite(fd, os.urandom(SPOT), spot * SPOT)
        os.fsync(fd)
    finally:
        os.close(fd)
    return [spot * SPOT for spot in spots]


def same_spots(original: Path, restored: Path, offsets: list[int]) -> None:
    """The restored file has the original's size and bytes at the given offsets."""
    if original.stat().st_size != restored.stat().st_size:
        raise BenchError(f"{restored.name}: restored size {restored.stat().st_size} is not "
                         f"{original.stat().st_size}")
    with open(original, "rb") as one, open(restored, "rb") as other:
        for offset in offsets:
            one.seek(offset)
            other.seek(offset)
            if one.read(SPOT) != other.read(SPOT):
                raise BenchError(f"{restored}: differs from the disk at offset {offset}")


# -- the snapshot driver (a process of its own, with csvfs imported) ------------------------------


# -- the setup ----------------------------------------------------------------------------------


class Setup:
    def __init__(self, args, scratch: Path, cleanup: contextlib.ExitStack):
        self.scratch = scratch
        self.image = scratch / "vol.img"
        self.plain = scratch / "plain"
        self.plain.mkdir()
        log(f"mkfs ({args.volume_size}) and mounting nodes A and B ...")
        subprocess.run([*args.csvfs, "mkfs", self.image, "--size", args.volume_size],
                       check=True, capture_output=True, timeout=120)
        self.a = self._mount(cleanup, args, "A")
        self.b = self._mount(cleanup, args, "B")
        self.tools = Tools(args.csvfs, scratch, self.image)
        cleanup.callback(self.tools.kill_children)  # runs before the nodes stop

    def _mount(self, cleanup: contextlib.ExitStack, args, name: str) -> Path:
        server = MountProcess.csvfs_node(self.image, self.scratch / f"{name}-mnt", name,
                                         self.scratch / f"{name}.log", csvfs=args.csvfs,
                                         new_session=True)
        cleanup.callback(server.stop)
        server.start(MOUNT_TIMEOUT)
        return server.mountpoint
