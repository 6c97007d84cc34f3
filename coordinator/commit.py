"""Commits: how a metadata change reaches the journal, and when anyone may see it.

Every change follows one path. Under the metadata lock (`mutation()`) the
handler validates the request against the current state and builds one
journal record that carries every decision (inode numbers, units,
timestamps, reclaim); `append` queues the record and applies it to the
state at once; the reply waits in `durable(seq)` until the record's batch is
fdatasync'ed. Readers wait for durability too, so nobody sees a change
before it commits.

The journal is half full: the next mutation first writes the whole state to
a checkpoint slot and starts the journal again. A coordinator whose lease
may have lapsed writes nothing: it renews first, and steps down (fences)
if another node holds the lease now.

Each request from a node travels through the service as a `Request`, passed
explicitly from the dispatcher down to the record that carries it out.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from coordinator import recovery
from coordinator.journal import Journal, JournalFull, LeaseLost, unless_lapsed
from coordinator.model import Inode, MetadataState
from csvfs.cluster.errors import MetaError, NotCoordinator
from csvfs.volume.extents import pieces, to_runs
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

# Fraction of the journal in use that triggers a checkpoint. Crash tests lower it
# through the environment so that kills also land in the middle of checkpoints.
CHECKPOINT_AT = float(os.environ.get("CSVFS_CHECKPOINT_AT", "0.5"))


@dataclass
class Request:
    """One node's request, as every part of the service that serves it sees it."""

    session: str  # the node that asked
    # [session, request id] of a request that must not run twice: the record that
    # carries it out remembers it, so a retry after a failover gets the first answer.
    once_only: list | None = None
    # Inodes whose attributes its records changed: their other holders must drop
    # what their kernels cache before the reply goes out.
    touched: set[int] = field(default_factory=set)


