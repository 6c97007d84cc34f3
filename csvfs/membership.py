"""A node's place in the cluster: the volume's coordinator, or a member of another's.

The role changes under the node's feet: the coordinator dies or hangs and this
node takes over, or this node stalled as coordinator, lost its lease and steps
down. The FUSE layer and the data path never see that happen. They call
`meta(method, **args)`, which waits while the node finds the coordinator again
and then retries, and the data path awaits `revalidate()` before any direct I/O
once its grant has run out. Applications see a pause, not an error.

- As coordinator, the node runs the metadata service in-process, renews the
  lease several times per lease period, and serves the others through the
  RPC endpoint. Its own data path may do I/O while the lease is surely held.
- As a member, it holds an RPC session with the coordinator: it registers its
  open files, receives pause/map/resume pushes, and renews a grant with
  heartbeats. Its data path may do I/O only inside that grant.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable
from functools import partial

import trio

from coordinator import recovery
from coordinator.endpoint import CoordinatorEndpoint
from coordinator.service import ONCE_ONLY, MetadataService
from csvfs.cluster.election import Election, Lease, read_lease, read_slot, slot_alive
from csvfs.cluster.errors import MetaError, NotCoordinator, is_not_coordinator
from csvfs.cluster.events import EventLog
from csvfs.cluster.transport import Peer, RpcClient, RpcError, split_address
from csvfs.cluster.wire import ProtocolError
from csvfs.datapath import DataPath
from csvfs.volume import format as fmt
from csvfs.volume.errors import VolumeError
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 2.0  # connect + register, cut short when the coordinator's lease runs out
CALL_TIMEOUT = 30.0  # a metadata call; a quiesce may have to wait out an evicted node
RETRY_PAUSE = 0.05
GRANT_USE = 0.8  # fraction of a grant or lease inside which this node does direct I/O


class Membership:
    def __init__(self, name: str, volume: Volume, election: Election, datapath: DataPath,
                 key: bytes, lease_seconds: float, nursery: trio.Nursery):
        self.name = name
        self.volume = volume
        self.election = election
        self.datapath = datapath
        self.key = key
        self.lease_seconds = lease_seconds
        self.nursery = nursery
        self.role: str | None = None  # "coordinator", "member", or None while electing
        self.coordinator_name = ""
        self.service: MetadataService | None = None
        self.endpoint: CoordinatorEndpoint | None = None
        self.events: EventLog | None = None
        self.client: RpcClient | None = None
        self.grant_seconds = lease_seconds
        self.epoch = 0  # of the coordinator this node is registered with
        self.closing = False
        self._settled = trio.Event()
        self._electing = False
        # Ids for requests that must not run twice. A random start, so that a node
        # restarted under the same name never reuses an id the coordinator remembers.
        self._request_ids = itertools.count(secrets.randbits(48))

    # -- what the FUSE layer and the data path use -----------------------------------------

    async def meta(self, method: str, **args):
        """Run a metadata request wherever the coordinator is; wait out failovers."""
        if method in ONCE_ONLY:
            args["req"] = next(self._request_ids)
        while True:
            await self._wait_settled()
            if self.role == "coordinator":
                try:
                    return await self.service.call(self.name, method, args)
                except NotCoordinator:
                    continue  # we stepped down meanwhile; find the new coordinator
            client = self.client
            try:
                return await client.call(method, args, timeout=CALL_TIMEOUT)
            except ProtocolError as exc:
                raise MetaError(errno.EIO, f"{method}: {exc}") from None
            except MetaError as exc:
                if not is_not_coordinator(exc):
                    raise
                self._lost(client, f"{client.address} is not the coordinator any more")
            except RpcError as exc:
                self._lost(client, str(exc))

    async def revalidate(self) -> float | None:
        """A fresh deadline for direct I/O, once the node's session is sure again;
        None when the node is shutting down."""
        while not self.closing:
            try:
                await self._wait_settled()
            except MetaError:
                return None
            if self.role == "coordinator":
                if self._renew_now():
                    return self.datapath.valid_until
            elif await self._heartbeat(self.client):
                return self.datapath.valid_until
        return None

    async def _wait_settled(self) -> None:
        while self.role is None:
            if self.closing:
                raise MetaError(errno.EIO, "the node is shutting down")
            await self._settled.wait()

    # -- finding the coordinator, or becoming it ----------------------------------------

    async def start(self) -> None:
        """The first election; raises VolumeError if the metadata cannot be loaded."""
        await self._settle(first=True)

    async def _settle(self, first: bool = False) -> None:
        while not self.closing:
            try:
                outcome = self._try_take()
            except (VolumeError, OSError) as exc:
                if first:
                    raise VolumeError(str(exc)) from None
                log.error("cannot take over the volume: %s", exc)
                await trio.sleep(1)
                continue
            if isinstance(outcome, Lease):
                try:
                    await self._join(outcome)
                    return
                except (RpcError, MetaError, OSError, ValueError, trio.TooSlowError) as exc:
                    log.info("cannot join %s yet: %s", outcome.owner_name or "?",
                             str(exc) or "no answer in time")
                    await trio.sleep(RETRY_PAUSE)
                    continue
            await self._become_coordinator(*outcome)
            return

    def _try_take(self):
        """Take the lease if nobody live holds it: returns (recovered, epoch, old lease).
        Otherwise returns the live owner's lease."""
        election = self.election
        with election.lease_lock():
            lease = read_lease(self.volume)
            if election.live_owner(lease):
                return lease
            recovered = self._recover()
            epoch = election.take(lease, recovered.last_epoch)
        return recovered, epoch, lease

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

    # -- the coordinator role ----------------------------------------------------------------

    async def _become_coordinator(self, recovered: recovery.Recovered, epoch: int,
                                  old: Lease) -> None:
        events = EventLog(self.volume, self.name)
        events.emit("election", f"{self.name} became coordinator, epoch {epoch}")
        if old.owner_slot >= 0 and old.owner_slot != self.election.slot:
            why = ("its process is gone" if old.expiry_ns > time.time_ns()
                   else "its lease had lapsed")
            events.emit("takeover", f"took over from {old.owner_name} (pid {old.owner_pid}, "
                        f"epoch {old.epoch}): {why}", level="warning")
        if self.volume.used_copy:
            events.emit("superblock", "primary superblock unusable; running on its copy "
                        "(csvfs fsck --repair restores it)", level="warning")
        service = MetadataService(self.volume, recovered, epoch, events)
        service.renew_lease = self._renew_now
        service.on_fenced.append(partial(self._stepped_down, service))
        self.service, self.events = service, events
        self._move_deadlines()
        self.datapath.rejoined(await service.join(self.datapath, self.datapath.open_counts()))
        others = self._other_nodes_alive()
        await service.start(reclaim_orphans=not others)
        self.endpoint = CoordinatorEndpoint(service, self.nursery, self.lease_seconds,
                                            partial(slot_alive, self.volume), self.status)
        self.role, self.coordinator_name = "coordinator", self.name
        log.info("coordinator of %s, epoch %d", self.volume.path, epoch)
        if others:
            self.nursery.start_soon(self._reclaim_orphans_later, service)
        self.nursery.start_soon(self._renew_lease, service)
        self._settled.set()

    def _other_nodes_alive(self) -> bool:
        return any(slot != self.election.slot and slot_alive(self.volume, slot)
                   for slot in range(fmt.MAX_NODES))

    async def _reclaim_orphans_later(self, service: MetadataService) -> None:
        """Give the other nodes time to re-register what they have open first."""
        await trio.sleep(2 * self.lease_seconds)
        if service is self.service and not service.fenced:
            try:
                await service.reclaim_orphans()
            except MetaError as exc:
                log.warning("orphans not reclaimed: %s", exc)

    async def _renew_lease(self, service: MetadataService) -> None:
        """Renew several times per lease period; stop committing before it can lapse."""
        while service is self.service:
            await trio.sleep(self.lease_seconds / 3)
            if service is self.service:
                self._renew_now()

    def _renew_now(self) -> bool:
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
            service.fence("another node holds the coordinator lease now")
            return False
        self._move_deadlines()
        return True

    def _move_deadlines(self) -> None:
        """Commit and do direct I/O only well inside the lease, so that a stall
        cannot outlive it unnoticed."""
        margin = self.lease_seconds * GRANT_USE
        self.service.lease_deadline = trio.current_time() + margin
        self.datapath.valid_until = time.monotonic() + margin

    def _stepped_down(self, service: MetadataService) -> None:
        """The service found the lease gone: commit nothing more, rejoin as a member."""
        if service is not self.service:
            return
        self.service = None
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        self._lost_role("this node lost the coordinator lease")

    def status(self) -> dict:
        service = self.service
        sessions = [{"name": self.name, "slot": self.election.slot, "coordinator": True}]
        for session in (self.endpoint.sessions.values() if self.endpoint else ()):
            sessions.append({"name": session.name, "slot": session.slot,
                             "address": session.peer.address, "coordinator": False})
        holders = service.open_table()
        paths = service.state.paths(holders)
        return {
            "coordinator": self.name,
            "epoch": service.epoch,
            "sessions": sessions,
            "lingering": sorted(service.lingering),
            "open_files": [[ino, paths.get(ino, ""), nodes] for ino, nodes in holders.items()],
        }

    # -- the member role -----------------------------------------------------------------------

    async def _join(self, lease: Lease) -> None:
        record = read_slot(self.volume, lease.owner_slot) or {}
        host, port = split_address(record.get("address", ""))
        timeout = max(0.1, min(JOIN_TIMEOUT, lease.expiry_ns / 1e9 - time.time()))
        link = _Link(self)
        with trio.fail_after(timeout):
            client = await RpcClient.connect(host, port, self.key, self.name,
                                             on_notify=link.notified, timeout=timeout,
                                             nursery=self.nursery)
            link.client = client
            try:
                started = time.monotonic()
                reply = await client.call("register", {"slot": self.election.slot,
                                                       "epoch": lease.epoch,
                                                       "opens": self.datapath.open_counts()})
            except BaseException:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                raise
        self.datapath.rejoined(reply["maps"])
        self.grant_seconds = reply["grant_seconds"]
        self.epoch = reply["epoch"]
        self.datapath.valid_until = started + GRANT_USE * self.grant_seconds
        self.client = client
        self.role, self.coordinator_name = "member", lease.owner_name
        self.election.write_slot(mode="direct")
        log.info("joined coordinator %s at %s (epoch %d)", lease.owner_name, client.address,
                 reply["epoch"])
        await link.ready()
        self.nursery.start_soon(self._keep_alive, client)
        self.nursery.start_soon(self._watch, client)
        self._settled.set()

    async def _keep_alive(self, client: RpcClient) -> None:
        while client is self.client:
            await trio.sleep(self.grant_seconds / 4)
            if client is self.client:
                await self._heartbeat(client)

    async def _heartbeat(self, client: RpcClient) -> bool:
        """Renew the grant; False (and the session dropped) if the coordinator is gone."""
        started = time.monotonic()
        try:
            reply = await client.call("heartbeat", timeout=self.grant_seconds / 3)
        except (RpcError, MetaError) as exc:
            self._lost(client, f"heartbeat failed: {exc}")
            return False
        if reply["epoch"] != self.epoch:  # not the coordinator we registered with
            self._lost(client, f"the coordinator's epoch changed to {reply['epoch']}")
            return False
        if client is not self.client:
            return False
        self.datapath.valid_until = max(self.datapath.valid_until,
                                        started + GRANT_USE * self.grant_seconds)
        try:
            self.election.write_slot(mode="direct")
        except OSError as exc:
            log.warning("cannot write this node's slot: %s", exc)
        return True

    async def _watch(self, client: RpcClient) -> None:
        await client.wait_closed()
        self._lost(client, client.close_reason or "connection closed")

    def _lost(self, client: RpcClient | None, reason: str) -> None:
        if client is None or client is not self.client:
            return
        self.client = None
        if not self.closing:
            log.warning("lost coordinator %s: %s", self.coordinator_name, reason)
        self.nursery.start_soon(client.aclose)
        self._lost_role(reason)

    def _lost_role(self, reason: str) -> None:
        """No role until a new election: no direct I/O, metadata calls wait."""
        self.role = None
        self.datapath.valid_until = -math.inf
        # changes to open files will not be pushed here until the node is back
        stale = {"inos": list(self.datapath.files), "entries": []}
        self.nursery.start_soon(self.datapath.forget_in_kernel, stale)
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

    # -- shutting down -----------------------------------------------------------------------

    async def close(self) -> None:
        """Clean unmount, after FUSE is gone: hand the volume back in good order."""
        self.closing = True
        role, self.role = self.role, None
        self._settled.set()  # waiters wake up and see the node is closing
        self.datapath.fence()
        if role == "coordinator":
            await self._close_coordinator()
        elif role == "member":
            client = self.client
            with trio.move_on_after(2):
                try:
                    await client.call("goodbye", timeout=2)
                except (RpcError, MetaError) as exc:
                    log.info("goodbye to the coordinator failed: %s", exc)
            await client.aclose()
        try:
            self.election.write_slot(mode="stopped")
        except OSError:
            pass

    async def _close_coordinator(self) -> None:
        service = self.service
        try:
            await service.checkpoint_now()  # makes the next mount or takeover fast
            service.close()
            self.endpoint.close()
            self.events.emit("unmount", f"{self.name} unmounted cleanly")
            self.election.release()
        except (OSError, MetaError) as exc:
            log.error("clean shutdown failed: %s (the next coordinator replays the journal)",
                      exc)


