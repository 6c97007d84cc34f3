"""The VM's own record of what it wrote: a local log, kept off the volume under test.

Why local, and not beside the disk on the volume: the record is the reference a disk
is checked against, so it must not depend on the system being checked. Kept on the
volume, a write csvfs lost could take the record of that write with it, and the loss
would pass unseen. On this machine every node is a local process, so a local file is
readable from "any node"; on several hosts it would go on storage of their own.

STATE/NAME.log is a sequence of fixed-size entries, appended with O_APPEND, each
with the wall-clock time it was appended at:

    W gen first count   a write of `count` sectors from `first`, logged before it is
                        issued
    D gen               that write was acknowledged (pwrite returned)
    S gen               an fsync of the disk returned: every write before it is durable
    G size              the disk was grown to `size` bytes (logged once it was)
    M number            the VM moved to another node (details in STATE/NAME.json)
    F id                a backup's writer freeze (vmload/writer.py): nothing was in
                        flight, every write before is durable, none follows until
                        the thaw; a backup taken at it holds exactly those writes
    E                   a clean end: nothing was in flight

A W with no D was in flight when the process died, or the node under it: the disk may
hold that write or what was there before. A VM never has two writes in flight that
overlap, so the order of the W entries is the order in which each sector got its
writes. A torn last entry (the process died while appending it) is ignored.

STATE/NAME.json holds what does not change per write: the disk's path on the mount,
the pid of the `run` process, the mount it is on now, and the migrations.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

# kind, count, gen (or size, number, freeze id), first, wall-clock time of the entry
_ENTRY = struct.Struct("<cxxxIQQq")
ENTRY_SIZE = _ENTRY.size
WRITE, DONE, SYNC, GROW, MOVE, FROZEN, END = b"W", b"D", b"S", b"G", b"M", b"F", b"E"


class RecordError(Exception):
    """The record is missing or cannot be read."""


@dataclass
class Entry:
    kind: bytes
    value: int  # generation, size or migration number
    first: int = 0
    count: int = 0
    time_ns: int = 0  # when it was logged: a W before its write, a D after it returned


class Log:
    """Appends entries to STATE/NAME.log."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, generation: int, first: int, count: int) -> None:
        self._append(WRITE, count, generation, first)

    def done(self, generation: int) -> None:
        self._append(DONE, 0, generation, 0)

    def synced(self, generation: int) -> None:
        self._append(SYNC, 0, generation, 0)

    def grown(self, size: int) -> None:
        self._append(GROW, 0, size, 0)

    def moved(self, number: int) -> None:
        self._append(MOVE, 0, number, 0)

    def frozen(self, freeze_id: int) -> None:
        self._append(FROZEN, 0, freeze_id, 0)

    def ended(self) -> None:
        self._append(END, 0, 0, 0)

    def flush(self) -> None:
        """Make the log durable before the disk is: an fsynced write is always logged."""
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def _append(self, kind: bytes, count: int, value: int, first: int) -> None:
        entry = _ENTRY.pack(kind, count, value, first, time.time_ns())
        if os.write(self._fd, entry) != len(entry):
            raise OSError(f"short write to {self.path}")


def read_log(path: Path) -> list[Entry]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"no record at {path}") from None
    except OSError as exc:
        raise RecordError(f"cannot read {path}: {exc.strerror}") from None
    whole = len(data) - len(data) % _ENTRY.size  # a torn last entry is ignored
    entries = []
    for offset in range(0, whole, _ENTRY.size):
        kind, count, value, first, time_ns = _ENTRY.unpack_from(data, offset)
        if kind not in (WRITE, DONE, SYNC, GROW, MOVE, FROZEN, END):
            raise RecordError(f"{path}: unknown entry {kind!r} at byte {offset}")
        entries.append(Entry(kind, value, first, count, time_ns))
    return entries


@dataclass
class Facts:
    """STATE/NAME.json."""

    vm: str
    disk: str  # path of the disk relative to the mount
    size: int  # bytes at creation
    mount: str = ""  # where the VM runs now, or ran last
    pid: int = 0
    migrations: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Facts:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise RecordError(f"no record at {path}") from None
        except (OSError, ValueError, TypeError) as exc:
            raise RecordError(f"cannot read {path}: {exc}") from None

    def save(self, path: Path) -> None:
        """Replace the file atomically: a reader sees the old or the new facts."""
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.__dict__, indent=1) + "\n")
        os.replace(temporary, path)


@dataclass
class Paths:
    log: Path
    facts: Path
    request: Path  # a migration request: the target mount, written by `vmload migrate`

    @classmethod
    def of(cls, state: Path, vm: str) -> Paths:
        return cls(state / f"{vm}.log", state / f"{vm}.json", state / f"{vm}.migrate")
