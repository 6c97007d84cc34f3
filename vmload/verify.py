"""Check a VM's disk, read through any mount, against the VM's own record."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import stamp
from .record import DONE, END, FROZEN, GROW, WRITE, Entry, RecordError

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
MAX_LISTED = 10  # mismatches shown one by one; the rest are counted


@dataclass
class Expected:
    """What the disk must hold, replayed from the log."""

    size: int
    generations: dict[int, int] = field(default_factory=dict)  # sector -> last acked write
    # Sectors of writes the log has no acknowledgement of (the process or its node died
    # while they were in flight): each may hold that write or what was there before.
    in_flight: dict[int, int] = field(default_factory=dict)
    writes: int = 0
    grows: int = 0
    clean: bool = False  # the run ended cleanly

    @classmethod
    def replay(cls, entries: list[Entry], size: int, at_freeze: int | None = None,
               at_time: int | None = None) -> Expected:
        """What the disk holds now; with `at_freeze`, what a backup taken at that freeze
        holds: exactly the writes before it (none was in flight then); with `at_time`,
        what a crash-consistent snapshot at that wall-clock time holds: every write
        acknowledged before it, and perhaps one issued before it and acknowledged after
        (in flight at the point); none issued after it."""
        if at_time is not None:
            return cls._replay_until(entries, size, at_time)
        if at_freeze is not None:
            cut = next((index for index, entry in enumerate(entries)
                        if entry.kind == FROZEN and entry.value == at_freeze), None)
            if cut is None:
                raise RecordError(f"the record has no freeze {at_freeze}")
            entries = entries[:cut]
        expected = cls(size)
        acknowledged = {entry.value for entry in entries if entry.kind == DONE}
        for entry in entries:
            if entry.kind == WRITE:
                done = entry.value in acknowledged
                target = expected.generations if done else expected.in_flight
                for number in range(entry.first, entry.first + entry.count):
                    target[number] = entry.value
                expected.writes += 1
            elif entry.kind == GROW:
                expected.size = max(expected.size, entry.value)
                expected.grows += 1
            expected.clean = entry.kind == END
        return expected

    @classmethod
    def _replay_until(cls, entries: list[Entry], size: int, point_ns: int) -> Expected:
        expected = cls(size)
        acked_at = {entry.value: entry.time_ns for entry in entries if entry.kind == DONE}
        for entry in entries:
            if entry.time_ns >= point_ns:
                continue  # W entries are logged before their write: issued after the point
            if entry.kind == WRITE:
                done = acked_at.get(entry.value, point_ns) < point_ns
                for number in range(entry.first, entry.first + entry.count):
                    if done:
                        expected.generations[number] = entry.value
                        expected.in_flight.pop(number, None)
                    else:
                        expected.in_flight[number] = entry.value
                expected.writes += 1
            elif entry.kind == GROW:
                expected.size = max(expected.size, entry.value)
                expected.grows += 1
        return expected

    def allows(self, number: int, found: stamp.Found, vm: int) -> bool:
        acked = self.generations.get(number, 0)
        if self._holds(found, number, acked, vm):
            return True
        maybe = self.in_flight.get(number)
        return maybe is not None and self._holds(found, number, maybe, vm)

    @staticmethod
    def _holds(found: stamp.Found, number: int, generation: int, vm: int) -> bool:
        if generation == 0:
            return found.kind == "zero"
        return (found.kind == "stamp" and found.vm == vm and found.number == number
                and found.generation == generation)


@dataclass
class Mismatch:
    sector: int
    expected: str
    found: str


@dataclass
class Report:
    vm: str
    path: str
    size: int  # bytes on the disk
    checked: int = 0  # sectors
    written: int = 0  # sectors the VM wrote at least once
    mismatches: int = 0
    listed: list[Mismatch] = field(default_factory=list)
    problem: str | None = None  # the disk itself is wrong (too short, say)

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.problem is None


def verify(disk: Path, vm: str, expected: Expected) -> Report:
    """Read the whole disk and check every sector. Raises OSError if it cannot be read."""
    own = stamp.vm_id(vm)
    fd = os.open(disk, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        report = Report(vm, str(disk), size)
        if size < expected.size:
            report.problem = (f"the disk is {size} bytes, but the VM grew it to "
                              f"{expected.size}")
        _check_sectors(fd, size, own, expected, report)
    finally:
        os.close(fd)
    report.written = len(expected.generations.keys() | expected.in_flight.keys())
    missing = [n for n in expected.generations if n * stamp.SECTOR >= size]
    for number in missing:
        _mismatch(report, number, _describe_expected(expected, number), "past the end")
    return report


def _check_sectors(fd: int, size: int, own: int, expected: Expected, report: Report) -> None:
    zero_chunk = bytes(READ_CHUNK)
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(READ_CHUNK, size - offset), offset)
        if not chunk:
            raise OSError(f"unexpected end of file at byte {offset}")
        first = offset // stamp.SECTOR
        count = len(chunk) // stamp.SECTOR
        if chunk == zero_chunk[:len(chunk)] and not _any_written(expected, first, count):
            report.checked += count  # a hole the VM never wrote: all zeros, as it must be
        else:
            _check_chunk(chunk, first, count, own, expected, report)
        offset += len(chunk)


def _any_written(expected: Expected, first: int, count: int) -> bool:
    generations, in_flight = expected.generations, expected.in_flight
    return any(n in generations or n in in_flight for n in range(first, first + count))


def _check_chunk(chunk: bytes, first: int, count: int, own: int, expected: Expected,
                 report: Report) -> None:
    view = memoryview(chunk)
    for index in range(count):
        number = first + index
        found = stamp.parse(bytes(view[index * stamp.SECTOR:(index + 1) * stamp.SECTOR]))
        report.checked += 1
        if not expected.allows(number, found, own):
            _mismatch(report, number, _describe_expected(expected, number),
                      found.describe(own))


def _describe_expected(expected: Expected, number: int) -> str:
    acked = expected.generations.get(number, 0)
    text = f"generation {acked}" if acked else "zeros (never written)"
    maybe = expected.in_flight.get(number)
    if maybe is not None:
        text += f" or generation {maybe} (in flight)"
    return text


def _mismatch(report: Report, number: int, wanted: str, found: str) -> None:
    report.mismatches += 1
    if len(report.listed) < MAX_LISTED:
        report.listed.append(Mismatch(number, wanted, found))
