"""The member role: this node in session with another node's coordinator.

Joining: connect to the address the coordinator published in its slot of the
lease region, authenticate with the cluster key, and REGISTER the files this
node has open and the locks it holds (csvfs/locks.py); the reply's maps
replace this node's, and only then are the pushes that came meanwhile handled
(csvfs/inbox.py). A HEARTBEAT every quarter grant renews the grant; the data
path does direct I/O only inside GRANT_USE of the last grant, measured from
before its request went out, so that a node the coordinator cut off has
surely stopped writing once the grant it knows of runs out. Metadata requests
go to the coordinator as RPC calls.

The role ends when the connection drops, a heartbeat fails, or the
coordinator answers with another epoch or as no coordinator at all;
`on_lost(reason)` then tells the membership, which finds the coordinator
again. A clean unmount says GOODBYE.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

import trio

from csvfs.cluster import messages
from csvfs.cluster.election import Lease
from csvfs.cluster.errors import MetaError, NotCoordinator, is_not_coordinator
from csvfs.cluster.rpc_client import RpcClient
from csvfs.cluster.transport import split_address
from csvfs.cluster.wire import ProtocolError, RpcError
from csvfs.datapath import GRANT_USE, DataPath
from csvfs.inbox import Inbox
from csvfs.locks import NodeLocks
from csvfs.quiesce import FileGates
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 2.0  # connect + register, cut short when the coordinator's lease runs out
CALL_TIMEOUT = 30.0  # a metadata call; a quiesce may have to wait out an evicted node
GOODBYE_TIMEOUT = 2.0


class MemberRole:
    kind = "member"
    route = "over RPC"  # how this node's metadata requests reach the coordinator

    def __init__(self, name: str, volume: Volume, election, key: bytes,
                 gates: FileGates, datapath: DataPath, nursery: trio.Nursery,
                 on_lost: Callable[[MemberRole, str], None], locks: NodeLocks):
        self.name = name
        self.locks = locks
        self.volume = volume
        self.election = election
        self.key = key
        self.gates = gates
        self.datapath = datapath
        self.nursery = nursery
        self.on_lost = on_lost
        self.client: RpcClient | None = None
        self.coordinator_name = ""
        self.grant_seconds = 0.0
        self.epoch = 0  # of the coordinator this node is registered with

    async def join(self, lease: Lease) -> None:
        """Register with the lease's owner. Raises RpcError, MetaError, OSError,
        ValueError or trio.TooSlowError if it cannot."""
        host, port = split_address(self.election.owner_address(lease))
        timeout = max(0.1, min(JOIN_TIMEOUT, lease.expiry_ns / 1e9 - time.time()))
        inbox = Inbox({**self.gates.push_handlers(), **self.locks.push_handlers(),
                       messages.CONTROL: self._control},
                      self.nursery, self._acknowledge)
        with trio.fail_after(timeout):
            client = await RpcClient.connect(host, port, self.key, self.name,
                                             on_notify=inbox.notified, timeout=timeout,
                                             nursery=self.nursery)
            started = time.monotonic()
            reply = await self._register(client, lease.epoch)
        self.gates.rejoined(reply["maps"])
        self.gates.snapshot.report = self._report_frozen
        self.locks.registered(reply.get("lost_locks", []))
        self.grant_seconds, self.epoch = reply["grant_seconds"], reply["epoch"]
        self.datapath.valid_until = started + GRANT_USE * self.grant_seconds
        self.client, self.coordinator_name = client, lease.owner_name
        self.election.write_slot()
        if self.datapath.storage.redirected:  # the new coordinator has not heard of it
            self.datapath.storage.on_change()
        log.info("joined coordinator %s at %s (epoch %d)", lease.owner_name, client.address,
                 self.epoch)
        await inbox.ready()
        self.nursery.start_soon(self._keep_alive, client)
        self.nursery.start_soon(self._watch, client)

    async def _register(self, client: RpcClient, epoch: int) -> dict:
        try:
            return await client.call(messages.REGISTER, {
                "slot": self.election.slot, "epoch": epoch, "opens": self.gates.open_counts(),
                "locks": self.locks.held()})
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.aclose()
            raise

    async def call(self, method: str, args: dict):
        """A metadata request. Raises NotCoordinator once the session is lost, so that
        the membership asks whoever is coordinator now."""
        client = self.client
        if client is None:
            raise NotCoordinator("no session with a coordinator")
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
        raise NotCoordinator(f"{method}: the session with the coordinator was lost")

    async def _control(self, body: dict) -> dict:
        """`csvfs fault` or `csvfs redirect` for this node (csvfs/redirect.py)."""
        self.datapath.storage.control(body["action"])
        return self.datapath.storage.state()

    async def _report_frozen(self, freeze_id: int, results: dict) -> None:
        """This node's writers answered a freeze (csvfs/snapshot.py)."""
        client = self.client
        if client is None:
            return  # the coordinator counts them as failed when the answer does not come
        try:
            await client.call(messages.WRITERS_FROZEN, {"id": freeze_id, "results": results},
                              timeout=CALL_TIMEOUT)
        except (RpcError, MetaError) as exc:
            log.info("freeze results not delivered: %s", exc)

    async def _acknowledge(self, token: int, result=None) -> None:
        """The inbox handles pushes only once this session is in place (`ready`).
        `result`: what the push's handler answers (a hold: the stripes written)."""
        client = self.client
        if client is None:
            return  # lost meanwhile: the coordinator evicts us, and we rejoin
        args = {"token": token} if result is None else {"token": token, "result": result}
        try:
            await client.call(messages.ACK, args, timeout=CALL_TIMEOUT)
        except (RpcError, MetaError) as exc:
            log.info("acknowledgement not delivered: %s", exc)

    async def revalidate(self) -> bool:
        return await self._heartbeat(self.client)

    async def _keep_alive(self, client: RpcClient) -> None:
        while client is self.client:
            await trio.sleep(self.grant_seconds / 4)
            if client is self.client:
                await self._heartbeat(client)

    async def _heartbeat(self, client: RpcClient | None) -> bool:
        """Renew the grant; False (and the session dropped) if the coordinator is gone."""
        if client is None:
            return False
        started = time.monotonic()
        try:
            reply = await client.call(messages.HEARTBEAT, timeout=self.grant_seconds / 3)
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
            self.election.write_slot()
        except OSError as exc:
            log.warning("cannot write this node's slot: %s", exc)
        return True

    async def _watch(self, client: RpcClient) -> None:
        await client.wait_closed()
        self._lost(client, client.close_reason or "connection closed")

    def _lost(self, client: RpcClient, reason: str) -> None:
        if client is not self.client:
            return
        self.client = None
        self.nursery.start_soon(client.aclose)
        self.on_lost(self, reason)

    async def close(self) -> None:
        """Clean unmount: the node has stopped all I/O and closed every file. It says
        which stripes it wrote since its last report, so that nothing is lost."""
        client, self.client = self.client, None
        if client is None:
            return
        args = {"written": self.datapath.stripe_report()}
        with trio.move_on_after(GOODBYE_TIMEOUT):
            try:
                await client.call(messages.GOODBYE, args, timeout=GOODBYE_TIMEOUT)
            except (RpcError, MetaError) as exc:
                log.info("goodbye to the coordinator failed: %s", exc)
        await client.aclose()
