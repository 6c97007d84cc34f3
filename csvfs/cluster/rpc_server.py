"""The coordinator's RPC server: authenticates nodes, runs their requests, and
pushes notifications to them (the shared framing is csvfs/cluster/transport.py).

A connection starts with the key handshake (csvfs/cluster/wire.py); a peer that
has not authenticated within HANDSHAKE_TIMEOUT is dropped. Then each request
runs in a task of its own, up to MAX_CONCURRENT per connection (a full house
stops the reading, so a flood backs up into the peer's socket), and its reply
goes out whenever it is done. A client that drops never cancels a request half
way: its reply is dropped instead.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from csvfs.cluster.errors import MetaError
from csvfs.cluster.transport import (
    STALL_TIMEOUT,
    EventReader,
    FrameWriter,
    RpcDisconnected,
    acquire,
    format_address,
    join_address,
)
from csvfs.cluster.wire import (
    MAX_FRAME,
    Authenticated,
    ProtocolError,
    Request,
    ServerConnection,
    check_key,
)

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0
MAX_CONCURRENT = 64  # requests in progress per connection before we stop reading

Handler = Callable[["Peer", str, dict], Awaitable[Any]]
PeerCallback = Callable[["Peer"], None]


class Peer:
    """One authenticated client connection, as the coordinator sees it."""

    def __init__(self, stream: trio.SocketStream, conn: ServerConnection, reader: EventReader,
                 address: str, stall_timeout: float, max_concurrent: int, welcome: bytes):
        self.name: str = conn.name
        self.address = address
        self.closed = False
        self.close_reason: str | None = None
        self._stream = stream
        self._conn = conn
        self._reader = reader
        self._welcome = welcome
        self._writer = FrameWriter(stream, stall_timeout)
        self._slots = trio.Semaphore(max_concurrent)
        self._scope = trio.CancelScope()  # the connection's reader
        self._closed_event = trio.Event()

    def __str__(self) -> str:
        return f"{self.name} at {self.address}"

    async def notify(self, kind: str, body: dict) -> None:
        """Push a notification. Raises RpcDisconnected if the peer is gone, or is cut
        off now because it has not read for stall_timeout."""
        await self._send(self._conn.notify(kind, body))

    def close(self, reason: str = "closed by the coordinator") -> None:
        """Drop the connection, e.g. to evict a node."""
        if self._end(reason):
            log.info("closing %s: %s", self, reason)

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def _cut_off(self, reason: str) -> None:
        if self._end(reason):
            log.warning("cut off %s: %s", self, reason)

    def _end(self, reason: str) -> bool:
        """Mark the connection closed and stop its reader; the stream is closed when
        the reader has stopped. True if it was open until now."""
        if self.closed:
            return False
        self.closed, self.close_reason = True, reason
        self._scope.cancel()
        self._closed_event.set()
        return True

    async def _send(self, data: bytes) -> None:
        if self.closed:
            raise RpcDisconnected(f"{self} is closed: {self.close_reason}")
        try:
            failure = await self._writer.send(data)
        except trio.Cancelled:
            self.close("a send was interrupted")  # the stream is out of step for good
            raise
        if failure is None:
            return
        if failure.startswith("not reading"):
            self._cut_off(failure)
            raise RpcDisconnected(f"{self} was cut off: {self.close_reason}")
        self._end(failure)
        raise RpcDisconnected(f"{self} is gone: {failure}")


class RpcServer:
    """The coordinator's listener: authenticates clients and runs their requests.

    `handler(peer, method, args)` answers each request; a MetaError becomes an error
    reply with its errno, any other exception is logged and becomes EIO. on_connect
    and on_disconnect are plain functions of the peer, so that they cannot hold up
    a connection; spawn work from them if it must wait.
    """

    def __init__(self, key: bytes, handler: Handler, host: str = "127.0.0.1", port: int = 0, *,
                 max_frame: int = MAX_FRAME, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 stall_timeout: float = STALL_TIMEOUT, max_concurrent: int = MAX_CONCURRENT,
                 on_connect: PeerCallback | None = None,
                 on_disconnect: PeerCallback | None = None):
        check_key(key)  # refuse a bad key now rather than at the first client
        self.host = host
        self.port = port
        self.peers: set[Peer] = set()
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self._key = key
        self._handler = handler
        self._max_frame = max_frame
        self._handshake_timeout = handshake_timeout
        self._stall_timeout = stall_timeout
        self._max_concurrent = max_concurrent
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._listeners: list | None = None

    async def bind(self) -> str:
        """Open the listening socket now (serve() would otherwise); returns its address."""
        if self._listeners is None:
            self._listeners = await trio.open_tcp_listeners(self.port, host=self.host)
            self.port = self._listeners[0].socket.getsockname()[1]
        return self.address

    @property
    def address(self) -> str:
        return join_address(self.host, self.port)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen until close(); task_status.started() gets the bound port."""
        with self._scope:
            await self.bind()
            listeners = self._listeners
            log.info("RPC server listening on %s",
                     format_address(listeners[0].socket.getsockname()))
            async with trio.open_nursery() as nursery:
                # Requests run here, not under their connection: a client that drops
                # must not cancel a metadata change half way; its reply is dropped.
                self._nursery = nursery
                await nursery.start(partial(trio.serve_listeners, self._connection, listeners,
                                            handler_nursery=nursery))
                task_status.started(self.port)

    def close(self) -> None:
        """Stop listening and drop every connection; serve() then returns."""
        self._scope.cancel()

    async def _connection(self, stream: trio.SocketStream) -> None:
        # Runs beside every other connection: nothing may escape from here.
        try:
            address = format_address(stream.socket.getpeername())
        except OSError:
            await stream.aclose()
            return
        try:
            peer = await self._authenticate(stream, address)
            if peer is not None:
                await self._serve_peer(peer)
        except Exception:
            log.exception("connection from %s failed", address)
        finally:
            await stream.aclose()

    async def _authenticate(self, stream: trio.SocketStream, address: str) -> Peer | None:
        """Run the handshake up to the client's AUTH; the peer's WELCOME is still to send."""
        conn = ServerConnection(self._key, max_frame=self._max_frame)
        reader = EventReader(stream, conn, self._stall_timeout)
        with trio.move_on_after(self._handshake_timeout):
            try:
                await stream.send_all(conn.hello())
                event = await reader.next_event()
            except ProtocolError as exc:
                log.warning("cut off %s: %s", address, exc.reason)
                return None
            except trio.BrokenResourceError:
                event = None
            if event is None:
                log.info("%s left during the handshake", address)
                return None
            assert isinstance(event, Authenticated)
            log.info("%s authenticated as %s", address, event.name)
            return Peer(stream, conn, reader, address, self._stall_timeout,
                        self._max_concurrent, welcome=event.reply)
        log.warning("cut off %s: %s", address,
                    f"no authentication within {self._handshake_timeout:g} s")
        return None

    async def _serve_peer(self, peer: Peer) -> None:
        # Known before the WELCOME goes out: once a client's connect() has returned,
        # the coordinator has it among its peers.
        self.peers.add(peer)
        try:
            self._call_back(self.on_connect, peer)
            with peer._scope:
                try:
                    await peer._send(peer._welcome)
                    await self._read_requests(peer)
                except ProtocolError as exc:
                    peer._cut_off(exc.reason)
                except RpcDisconnected:
                    pass  # the send said why
                else:
                    if peer._end("disconnected"):
                        log.info("%s disconnected", peer)
        finally:
            peer._end("the server is shutting down")
            self.peers.discard(peer)
            self._call_back(self.on_disconnect, peer)

    async def _read_requests(self, peer: Peer) -> None:
        while (request := await peer._reader.next_event()) is not None:
            # A full house stops the reading, so a flood backs up into the peer's socket.
            await acquire(peer._slots)
            self._nursery.start_soon(self._dispatch, peer, request)

    async def _dispatch(self, peer: Peer, request: Request) -> None:
        try:
            error, result = await self._run_handler(peer, request)
            await self._reply(peer, request, error, result)
        finally:
            peer._slots.release()

    async def _run_handler(self, peer: Peer, request: Request) -> tuple[list | None, Any]:
        try:
            return None, await self._handler(peer, request.method, request.args)
        except MetaError as exc:
            return [exc.errno, str(exc)], None
        except Exception:
            log.exception("%s from %s failed", request.method, peer)
            return [errno.EIO, f"{request.method} failed in the coordinator"], None

    async def _reply(self, peer: Peer, request: Request, error: list | None,
                     result: Any) -> None:
        try:
            data = peer._conn.respond(request.id, error, result)
        except ProtocolError as exc:
            log.error("cannot reply to %s from %s: %s", request.method, peer, exc.reason)
            data = peer._conn.respond(request.id, [errno.EIO, exc.reason])
        try:
            await peer._send(data)
        except RpcDisconnected as exc:
            log.debug("reply to %s dropped: %s", request.method, exc)

    @staticmethod
    def _call_back(callback: PeerCallback | None, peer: Peer) -> None:
        if callback is None:
            return
        try:
            callback(peer)
        except Exception:
            log.exception("callback %r on %s failed", callback, peer)
