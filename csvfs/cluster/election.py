"""Election through the volume's lease region.

The coordinator is whoever holds an unexpired lease. Reads and updates of
the lease happen under a POSIX OFD lock on the lease bytes, which plays the
part of VMFS's compare-and-write among processes. Each node also holds an
OFD lock on its own node slot for as long as it lives: when another process
can take that lock, the node is provably dead.

`Election` is the embedded default; csvfs/cluster/etcd_election.py offers the
same interface through etcd (csvfs/cluster/elections.py chooses).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import struct
import time
from dataclasses import dataclass

from csvfs.volume import format as fmt
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

_FLOCK = struct.Struct("@hhqqi4x")


def _ofd(fd: int, command: int, lock_type: int, start: int, length: int) -> bytes:
    request = _FLOCK.pack(lock_type, os.SEEK_SET, start, length, 0)
    return fcntl.fcntl(fd, command, request)


def try_lock(fd: int, start: int, length: int) -> bool:
    try:
        _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, start, length)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock(fd: int, start: int, length: int) -> None:
    _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, start, length)


def held_elsewhere(fd: int, start: int, length: int) -> bool:
    """True when another open file description holds a lock on the range."""
    reply = _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, start, length)
    return _FLOCK.unpack(reply)[0] != fcntl.F_UNLCK


@contextlib.contextmanager
def locked(fd: int, start: int, length: int):
    _ofd(fd, fcntl.F_OFD_SETLKW, fcntl.F_WRLCK, start, length)
    try:
        yield
    finally:
        unlock(fd, start, length)


@dataclass
class Lease:
    owner_slot: int
    owner_name: str
    owner_pid: int
    epoch: int
    expiry_ns: int
    # A move (`csvfs move`): the old coordinator freed the lease for this slot alone,
    # until heir_until_ns; the others wait for it, then join it.
    heir_slot: int = -1
    heir_until_ns: int = 0
    # Set while the volume elects through etcd (csvfs/cluster/elections.py): nodes that
    # would elect through this region refuse to mount.
    election: str = ""

    def unexpired(self) -> bool:
        """Does a node hold it, within its time?"""
        return self.owner_slot >= 0 and self.expiry_ns > time.time_ns()

    def moving(self) -> bool:
        """Is it free, but kept for the heir of a move for a while yet?"""
        return self.heir_slot >= 0 and self.heir_until_ns > time.time_ns()

    @classmethod
    def empty(cls) -> Lease:
        return cls(-1, "", 0, 0, 0)


def read_lease(volume: Volume) -> Lease:
    raw = volume.read(volume.sb.lease.offset, fmt.LEASE_RECORD_SIZE)
    if raw[:4] != fmt.LEASE_MAGIC:
        return Lease.empty()
    try:
        return Lease(**fmt.unpack_block(raw, fmt.LEASE_MAGIC))
    except (fmt.FormatError, TypeError):
        log.warning("lease record is corrupt; treating the lease as free")
        return Lease.empty()


def write_free_lease(volume: Volume, epoch: int = 0, heir_slot: int = -1,
                     heir_until_ns: int = 0, election: str = "") -> None:
    lease = Lease(-1, "", 0, epoch, 0, heir_slot, heir_until_ns, election)
    volume.write(volume.sb.lease.offset,
                 fmt.pack_block(fmt.LEASE_MAGIC, lease.__dict__, fmt.LEASE_RECORD_SIZE))


def holder_alive(volume: Volume, lease: Lease) -> bool:
    """Is the lease held, in time, by a node whose process lives?"""
    return lease.unexpired() and slot_alive(volume, lease.owner_slot)


def read_slot(volume: Volume, slot: int) -> dict | None:
    raw = volume.read(fmt.node_slot_offset(volume.sb, slot), fmt.NODE_SLOT_SIZE)
    if raw[:4] != fmt.NODE_MAGIC:
        return None
    try:
        record = fmt.unpack_block(raw, fmt.NODE_MAGIC)
    except fmt.FormatError:
        return None
    return record if isinstance(record, dict) else None


def slot_alive(volume: Volume, slot: int) -> bool:
    return held_elsewhere(volume.fd, fmt.node_slot_offset(volume.sb, slot), fmt.NODE_SLOT_SIZE)


class Election:
    """One node's view of the lease region."""

    def __init__(self, volume: Volume, name: str, lease_seconds: float = 3.0):
        self.volume = volume
        self.name = name
        self.lease_seconds = lease_seconds
        self.slot = -1
        self.epoch = 0
        self.address = ""  # where this node's RPC server listens, published in its slot
        self.io_mode = "direct"  # published in the slot too (csvfs/redirect.py)
        self.confirmed_at = -math.inf  # time.monotonic() the last renewal began
        self.lease_window = lease_seconds  # the lease surely lasts this long after that

    # -- what the roles ask, the same for every backend (csvfs/cluster/elections.py) ------

    def read_lease(self) -> Lease:
        return read_lease(self.volume)

    def read_slot(self, slot: int) -> dict | None:
        return read_slot(self.volume, slot)

    def slot_alive(self, slot: int) -> bool:
        return slot_alive(self.volume, slot)

    def live_records(self) -> dict[int, dict]:
        """The records of the live nodes, this one included, by slot."""
        records = {}
        for slot in range(fmt.MAX_NODES):
            if slot == self.slot or slot_alive(self.volume, slot):
                records[slot] = read_slot(self.volume, slot) or {}
        return records

    def owner_address(self, lease: Lease) -> str:
        return (read_slot(self.volume, lease.owner_slot) or {}).get("address", "")

    async def try_take(self, may_take, recover):
        """Take the lease if nobody live holds it and `may_take(lease)`: returns
        (recovered, epoch, old lease), where `recover()` loaded the metadata under
        the lease lock; otherwise the lease as it is."""
        with self.lease_lock():
            lease = read_lease(self.volume)
            if self.live_owner(lease) or self.waits_for_heir(lease) or not may_take(lease):
                return lease
            recovered = recover()
            epoch = self.take(lease, recovered.last_epoch)
        return recovered, epoch, lease

    async def owner_gone(self, lease: Lease) -> None:
        """Joining the owner failed. Here a dead owner shows by itself: its slot's
        liveness lock is free."""

    async def run(self) -> None:
        """Nothing runs in the background: the coordinator renews in its role."""

    async def leave(self) -> None:
        """A clean unmount: the slot's lock goes with the volume's descriptor."""

    def claim_slot(self) -> int:
        """Take the liveness lock of a free slot (a dead node's slot is free). Writes nothing."""
        for slot in range(fmt.MAX_NODES):
            if try_lock(self.volume.fd, fmt.node_slot_offset(self.volume.sb, slot),
                        fmt.NODE_SLOT_SIZE):
                self.slot = slot
                return slot
        raise OSError("all node slots of the volume are in use")

    def lease_lock(self):
        return locked(self.volume.fd, self.volume.sb.lease.offset, fmt.LEASE_RECORD_SIZE)

    def live_owner(self, lease: Lease) -> bool:
        """Is the lease held by a node that is still alive and within its lease?"""
        return lease.owner_slot != self.slot and holder_alive(self.volume, lease)

    def waits_for_heir(self, lease: Lease) -> bool:
        """Is the free lease kept for another live node, the heir of a move?"""
        return (lease.moving() and lease.heir_slot != self.slot
                and slot_alive(self.volume, lease.heir_slot))

    def other_nodes(self) -> list[int]:
        """The slots of the other live nodes."""
        return [slot for slot in range(fmt.MAX_NODES)
                if slot != self.slot and slot_alive(self.volume, slot)]

    async def hand_over(self, heir_slot: int) -> bool:
        """Free our lease for `heir_slot` alone, for one lease period (a move); False if
        the lease is not ours any more."""
        with self.lease_lock():
            lease = read_lease(self.volume)
            if lease.owner_slot != self.slot or lease.epoch != self.epoch:
                return False
            until = time.time_ns() + int(self.lease_seconds * 1e9)
            write_free_lease(self.volume, self.epoch, heir_slot, until)
        self.volume.sync()
        return True

    def take(self, lease: Lease, min_epoch: int) -> int:
        """Become coordinator with a new epoch. Call under lease_lock()."""
        self.epoch = max(lease.epoch, min_epoch) + 1
        self.confirmed_at = time.monotonic()
        self._write_lease()
        self.write_slot(mode="direct")
        self.volume.sync()
        return self.epoch

    def renew(self) -> bool:
        """Extend our lease; False if someone else holds it now (we must stop committing)."""
        started = time.monotonic()
        with self.lease_lock():
            lease = read_lease(self.volume)
            if lease.owner_slot != self.slot or lease.epoch != self.epoch:
                return False
            self._write_lease()
        self.confirmed_at = started
        self.write_slot()
        return True

    async def release(self) -> None:
        """Give the lease up at a clean shutdown, keeping the epoch for the next owner."""
        with self.lease_lock():
            lease = read_lease(self.volume)
            if lease.owner_slot == self.slot and lease.epoch == self.epoch:
                write_free_lease(self.volume, self.epoch)
        self.volume.sync()

    def write_slot(self, mode: str | None = None) -> None:
        """Publish this node in its slot: who, where, and its I/O mode; doubles as a
        heartbeat that status tools can read."""
        record = {
            "slot": self.slot,
            "name": self.name,
            "pid": os.getpid(),
            "address": self.address,
            "heartbeat_ns": time.time_ns(),
            "mode": mode or self.io_mode,
        }
        offset = fmt.node_slot_offset(self.volume.sb, self.slot)
        self.volume.write(offset, fmt.pack_block(fmt.NODE_MAGIC, record, fmt.NODE_SLOT_SIZE))

    def _write_lease(self) -> None:
        expiry = time.time_ns() + int(self.lease_seconds * 1e9)
        lease = Lease(self.slot, self.name, os.getpid(), self.epoch, expiry)
        block = fmt.pack_block(fmt.LEASE_MAGIC, lease.__dict__, fmt.LEASE_RECORD_SIZE)
        self.volume.write(self.volume.sb.lease.offset, block)
