"""Election and liveness through etcd, for nodes that share no kernel.

`csvfs mount ... --election etcd://HOST:PORT[,HOST:PORT...]` replaces the lease
region's OFD locks (csvfs/cluster/election.py) with etcd, and keeps the same
interface (csvfs/cluster/elections.py), so the roles above do not know which
one they use. Keys, per volume (by its UUID):

    /csvfs/<uuid>/coordinator   who coordinates: slot, name, pid, RPC address, etcd
                                lease id, TTL, epoch base; or free, perhaps kept
                                for the heir of a move
    /csvfs/<uuid>/slot/<NN>     a node: slot, name, pid, RPC address, I/O mode

**Liveness.** Each node holds one etcd lease, with a TTL of 0.8 coordinator lease
(whole seconds, at least 1; etcd may raise it to its own minimum), and keeps it
alive four times per TTL. The TTL is shorter than the lease so that a hung
coordinator is replaced within its lease even though etcd looks for expired
leases only twice a second. Its slot key, and the coordinator key while it
coordinates, are attached to that lease: the node is alive while its key exists.

**Taking the role** is one transaction: put the coordinator key, attached to this
node's lease, if its mod revision is still what the candidate read (0: no key).
The epoch is that revision (plus a base kept in the value, which is 0 unless the
volume had higher epochs before it met this etcd cluster: then the winner bumps
the base once so that its epoch is above the journal's). Two winners of one
revision cannot exist, so no two nodes ever commit in one epoch.

**Holding it and fencing.** A background task renews the node's lease and then
reads the keys (a linearizable read, which needs an etcd quorum). The role is
confirmed when the coordinator key still carries our revision: the lease then
lasts at least one TTL from the moment the renewal was *sent*. The coordinator
commits (and does direct I/O) only until GRANT_USE of `lease_window` (the TTL,
or the coordinator lease if shorter) after that moment
(csvfs/coordinator_role.py); when it cannot confirm again in
time (etcd down, quorum lost), `renew()` fails and it fences itself, before
etcd could have let the lease expire. When the key carries another revision,
it fences at once. After a quorum returns, etcd restores every lease for a full
TTL, so a fenced coordinator whose key survived takes it again with a new
revision (a new epoch), or another node does once it expires.

**Takeover: the rule.** A member takes over when the coordinator key is gone:
its lease expired (the coordinator hung, or was cut off: after one TTL), was
released at a clean unmount, or was handed over in a move. A SIGKILLed
coordinator's lease would linger for its TTL, so there is a faster, sound death
signal: its members see their RPC connection drop, fail to join it again, and
then find its RPC address *refusing* connections. A live node's listener lives
as long as its process (csvfs/node.py), and a stopped process's kernel still
accepts connections, so only a dead process refuses: the member then revokes
the dead coordinator's etcd lease (its id is in the key), which deletes its
keys, and takes the role (`owner_gone`). This is the OFD lock on a dead
node's slot, carried over to processes on other hosts. (A firewall that
rejects with a TCP reset would fool it: partitions must drop packets.) A hung
or cut-off coordinator is replaced only once its TTL has run out.

The I/O is csvfs/cluster/etcd_client.py (synchronous, run in threads here).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field

import trio

from csvfs.cluster.election import Lease
from csvfs.cluster.etcd_client import Etcd, EtcdUnavailable, KeyValue
from csvfs.cluster.transport import split_address
from csvfs.volume import format as fmt

log = logging.getLogger(__name__)

RENEWALS_PER_LEASE = 4
CONFIRMED_USE = 0.8  # of the lease after a confirmation: csvfs.datapath.GRANT_USE
PROBE_TIMEOUT = 0.3  # seconds to connect to a coordinator whose connection dropped


def coordinator_key(uuid: str) -> str:
    return f"/csvfs/{uuid}/coordinator"


def slot_key(uuid: str, slot: int) -> str:
    return f"/csvfs/{uuid}/slot/{slot:02d}"


TTL_OF_LEASE = 0.8


def ttl_of(lease_seconds: float) -> int:
    """The etcd lease TTL for a coordinator lease: whole seconds, at least 1."""
    return max(1, math.floor(lease_seconds * TTL_OF_LEASE))


@dataclass
class EtcdLease(Lease):
    revision: int = 0  # the coordinator key's mod revision; 0: no key
    etcd_lease: int = 0  # the owner's etcd lease, 0 when the role is free
    address: str = ""  # the owner's RPC address
    base: int = 0  # epoch = base + revision


def lease_of(kv: KeyValue | None, now_ns: int) -> EtcdLease:
    """The coordinator key as a Lease. It exists only while its etcd lease lives, so
    a held one is unexpired for a TTL at least from now."""
    if kv is None:
        return EtcdLease(-1, "", 0, 0, 0)
    value = kv.value
    owner = int(value.get("owner_slot", -1)) if kv.lease else -1
    expiry = now_ns + int(value.get("ttl", 1) * 1e9) if owner >= 0 else 0
    base = int(value.get("base", 0))
    return EtcdLease(owner, str(value.get("owner_name", "")), int(value.get("owner_pid", 0)),
                     base + kv.mod_revision, expiry, int(value.get("heir_slot", -1)),
                     int(value.get("heir_until_ns", 0)), revision=kv.mod_revision,
                     etcd_lease=kv.lease if owner >= 0 else 0,
                     address=str(value.get("address", "")), base=base)


@dataclass
class ClusterState:
    """What the keys of one volume say: the coordinator and the live nodes' records."""
    lease: EtcdLease = field(default_factory=lambda: lease_of(None, 0))
    slots: dict[int, dict] = field(default_factory=dict)