class Commits:
    """The state, its journal and checkpoints, and the lock every change takes."""

    def __init__(self, volume: Volume, recovered: recovery.Recovered, epoch: int,
                 renew_lease: Callable[[], bool] | None = None,
                 on_fenced: Callable[[], None] | None = None):
        self.volume = volume
        self.unit = volume.sb.unit_size
        self.state: MetadataState = recovered.state
        self.epoch = epoch
        self.journal = Journal(volume, epoch, recovered.last_seq + 1,
                               recovered.replay.end_offset, recovered.journal_gen)
        self.journal.may_write = self.lease_held
        self.journal.write_deadline = self.lease_deadline_monotonic
        self.lock = trio.Lock()
        self.fenced = False
        self.journal_failure: OSError | None = None  # why it fenced, if its path failed
        self.checkpoint_slot = recovered.next_checkpoint_slot
        self._checkpointed_seq: int | None = None  # seq of the last checkpoint written here
        # Trio clock time until which the lease is surely ours; the node moves it on
        # at every renewal. Unbounded unless a node says otherwise (in-process tests).
        self.lease_deadline = math.inf
        self._renew_lease = renew_lease  # renew at once: () -> bool (still ours)
        self._on_fenced = on_fenced

    # -- appending ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def mutation(self):
        """Hold the metadata lock; checkpoint first when the journal is filling up.

        Other requests may have appended records that are not durable yet, so
        wait for them before the checkpoint captures the state.
        """
        async with self.lock:
            if self.journal.used_fraction > CHECKPOINT_AT:
                await self.durable()
                await self.checkpoint()
            yield

    def append(self, op: dict, request: Request | None = None) -> int:
        """Queue op's record and apply it; returns its seq. Call under the lock."""
        if request is not None and request.once_only is not None:
            op["req"], request.once_only = request.once_only, None
        try:
            seq = self.journal.append(op)
        except JournalFull:
            raise MetaError(errno.ENOSPC, "metadata journal is full") from None
        except LeaseLost as exc:
            raise NotCoordinator(str(exc)) from None
        if request is not None:
            request.touched.update(self._inodes_changed_by(op))
        self.state.apply(op)
        log.debug("record %d: %s of inode %s", seq, op["op"], op.get("ino", "-"))
        return seq

    def _inodes_changed_by(self, op: dict) -> list[int]:
        """Inodes (before `op` applies) whose attributes it changes."""
        entries = self.state.entries
        if op["op"] == "unlink":
            changed = [entries[op["parent"]].get(op["name"])]
        elif op["op"] == "rename":
            changed = [entries[op["old_parent"]].get(op["old_name"]),
                       entries[op["new_parent"]].get(op["new_name"])]
        else:
            changed = [op.get("ino")]
        return [ino for ino in changed if ino is not None]

    async def commit(self, op: dict, request: Request | None = None) -> None:
        async with self.mutation():
            seq = self.append(op, request)
        await self.durable(seq)

    async def durable(self, seq: int | None = None) -> None:
        """Wait until record seq (by default every record so far) is on the volume."""
        try:
            await self.journal.wait_durable(seq)
        except LeaseLost as exc:  # the node retries with whoever holds the lease now
            raise NotCoordinator(str(exc)) from None
        except OSError as exc:
            # This node's path to the journal failed: it must not go on coordinating.
            # It steps down and renews its lease no more; a node whose path works takes
            # over once the lease runs out and replays what is durable, and the nodes
            # send their requests there (the application sees a pause, not EIO).
            self.journal_failure = exc
            self.fence(f"the journal on the image failed: {exc}")
            raise NotCoordinator(f"the coordinator stepped down: {exc}") from None

    # -- checkpoints ------------------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Write the whole state to the other slot, then restart the journal.

        Called with the lock held and nothing pending, so the image is exactly
        the state after journal record next_seq - 1, and stays so while a worker
        thread writes it (the fdatasync would otherwise stall every request).
        """
        if self.journal.durable_seq != self.journal.next_seq - 1:
            raise AssertionError("checkpoint with records still pending")
        if not self.lease_held():  # a stale coordinator must not overwrite a checkpoint
            raise NotCoordinator("the coordinator lease is gone")
        seq = self.journal.next_seq - 1
        if seq == self._checkpointed_seq:
            # Nothing appended since our last checkpoint: both slots will hold this
            # (seq, epoch), and recovery cannot tell which is newer. Keep the live
            # generation (no record of it exists yet), so either one replays what follows.
            gen = self.journal.gen
        else:
            gen = recovery.new_journal_gen()
        offset, blob = recovery.checkpoint_blob(self.volume, self.checkpoint_slot, self.epoch,
                                                seq, self.state, gen)
        try:
            await trio.to_thread.run_sync(unless_lapsed, self.lease_deadline_monotonic(),
                                          recovery.write_blob, self.volume, offset, blob)
        except LeaseLost as exc:
            raise NotCoordinator(str(exc)) from None
        except OSError as exc:
            raise MetaError(errno.EIO, f"checkpoint failed: {exc}") from None
        log.debug("checkpoint of record %d in slot %d", seq, self.checkpoint_slot)
        self.checkpoint_slot = 1 - self.checkpoint_slot
        self._checkpointed_seq = seq
        self.journal.restart_after_checkpoint(gen)

    async def checkpoint_now(self) -> None:
        async with self.lock:
            await self.durable()
            await self.checkpoint()

    # -- the lease ------------------------------------------------------------------------

    def lease_deadline_monotonic(self) -> float:
        """`lease_deadline` on time.monotonic()'s clock, which a worker thread can read
        (trio's clock is the same monotonic time, shifted)."""
        if self.lease_deadline == math.inf:
            return math.inf
        return time.monotonic() + (self.lease_deadline - trio.current_time())

    def lease_held(self) -> bool:
        """May we write a record now? After a stall, renew first: if nobody took the
        lease meanwhile, go on; if another node holds it, we are stale and stop."""
        if self.fenced:
            return False
        if trio.current_time() < self.lease_deadline:
            return True
        if self._renew_lease is not None and self._renew_lease():
            return True
        self.fence("the coordinator lease lapsed and another node may hold it")
        return False

    def check_lease(self) -> None:
        """Before the coordinator writes file data itself (zeroing, a conversion's copy,
        an append): a stale coordinator's allocation may be another file's by now."""
        if not self.lease_held():
            raise NotCoordinator("the coordinator lease has lapsed; not writing data")

    def fence(self, reason: str) -> None:
        """Stop for good: no more commits, and the node is told to step down."""
        if self.fenced:
            return
        self.fenced = True
        # Only the coordinator writes the event ring, and we no longer are one:
        # the node that took over records the takeover there instead.
        log.warning("stepping down as coordinator: %s", reason)
        if self._on_fenced is not None:
            self._on_fenced()

    # -- reading the state ------------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        inode = self.state.inodes.get(ino)
        if inode is None:
            raise MetaError(errno.ENOENT, f"no inode {ino}")
        return inode

    def directory(self, ino: int) -> dict[bytes, int]:
        """The names in directory ino."""
        inode = self.inode(ino)
        if not inode.is_dir:
            raise MetaError(errno.ENOTDIR)
        names = self.state.entries.get(ino)
        if names is None:
            raise MetaError(errno.ENOENT, "directory was removed")
        return names

    def regular(self, ino: int) -> Inode:
        inode = self.inode(ino)
        if inode.is_dir:
            raise MetaError(errno.EISDIR)
        if not inode.is_reg:
            raise MetaError(errno.EINVAL)
        return inode

    def map_of(self, inode: Inode) -> dict:
        """Size and map with a version (the last record's seq), so that a node can drop
        a reply that a newer map overtook."""
        reply = {"size": inode.size, "runs": to_runs(inode.units),
                 "granule": inode.granule(self.unit), "version": self.journal.next_seq - 1}
        ask = self.state.snapshots.asks(inode)  # granules to ask first about
        if ask:  # (coordinator/snapshots.py)
            reply["ask"] = ask
        if inode.tracks_stripes(self.unit):  # the node notes which stripes it writes
            reply["stripes"] = True
        return reply

    def write_data(self, units: dict[int, int], granule: int, offset: int, data) -> None:
        """Write file data at `offset` through a map (file granule -> volume granule):
        the coordinator's own writes of file data (appends, redirected writes). A
        coordinator whose lease may have lapsed writes nothing."""
        self.check_lease()
        base = self.volume.sb.data.offset
        view = memoryview(data)
        for start, end, index in pieces(offset, offset + len(data), granule):
            self.volume.write(base + units[index] * granule + start % granule,
                              view[start - offset : end - offset])
        self.data_written()

    def data_written(self) -> None:
        """The coordinator wrote file data that the next records depend on: their
        commit makes the whole image durable, not only the records
        (coordinator/journal.py)."""
        self.journal.whole_image_sync = True

    def unit_offset(self, volume_unit: int) -> int:
        return self.volume.sb.data.offset + volume_unit * self.unit

    def position(self, inode: Inode, offset: int) -> int | None:
        """Where byte `offset` of the file lies on the volume, whether its map is in
        units or in blocks; None in a hole. The one place outside the nodes' data
        path that turns a file offset into an image offset."""
        granule = inode.granule(self.unit)
        mapped = inode.units.get(offset // granule)
        if mapped is None:
            return None
        return self.volume.sb.data.offset + mapped * granule + offset % granule

    @staticmethod
    def now() -> int:
        return time.time_ns()
