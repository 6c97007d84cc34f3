"""The coordinator role: this node runs the volume's metadata service.

Taking it: under the lease lock the election found no live owner, took the
lease with a new epoch, and recovery loaded the metadata (csvfs/membership.py).
The role then records the election (and a takeover) in the event ring,
starts the metadata service, registers this node's own open files and locks
with it in process (csvfs/quiesce.py FileGates is that node's session), holds
lock grants until the other live nodes have re-registered theirs, opens the
epoch (reclaiming orphans at once if no other node lives, else after two
lease periods, once the members had time to register again), and serves the
members through the RPC endpoint (coordinator/endpoint.py).

Holding it: the lease is renewed three times per lease period; commits, and
this node's direct I/O, stop at GRANT_USE of the lease unless it was renewed.
When the service finds the lease held by another node (a stall outlived it),
it fences itself, the endpoint closes, and `on_lost` tells the membership,
which joins the new coordinator as a member.

Leaving it: at a clean unmount, a checkpoint (the next coordinator then has
no journal to replay), and the lease is released so that another node takes
over at once.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path

import trio

from coordinator import recovery
from coordinator.endpoint import CoordinatorEndpoint
from coordinator.service import MetadataService
from csvfs import move, partition
from csvfs.cluster.election import Lease
from csvfs.cluster.errors import MetaError, NotCoordinator
from csvfs.cluster.events import EventLog
from csvfs.datapath import GRANT_USE, DataPath
from csvfs.locks import NodeLocks
from csvfs.quiesce import FileGates
from csvfs.redirect import ACTIONS
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

RENEWALS_PER_LEASE = 3
SNAPSHOT_EXPIRY_CHECK = 1.0  # seconds between looks for snapshots whose requester is gone


class CoordinatorRole:
    kind = "coordinator"
    route = "in process"  # how this node's metadata requests reach the coordinator

    def __init__(self, name: str, volume: Volume, election, gates: FileGates,
                 datapath: DataPath, lease_seconds: float, nursery: trio.Nursery,
                 on_lost: Callable[[CoordinatorRole, str], None], locks: NodeLocks,
                 cluster: list[Path] | None = None):
        self.name = name
        self.cluster = cluster or []  # the cluster's volumes (csvfs/balance.py)
        self.locks = locks
        self.volume = volume
        self.election = election
        self.gates = gates
        self.datapath = datapath
        self.lease_seconds = lease_seconds
        self.nursery = nursery
        self.on_lost = on_lost
        self.service: MetadataService | None = None
        self.cut_off = False  # stepped down, hearing too few nodes (csvfs/partition.py)
        self.endpoint: CoordinatorEndpoint | None = None
        self.events: EventLog | None = None

    @property
    def coordinator_name(self) -> str:
        return self.name

    async def start(self, recovered: recovery.Recovered, epoch: int, old: Lease) -> None:
        self.events = events = EventLog(self.volume, self.name)
        self._record_election(events, epoch, old)
        service = self.service = MetadataService(self.volume, recovered, epoch, events,
                                                 renew_lease=self.renew_now,
                                                 on_fenced=self._stepped_down)
        self._move_deadlines()
        self.gates.rejoined(await service.join(self.gates, self.gates.open_counts()))
        self.locks.registered(service.locks.join(self.name, self.locks.held()))
        others = bool(self.election.other_nodes())
        # Grant no lock over one a member has not re-registered yet (coordinator/locks.py).
        service.locks.expect(self.other_node_names(),
                             trio.current_time() + 2 * self.lease_seconds)
        await service.start(reclaim_orphans=not others)
        self.endpoint = CoordinatorEndpoint(service, self.nursery, self.lease_seconds,
                                            self.election.slot_alive, self.status,
                                            self.control, self.move)
        log.info("coordinator of %s, epoch %d", self.volume.path, epoch)
        if others:
            self.nursery.start_soon(self._reclaim_orphans_later, service)
        self.nursery.start_soon(self._renew_lease, service)
        self.nursery.start_soon(self._expire_snapshots, service)
        self.nursery.start_soon(partition.watch_members, self, service)
        if self.cluster:
            self.nursery.start_soon(move.keep_balance, self, service)

    def _record_election(self, events: EventLog, epoch: int, old: Lease) -> None:
        events.emit("election", f"{self.name} became coordinator, epoch {epoch}")
        if old.owner_slot >= 0 and old.owner_slot != self.election.slot:
            why = ("its process is gone" if old.expiry_ns > time.time_ns()
                   else "its lease had lapsed")
            events.emit("takeover", f"took over from {old.owner_name} (pid {old.owner_pid}, "
                        f"epoch {old.epoch}): {why}", level="warning")
        if self.volume.used_copy:
            events.emit("superblock", "primary superblock unusable; running on its copy "
                        "(csvfs fsck --repair restores it)", level="warning")

    async def call(self, method: str, args: dict):
        """A metadata request of this node's own, served in process. Raises
        NotCoordinator once the role is lost."""
        service = self.service
        if service is None:
            raise NotCoordinator("this node stepped down")
        return await service.call(self.name, method, args)

    async def revalidate(self) -> bool:
        return self.renew_now()

    def other_node_names(self) -> list[str]:
        names = []
        for slot in self.election.other_nodes():
            record = self.election.read_slot(slot)
            if record and record.get("name"):
                names.append(record["name"])
        return names

    async def _reclaim_orphans_later(self, service: MetadataService) -> None:
        """Give the other nodes time to re-register what they have open first."""
        await trio.sleep(2 * self.lease_seconds)
        if service is self.service and not service.fenced:
            try:
                await service.reclaim_orphans()
            except MetaError as exc:
                log.warning("orphans not reclaimed: %s", exc)

    async def _expire_snapshots(self, service: MetadataService) -> None:
        """Release the snapshots of backups that stopped renewing them."""
        while service is self.service and not service.fenced:
            await trio.sleep(SNAPSHOT_EXPIRY_CHECK)
            try:
                await service.snapshots.expire()
            except MetaError as exc:
                log.warning("expired snapshots not released: %s", exc)

    # -- the lease -----------------------------------------------------------------------------

    async def _renew_lease(self, service: MetadataService) -> None:
        """Renew several times per lease period; stop committing before it can lapse."""
        while service is self.service:
            await trio.sleep(self.lease_seconds / RENEWALS_PER_LEASE)
            if service is self.service:
                self.renew_now()

    def renew_now(self) -> bool:
        """Renew the lease; on success move the deadlines on. False if it is gone."""
        service = self.service
        if service is None or service.fenced:
            return False
        try:
            renewed = self.election.renew()
        except OSError as exc:
            log.warning("cannot renew the coordinator lease: %s", exc)
            return False  # commits and direct I/O stop by themselves at the deadlines
        if not renewed:
            service.commits.fence("another node holds the coordinator lease now")
            return False
        self._move_deadlines()
        return True

    def _move_deadlines(self) -> None:
        """Commit and do direct I/O only well inside the lease, so that a stall
        cannot outlive it unnoticed."""
        until = self.election.confirmed_at + self.election.lease_window * GRANT_USE
        self.service.lease_renewed(trio.current_time() + (until - time.monotonic()))
        self.datapath.valid_until = until

    def _stepped_down(self) -> None:
        """The service found the lease gone, or its journal failing: commit nothing more,
        rejoin as a member. A failed journal is this node's path to the image failing:
        it stays out of the next election (csvfs/membership.py) until a probe works."""
        if self.service is None:
            return
        failure = self.service.commits.journal_failure
        if failure is not None:
            self.datapath.storage.failed("journal write", failure)
        self.service = None
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        self.on_lost(self, "this node lost the coordinator lease")

    # -- status and shutdown -------------------------------------------------------------------

    def status(self) -> dict:
        """What `csvfs status` shows of the coordinator: its sessions and open files."""
        service = self.service
        redirect = service.redirect
        own = {**self.datapath.storage.state(), "served": redirect.served.get(self.name, {})}
        sessions = [{"name": self.name, "slot": self.election.slot, "coordinator": True,
                     "io": own}]
        for session in (self.endpoint.sessions.values() if self.endpoint else ()):
            sessions.append({"name": session.name, "slot": session.slot,
                             "address": session.peer.address, "coordinator": False,
                             "io": redirect.state_of(session.name)})
        holders = service.open_table()
        locks = service.locks.table_of()
        paths = service.state.paths({**holders, **locks})
        return {
            "coordinator": self.name,
            "epoch": service.epoch,
            "sessions": sessions,
            "lingering": sorted(service.sessions.lingering),
            "open_files": [[ino, paths.get(ino, ""), nodes] for ino, nodes in holders.items()],
            "locks": [[ino, paths.get(ino, ""), *lock] for ino, each in locks.items()
                      for lock in each],
            "snapshots": service.snapshots.table(),
        }

    async def control(self, node: str, action: str) -> dict:
        """`csvfs fault` or `csvfs redirect` (csvfs/redirect.py): done here for this node,
        pushed to a member, and answered once that node has done it."""
        if action not in ACTIONS:
            raise MetaError(errno.EINVAL, f"unknown action {action!r}: one of "
                                          f"{', '.join(ACTIONS)}")
        if node == self.name:
            self.datapath.storage.control(action)
            state = self.datapath.storage.state()
        else:
            session = self.endpoint.sessions.get(node) if self.endpoint else None
            if session is None:
                raise MetaError(errno.ENOENT, f"no node named {node} is in session")
            state = await session.control(action)
        self.events.emit("control", f"{action} on {node}", level="info")
        return {"node": node, "mode": state["mode"], "reason": state["reason"]}

    # -- moving the role (csvfs/move.py) -------------------------------------------------------

    async def move(self, heir: str, reason: str = "requested") -> dict:
        """Hand the role to the member `heir` ("": the best one)."""
        return await move.hand_over(self, heir, reason)

    async def close(self) -> None:
        """Clean unmount, after FUSE is gone: hand the volume back in good order."""
        service = self.service
        if service is None:
            return
        try:
            await service.checkpoint_now()  # makes the next mount or takeover fast
            service.close()
            self.endpoint.close()
            self.events.emit("unmount", f"{self.name} unmounted cleanly")
            await self.election.release()
        except (OSError, MetaError) as exc:
            log.error("clean shutdown failed: %s (the next coordinator replays the journal)",
                      exc)
