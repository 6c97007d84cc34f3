"""One VM: a process that owns a disk file on a mount and writes it at random.

Up to --iodepth writes at once (one by default), never two that overlap, like a guest's
queue: each is logged, issued with pwrite (from a thread when there are several), and
logged again once it returns. Now and then the VM fsyncs the disk, grows it, or moves to
another node's mount (a live migration: the target opens the disk while the source may
still be writing, then the source drains its queue, fsyncs and closes, and the target
carries on).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from . import stamp
from .record import DONE, END, WRITE, Entry, Facts, Log, Paths, read_log
from .writer import FROZEN_REPLY, WriterLink

log = logging.getLogger(__name__)


class VMError(Exception):
    """The VM cannot start or go on; the message says why."""


@dataclass
class Settings:
    mount: Path
    vm: str
    state: Path
    size: int = 1 << 30
    block_min: int = 4096
    block_max: int = 65536
    seconds: float = 30.0
    fsync_every: int = 64  # writes between fsyncs
    grow_every: float | None = None  # seconds between grows; None: never
    grow_by: int = 64 << 20
    max_size: int | None = None  # grows stop here; None: no limit
    migrate_every: float | None = None  # seconds between moves to the next peer
    peers: list[Path] = field(default_factory=list)
    overlap: float = 0.0  # seconds both nodes hold the disk while the source writes on
    seed: int | None = None
    iodepth: int = 1  # writes in flight at once
    writer: bool = True  # register as the disk's writer with its node, for backups


@dataclass
class Stats:
    vm: str
    seconds: float = 0.0
    writes: int = 0
    bytes: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    fsyncs: int = 0
    freezes: int = 0
    grows: int = 0
    size: int = 0
    migrations: list[dict] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> dict:
        cuts = _p50_p99(self.latencies_ms)
        seconds = self.seconds or 1e-9
        return {
            "vm": self.vm, "seconds": round(self.seconds, 3), "writes": self.writes,
            "ops_s": round(self.writes / seconds, 1),
            "mib_s": round(self.bytes / seconds / 2**20, 2),
            "p50_ms": cuts and round(cuts[0], 3), "p99_ms": cuts and round(cuts[1], 3),
            "fsyncs": self.fsyncs, "freezes": self.freezes, "grows": self.grows,
            "size": self.size,
            "migrations": self.migrations, "error": self.error,
        }


def _p50_p99(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0], values[0]
    return statistics.median(values), statistics.quantiles(values, n=100, method="inclusive")[98]


class VM:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.paths = Paths.of(settings.state, settings.vm)
        self.vm_id = stamp.vm_id(settings.vm)
        self.random = random.Random(settings.seed)
        self.blocks = _block_sizes(settings.block_min, settings.block_max)
        self.stats = Stats(settings.vm)
        self.generation = 0
        self.mount = settings.mount
        self.facts: Facts | None = None
        self.log: Log | None = None
        self.fd = -1
        self.size = 0
        self._stop = False
        self._move_asked = False
        self._since_sync = 0
        self._next_grow: float | None = None
        self._in_flight: dict[int, _InFlight] = {}  # generation -> write
        self._pool = (ThreadPoolExecutor(settings.iodepth, thread_name_prefix="vmload-io")
                      if settings.iodepth > 1 else None)
        self.writer = WriterLink(settings.vm)

    # -- start and stop ---------------------------------------------------------------------

    def open(self) -> None:
        """Create the VM's disk and record, or take up an existing VM where it stopped."""
        try:
            self.settings.state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VMError(f"cannot use {self.settings.state} as the state directory: "
                          f"{exc.strerror}") from None
        # Before the pid is published: `vmload migrate` signals it at once, and an
        # unhandled SIGUSR1 would kill the VM.
        self._install_signals()
        if self.paths.facts.exists():
            left_in_flight = self._resume()
        else:
            self._create(self.mount / f"{self.settings.vm}.img")
            left_in_flight = []
        self.log = Log(self.paths.log)
        self._finish(left_in_flight)
        self.facts.mount, self.facts.pid = str(self.mount), os.getpid()
        self.facts.save(self.paths.facts)
        if self.settings.writer:
            self.writer.connect(self.mount / self.facts.disk)

    def _create(self, disk: Path) -> None:
        try:
            self.fd = os.open(disk, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise VMError(f"{disk} exists but {self.paths.facts} does not: not a vmload "
                          "disk of this state directory") from None
        except OSError as exc:
            raise VMError(f"cannot create {disk}: {exc.strerror}") from None
        os.ftruncate(self.fd, self.settings.size)
        self.size = self.settings.size
        self.facts = Facts(self.settings.vm, disk.name, self.size)
        self.paths.log.unlink(missing_ok=True)

    def _resume(self) -> list[Entry]:
        """Open the disk of an existing VM; the writes its last run left in flight."""
        self.facts = Facts.load(self.paths.facts)
        if self.facts.pid != os.getpid() and is_vmload(self.facts.pid):
            raise VMError(f"{self.settings.vm} is running already (pid {self.facts.pid})")
        entries = read_log(self.paths.log) if self.paths.log.exists() else []
        self.generation = max((e.value for e in entries if e.kind == WRITE), default=0)
        disk = self.mount / self.facts.disk
        try:
            self.fd = os.open(disk, os.O_RDWR)
        except FileNotFoundError:
            raise VMError(f"{self.settings.vm} has a record in {self.settings.state} but no "
                          f"disk {disk}; to start it afresh, remove "
                          f"{self.settings.state}/{self.settings.vm}.*") from None
        except OSError as exc:
            raise VMError(f"cannot open {disk}: {exc.strerror}") from None
        self.size = os.fstat(self.fd).st_size
        if entries and entries[-1].kind == END:
            return []
        done = {entry.value for entry in entries if entry.kind == DONE}
        return [entry for entry in entries if entry.kind == WRITE and entry.value not in done]

    def _finish(self, writes: list[Entry]) -> None:
        """Issue each write the last run left in flight again (the same data) and log it
        as done, so the record no longer has to allow for either outcome."""
        for entry in writes:
            data = stamp.sectors(self.vm_id, entry.first, entry.count, entry.value)
            try:
                _timed_pwrite(self.fd, data, entry.first * stamp.SECTOR)
            except OSError as exc:
                raise VMError("cannot finish a write left in flight: "
                              f"{exc.strerror or exc}") from None
            self.log.done(entry.value)

    def close(self) -> None:
        self.writer.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # writes still in flight after an error end
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass  # the node under the disk is gone; the descriptor is released anyway
            self.fd = -1
        if self.log is not None:
            self.log.close()
            self.log = None

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> Stats:
        """Write until the time is up or a stop signal; the stats, with `error` set if
        the disk failed under the VM."""
        settings = self.settings
        started = time.monotonic()
        deadline = started + settings.seconds
        self._next_grow = started + settings.grow_every if settings.grow_every else None
        next_move = started + settings.migrate_every if settings.migrate_every else None
        try:
            while not self._stop and time.monotonic() < deadline:
                if self._move_asked or (next_move is not None
                                        and time.monotonic() >= next_move):
                    self._migrate(self._next_mount())
                    if settings.migrate_every:
                        next_move = time.monotonic() + settings.migrate_every
                self._step()
            self._fsync()
            self.log.ended()
        except OSError as exc:
            self.stats.error = f"{exc.strerror or exc} on {self.mount}"
        finally:
            self.stats.seconds = time.monotonic() - started
            self.stats.size = self.size
        return self.stats

    def _install_signals(self) -> None:
        def stop(*_):
            self._stop = True

        def move(*_):
            self._move_asked = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGUSR1, move)

    def _step(self) -> None:
        """Grow the disk if it is time to, then issue one write (once there is room in
        the queue), and fsync when it is due."""
        if self.writer.freeze_asked is not None:
            self._freeze()
        if self._next_grow is not None and time.monotonic() >= self._next_grow:
            self._grow()
            self._next_grow = time.monotonic() + self.settings.grow_every
        while len(self._in_flight) >= self.settings.iodepth:
            self._reap(block=True)
        self._issue_one()
        self._reap(block=False)
        if self.settings.fsync_every and self._since_sync >= self.settings.fsync_every:
            self._fsync()

    def _issue_one(self) -> None:
        first, count = self._pick_range()
        self.generation += 1
        data = stamp.sectors(self.vm_id, first, count, self.generation)
        self.log.write(self.generation, first, count)
        offset = first * stamp.SECTOR
        if self._pool is None:
            self._completed(self.generation, len(data), _timed_pwrite(self.fd, data, offset))
            return
        future = self._pool.submit(_timed_pwrite, self.fd, data, offset)
        self._in_flight[self.generation] = _InFlight(first, count, future)

    def _pick_range(self) -> tuple[int, int]:
        """A random block that overlaps no write in flight (a guest never issues two
        writes to one block at once: which one lands last would be undefined)."""
        sectors = self.size // stamp.SECTOR
        while True:
            for _ in range(64):
                count = min(self.random.choice(self.blocks), sectors)
                first = self.random.randrange(0, sectors - count + 1)
                if not any(first < w.first + w.count and w.first < first + count
                           for w in self._in_flight.values()):
                    return first, count
            self._reap(block=True)  # a small disk, crowded: let a write finish first

    def _reap(self, block: bool) -> None:
        """Log the writes that have returned: all of those done now, or (block) at least
        one. A failed write raises its OSError."""
        if not self._in_flight:
            return
        futures = [write.future for write in self._in_flight.values()]
        done, _ = wait(futures, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for generation, write in list(self._in_flight.items()):
            if write.future in done:
                del self._in_flight[generation]
                self._completed(generation, write.count * stamp.SECTOR,
                                write.future.result())

    def _completed(self, generation: int, length: int, latency_ms: float) -> None:
        self.log.done(generation)
        self.stats.latencies_ms.append(latency_ms)
        self.stats.writes += 1
        self.stats.bytes += length
        self._since_sync += 1

    def _drain(self) -> None:
        while self._in_flight:
            self._reap(block=True)

    def _fsync(self) -> None:
        self._drain()  # a flush covers the writes that have returned: wait for all
        self.log.flush()  # the record is never behind what the disk has made durable
        os.fsync(self.fd)
        self.log.synced(self.generation)
        self.stats.fsyncs += 1
        self._since_sync = 0

    def _freeze(self) -> None:
        """A backup's freeze: drain, flush, say where in the record, hold until thawed."""
        asked, self.writer.freeze_asked = self.writer.freeze_asked, None
        self._fsync()
        self.log.frozen(asked["id"])
        self.log.flush()
        self.writer.send({"op": FROZEN_REPLY, "id": asked["id"]})
        if not self.writer.thawed.wait(timeout=2 * asked.get("timeout", 10.0)):
            log.warning("%s: no thaw came for freeze %s; going on", self.settings.vm,
                        asked["id"])
        self.stats.freezes += 1

    def _grow(self) -> None:
        settings = self.settings
        new_size = self.size + settings.grow_by
        if settings.max_size is not None:
            new_size = min(new_size, settings.max_size)
        if new_size <= self.size:
            return
        os.ftruncate(self.fd, new_size)
        self.size = new_size
        self.log.grown(new_size)
        self.stats.grows += 1

    # -- live migration ---------------------------------------------------------------------

    def _record_move(self, move: dict) -> None:
        """A migration, done or (with "error") given up, in the stats and the facts."""
        self.stats.migrations.append(move)
        self.facts.migrations.append(move)
        self.facts.save(self.paths.facts)

    def _next_mount(self) -> Path:
        """The mount asked for with `vmload migrate`, else the next peer in turn."""
        if self._move_asked:
            self._move_asked = False
            try:
                target = Path(self.paths.request.read_text().strip())
                self.paths.request.unlink()
                return target
            except OSError:
                pass  # no request file: a bare SIGUSR1 moves to the next peer
        ring = [self.settings.mount, *self.settings.peers]
        if self.mount in ring:
            return ring[(ring.index(self.mount) + 1) % len(ring)]
        return ring[0]

    def _migrate(self, target: Path) -> None:
        if target == self.mount:
            return
        disk = self.facts.disk
        began = time.monotonic()
        try:
            new_fd = os.open(target / disk, os.O_RDWR)  # the target opens: both hold it
        except OSError as exc:  # as a hypervisor does: the VM stays where it runs
            self._record_move({"from": str(self.mount), "to": str(target),
                               "at": round(time.time(), 3),
                               "error": f"cannot open the disk there: {exc.strerror}"})
            log.warning("%s stays on %s: cannot open %s: %s", self.settings.vm, self.mount,
                        target / disk, exc.strerror)
            return
        overlap_end = began + self.settings.overlap
        while time.monotonic() < overlap_end and not self._stop:
            self._step()  # the source runs on meanwhile, as a VM does during pre-copy
        switch = time.monotonic()
        self._fsync()  # the source drains its queue and flushes
        os.close(self.fd)
        self.fd = new_fd
        self.size = os.fstat(self.fd).st_size
        ended = time.monotonic()
        move = {"from": str(self.mount), "to": str(target), "at": round(time.time(), 3),
                "handoff_ms": round((ended - switch) * 1e3, 3),
                "overlap_ms": round((switch - began) * 1e3, 3)}
        self.mount = target
        if self.settings.writer:  # the writer of its disk with the node it runs on now
            if self.writer.freeze_asked is not None:
                self._freeze()  # asked by the node it leaves: answer there first
            self.writer.connect(target / disk)
        self.log.moved(len(self.facts.migrations) + 1)
        self.facts.mount = str(target)
        self._record_move(move)
        log.info("%s moved from %s to %s (handoff %.1f ms)", self.settings.vm, move["from"],
                 move["to"], move["handoff_ms"])


@dataclass
class _InFlight:
    first: int
    count: int
    future: Future


def _timed_pwrite(fd: int, data: bytes, offset: int) -> float:
    """pwrite the whole buffer; its latency in ms. A short write is an error."""
    started = time.perf_counter()
    written = os.pwrite(fd, data, offset)
    latency = (time.perf_counter() - started) * 1e3
    if written != len(data):
        raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)")
    return latency


def _block_sizes(smallest: int, largest: int) -> list[int]:
    """Write sizes in sectors: the powers of two from smallest to largest bytes."""
    sizes, size = [], smallest
    while size <= largest:
        sizes.append(size // stamp.SECTOR)
        size *= 2
    return sizes


def completed_moves(migrations: list[dict]) -> list[dict]:
    """The migrations a VM made, without those it gave up (they carry an "error")."""
    return [move for move in migrations if "error" not in move]


def is_vmload(pid: int) -> bool:
    """Is pid a live vmload process (not a reused pid)?"""
    if pid <= 0:
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"vmload" in command
