"""The backup's requester: it finds the coordinator through the image's lease region,
authenticates with the cluster key, and asks for a snapshot, like `csvfs status`
does for its report. It renews the snapshot while the copy runs, and releases it
at the end, whatever happens; if it dies, the coordinator releases the snapshot
after its timeout (coordinator/snapshots.py).

The snapshot is journaled, so it outlives its coordinator: when the
connection breaks, the requester finds whoever holds the lease now and goes on
with the same snapshot (`reconnects` counts the times, so that a reader can
take the new coordinator's view of the copies made so far).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import trio

from csvfs.cluster import elections, messages
from csvfs.cluster.errors import MetaError, is_not_coordinator
from csvfs.cluster.rpc_client import RpcClient
from csvfs.cluster.transport import split_address
from csvfs.cluster.wire import RpcError
from csvfs.volume.errors import ExitCode, UserError
from csvfs.volume.image import Volume, default_key_path, read_key

log = logging.getLogger(__name__)

CALL_TIMEOUT = 30.0  # a snapshot point waits out a node that does not hold (a grant)
SNAPSHOT_TIMEOUT = 60.0  # the coordinator releases a snapshot not renewed this long
RECONNECT_FOR = 20.0  # seconds to find a new coordinator after losing the old one


class NoCoordinator(UserError):
    """No node serves the volume, or its coordinator did not answer."""

    exit_code = ExitCode.UNREACHABLE


class SnapshotLost(UserError):
    """The snapshot went away during the backup (lack of space, a timeout)."""

    exit_code = ExitCode.BACKUP_FAILED


class TakeoverUnderWay(NoCoordinator):
    """Nodes are alive but no coordinator answers yet: worth trying again shortly."""


def find_coordinator(image: Path, key_path: Path | None) -> tuple[str, bytes, str]:
    """(address, cluster key, volume uuid) of the volume's live coordinator."""
    key_path = key_path or default_key_path(image)
    volume = Volume.open(image)
    try:
        key = read_key(key_path)
        volume.check_key(key)
        view = elections.view(elections.election_spec(None), volume)  # $CSVFS_ELECTION
        uuid = str(volume.sb.uuid)
    finally:
        volume.close()
    record = view.owner()
    if not record or not record.get("address"):
        if view.alive:
            raise TakeoverUnderWay(f"{image}: the nodes that have the volume mounted have "
                                   f"no coordinator yet")
        raise NoCoordinator(f"{image}: no node has the volume mounted, so no coordinator "
                            f"can set a snapshot (mount it on a node first)")
    return record["address"], key, uuid


class Requester:
    """One backup's link to the coordinator, whichever node that is."""

    def __init__(self, image: Path, key_path: Path | None, timeout: float):
        self.image = image
        self.key_path = key_path
        self.timeout = timeout
        self.client: RpcClient | None = None
        self.address = ""
        self.reconnects = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, image: Path, key_path: Path | None,
                      timeout: float = SNAPSHOT_TIMEOUT):
        requester = cls(image, key_path, timeout)
        give_up = trio.current_time() + RECONNECT_FOR
        while True:
            try:
                await requester._connect()
                break
            except TakeoverUnderWay:
                if trio.current_time() > give_up:
                    raise
                await trio.sleep(0.2)
        try:
            yield requester
        finally:
            if requester.client is not None:
                with trio.CancelScope(shield=True):
                    await requester.client.aclose()

    async def _connect(self) -> None:
        self.address, key, _uuid = find_coordinator(self.image, self.key_path)
        host, port = split_address(self.address)
        try:
            self.client = await RpcClient.connect(host, port, key, f"backup-{os.getpid()}",
                                                  timeout=CALL_TIMEOUT)
        except (RpcError, OSError, trio.TooSlowError) as exc:
            raise TakeoverUnderWay(f"coordinator at {self.address} did not answer: "
                                   f"{exc or 'timeout'}") from None

    async def call(self, method: str, **args):
        """A request; after a failover, the same request to the new coordinator."""
        give_up = trio.current_time() + RECONNECT_FOR
        while True:
            try:
                return await self.client.call(method, args, timeout=CALL_TIMEOUT)
            except MetaError as exc:
                if not is_not_coordinator(exc):
                    raise SnapshotLost(f"{method}: {exc}") from None
                problem: Exception = exc
            except (RpcError, OSError, trio.TooSlowError) as exc:
                problem = exc
            if trio.current_time() > give_up:
                raise NoCoordinator(f"{method}: the coordinator at {self.address} did not "
                                    f"answer: {problem or 'timeout'}")
            log.info("%s: %s; looking for the coordinator again", method, problem)
            await self._reconnect()

    async def _reconnect(self) -> None:
        with trio.CancelScope(shield=True):
            await self.client.aclose()
        await trio.sleep(0.2)
        try:
            await self._connect()
        except NoCoordinator as exc:
            log.info("%s", exc)  # a takeover may be under way; the caller tries again
            return
        self.reconnects += 1

    @contextlib.asynccontextmanager
    async def snapshot(self, files: list[str] | None = None, freeze: bool = False,
                       allow_crash_consistent: bool = False, freeze_timeout: float = 10.0):
        """Take a snapshot, renew it in the background, release it at the end. Yields
        the point: {id, t_ns, version, pause_s, consistency}. `files`: the paths the
        backup takes (default every file), whose change tracking starts afresh at the
        point; with `freeze`, their writers freeze for it."""
        args: dict = {"timeout": float(self.timeout)}
        if files is not None:
            args["files"] = ["/" + path.strip("/") for path in files]
            if freeze:
                args["freeze"] = args["files"]
                args["allow_crash_consistent"] = allow_crash_consistent
                args["freeze_timeout"] = float(freeze_timeout)
        point = await self.call(messages.SNAPSHOT_TAKE, **args)
        outcome = "failed"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renew, point["id"])
                yield point
                outcome = "done"
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CALL_TIMEOUT):
                try:
                    await self.call(messages.SNAPSHOT_RELEASE, snapshot=point["id"],
                                    outcome=outcome)
                except UserError as exc:
                    log.warning("snapshot %d not released (its timeout will): %s",
                                point["id"], exc)

    async def _renew(self, snap_id: int) -> None:
        while True:
            await trio.sleep(self.timeout / 6)
            await self.call(messages.SNAPSHOT_RENEW, snapshot=snap_id)

    async def files(self, snap_id: int) -> dict:
        return await self.call(messages.SNAPSHOT_FILES, snapshot=snap_id)

    async def read(self, snap_id: int, kind: str, granules: list[int]) -> None:
        await self.call(messages.SNAPSHOT_READ, snapshot=snap_id, kind=kind, granules=granules)

    async def check(self, snap_id: int, since: int) -> dict:
        return await self.call(messages.SNAPSHOT_CHECK, snapshot=snap_id, since=since)
