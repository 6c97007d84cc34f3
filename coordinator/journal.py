"""The metadata journal: group commit of checksummed records, and replay.

Records are sector aligned and carry (epoch, seq, batch_first). A record
commits when the write of its batch is on stable storage. Replay starts
after the newest valid checkpoint and accepts only the next sequence
number, so a torn or stale record ends it.

A batch is written with RWF_DSYNC, which syncs its own range and nothing else
of the image, so a commit costs its own record and not a flush of every page
the nodes wrote. Where a record depends on file data the coordinator wrote
itself (an append, a redirected write, a snapshot's copies, zeros over a new
block), `whole_image_sync` asks for the write and an fdatasync of the whole
image instead, which makes that data durable before the record.

A bad record followed by valid records of a *later* batch cannot be a torn
write: later batches are only written after the earlier one was durable.
That is corruption, and replay reports it instead of silently stopping.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from csvfs.cluster.blocking import BlockingCalls
from csvfs.volume import format as fmt
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

SCAN_CHUNK = 1 << 20
# Batches are written one at a time, on a thread of their own (cheaper than to_thread's)
_batch_writes = BlockingCalls("csvfs journal")


class LeaseLost(OSError):
    """The coordinator may no longer commit: another node may hold the lease."""


def unless_lapsed(deadline: float, write: Callable, *args):
    """write(*args) in a worker thread, unless the lease ran out (time.monotonic()
    `deadline`) since the event loop checked it. A process stopped in between (SIGSTOP,
    a long stall) wakes with the write still to do, after another node may have taken
    over: checking here, in the thread that writes, leaves no room for that."""
    if time.monotonic() >= deadline:
        raise LeaseLost("the coordinator lease ran out before the write; not writing")
    return write(*args)


class JournalFull(Exception):
    pass


class JournalCorrupt(Exception):
    def __init__(self, offset: int, seq: int, reason: str):
        super().__init__(
            f"journal record {seq} at offset {offset} is corrupt ({reason}) "
            "but later records are intact"
        )
        self.offset = offset
        self.seq = seq


@dataclass
class ReplayResult:
    records: list[fmt.JournalRecord]
    end_offset: int  # where the next record goes
    stop_reason: str  # why replay ended ("end of journal", "torn record", ...)
    corrupt: JournalCorrupt | None = None


def scan(volume: Volume, after_seq: int, min_epoch: int, gen: int = 0,
         checkpoint_lost: bool = False) -> ReplayResult:
    """Read the records of generation `gen` that follow checkpoint seq `after_seq`.

    `checkpoint_lost` says a checkpoint slot is unreadable: then a record of another
    generation that is newer than expected means that checkpoint's records are gone.
    """
    region = volume.sb.journal
    data = volume.read(region.offset, region.length)
    records: list[fmt.JournalRecord] = []
    offset, expected, epoch = 0, after_seq + 1, min_epoch
    reason, stale, gap = "end of journal", False, None
    while offset < region.length:
        try:
            record, length = fmt.decode_journal_record(memoryview(data)[offset:])
        except fmt.FormatError as exc:
            reason = "end of journal" if _is_blank(data, offset) else f"torn record: {exc}"
            break
        if record.gen != gen or record.seq != expected:
            stale = True  # a record from before the last checkpoint
            same_lineage = record.gen == gen or checkpoint_lost
            if same_lineage and record.seq > expected and record.batch_first > expected:
                # Its batch began after `expected` was durable: that record is lost
                # (the checkpoint that covered it is gone), not stale.
                reason = f"record {record.seq} found where {expected} belongs"
                gap = JournalCorrupt(offset, expected, f"record {record.seq} is in its place")
            break
        if record.epoch < epoch:
            reason = f"record {record.seq} is from stale epoch {record.epoch}"
            break
        records.append(record)
        epoch = record.epoch
        offset += length
        expected += 1
    result = ReplayResult(records, offset, reason, gap)
    if not stale:
        result.corrupt = _find_later_batch(data, offset, expected)
    return result


def raw_records(volume: Volume) -> list[fmt.JournalRecord]:
    """Every intact record block in the journal region, of any generation, in offset order.

    For forensics and tests: replay uses only one generation, but stale
    coordinators or old checkpoints leave other blocks behind.
    """
    region = volume.sb.journal
    data = memoryview(volume.read(region.offset, region.length))
    found = []
    for offset in range(0, region.length, fmt.SECTOR):
        if data[offset : offset + 4] != fmt.JOURNAL_MAGIC:
            continue
        try:
            record, _ = fmt.decode_journal_record(data[offset:])
        except fmt.FormatError:
            continue
        found.append(record)
    return found


def _is_blank(data: bytes, offset: int) -> bool:
    return data[offset : offset + 4] == b"\0\0\0\0"


def _find_later_batch(data: bytes, bad_offset: int, bad_seq: int) -> JournalCorrupt | None:
    """Look past a bad record for a valid one from a batch that began after it."""
    position = bad_offset + fmt.SECTOR
    while True:
        position = data.find(fmt.JOURNAL_MAGIC, position)
        if position < 0:
            return None
        if position % fmt.SECTOR == 0:
            try:
                record, _ = fmt.decode_journal_record(memoryview(data)[position:])
            except fmt.FormatError:
                pass
            else:
                if record.seq > bad_seq and record.batch_first > bad_seq:
                    return JournalCorrupt(bad_offset, bad_seq, "checksum mismatch")
        position += 1


class Journal:
    """Appends records with group commit. Owned by the coordinator."""

    def __init__(self, volume: Volume, epoch: int, next_seq: int, offset: int, gen: int = 0):
        self.volume = volume
        self.gen = gen
        self.region = volume.sb.journal
        self.epoch = epoch
        self.next_seq = next_seq
        self.offset = offset  # journal bytes already on disk
        self.durable_seq = next_seq - 1
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._batch_first = next_seq
        self._flushing = False
        self._flushed = trio.Event()
        self.broken: BaseException | None = None
        self.whole_image_sync = False  # the coordinator wrote data since the last flush
        # Asked right before every write: False once the coordinator may no longer
        # commit (its lease lapsed), so a stale coordinator never writes a record.
        self.may_write: Callable[[], bool] = lambda: True
        # time.monotonic() until which the lease allows a write, asked right after
        # may_write(): the writing thread checks it again just before the write
        self.write_deadline: Callable[[], float] = lambda: math.inf

    @property
    def used_fraction(self) -> float:
        return (self.offset + self._pending_bytes) / self.region.length

    def append(self, op: dict) -> int:
        """Queue a record; returns its seq. Call `wait_durable(seq)` before exposing it."""
        self._check_usable(appending=True)
        if not self._pending:
            self._batch_first = self.next_seq
        record = fmt.JournalRecord(self.epoch, self.next_seq, self._batch_first, op, self.gen)
        blob = fmt.encode_journal_record(record)
        if self.offset + self._pending_bytes + len(blob) > self.region.length:
            raise JournalFull("journal is full")
        self._pending.append(blob)
        self._pending_bytes += len(blob)
        self.next_seq += 1
        return record.seq

    def fits(self, extra: int) -> bool:
        return self.offset + self._pending_bytes + extra <= self.region.length

    async def wait_durable(self, seq: int | None = None) -> None:
        target = self.next_seq - 1 if seq is None else seq
        while self.durable_seq < target:
            self._check_usable()
            if self._flushing:
                await self._flushed.wait()
            else:
                await self._flush()

    def _check_usable(self, appending: bool = False) -> None:
        if isinstance(self.broken, LeaseLost):
            raise LeaseLost(str(self.broken))
        if self.broken is not None and appending:
            raise OSError(f"journal is unusable after an I/O error: {self.broken}")
        if self.broken is not None:
            raise OSError(f"journal write failed: {self.broken}")

    async def _flush(self) -> None:
        self._flushing = True
        batch, last = b"".join(self._pending), self.next_seq - 1
        self._pending, self._pending_bytes = [], 0
        try:
            if not self.may_write():
                raise LeaseLost("the coordinator lease has lapsed; not committing")
            await self._write_batch(batch, self.write_deadline())
        except LeaseLost as exc:  # stepping down: the requests go to the next coordinator
            self.broken = exc
            log.warning("%s", exc)
        except OSError as exc:
            self.broken = exc
            log.error("journal commit failed: %s", exc)
        else:
            self.offset += len(batch)
            self.durable_seq = last
        finally:
            self._flushing = False
            self._flushed.set()
            self._flushed = trio.Event()

    async def _write_batch(self, batch: bytes, deadline: float) -> None:
        """On stable storage: the batch alone, or, after data the coordinator wrote,
        the whole image. Either in a worker thread: the event loop goes on meanwhile."""
        offset = self.region.offset + self.offset
        if self.whole_image_sync:
            self.whole_image_sync = False  # data written from now on waits for the next
            await _batch_writes.run(unless_lapsed, deadline, self._write_and_sync, offset,
                                    batch)
        else:
            await _batch_writes.run(unless_lapsed, deadline, self.volume.write_durable,
                                    offset, batch)

    def _write_and_sync(self, offset: int, batch: bytes) -> None:
        self.volume.write(offset, batch)
        os.fdatasync(self.volume.fd)

    def restart_after_checkpoint(self, gen: int) -> None:
        """A checkpoint now covers every record: start generation `gen` at the head."""
        assert not self._pending and self.durable_seq == self.next_seq - 1
        self.offset = 0
        self.gen = gen
