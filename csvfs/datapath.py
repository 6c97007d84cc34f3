"""The data path: reads and writes go straight to the image at the mapped offsets.

A request inside the file's size and allocated units costs one dict lookup
and one pread/pwrite; a map is in granules, the allocation unit or, for a
small file, a 4 KiB block (csvfs/volume/extents.py), and the path is the
same for both; anything else (a hole, a write past EOF) asks the
coordinator to extend the file first. Nothing here knows about FUSE or RPC:
the coordinator is reached through the `meta` callable given at start.

The map is never behind a change another node has been told is done: the
coordinator pushes every new map to the file's other holders, and waits until
they have it, before it answers the node that made the change. So a hole reads
as zeros and the end of the file is the end, with no question asked.

A granule that a snapshot holds is marked "ask first" in the map: the first
write there goes to the coordinator, which preserves its old contents and
answers with the map that lets the write go ahead (csvfs/snapshot.py tells the
protocol). A map older than the last snapshot point this node heard of asks
first everywhere. A volume-wide hold, also closed and opened by that protocol,
stops all I/O while the point is set.

Change tracking is finer than the map: for a file whose map says "stripes",
each write notes which 64 KiB stripes of its units it touched (`written`), and
the node reports them when it acknowledges the next hold, or says goodbye, so
that an incremental backup reads those stripes and not whole units.

The per-inode I/O gate is a flag and an event, closed and opened by the
quiesce protocol (csvfs/quiesce.py). This module's I/O runs inline in the trio
thread, so once a request passes the gate it completes without yielding; a
pause therefore never has in-flight I/O to drain beyond the request that is
already running.

The fast lane (`lane`: the FUSE shim's, csvfs/fuse_shim.py FastLane) answers
the plain reads and writes before they reach Python, from a mirror of this
module's state that every change here keeps exact: a file is in the lane only
while its gate is open (`OpenFile.mirror`), its writes only to granules that
need not ask first (`ask_runs`; it notes their stripes itself, and
`collect_stripes` takes them into `written`), and the lane's deadline is `valid_until`
while no hold, fence or redirection is on (`_push_deadline`). Its worker
threads have requests in flight at once, but the lane hands the trio thread
back only once none is in flight (csvfs/_fast_path.c), so when this code runs
and changes the mirror, nothing of the lane's is in flight either: the gate
stays exact. Whatever the lane does not answer comes here as before.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import Awaitable, Callable

import trio

from csvfs.cluster.blocking import BlockingCalls
from csvfs.redirect import StoragePath
from csvfs.volume.extents import from_runs, pieces, stripe_mask

log = logging.getLogger(__name__)

_syncs = BlockingCalls("csvfs fdatasync")  # the image's, for fsyncs the lane left to us

GRANT_USE = 0.8  # fraction of a grant or lease inside which this node does direct I/O

MetaCall = Callable[..., Awaitable]


class OpenFile:
    """This node's view of one open inode, shared by all its handles: its map, and
    the gate that the quiesce protocol closes (csvfs/quiesce.py)."""

    __slots__ = ("ino", "size", "units", "runs", "granule", "version", "refs", "paused",
                 "resumed", "_dirty_mtime", "gone", "ask", "ask_runs", "stripes", "lane",
                 "written", "_coordinator_wrote")

    def __init__(self, ino: int, size: int, runs: list, version: int, granule: int,
                 lane: NoLane, written: dict[int, dict[int, int]]):
        self.ino = ino
        self.size = size
        self.runs = runs  # the map as it came: [file granule, volume granule, count]...
        self.units = from_runs(runs)  # file granule -> volume granule
        self.granule = granule  # bytes per map entry: the unit, or BLOCK for a small file
        self.version = version
        self.refs = 0
        self.paused = False  # the gate is closed: I/O waits for `resumed`
        self.resumed = trio.Event()
        self._dirty_mtime = 0
        self.gone = False  # the file vanished while this node was cut off: ESTALE
        self.ask: set[int] = set()  # file granules whose first write asks the coordinator
        self.ask_runs: list = []  # the same as [first, count] runs, for the lane
        self.stripes = False  # note the stripes each write touches (change tracking)
        self.lane = lane
        self.written = written  # the data path's: stripes written, per inode and unit
        # The coordinator wrote data of ours (an append, a redirected write) since the
        # last fsync: the next one must have the coordinator flush it too.
        self._coordinator_wrote = False

    @property
    def dirty_mtime(self) -> int:
        """Time of the last local write not yet sent to the coordinator (0: none), the
        lane's included."""
        self._dirty_mtime = max(self._dirty_mtime, self.lane.take_mtime(self.ino))
        return self._dirty_mtime

    @dirty_mtime.setter
    def dirty_mtime(self, value: int) -> None:
        self.lane.take_mtime(self.ino)
        self._dirty_mtime = value

    @property
    def coordinator_wrote(self) -> bool:
        return self._coordinator_wrote

    @coordinator_wrote.setter
    def coordinator_wrote(self, value: bool) -> None:
        """The lane does this file's fdatasyncs only while the coordinator has nothing
        of it to flush."""
        if value != self._coordinator_wrote:
            self._coordinator_wrote = value
            self.mirror()

    def ask_all(self) -> None:
        """Every granule of the map asks first."""
        self.ask = set(self.units)
        self.ask_runs = [[first, count] for first, _volume, count in self.runs]

    def ask_only(self, runs: list | None) -> None:
        """The granules of these [first, count] runs ask first."""
        self.ask_runs = [[first, count] for first, count in runs or ()]
        self.ask = {first + step for first, count in self.ask_runs for step in range(count)}

    def mirror(self) -> None:
        """Show the fast lane this file as it is now: served there while the gate is
        open, with writes there except to the granules that ask first."""
        if self.paused or self.gone or self.refs <= 0:
            self.leave_lane()
        else:
            self.lane.file(self.ino, self.size, self.granule, self.runs,
                           sync_here=not self.coordinator_wrote, note_stripes=self.stripes,
                           asks=self.ask_runs)

    def leave_lane(self) -> None:
        self.collect_stripes()
        self._dirty_mtime = max(self._dirty_mtime, self.lane.drop_file(self.ino))

    def collect_stripes(self) -> None:
        """Take the stripes the lane's writes noted into `written`."""
        noted = self.lane.take_stripes(self.ino)
        if noted:
            units = self.written.setdefault(self.ino, {})
            for unit, mask in noted:
                units[unit] = units.get(unit, 0) | mask

    def close_gate(self) -> None:
        if not self.paused:
            self.paused = True
            self.resumed = trio.Event()
            self.leave_lane()

    def open_gate(self) -> None:
        if self.paused:
            self.paused = False
            self.resumed.set()
            self.mirror()

    def close_for_good(self) -> None:
        """Shut down, or gone: whoever waits at the gate wakes to find out why."""
        self.paused = True
        self.resumed.set()
        self.leave_lane()


