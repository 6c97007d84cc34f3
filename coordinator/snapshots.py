"""The snapshot hold and copy-on-write protocols, coordinator side (csvfs/snapshot.py is
the node side; coordinator/snapshot_state.py the state they change).

They protect one invariant: a reader of a snapshot gets exactly the volume as it
was at the snapshot's point, whatever every node writes afterwards, and no
application's write ever fails because of a backup.

The point (`take`), the one whole-volume pause in csvfs:

1. Under the metadata lock, so no metadata change runs meanwhile, push HOLD
   to every node in session (the coordinator's own node in process). A node
   holds new data I/O on every file and acknowledges once none is in flight.
   A node that does not acknowledge in time is evicted, and every node cut
   off earlier is waited out until its grant has run out.
2. Append the "snapshot" record (the frozen namespace and maps) and wait
   until it is durable: from here the snapshot survives a failover.
3. Push SNAPSHOT_SET(version = the record's seq) to every node, which ends
   its hold. Every map a node has that is older than the record counts as
   "ask first" in all its granules; every map the coordinator hands out from
   now on says which granules to ask first about ("ask" in Commits.map_of).
   Then free the lock.

An application-consistent point (`freeze` given) first asks the writers of
those files, on every node in session, to flush and hold (FREEZE; each node
answers WRITERS_FROZEN once its writers have, within the freeze's time limit),
outside the metadata lock, so that metadata goes on meanwhile. Then the point
is set as above, and THAW goes out at once: the copy happens after the thaw.
A file whose writer failed or did not answer fails the snapshot, unless the
requester allows crash consistency: then it is taken so, and the event ring
says why. A file with no writer anywhere is crash-consistent, with a warning
event. The reply says which file is which.

Copy-on-write (`op_first_write`, and `before_write` before the coordinator
writes file data itself): a node's first write to an "ask first" granule goes
to the coordinator instead. Under the metadata lock, so one preserve per granule
at a time whichever node asks first, the coordinator copies the held granules
of the range to fresh ones, makes the copies durable, appends one "preserve"
record, and answers with the new map once that is durable. Only then does the
node write, in place: the live file's layout never moves. Other holders keep
their marks; their first write asks too and hears that nothing is left to do.

Reading (`files`, `check`): the requester reads the snapshot's granules
straight from the image: a preserved one at its copy, the others where the
live file has them. Since a live granule is written only after its preserve
is applied, a granule read live and still unpreserved when `check` answers
afterwards was read as it was at the point; one preserved meanwhile is read
again from its copy.

Change tracking uses the same mark. The files a backup takes are tracked from
its point on: each keeps the snapshot as a base (the last few, so that backups
into several repositories each find theirs) with the granules changed since.
A granule of a tracked file not yet marked changed for every base asks first
too, and the first write there appends a "changed" record, durable before the
write goes ahead (and so before it is acknowledged), whichever node writes.
Allocations and frees mark what they touch in the same record that makes
them. The next backup reads only the granules changed since the newest base
its repository holds a backup of, and takes the rest from that backup. A
backup that fails is no base.

Tracking is finer than the unit where it can be: for a tracked file mapped in
units larger than 64 KiB, a node's first write marks the unit with an empty
mask of 64 KiB stripes, and from then on every node notes the stripes it
writes there (its map says "stripes"). A node reports those when it
acknowledges a hold (so the snapshot record carries them, for the bases
before its point) or in its goodbye. A unit added where the base had a hole
also starts empty (it reads as zeros, as the hole did). The coordinator's own
writes, frees, and any unit marked otherwise count whole. If a report may be
lost (a node left without a goodbye or did not acknowledge a hold, or this
coordinator took over from another), the next snapshot record says
"stripes_lost", and every changed unit counts whole again: an incremental
then reads more, never less.

As the requester goes, it tells the coordinator which granules it has read
for good (`read`: after the check that followed them): the snapshot stops
holding those, so later writes there need no copy. A backup that reads a disk
front to back while a VM writes it at random pays for copies only ahead of
itself.

Release: the requester releases its snapshot when its backup ends; one that
stops renewing is released after its timeout. If a preserve finds no free
space, the snapshots that hold those granules are dropped (released, with an
error event) and the write goes on: a backup fails, never an application.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

import msgpack
import trio

from coordinator.allocator import NoSpace
from coordinator.commit import Commits, Request
from coordinator.model import Inode
from coordinator.quiesce import Sessions
from coordinator.snapshot_state import BLOCKS, UNITS
from csvfs.cluster.errors import MetaError
from csvfs.cluster.events import EventLog
from csvfs.volume.extents import BLOCK, pieces

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds a requester may go without renewing its snapshot
FREEZE_TIMEOUT = 10.0  # seconds writers have to flush and hold
MAX_TIMEOUT = 3600.0


class SnapshotGone(MetaError):
    """The snapshot was released: by its requester, its timeout, or lack of space."""


class Snapshots:
    def __init__(self, commits: Commits, sessions: Sessions, events: EventLog):
        self.commits = commits
        self.sessions = sessions
        self.events = events
        # snapshot id -> the trio time by which its requester must renew it
        self.deadlines: dict[int, float] = {}
        self.dropped: dict[int, str] = {}  # snapshot id -> why it was released early
        # Told of granules a preserve wrote (copies): what knows them as clean forgets.
        self.on_copied: Callable[[str, list[int]], None] = lambda kind, granules: None
        # The stripes nodes reported writing (at a goodbye) since the last point, and
        # whether some node's report is lost since: a new coordinator cannot know
        # what nodes that died before it took over had written.
        self.stripes = StripeReports()

    @property
    def state(self):
        return self.commits.state.snapshots

    # -- the point ---------------------------------------------------------------------------

    async def request_take(self, requester: str, timeout: float | int = DEFAULT_TIMEOUT,
                           files: list[str] | None = None, freeze: list[str] | None = None,
                           freeze_timeout: float | int = FREEZE_TIMEOUT,
                           allow_crash_consistent: bool = False) -> dict:
        """Set a snapshot point (steps 1-3 above). `files`: the paths the backup takes
        (default: every file), which start tracking changes from the point; `freeze`:
        the paths whose writers must freeze for it (application-consistent)."""
        if freeze is None:
            point = await self._take(requester, timeout, files)
            return dict(point, consistency={})
        freeze_id = time.time_ns()  # unique across coordinators: the VM's record keeps it
        inos = {path: self.commits.state.lookup_path(path) for path in freeze}
        outcomes = await self._freeze(freeze_id, [ino for ino in inos.values() if ino],
                                      _bounded(freeze_timeout))
        try:
            consistency = self._consistency(inos, outcomes, allow_crash_consistent)
            point = await self._take(requester, timeout, files)
        finally:
            for session in list(self.sessions.by_name.values()):
                session.thaw_writers(freeze_id)
        return dict(point, consistency=consistency, freeze_id=freeze_id)

    async def _freeze(self, freeze_id: int, inos: list[int], timeout: float) -> dict:
        """ino -> what its writers said, from every node in session at once."""
        outcomes: dict[int, list[str]] = {}

        async def ask(name: str, session) -> None:
            answer = {}
            with trio.move_on_after(timeout + 1.0):
                answer = await session.freeze_writers(freeze_id, inos, timeout)
            for ino, outcome in answer.items():
                outcomes.setdefault(ino, []).append(f"{outcome} (on {name})")

        async with trio.open_nursery() as nursery:
            for name, session in list(self.sessions.by_name.items()):
                nursery.start_soon(ask, name, session)
        return outcomes

    def _consistency(self, inos: dict[str, int | None], outcomes: dict,
                     allow_crash: bool) -> dict[str, list[str]]:
        """path -> [consistency, why]; raises if a writer failed and that is not allowed."""
        consistency = {}
        for path, ino in inos.items():
            if ino is None:
                continue  # no such file: the requester says so
            said = outcomes.get(ino, [])
            failed = [outcome for outcome in said if not outcome.startswith("frozen")]
            if said and not failed:
                consistency[path] = ["application", "; ".join(said)]
            elif failed and not allow_crash:
                raise MetaError(errno.EAGAIN, f"the writer of {path} did not freeze: "
                                              f"{failed[0]}")
            elif failed:
                why = f"its writer did not freeze ({failed[0]}); taken crash-consistent, " \
                      f"as the requester allowed"
                consistency[path] = ["crash", why]
                self.events.emit("backup", f"{path}: {why}", level="warning")
            else:
                why = "no writer registered for it on any node; taken crash-consistent"
                consistency[path] = ["crash", why]
                self.events.emit("backup", f"{path}: {why}", level="warning")
        return consistency

    async def _take(self, requester: str, timeout: float, files: list[str] | None) -> dict:
        commits = self.commits
        # Flush what the nodes wrote first, with nothing held: the record's commit in
        # the hold then has little but itself to write out.
        try:
            await trio.to_thread.run_sync(commits.volume.sync)
        except OSError as exc:
            raise MetaError(errno.EIO, f"cannot flush the volume: {exc}") from None
        async with commits.mutation():
            started = trio.current_time()
            seq = 0  # until the record is appended, ending the hold marks nothing
            timeout = _bounded(timeout)
            self._check_room()
            try:
                reports = await self._hold_every_node()
                snap_id = commits.journal.next_seq  # unique for the life of the volume
                t_ns = commits.now()
                op = {"op": "snapshot", "id": snap_id, "t": t_ns, "requester": requester,
                      "timeout": timeout, **self.stripes.record(reports)}
                if files is not None:
                    op["inos"] = self._inos_of(files)
                seq = commits.append(op)
                self.stripes.recorded()
                await commits.durable(seq)
            finally:
                # Also when it failed: a record that may be on the volume counts, and
                # asking first about a granule nobody holds costs one round trip.
                for session in list(self.sessions.by_name.values()):
                    session.snapshot_set(seq)
            paused = trio.current_time() - started
        self.deadlines[snap_id] = trio.current_time() + timeout
        held = sum(1 for _ in self.state.by_id[snap_id].held())
        log.info("snapshot %d for %s: %d granules held, volume paused %.1f ms", snap_id,
                 requester, held, paused * 1000)
        self.events.emit("snapshot", f"snapshot {snap_id} for {requester}: volume paused "
                         f"{paused * 1000:.1f} ms")
        return {"id": snap_id, "t_ns": t_ns, "version": seq, "pause_s": paused}

    def _check_room(self) -> None:
        """A snapshot keeps a copy of the inode table and namespace in every checkpoint
        until it is released: refuse one that would not fit (the backup fails; the
        volume's metadata must never)."""
        state = self.commits.state
        image = msgpack.packb(state.to_image(), use_bin_type=True)
        frozen = msgpack.packb([[inode.to_list() for inode in state.inodes.values()],
                                [[ino, list(names.items())]
                                 for ino, names in state.entries.items()]],
                               use_bin_type=True)
        slot = self.commits.volume.sb.checkpoint_slots()[0].length
        if (len(image) + len(frozen)) * 1.25 > slot:
            raise MetaError(errno.ENOSPC, f"no room for a snapshot: the volume's metadata "
                                          f"({len(image)} bytes) and a frozen copy of it "
                                          f"would not fit a checkpoint slot of {slot} bytes")

    def _inos_of(self, paths: list[str]) -> list[int]:
        """The regular files at these paths now (a path that is none is left out: the
        requester finds it missing in the snapshot and says so)."""
        inos = []
        for path in paths:
            ino = self.commits.state.lookup_path(path)
            if ino is not None and self.commits.state.inodes[ino].is_reg:
                inos.append(ino)
        return inos

    async def _hold_every_node(self) -> list:
        """Hold every node; returns the stripes each reported writing since its last
        report (a node that did not acknowledge is evicted, and its report lost)."""
        reports: list = []

        async def hold(session) -> None:
            report = await session.hold()
            if self.stripes.well_formed(report, session.name):
                reports.append(report)

        async def hold_node(name: str) -> None:
            if not await self.sessions.acknowledged(name, "hold of every file", hold):
                self.stripes.lost(f"{name} did not acknowledge the hold")

        async with trio.open_nursery() as nursery:
            for name in list(self.sessions.by_name):
                nursery.start_soon(hold_node, name)
        for name, until in list(self.sessions.lingering.items()):
            if until > trio.current_time():  # cut off, it may still write until then
                log.info("snapshot waits %.2f s for %s's grant to run out", name,
                         until - trio.current_time())
                await trio.sleep_until(until)
        return reports

    # -- copy-on-write ----------------------------------------------------------------------

    async def op_first_write(self, request: Request, ino: int, offset: int, end: int) -> dict:
        """A node's first write to granules it must ask about: preserve what snapshots
        hold in [offset, end); the reply is the map with those granules writable."""
        if offset < 0 or end <= offset:
            raise MetaError(errno.EINVAL, "first_write needs 0 <= offset < end")
        commits = self.commits
        async with commits.mutation():
            inode = commits.regular(ino)
            seq = await self.before_write(inode, offset, end, by_node=True)
            reply = commits.map_of(inode)
        await commits.durable(seq)
        return reply

    async def before_write(self, inode: Inode, start: int, end: int,
                           by_node: bool = False) -> int | None:
        """Before anything writes to [start, end) of a live file: copy the granules a
        snapshot holds there, and mark changed those of a tracked file. Call with the
        metadata lock held. Returns once the records are durable (a write before
        that, then a crash, would leave a snapshot reading the new data, or an
        incremental missing it), with the last one's seq (None: nothing to do).
        `by_node`: a node writes, and reports the stripes it wrote (if the file's map
        says so); otherwise the coordinator does, and its units changed anywhere."""
        if end <= start:
            return None
        seq = await self._preserve(inode, start, end)
        stripes = by_node and inode.tracks_stripes(self.commits.unit)
        changed = self._to_mark(inode, start, end, stripes)
        if changed:
            op = {"op": "changed", "ino": inode.ino, "granules": changed}
            if stripes:
                op["by_node"] = True
            seq = self.commits.append(op)
        if seq is not None:
            await self.commits.durable(seq)
        return seq

    def _to_mark(self, inode: Inode, start: int, end: int, stripes: bool) -> list[int]:
        """The granules of [start, end) to mark: those not marked for every base, and,
        unless the writer reports its stripes, those only some stripes of are."""
        if not inode.tracking:
            return []
        size = inode.granule(self.commits.unit)
        return [index for index in range(start // size, (end - 1) // size + 1)
                if inode.unmarked(index) or (not stripes and inode.has_partial(index))]

    async def _preserve(self, inode: Inode, start: int, end: int) -> int | None:
        snapshots = self.state
        if not snapshots:
            return None
        kind = snapshots.kind_of(inode)
        size = inode.granule(self.commits.unit)
        held = [granule for _s, _e, index in pieces(start, end, size)
                if (granule := inode.units.get(index)) is not None
                and snapshots.is_held(kind, granule)]
        if not held:
            return None
        try:
            copies = self._find(kind, len(held))
        except NoSpace:
            seq = self._drop_holders(kind, held)
        else:
            pairs = list(zip(held, copies, strict=True))
            await self._copy(kind, size, pairs)
            seq = self.commits.append({"op": "preserve",
                                       "copies": [[kind, g, c] for g, c in pairs]})
        return seq

    def _find(self, kind: str, count: int) -> list[int]:
        allocator = self.commits.state.allocator
        return allocator.find(count) if kind == UNITS else allocator.find_blocks(count)

    async def _copy(self, kind: str, size: int, pairs: list[tuple[int, int]]) -> None:
        """Copy each granule to its copy, before the record that points there. The
        record's commit makes them durable too: Commits.data_written has it flush the
        whole image, every page written to it before (a crash before that leaves the
        copies simply free, and the write not done)."""
        self.commits.check_lease()
        volume = self.commits.volume
        base = volume.sb.data.offset

        def copy() -> None:
            for granule, target in pairs:
                volume.write(base + target * size, volume.read(base + granule * size, size))

        try:
            await trio.to_thread.run_sync(copy)
        except OSError as exc:
            raise MetaError(errno.EIO, f"copy-on-write failed: {exc}") from None
        self.commits.data_written()  # once written: a flush already under way missed them
        self.on_copied(kind, [target for _granule, target in pairs])

    def _drop_holders(self, kind: str, held: list[int]) -> int | None:
        """No space for the copies: drop the snapshots that hold these granules, so the
        write goes on. Their backups fail, with this reason."""
        victims = sorted({snap_id for granule in held
                          for snap_id in self.state.waiting[kind].get(granule, ())})
        seq = None
        for snap_id in victims:
            seq = self._release_record(snap_id, "the volume ran out of space for its "
                                                "copy-on-write", level="error")
        return seq

    # -- what the requester asks -----------------------------------------------------------

    async def request_files(self, requester: str, snapshot: int) -> dict:
        """The frozen namespace and maps, where to read each granule, and how many
        preserves happened so far (for `check`)."""
        snap_id, snapshot = snapshot, self._get(snapshot)
        unit = self.commits.unit
        inodes = [inode.to_list() for inode in snapshot.inodes.values()]  # Inode.from_list
        return {"id": snap_id, "t_ns": snapshot.t_ns, "unit_size": unit, "block_size": BLOCK,
                "data_offset": self.commits.volume.sb.data.offset,
                "volume": str(self.commits.volume.sb.uuid),
                "inodes": inodes, "tracking": list(snapshot.tracking.items()),
                "dirs": [[ino, list(names.items())] for ino, names in snapshot.entries.items()],
                "copies": list(snapshot.preserved), "preserved": len(snapshot.preserved)}

    async def request_check(self, requester: str, snapshot: int, since: int) -> dict:
        """Preserves after the first `since` ones: granules to read again from copies."""
        snapshot = self._get(snapshot)
        return {"copies": snapshot.preserved[since:], "preserved": len(snapshot.preserved)}

    async def request_read(self, requester: str, snapshot: int, kind: str,
                           granules: list[int]) -> None:
        """The requester has read these granules for good: stop holding them. Not
        waited for: a crash before the record is durable only keeps them held."""
        self._get(snapshot)
        if kind not in (UNITS, BLOCKS):
            raise MetaError(errno.EINVAL, f"no granule kind {kind!r}")
        async with self.commits.mutation():
            held = [granule for granule in granules
                    if snapshot in self.state.waiting[kind].get(granule, ())]
            if held:
                self.commits.append({"op": "unhold", "id": snapshot, "kind": kind,
                                     "granules": held})

    async def request_renew(self, requester: str, snapshot: int) -> None:
        self.deadlines[snapshot] = trio.current_time() + self._get(snapshot).timeout

    async def request_release(self, requester: str, snapshot: int, outcome: str = "done") -> None:
        """`outcome` "done" if the backup is in the repository; anything else gives its
        files back their earlier change tracking."""
        if snapshot not in self.state.by_id:
            return
        async with self.commits.mutation():
            seq = self._release_record(snapshot, f"released by its requester: {outcome}",
                                       failed=outcome != "done")
        await self.commits.durable(seq)

    def _release_record(self, snap_id: int, why: str, level: str = "info",
                        failed: bool = True) -> int | None:
        """Append a release (lock held). Returns its seq."""
        if snap_id not in self.state.by_id:
            return None
        snapshot = self.state.by_id[snap_id]
        seq = self.commits.append({"op": "release", "id": snap_id, "failed": failed})
        self.deadlines.pop(snap_id, None)
        if level != "info":
            self.dropped[snap_id] = why
        age = (time.time_ns() - snapshot.t_ns) / 1e9
        log.log(logging.ERROR if level == "error" else logging.INFO, "snapshot %d %s", snap_id,
                why)
        self.events.emit("snapshot", f"snapshot {snap_id} ({snapshot.requester}, {age:.1f} s "
                         f"old, {len(snapshot.preserved)} granules preserved) {why}",
                         level=level)
        return seq

    def _get(self, snap_id: int):
        snapshot = self.state.by_id.get(snap_id)
        if snapshot is None:
            why = self.dropped.get(snap_id, "it was released or never existed")
            raise SnapshotGone(errno.ESTALE, f"snapshot {snap_id} is gone: {why}")
        return snapshot

    # -- expiry -----------------------------------------------------------------------------

    def adopt(self) -> None:
        """After a takeover: snapshots from before it get their timeout to be renewed."""
        for snap_id, snapshot in self.state.by_id.items():
            self.deadlines.setdefault(snap_id, trio.current_time() + snapshot.timeout)

    async def expire(self) -> None:
        """Release the snapshots whose requester stopped renewing them."""
        now = trio.current_time()
        late = [snap_id for snap_id, deadline in self.deadlines.items() if deadline < now]
        for snap_id in late:
            async with self.commits.mutation():
                seq = self._release_record(snap_id, "released: its requester stopped "
                                                    "renewing it (timeout)", level="warning")
            await self.commits.durable(seq)

    def table(self) -> list[list]:
        """[id, requester, age seconds, granules preserved, granules held] per snapshot."""
        now = time.time_ns()
        rows = []
        for snapshot in self.state.by_id.values():
            held = sum(1 for kind in (UNITS, BLOCKS) for waiting in
                       self.state.waiting[kind].values() if snapshot.id in waiting)
            rows.append([snapshot.id, snapshot.requester, round((now - snapshot.t_ns) / 1e9, 3),
                         len(snapshot.preserved), held])
        return rows


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _bounded(timeout: float) -> float:
    return min(max(float(timeout), 1.0), MAX_TIMEOUT)


class StripeReports:
    """What the next snapshot record says of the stripes nodes wrote (the model's
    `_take_stripe_reports` applies it): the reports so far, and whether one is lost.

    Reports arrive with each node's acknowledgement of a hold, and at a clean
    goodbye. A node that leaves any other way (it died, was evicted, lost its
    connection) may have written stripes it never reported, and so may the nodes
    of a coordinator before this one: then the next record says "stripes_lost".
    """

    def __init__(self):
        self.missing = "a new coordinator does not know what nodes wrote before it"
        self.goodbyes: list = []

    def lost(self, why: str) -> None:
        if not self.missing:
            log.info("stripe reports lost: %s; the next incrementals read whole units", why)
        self.missing = self.missing or why

    def goodbye(self, report: list | None, name: str) -> None:
        if report and self.well_formed(report, name):
            self.goodbyes.append(report)

    def well_formed(self, report, name: str) -> bool:
        """Is report [[ino, [[unit, mask]...]]...]? One that is not is lost."""
        try:
            good = all(isinstance(ino, int) and all(_natural(unit) and _natural(mask)
                                                    for unit, mask in masks)
                       for ino, masks in report)
        except (TypeError, ValueError):
            good = False
        if not good:
            log.warning("%s sent a malformed report of the stripes it wrote", name)
            self.lost(f"{name} sent a malformed report")
        return good

    def record(self, reports: list) -> dict:
        """The fields of a snapshot record: "written" and, if so, "stripes_lost"."""
        merged: dict[int, dict[int, int]] = {}
        for report in [*self.goodbyes, *reports]:
            for ino, masks in report or ():
                units = merged.setdefault(ino, {})
                for unit, mask in masks:
                    units[unit] = units.get(unit, 0) | mask
        fields: dict = {}
        if merged:
            fields["written"] = [[ino, sorted(units.items())] for ino, units in merged.items()]
        if self.missing:
            fields["stripes_lost"] = True
        return fields

    def recorded(self) -> None:
        """The snapshot record has them (or the coordinator fails, and the next one
        starts with its reports missing)."""
        self.missing = ""
        self.goodbyes = []