def state_of(uuid: str, kvs: list[KeyValue]) -> ClusterState:
    state, now = ClusterState(), time.time_ns()
    slots = f"/csvfs/{uuid}/slot/"
    for kv in kvs:
        if kv.key == coordinator_key(uuid):
            state.lease = lease_of(kv, now)
        elif kv.key.startswith(slots) and kv.key[len(slots):].isdigit():
            state.slots[int(kv.key[len(slots):])] = {**kv.value, "heartbeat_ns": now}
    return state


def read_state(etcd: Etcd, uuid: str) -> ClusterState:
    """One linearizable read of the volume's keys (for tools such as `csvfs status`)."""
    return state_of(uuid, etcd.get_prefix(f"/csvfs/{uuid}/"))


def refuses_connections(address: str) -> bool:
    """Is nothing listening at `address` (the process that listened is dead)?"""
    try:
        host, port = split_address(address)
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True
    except (OSError, ValueError):
        return False  # unreachable or slow: no proof of anything


class EtcdElection:
    """One node's part in the election through etcd; the same interface as the disk
    Election. The node runs `run()` in its nursery for as long as it lives."""

    def __init__(self, endpoints: list[tuple[str, int]], uuid: str, name: str,
                 lease_seconds: float = 3.0):
        self.uuid = uuid
        self.name = name
        self.lease_seconds = lease_seconds
        self.ttl = ttl_of(lease_seconds)
        self.lease_window = min(lease_seconds, self.ttl)  # the lease lasts this long at least
        self.slot = -1
        self.epoch = 0
        self.address = ""
        self.io_mode = "direct"
        self.node_lease = 0  # this node's etcd lease id
        self.revision = 0  # of the coordinator key while this node holds it, else 0
        self.base = 0
        self.confirmed_at = -math.inf  # time.monotonic() the last confirming renewal began
        self.state = ClusterState()  # the last read of the keys
        self._published: dict | None = None
        self._etcd = Etcd(endpoints)  # for the calls of the roles, one at a time
        self._background = Etcd(endpoints)  # for the renewals
        self._lock = trio.Lock()

    # -- slots ---------------------------------------------------------------------------------

    def claim_slot(self) -> int:
        """Take a lease and the first free slot. Blocking: call before trio runs."""
        self.node_lease, granted = self._etcd.grant(self.ttl)
        self.confirmed_at = time.monotonic()
        if granted != self.ttl:
            log.info("etcd granted a TTL of %d s (asked %d s)", granted, self.ttl)
        self.state = read_state(self._etcd, self.uuid)
        for slot in range(fmt.MAX_NODES):
            if slot in self.state.slots:
                continue
            self.slot = slot
            if self._etcd.put_if(slot_key(self.uuid, slot), 0, self._record(),
                                 self.node_lease) is not None:
                self._published = self._record()
                self.state.slots[slot] = self._published
                return slot
        self.slot = -1
        raise OSError(errno.EBUSY, "all node slots of the volume are in use")

    def _record(self, mode: str | None = None) -> dict:
        return {"slot": self.slot, "name": self.name, "pid": os.getpid(),
                "address": self.address, "mode": mode or self.io_mode}

    def write_slot(self, mode: str | None = None) -> None:
        """Publish this node's record; the renewal task writes it when it changed."""
        if mode:
            self.io_mode = mode if mode != "stopped" else self.io_mode

    def live_records(self) -> dict[int, dict]:
        return dict(self.state.slots)

    def read_slot(self, slot: int) -> dict | None:
        return self.state.slots.get(slot)

    def slot_alive(self, slot: int) -> bool:
        return slot in self.state.slots

    def other_nodes(self) -> list[int]:
        return [slot for slot in self.state.slots if slot != self.slot]

    # -- the lease -----------------------------------------------------------------------------

    def read_lease(self) -> EtcdLease:
        return self.state.lease

    def owner_address(self, lease: EtcdLease) -> str:
        return lease.address

    def live_owner(self, lease: EtcdLease) -> bool:
        return lease.owner_slot >= 0 and lease.owner_slot != self.slot

    def waits_for_heir(self, lease: EtcdLease) -> bool:
        return (lease.moving() and lease.heir_slot != self.slot
                and self.slot_alive(lease.heir_slot))

    async def _call(self, function, *args):
        async with self._lock:
            return await trio.to_thread.run_sync(function, *args)

    async def fresh_lease(self) -> EtcdLease:
        """The coordinator key now; a held one with the time its owner's lease has left
        (rounded down, so that a join to a hung owner gives up in time)."""
        return await self._call(self._read_lease)

    def _read_lease(self) -> EtcdLease:
        lease = lease_of(self._etcd.get(coordinator_key(self.uuid)), time.time_ns())
        if lease.etcd_lease and lease.owner_slot != self.slot:
            left = self._etcd.time_to_live(lease.etcd_lease)
            lease.expiry_ns = time.time_ns() + int(max(left, 0) * 1e9) if left >= 0 else 0
        return lease

    async def try_take(self, may_take, recover):
        """Take the role if no live node holds it and `may_take(lease)`: returns
        (recovered, epoch, old lease), else the lease as it is."""
        lease = await self.fresh_lease()
        mine = lease.owner_slot == self.slot and lease.etcd_lease == self.node_lease
        if not mine and (self.live_owner(lease) or self.waits_for_heir(lease)
                         or not may_take(lease)):
            return lease
        started = time.monotonic()
        revision = await self._call(self._take, lease)
        if revision is None:
            return await self.fresh_lease()
        self.revision, self.base, self.confirmed_at = revision, lease.base, started
        try:
            recovered = recover()
            if self.base + self.revision <= recovered.last_epoch:
                await self._raise_epoch_above(recovered.last_epoch)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.release()
            raise
        self.epoch = self.base + self.revision
        return recovered, self.epoch, lease

    def _take(self, lease: EtcdLease) -> int | None:
        if self._etcd.keep_alive(self.node_lease) < 0:
            raise EtcdUnavailable("this node's etcd lease has expired; renewing it")
        return self._etcd.put_if(coordinator_key(self.uuid), lease.revision,
                                 self._owner_value(lease.base), self.node_lease)

    def _owner_value(self, base: int) -> dict:
        return {"owner_slot": self.slot, "owner_name": self.name, "owner_pid": os.getpid(),
                "address": self.address, "ttl": self.ttl, "base": base}

    async def _raise_epoch_above(self, epoch: int) -> None:
        """The volume's journal has epochs from before this etcd cluster: move the
        base up once, so that ours is above them."""
        base = epoch - self.revision
        revision = await self._call(self._etcd.put_if, coordinator_key(self.uuid),
                                    self.revision, self._owner_value(base), self.node_lease)
        if revision is None:
            raise EtcdUnavailable("lost the coordinator key while raising the epoch")
        self.revision, self.base = revision, base
        log.info("epoch base raised to %d, above the journal's epoch %d", base, epoch)

    async def owner_gone(self, lease: EtcdLease) -> None:
        """Joining the owner failed: if its address refuses connections, its process is
        dead, and its etcd lease goes now rather than after its TTL (the rule above)."""
        if lease.etcd_lease == 0 or lease.owner_slot == self.slot or not lease.address:
            return
        if not await trio.to_thread.run_sync(refuses_connections, lease.address):
            return
        log.warning("coordinator %s at %s refuses connections: its process is gone; "
                    "revoking its etcd lease", lease.owner_name, lease.address)
        await self._call(self._etcd.revoke, lease.etcd_lease)

    def renew(self) -> bool:
        """Is the role still ours, confirmed recently enough to commit on? False when
        another revision holds the key (fence); EtcdUnavailable when the last
        confirmation is too old (etcd unreachable, or no quorum)."""
        if not self.revision:
            return False
        if time.monotonic() - self.confirmed_at >= CONFIRMED_USE * self.lease_window:
            raise EtcdUnavailable("the coordinator lease could not be confirmed through "
                                  "etcd in time")
        return True

    async def hand_over(self, heir_slot: int) -> bool:
        """Free the role for `heir_slot` alone, for one lease period (a move)."""
        value = {"owner_slot": -1, "heir_slot": heir_slot, "base": self.base,
                 "heir_until_ns": time.time_ns() + int(self.lease_seconds * 1e9)}
        revision, self.revision = self.revision, 0
        if not revision:
            return False
        done = await self._call(self._etcd.put_if, coordinator_key(self.uuid), revision, value)
        return done is not None

    async def release(self) -> None:
        """Give the role up (a clean unmount, a step down), keeping the epoch base."""
        revision, self.revision = self.revision, 0
        if not revision:
            return
        try:
            await self._call(self._etcd.put_if, coordinator_key(self.uuid), revision,
                             {"owner_slot": -1, "base": self.base})
        except OSError as exc:
            log.warning("cannot release the coordinator key: %s (it expires with the "
                        "lease)", exc)

    async def leave(self) -> None:
        """A clean unmount: revoke this node's lease, which deletes its slot."""
        try:
            await self._call(self._etcd.revoke, self.node_lease)
        except OSError as exc:
            log.warning("cannot revoke this node's etcd lease: %s", exc)

    # -- the renewal task ----------------------------------------------------------------------

    async def run(self) -> None:
        """Renew this node's lease, publish its record, and read the keys, several
        times per lease, for as long as the node lives."""
        while True:
            await self.refresh()
            await trio.sleep(self.lease_window / RENEWALS_PER_LEASE)

    async def refresh(self) -> None:
        holding, started = self.revision, time.monotonic()
        record = self._record()
        try:
            kvs = await trio.to_thread.run_sync(self._renew_and_read, record)
        except (OSError, KeyError, ValueError) as exc:  # unconfirmed: the lease runs down
            log.warning("etcd: %s", exc)
            return
        self.state = state_of(self.uuid, kvs)
        if holding and holding == self.revision:
            lease = self.state.lease
            if lease.revision == holding and lease.etcd_lease == self.node_lease:
                self.confirmed_at = started
            else:
                log.warning("the coordinator key is not ours any more (revision %d, not %d)",
                            lease.revision, holding)
                self.revision = 0

    def _renew_and_read(self, record: dict) -> list[KeyValue]:
        etcd = self._background
        if etcd.keep_alive(self.node_lease) < 0:
            self._new_lease(etcd)
        if record != self._published:
            self._publish(etcd, record)
        return etcd.get_prefix(f"/csvfs/{self.uuid}/")

    def _publish(self, etcd: Etcd, record: dict) -> None:
        """Write this node's slot record, unless another node took the slot meanwhile
        (this node's lease had expired)."""
        kv = etcd.get(slot_key(self.uuid, self.slot))
        if kv is not None and kv.lease != self.node_lease:
            log.error("slot %d was taken by %s while this node's lease had expired",
                      self.slot, kv.value.get("name", "?"))
            return
        etcd.put_if(slot_key(self.uuid, self.slot), kv.mod_revision if kv else 0, record,
                    self.node_lease)
        self._published = record

    def _new_lease(self, etcd: Etcd) -> None:
        """This node's lease expired (it hung, or etcd lost it): a new one, the slot
        again. A coordinator role held under the old one is gone with it."""
        log.warning("this node's etcd lease expired; taking a new one")
        self.node_lease, _ = etcd.grant(self.ttl)
        self._published = None
        self.revision = 0