class NoLane:
    """No fast lane (in-process use, or no FUSE shim): every request comes to Python.
    csvfs/fuse_shim.py FastLane has the same calls."""

    def stop(self) -> None:
        pass

    def deadline(self, valid_until: float | None) -> None:
        pass

    def fault(self, on: bool) -> None:
        pass

    def file(self, ino: int, size: int, granule: int, runs: list,
             sync_here: bool = True, note_stripes: bool = False,
             asks: list | None = None) -> None:
        pass

    def take_stripes(self, ino: int) -> list[tuple[int, int]]:
        return []

    def drop_file(self, ino: int) -> int:
        return 0

    def take_mtime(self, ino: int) -> int:
        return 0

    def handle(self, fh: int, ino: int, writes: bool) -> None:
        pass

    def drop_handle(self, fh: int) -> None:
        pass

    def counts(self) -> tuple[int, int, int, int, int]:
        return 0, 0, 0, 0, 0


class DataPath:
    def __init__(self, fd: int, data_offset: int, unit_size: int, meta: MetaCall,
                 revalidate: Callable[[], Awaitable[float | None]] | None = None,
                 image_io: tuple = (), lane: NoLane | None = None):
        """image_io: the image's (pread, pwrite), Volume's (O_DIRECT or not); by
        default os.pread and os.pwrite on fd. lane: the FUSE shim's fast lane."""
        self.fd = fd
        self.lane = lane or NoLane()
        # Every data pread, pwrite and fdatasync goes through it; when one fails, I/O
        # goes to the coordinator instead (csvfs/redirect.py tells the protocol).
        self.storage = StoragePath(fd, *image_io)
        self.storage.on_path_change = self._push_deadline
        self.base = data_offset
        self.unit = unit_size
        self.meta = meta
        self.files: dict[int, OpenFile] = {}
        self.fenced = False  # shut down: no I/O at all any more
        self.holding = False  # the snapshot hold: no I/O at all while a point is set
        # Direct I/O is allowed until this time.monotonic() deadline, which the node moves
        # on while its session is valid: the coordinator lease on the coordinator, the
        # coordinator's grant elsewhere. Past it, the slow path awaits `revalidate`
        # first, so a node that was stalled or cut off cannot write a single byte before
        # it knows its maps are current. `revalidate` returns the new deadline, or None
        # when the node is shutting down.
        self.valid_until = math.inf
        self.revalidate = revalidate or _always_valid
        self.hold_over = trio.Event()
        self.snapshot_version = 0  # maps older than this ask first everywhere
        # ino -> file unit -> mask of the stripes written there since the last report
        self.written: dict[int, dict[int, int]] = {}

    @property
    def valid_until(self) -> float:
        return self._valid_until

    @valid_until.setter
    def valid_until(self, deadline: float) -> None:
        self._valid_until = deadline
        self._push_deadline()

    def _push_deadline(self) -> None:
        """The lane serves until valid_until, unless I/O must stop or go elsewhere; an
        injected fault fails its calls as it fails ours."""
        stopped = self.holding or self.fenced or self.storage.redirected
        self.lane.fault(self.storage.fault)
        self.lane.deadline(None if stopped else self._valid_until)

    # -- open files ------------------------------------------------------------------

    def opened(self, ino: int, size: int, runs: list, version: int,
               granule: int | None = None, ask: list | None = None,
               stripes: bool = False) -> OpenFile:
        """One more handle of ino, with the map an open returned."""
        self._check_fenced()
        handle = self.files.get(ino)
        if handle is None:
            handle = self.files[ino] = OpenFile(ino, size, runs, version,
                                                granule or self.unit, self.lane, self.written)
            self._set_asks(handle, ask)
            handle.stripes = stripes
        else:
            self.update_map(ino, size, runs, version, granule, ask, stripes)
        handle.refs += 1
        handle.mirror()
        return handle

    def closed(self, handle: OpenFile) -> bool:
        """Drop one reference; True when this node no longer has the inode open."""
        handle.refs -= 1
        if handle.refs > 0:
            return False
        handle.leave_lane()
        self.files.pop(handle.ino, None)
        return True

    def update_map(self, ino: int, size: int, runs: list, version: int = 0,
                   granule: int | None = None, ask: list | None = None,
                   stripes: bool = False) -> bool:
        """Take a new map of ino unless a newer one is here already; False if ino is not
        open here. `granule` is the map's (the unit if not given)."""
        handle = self.files.get(ino)
        if handle is None:
            return False
        if version and version < handle.version:
            return True  # a reply overtaken by a newer map
        self._set_map(handle, size, runs, max(handle.version, version), granule, ask, stripes)
        return True

    def reset_map(self, handle: OpenFile, reply: dict) -> None:
        """Take the coordinator's map at a rejoin, whatever version this node saw before
        (the versions of another coordinator's journal)."""
        self._set_map(handle, *map_fields(reply))

    def _set_map(self, handle: OpenFile, size: int, runs: list, version: int,
                 granule: int | None, ask: list | None, stripes: bool) -> None:
        handle.size = size
        handle.runs = runs
        handle.units = from_runs(runs)
        handle.granule = granule or self.unit
        handle.version = version
        handle.stripes = stripes
        self._set_asks(handle, ask)
        handle.mirror()

    def _set_asks(self, handle: OpenFile, ask: list | None) -> None:
        """The granules to ask first about: as the map says, or every one if the map is
        older than the last snapshot point (it could not say)."""
        if handle.version < self.snapshot_version:
            handle.ask_all()
        else:
            handle.ask_only(ask)

    # -- the snapshot hold (csvfs/snapshot.py) ------------------------------------------------

    def hold(self) -> None:
        """Stop I/O on every file. Requests run inline, so none is in flight now."""
        if not self.holding:
            self.holding = True
            self.hold_over = trio.Event()
            self._push_deadline()

    def end_hold(self, version: int) -> None:
        """The snapshot point `version` is set: every map older than it asks first."""
        if version > self.snapshot_version:
            self.snapshot_version = version
            for handle in self.files.values():
                if handle.version < version:
                    handle.ask_all()
                    handle.mirror()
        self.holding = False
        self.hold_over.set()
        self._push_deadline()

    def stripe_report(self) -> list:
        """[[ino, [[file unit, stripes mask]...]]...]: what this node wrote since its
        last report, in files whose maps say "stripes"."""
        for handle in self.files.values():
            handle.collect_stripes()
        return [[ino, list(units.items())] for ino, units in self.written.items() if units]

    def stripes_reported(self) -> None:
        """The coordinator recorded the last report (at a hold nothing was written since)."""
        self.written.clear()  # the open files share this dict

    # -- I/O ------------------------------------------------------------------------------

    def read_direct(self, handle: OpenFile, offset: int, length: int) -> bytes | None:
        """The fast path: the whole request, or None if the file is paused or held, or
        the session needs revalidating."""
        if handle.paused or self.holding or time.monotonic() > self.valid_until:
            return None
        if self.storage.redirected:
            return None
        try:
            return self._read_mapped(handle, offset, length)
        except OSError as exc:
            self.storage.failed("pread", exc)
            return None

    def _read_mapped(self, handle: OpenFile, offset: int, length: int) -> bytes:
        end = min(offset + length, handle.size)
        if offset >= end:
            return b""
        unit = handle.granule
        file_unit = offset // unit
        if (end - 1) // unit != file_unit:
            return b"".join(self._read_pieces(handle, offset, end))
        volume_unit = handle.units.get(file_unit)
        if volume_unit is None:
            return bytes(end - offset)
        return self._pread(end - offset, self.base + volume_unit * unit + offset % unit)

    async def read(self, handle: OpenFile, offset: int, length: int) -> bytes:
        while (data := self.read_direct(handle, offset, length)) is None:
            if not await self._waited(handle) and self.storage.redirected:
                return await self.meta("io_read", ino=handle.ino, offset=offset,
                                       length=length)
        return data

    async def _waited(self, handle: OpenFile) -> bool:
        """What keeps I/O off the fast path other than the map: True if it had to wait
        (for a revalidated session, or the end of a pause), so the caller retries."""
        self.check_handle(handle)
        if await self._ensure_valid():
            return True
        if handle.paused:
            await handle.resumed.wait()
            return True
        if self.holding:
            await self.hold_over.wait()
            return True
        return False

    def _take_map(self, handle: OpenFile, reply: dict) -> None:
        self.update_map(handle.ino, *map_fields(reply))

    async def _ensure_valid(self) -> bool:
        """Raise EIO if shut down or the file is gone; revalidate an expired session.
        True if it had to."""
        self._check_fenced()
        if time.monotonic() <= self.valid_until:
            return False
        deadline = await self.revalidate()
        if deadline is None:
            self.fence()
            self._check_fenced()
        self.valid_until = deadline
        return True

    def fence(self) -> None:
        """Cut this node off: close every gate for good and fail what waits."""
        self.fenced = True
        self._push_deadline()
        for handle in self.files.values():
            handle.close_for_good()

    def _check_fenced(self) -> None:
        if self.fenced:
            raise OSError(errno.EIO, "this node was fenced off the volume")

    def _read_pieces(self, handle: OpenFile, offset: int, end: int):
        unit = handle.granule
        for start, piece_end, file_unit in pieces(offset, end, unit):
            volume_unit = handle.units.get(file_unit)
            if volume_unit is None:
                yield bytes(piece_end - start)
            else:
                position = self.base + volume_unit * unit + start % unit
                yield self._pread(piece_end - start, position)

    def _pread(self, length: int, position: int) -> bytes:
        data = self.storage.pread(length, position)
        if len(data) < length:  # only past the end of a short image
            data += bytes(length - len(data))
        return data

    def check_handle(self, handle: OpenFile) -> None:
        if handle.gone:
            raise OSError(errno.ESTALE, "the file was removed while this node was cut off")

    def write_direct(self, handle: OpenFile, offset: int, data: bytes) -> bool:
        """The fast path: write inside size and allocated units that need no asking
        first, or return False."""
        if handle.paused or self.holding or offset + len(data) > handle.size:
            return False
        if time.monotonic() > self.valid_until or self.storage.redirected:
            return False
        try:
            if not self._write_direct(handle, offset, data):
                return False
        except OSError as exc:  # the whole write is done again through the coordinator
            self.storage.failed("pwrite", exc)
            return False
        handle.dirty_mtime = time.time_ns()
        return True

    async def write(self, handle: OpenFile, offset: int, data: bytes) -> int:
        end = offset + len(data)
        while not self.write_direct(handle, offset, data):
            if await self._waited(handle):
                continue
            # A hole or past EOF: allocate; otherwise a snapshot holds a granule here,
            # or this node's path to the image is lost.
            if self._unmapped(handle, offset, end):
                method = "extend"
            elif self.storage.redirected:
                if await self._write_redirected(handle, offset, data):
                    break
                continue
            else:
                method = "first_write"
            self._take_map(handle, await self.meta(method, ino=handle.ino, offset=offset,
                                                   end=end))
        return len(data)

    async def _write_redirected(self, handle: OpenFile, offset: int, data: bytes) -> bool:
        """The coordinator writes for this node; False if its map of the file differs
        from ours (the reply's map is ours now, and the write starts over)."""
        handle.coordinator_wrote = True
        reply = await self.meta("io_write", ino=handle.ino, offset=offset, data=bytes(data))
        if "runs" in reply:
            self._take_map(handle, reply)
            return False
        handle.dirty_mtime = time.time_ns()
        return True

    @staticmethod
    def _unmapped(handle: OpenFile, offset: int, end: int) -> bool:
        unit = handle.granule
        return end > handle.size or any(index not in handle.units
                                        for index in range(offset // unit, (end - 1) // unit + 1))

    def _write_direct(self, handle: OpenFile, offset: int, data: bytes) -> bool:
        """Write if every byte lands in an allocated unit; False (nothing written) if not."""
        unit = handle.granule
        units = handle.units
        file_unit = offset // unit
        last_unit = (offset + len(data) - 1) // unit
        if file_unit == last_unit:
            volume_unit = units.get(file_unit)
            if volume_unit is None or (handle.ask and file_unit in handle.ask):
                return False
            if handle.stripes:
                self._note_stripes(handle.ino, file_unit,
                                   stripe_mask(offset, offset + len(data), unit))
            self.storage.pwrite(data, self.base + volume_unit * unit + offset % unit)
            return True
        if any(index not in units or index in handle.ask
               for index in range(file_unit, last_unit + 1)):
            return False
        view = memoryview(data)
        for start, end, index in pieces(offset, offset + len(data), unit):
            if handle.stripes:
                self._note_stripes(handle.ino, index, stripe_mask(start, end, unit))
            position = self.base + units[index] * unit + start % unit
            self.storage.pwrite(view[start - offset : end - offset], position)
        return True

    def _note_stripes(self, ino: int, file_unit: int, mask: int) -> None:
        units = self.written.get(ino)
        if units is None:
            units = self.written[ino] = {}
        units[file_unit] = units.get(file_unit, 0) | mask

    async def sync(self) -> None:
        """fsync: in a worker thread, since flushing the image may take long and every
        other request (and the lease renewal) would wait behind it."""
        if not self.storage.redirected:
            try:
                await _syncs.run(self.storage.fdatasync)
                return
            except OSError as exc:
                self.storage.failed("fdatasync", exc)
        await self.meta("io_sync")


def map_fields(reply: dict) -> tuple:
    """(size, runs, version, granule, ask, stripes): a map as the coordinator sends it,
    in the order `DataPath.update_map` takes it."""
    return (reply["size"], reply["runs"], reply["version"], reply.get("granule"),
            reply.get("ask"), bool(reply.get("stripes")))


async def _always_valid() -> float:
    return math.inf