class _Link:
    """Routes one connection's notifications to the data path. Until the node has
    applied the maps its registration returned, notifications wait in order: a
    pause pushed right after the registration must not be undone by it."""

    def __init__(self, membership: Membership):
        self.membership = membership
        self.client: RpcClient | None = None
        self._backlog: list | None = []

    async def ready(self) -> None:
        backlog, self._backlog = self._backlog, None
        for kind, body in backlog:
            await self._apply(kind, body)

    async def notified(self, kind: str, body: dict) -> None:
        if self._backlog is not None:
            self._backlog.append((kind, body))
            return
        await self._apply(kind, body)

    async def _apply(self, kind: str, body: dict) -> None:
        datapath = self.membership.datapath
        if kind == "pause":
            await datapath.pause(body["ino"])
        elif kind == "invalidate":
            await datapath.forget_in_kernel(body)
        elif kind == "map":
            await datapath.take_map(body["ino"], body, body.get("resume", False),
                                    body.get("forget", False))
        elif kind == "resume":
            datapath.resume(body["ino"])
        else:
            log.warning("ignoring an unknown %r notification", kind)
            return
        if "token" in body:  # the coordinator waits for this one to be done
            self.membership.nursery.start_soon(self._ack, body["token"])

    async def _ack(self, token: int) -> None:
        try:
            await self.client.call("ack", {"token": token}, timeout=CALL_TIMEOUT)
        except (RpcError, MetaError) as exc:  # the coordinator evicts us; we rejoin
            log.info("acknowledgement not delivered: %s", exc)


def rpc_handler(membership_ref: Callable[[], Membership | None]):
    """The RpcServer handler of a node: only the coordinator answers."""

    async def handle(peer: Peer, method: str, args: dict):
        membership = membership_ref()
        endpoint = membership.endpoint if membership is not None else None
        if endpoint is None:
            raise NotCoordinator("this node is not the coordinator")
        return await endpoint.handle(peer, method, args)

    return handle
