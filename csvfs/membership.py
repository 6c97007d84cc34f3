"""A node's place in the cluster: the volume's coordinator, or a member of another's.

The role is a small state machine:

    electing --(no live coordinator: take the lease)--> coordinator
    electing --(a live coordinator: register with it)--> member
    coordinator --(lease lost: fenced)--> electing
    member --(connection lost, heartbeat failed, epoch changed)--> electing
    any --(clean unmount)--> closed

The role changes under the node's feet: the coordinator dies or hangs and this
node takes over, or this node stalled as coordinator, lost its lease and steps
down. The FUSE layer and the data path never see that happen. They call
`meta(method, **args)`, which waits while the node finds the coordinator again
and then retries, and the data path awaits `revalidate()` before any direct I/O
once its grant has run out. Applications see a pause, not an error.

The roles themselves are csvfs/coordinator_role.py and csvfs/member_role.py.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import secrets
from pathlib import Path

import trio

from coordinator import recovery
from coordinator.endpoint import CoordinatorEndpoint
from coordinator.service import ONCE_ONLY
from csvfs import balance
from csvfs.cluster import elections
from csvfs.cluster.election import Lease
from csvfs.cluster.errors import MetaError, NotCoordinator
from csvfs.cluster.messages import brief
from csvfs.cluster.transport import RpcDisconnected
from csvfs.cluster.wire import RpcError
from csvfs.coordinator_role import CoordinatorRole
from csvfs.datapath import DataPath
from csvfs.locks import NodeLocks
from csvfs.member_role import MemberRole
from csvfs.partition import STAY_OUT
from csvfs.quiesce import FileGates
from csvfs.volume.errors import VolumeError
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)


class NoCoordinatorInTime(MetaError):
    """No coordinator for the I/O timeout: the request fails with EIO."""


RETRY_PAUSE = 0.05
IO_TIMEOUT = 60.0  # default of `csvfs mount --io-timeout`
HEIR_POLL = 0.01  # while the heir of a move takes the lease
Role = CoordinatorRole | MemberRole


class Membership:
    def __init__(self, name: str, volume: Volume, election, key: bytes,
                 lease_seconds: float, gates: FileGates, datapath: DataPath,
                 nursery: trio.Nursery, locks: NodeLocks, cluster: list[Path] | None = None,
                 io_timeout: float = IO_TIMEOUT):
        self.name = name
        self.io_timeout = io_timeout  # how long requests wait for a coordinator, then EIO
        self._lost_at = math.inf  # trio time the node lost its coordinator
        self._stay_out_until = -math.inf  # after stepping down, cut off (csvfs/partition.py)
        self.cluster = cluster or []  # the cluster's volumes, to balance roles over
        self._defer_until: float | None = None  # a takeover waits for a node with fewer roles
        self.volume = volume
        self.election = election
        self.key = key
        self.lease_seconds = lease_seconds
        self.gates = gates
        self.datapath = datapath
        self.nursery = nursery
        self.locks = locks
        self.role: Role | None = None  # None while electing
        self.closing = False
        self._settled = trio.Event()
        self._electing = False
        # Ids for requests that must not run twice. A random start, so that a node
        # restarted under the same name never reuses an id the coordinator remembers.
        self._request_ids = itertools.count(secrets.randbits(48))

    @property
    def endpoint(self) -> CoordinatorEndpoint | None:
        """Where members' requests go: only a coordinator has one."""
        role = self.role
        return role.endpoint if isinstance(role, CoordinatorRole) else None

    # -- what the FUSE layer and the data path use -----------------------------------------

    async def meta(self, method: str, **args):
        """Run a metadata request wherever the coordinator is; wait out failovers."""
        if method in ONCE_ONLY:
            args["req"] = next(self._request_ids)
        while True:
            role = await self._settled_role()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s to %s %s: %s", method, role.coordinator_name, role.route,
                          brief(args))
            try:
                return await role.call(method, args)
            except NotCoordinator as exc:  # the role is gone: find the coordinator again
                log.debug("%s: %s; retrying", method, exc)

    async def revalidate(self) -> float | None:
        """A fresh deadline for direct I/O, once the node's session is sure again;
        None when the node is shutting down. OSError(EIO) once no coordinator has been
        reachable for the I/O timeout: that request fails, the node goes on trying."""
        while not self.closing:
            try:
                role = await self._settled_role()
            except NoCoordinatorInTime as exc:
                raise OSError(errno.EIO, str(exc)) from None
            except MetaError:
                return None
            if await role.revalidate():
                return self.datapath.valid_until
        return None

    async def _settled_role(self) -> Role:
        """The role, once there is one; requests wait for it at most the I/O timeout
        from when the node lost its coordinator (a partition), then fail with EIO."""
        while self.role is None:
            if self.closing:
                raise MetaError(errno.EIO, "the node is shutting down")
            with trio.move_on_at(self._lost_at + self.io_timeout):
                await self._settled.wait()
                continue
            raise NoCoordinatorInTime(
                errno.EIO, f"no coordinator reachable for {self.io_timeout:g} s (--io-timeout)")
        return self.role

    # -- finding the coordinator, or becoming it ----------------------------------------

    async def start(self) -> None:
        """The first election; raises VolumeError if the metadata cannot be loaded."""
        await self._settle(first=True)

    async def _settle(self, first: bool = False) -> None:
        while not self.closing:
            if not first and await self._defer_takeover():
                continue
            try:
                outcome = await self._try_take()
            except (VolumeError, OSError) as exc:
                if first:
                    raise VolumeError(str(exc)) from None
                log.error("cannot take over the volume: %s", exc)
                await trio.sleep(1)
                continue
            if isinstance(outcome, Lease):
                if outcome.owner_slot < 0:  # a move: the heir takes the lease any moment
                    await trio.sleep(HEIR_POLL)
                    continue
                if await self._join(outcome):
                    return
                continue
            await self._coordinate(*outcome)
            return

    async def _defer_takeover(self) -> bool:
        """Wait a moment, and True, while the lease is free and another node that
        coordinates fewer of the cluster's volumes may take it (csvfs/balance.py)."""
        if not self.cluster:
            return False
        lease = self.election.read_lease()
        if lease.moving() or self.election.live_owner(lease):
            self._defer_until = None
            return False
        now = trio.current_time()
        if self._defer_until is None:
            volumes = await trio.to_thread.run_sync(balance.read_cluster, self.cluster,
                                                    self.election.spec)
            delay = balance.takeover_delay(volumes, str(self.volume.path.resolve()), self.name)
            if delay <= 0:
                return False
            log.info("leaving the free lease to a node with fewer roles for %.1f s", delay)
            self._defer_until = now + delay
        if now >= self._defer_until:
            self._defer_until = None
            return False
        await trio.sleep(HEIR_POLL)
        return True

    async def _try_take(self):
        """Take the lease if nobody live holds it: returns (recovered, epoch, old lease).
        Otherwise returns the live owner's lease."""
        outcome = await self.election.try_take(self._may_take, self._recover)
        if not isinstance(outcome, Lease):
            await trio.to_thread.run_sync(elections.record_election, self.election,
                                          self.volume, outcome[1])
        return outcome

    def _may_take(self, lease: Lease) -> bool:
        """A node whose path failed, or that was cut off, leaves the role to others."""
        staying_out = trio.current_time() < self._stay_out_until
        return not ((self.datapath.storage.lost or staying_out) and self.election.other_nodes())

    def _recover(self) -> recovery.Recovered:
        image = self.volume.path
        try:
            recovered = recovery.load(self.volume)
        except (ValueError, KeyError, TypeError) as exc:
            raise VolumeError(f"{image}: metadata does not load ({exc}); run csvfs fsck") from None
        if recovered.state.damage:
            raise VolumeError(f"{image}: metadata is inconsistent ({recovered.state.damage[0]}); "
                              f"run 'csvfs fsck --repair {image}'")
        if recovered.replay.corrupt is not None:
            raise VolumeError(f"{image}: {recovered.replay.corrupt}; "
                              f"run 'csvfs fsck --repair {image}'")
        for problem in recovered.checkpoint_problems:
            log.warning("%s", problem)
        return recovered

    async def _coordinate(self, recovered: recovery.Recovered, epoch: int, old: Lease) -> None:
        self._defer_until = None
        role = CoordinatorRole(self.name, self.volume, self.election, self.gates, self.datapath,
                               self.lease_seconds, self.nursery, self._role_lost, self.locks,
                               self.cluster)
        await role.start(recovered, epoch, old)
        self._settle_on(role)

    async def _join(self, lease: Lease) -> bool:
        role = MemberRole(self.name, self.volume, self.election, self.key, self.gates,
                          self.datapath, self.nursery, self._role_lost, self.locks)
        try:
            await role.join(lease)
        except (RpcError, MetaError, OSError, ValueError, trio.TooSlowError) as exc:
            log.info("cannot join %s yet: %s", lease.owner_name or "?",
                     str(exc) or "no answer in time")
            if isinstance(exc, RpcDisconnected):
                await self._owner_gone(lease)
            await trio.sleep(RETRY_PAUSE)
            return False
        self._settle_on(role)
        return True

    async def _owner_gone(self, lease: Lease) -> None:
        try:
            await self.election.owner_gone(lease)
        except OSError as exc:
            log.warning("cannot end the dead coordinator's lease: %s", exc)

    def _settle_on(self, role: Role) -> None:
        self.role = role
        log.info("role: %s of %s (coordinator %s)", role.kind, self.volume.path,
                 role.coordinator_name)
        self._settled.set()

    def _role_lost(self, role: Role, reason: str) -> None:
        """No role until a new election: no direct I/O, metadata calls wait."""
        if role is not self.role:
            return
        self.role = None
        self._lost_at = trio.current_time()
        if getattr(role, "cut_off", False):  # it gave the role up: leave it to the others
            self._stay_out_until = self._lost_at + STAY_OUT * self.lease_seconds
        if not self.closing:
            log.warning("lost the %s role (coordinator %s): %s", role.kind,
                        role.coordinator_name, reason)
        self.datapath.valid_until = -math.inf
        # changes to open files will not be pushed here until the node is back
        stale = {"inos": list(self.datapath.files), "entries": [], "all_dirs": True}
        self.nursery.start_soon(self.gates.forget_in_kernel, stale)
        if self._settled.is_set():
            self._settled = trio.Event()
        if not self._electing and not self.closing:
            self._electing = True
            self.nursery.start_soon(self._resettle)

    async def _resettle(self) -> None:
        try:
            await self._settle()
        finally:
            self._electing = False

    async def hand_over(self, reason: str) -> None:
        """If this node coordinates, move the role to a node whose path to the image
        works (csvfs/redirect.py: a coordinator whose own path failed)."""
        role = self.role
        if not isinstance(role, CoordinatorRole):
            return
        try:
            await role.move("", reason)
        except MetaError as exc:
            log.warning("keeping the coordinator role: %s", exc)

    # -- shutting down -----------------------------------------------------------------------

    async def close(self) -> None:
        """Clean unmount, after FUSE is gone: hand the volume back in good order."""
        self.closing = True
        role, self.role = self.role, None
        self._settled.set()  # waiters wake up and see the node is closing
        self.datapath.fence()
        if role is not None:
            log.info("leaving the %s role", role.kind)
            await role.close()
        try:
            self.election.write_slot(mode="stopped")
        except OSError:
            pass
        await self.election.leave()

