"""The coordinator's face on the network: RPC requests in, notifications out.

Every node other than the coordinator's own reaches the metadata service
through here. A node first calls `register` with the files it has open;
that makes it a session: it gets pushed pause, map and resume notifications
for those files and invalidations of the directory attributes its kernel
caches, and it must renew its grant with `heartbeat`. The grant bounds how
long the node may do direct I/O without hearing from us, so that a node we
cut off is known to have stopped writing once it runs out. The names of
these requests and pushes are in csvfs/cluster/messages.py.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
from collections.abc import Awaitable, Callable

import trio

from coordinator.arguments import check_arguments
from coordinator.quiesce import NodeSession
from coordinator.service import MetadataService
from csvfs.cluster import messages
from csvfs.cluster.errors import MetaError, NotCoordinator
from csvfs.cluster.rpc_server import Peer
from csvfs.cluster.transport import RpcDisconnected

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = 5.0  # a node that has not carried out a CONTROL by then failed it
SILENT_GRANTS = 2  # a member silent for this many grants is evicted


class RemoteSession(NodeSession):
    """A node on the other end of an RPC connection, as the service sees it: each
    NodeSession request becomes a push (coordinator/quiesce.py tells the protocol)."""

    in_process = False

    def __init__(self, peer: Peer, slot: int, grant_seconds: float):
        self.name = peer.name
        self.peer = peer
        self.slot = slot
        self.grant_seconds = grant_seconds
        self.valid_until = trio.current_time() + grant_seconds
        self._outbox_send, self._outbox = trio.open_memory_channel(math.inf)
        self._acks: dict[int, trio.Event] = {}
        self._results: dict[int, object] = {}  # token -> what the node answered
        self._tokens = itertools.count(1)
        self._freezes: dict[int, tuple[trio.Event, dict]] = {}  # freeze id -> its answer

    def renew(self) -> None:
        """The node heard from us now: it may do I/O until the grant it computes,
        which starts before this moment and is shorter."""
        self.valid_until = trio.current_time() + self.grant_seconds

    async def send_notifications(self) -> None:
        """Push notifications in order; ends when the connection does."""
        async for kind, body in self._outbox:
            try:
                await self.peer.notify(kind, body)
            except RpcDisconnected:
                return

    # -- NodeSession ------------------------------------------------------------------

    async def pause(self, ino: int) -> None:
        await self._acknowledged(messages.PAUSE, {"ino": ino})

    async def invalidate(self, stale: dict, wait: bool) -> None:
        if wait:
            await self._acknowledged(messages.INVALIDATE, stale)
        else:
            self._push(messages.INVALIDATE, stale)

    def _push(self, kind: str, body: dict) -> bool:
        """Queue a notification; False if the session is closed already. Then nothing
        is lost: the node gets everything afresh when it registers again."""
        try:
            self._outbox_send.send_nowait((kind, body))
        except trio.ClosedResourceError:
            log.debug("%s to %s dropped: its session is closed", kind, self.name)
            return False
        log.debug("%s to %s: %s", kind, self.name, body)
        return True

    async def _acknowledged(self, kind: str, body: dict):
        """Push a notification and wait until the node says it has carried it out;
        returns what it answered."""
        if self.peer.closed:
            raise RpcDisconnected(f"{self.peer} is gone")
        token = next(self._tokens)
        acked = self._acks[token] = trio.Event()
        if not self._push(kind, dict(body, token=token)):
            self._acks.pop(token, None)
            raise RpcDisconnected(f"the session of {self.peer} is closed")
        try:
            async with trio.open_nursery() as nursery:
                async def give_up_when_closed():
                    await self.peer.wait_closed()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(give_up_when_closed)
                await acked.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._acks.pop(token, None)
        if not acked.is_set():
            raise RpcDisconnected(f"{self.peer} left before it acknowledged a {kind}")
        return self._results.pop(token, None)

    def acknowledged(self, token: int, result=None) -> None:
        acked = self._acks.get(token)
        if acked is not None:
            if result is not None:
                self._results[token] = result
            acked.set()

    async def take_map(self, ino: int, reply: dict, resume: bool, forget: bool,
                       wait: bool) -> None:
        body = {"ino": ino, "size": reply["size"], "runs": reply["runs"],
                "version": reply["version"], "resume": resume, "forget": forget}
        if "granule" in reply:  # Commits.map_of always says; without it, units
            body["granule"] = reply["granule"]
        if "ask" in reply:
            body["ask"] = reply["ask"]
        if reply.get("stripes"):
            body["stripes"] = True
        if wait:
            await self._acknowledged(messages.MAP, body)
        else:
            self._push(messages.MAP, body)

    def resume(self, ino: int) -> None:
        self._push(messages.RESUME, {"ino": ino})

    async def hold(self) -> list:
        """Returns the stripes the node wrote since its last report."""
        return await self._acknowledged(messages.HOLD, {}) or []

    async def freeze_writers(self, freeze_id: int, inos: list[int],
                             timeout: float) -> dict[int, str]:
        """Push FREEZE and wait for the node's WRITERS_FROZEN answer (the caller bounds
        the wait)."""
        answered = self._freezes[freeze_id] = trio.Event(), {}
        try:
            if self._push(messages.FREEZE, {"id": freeze_id, "inos": inos, "timeout": timeout}):
                await answered[0].wait()
        finally:
            self._freezes.pop(freeze_id, None)
        return answered[1]

    def writers_frozen(self, freeze_id: int, results: dict) -> None:
        answered = self._freezes.get(freeze_id)
        if answered is not None:
            answered[1].update({int(ino): str(outcome) for ino, outcome in results.items()})
            answered[0].set()

    def thaw_writers(self, freeze_id: int) -> None:
        self._push(messages.THAW, {"id": freeze_id})

    def snapshot_set(self, version: int) -> None:
        self._push(messages.SNAPSHOT_SET, {"version": version})

    def locks_changed(self, ino: int) -> None:
        self._push(messages.LOCKS_CHANGED, {"ino": ino})

    async def control(self, action: str) -> dict:
        """`csvfs fault` or `csvfs redirect` for this node (csvfs/redirect.py); its
        I/O mode after it, {mode, reason, since_ns}."""
        state = None
        with trio.move_on_after(CONTROL_TIMEOUT):
            try:
                state = await self._acknowledged(messages.CONTROL, {"action": action})
            except RpcDisconnected as exc:
                raise MetaError(errno.EIO, f"{action} not done: {exc}") from None
        if not isinstance(state, dict) or not {"mode", "reason"} <= state.keys():
            raise MetaError(errno.EIO, f"{self.name} gave no I/O mode for {action}")
        return state

    def evict(self, reason: str) -> float | None:
        self.peer.close(f"evicted: {reason}")
        self._outbox_send.close()
        return self.valid_until

    def close(self) -> None:
        self._outbox_send.close()


class CoordinatorEndpoint:
    """Serves one coordinator epoch. `slot_alive(slot)` tells whether a node's
    process provably still lives (its liveness lock on the volume is held)."""

    def __init__(self, service: MetadataService, nursery: trio.Nursery, grant_seconds: float,
                 slot_alive: Callable[[int], bool], status: Callable[[], dict],
                 control: Callable[..., Awaitable[dict]], move: Callable[..., Awaitable[dict]]):
        self.service = service
        self.nursery = nursery
        self.grant_seconds = grant_seconds
        self.slot_alive = slot_alive
        self.status = status
        self.control = control  # (node, action): csvfs/coordinator_role.py
        self.move = move  # (heir): csvfs/coordinator_role.py
        self.sessions: dict[str, RemoteSession] = {}

    async def handle(self, peer: Peer, method: str, args: dict):
        if method in messages.BACKUP_REQUESTS:  # a backup's requester: no node, no session
            return await self.service.backup_call(peer.name, method, args)
        if method == messages.CONTROL:  # `csvfs fault` or `csvfs redirect`: no session
            check_arguments(method, self._control, args)
            return await self._control(peer, **args)
        if method == messages.MOVE:  # `csvfs move`: no session
            check_arguments(method, self._move, args)
            return await self._move(peer, **args)
        if method not in messages.SESSION_REQUESTS:
            self._session(peer)
            return await self.service.call(peer.name, method, args)
        handler = getattr(self, f"_{method}")
        check_arguments(method, handler, args)
        return await handler(peer, **args)

    async def _register(self, peer: Peer, slot: int, opens: list[tuple[int, int]],
                        epoch: int = 0, locks: list | None = None) -> dict:
        """`opens` is [inode, handles] for each file the node has open; `locks` the
        locks it holds (coordinator/locks.py)."""
        if epoch > self.service.epoch:  # the node has seen a newer coordinator than us
            raise NotCoordinator(f"epoch {self.service.epoch} is stale: the node saw {epoch}")
        old = self.sessions.get(peer.name)
        if old is not None and old.peer is not peer:  # it reconnected before we noticed
            old.peer.close("replaced by a new connection from the same node")
            old.close()
        session = RemoteSession(peer, slot, self.grant_seconds)
        self.sessions[peer.name] = session
        self.nursery.start_soon(session.send_notifications)
        maps = await self.service.join(session, opens)
        lost = self.service.locks.join(peer.name, locks or [])
        log.info("%s joined with %d open files", peer, len(opens))
        self.service.events.emit("join", f"{peer.name} joined from {peer.address} "
                                 f"with {len(opens)} open files")
        return {"epoch": self.service.epoch, "grant_seconds": self.grant_seconds,
                "maps": maps, "lost_locks": lost}

    def _session(self, peer: Peer) -> RemoteSession:
        session = self._session_of(peer)
        if session is None:
            raise MetaError(errno.EPERM, "no session: register first")
        return session

    def _session_of(self, peer: Peer) -> RemoteSession | None:
        """The session of this very connection (not an older one of the same node)."""
        session = self.sessions.get(peer.name)
        return session if session is not None and session.peer is peer else None

    async def _heartbeat(self, peer: Peer) -> dict:
        session = self._session(peer)
        session.renew()
        return {"epoch": self.service.epoch, "grant_seconds": session.grant_seconds}

    async def _ack(self, peer: Peer, token: int, result: list | dict | None = None) -> None:
        self._session(peer).acknowledged(token, result)

    async def _goodbye(self, peer: Peer, written: list | None = None) -> None:
        """A clean unmount: the node has stopped all I/O and closed every file, and
        says which stripes it wrote since its last report."""
        session = self._session(peer)
        self.service.snapshots.stripes.goodbye(written, peer.name)
        del self.sessions[peer.name]
        session.close()
        await self.service.leave(peer.name)
        self.service.events.emit("leave", f"{peer.name} left")

    async def _status(self, peer: Peer) -> dict:
        return self.status()

    async def _move(self, peer: Peer, to: str = "") -> dict:
        log.info("%s asks to move the coordinator role to %s", peer, to or "the best node")
        return await self.move(to)

    async def _control(self, peer: Peer, node: str, action: str) -> dict:
        log.info("%s asks for %s on %s", peer, action, node)
        return await self.control(node, action)

    async def _writers_frozen(self, peer: Peer, id: int, results: dict) -> None:
        self._session(peer).writers_frozen(id, results)

    def evict_silent(self) -> list[str]:
        """Evict every member that has not renewed its grant for SILENT_GRANTS grants:
        it is cut off (a partition) or hung, and does no direct I/O any more. It rejoins,
        and registers its files again, once it reaches us."""
        now = trio.current_time()
        silent = [name for name, session in self.sessions.items()
                  if now > session.valid_until + (SILENT_GRANTS - 1) * session.grant_seconds]
        for name in silent:
            reason = (f"no heartbeat for {SILENT_GRANTS} grants of {self.grant_seconds:g} s: "
                      "cut off or hung")
            self.service.sessions.evict(name, reason)
            session = self.sessions.get(name)
            if session is not None:  # evicted before, by a pause, but not yet gone
                session.peer.close(f"evicted: {reason}")
        return silent

    def disconnected(self, peer: Peer) -> None:
        """RpcServer on_disconnect: a session ends with its connection."""
        session = self._session_of(peer)
        if session is None:
            return
        del self.sessions[peer.name]
        session.close()
        self.service.snapshots.stripes.lost(f"{peer.name} left without a goodbye")
        # A dead node writes nothing more; a live one may until its grant runs out.
        until = session.valid_until if self.slot_alive(session.slot) else None
        log.info("%s disconnected (%s)", peer, peer.close_reason)
        self.nursery.start_soon(self._leave, peer.name, until)

    async def _leave(self, name: str, until: float | None) -> None:
        try:
            await self.service.leave(name, until)
        except MetaError as exc:  # e.g. we stepped down meanwhile
            log.info("forgetting %s's open files: %s", name, exc)

    def close(self) -> None:
        for session in self.sessions.values():
            session.peer.close("the coordinator is stepping down")
            session.close()
        self.sessions.clear()
