"""RPC over TCP with trio: the coordinator's server and the nodes' client.

The wire format and the handshake live in csvfs/cluster/wire.py; this
module moves bytes and enforces time. A peer that does not authenticate in
time, breaks the protocol, leaves a frame half sent, or stops reading what
the server pushes is cut off with a logged reason; everyone else goes on.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from csvfs.cluster.errors import MetaError
from csvfs.cluster.wire import (
    MAX_FRAME,
    Authenticated,
    ClientConnection,
    ProtocolError,
    Request,
    Response,
    RpcError,
    ServerConnection,
    check_key,
)

log = logging.getLogger(__name__)

CALL_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 5.0
STALL_TIMEOUT = 10.0
MAX_CONCURRENT = 64  # requests in progress per connection before we stop reading
RECEIVE_SIZE = 1 << 16

Handler = Callable[["Peer", str, dict], Awaitable[Any]]
NotifyHandler = Callable[[str, dict], Awaitable[None]]
PeerCallback = Callable[["Peer"], None]


class RpcTimeout(RpcError, TimeoutError):
    """No answer in time."""


class RpcDisconnected(RpcError):
    """The connection is gone (or never came up); the call's fate is unknown."""


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6host]:port' -> (host, port); ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"not a HOST:PORT address: {address!r}")
    return host.strip("[]"), int(port)


WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # hosts that mean "every interface"


def split_advertised(address: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6host]' or '[v6host]:port' -> (host, port or None)."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not host or (rest and not rest.startswith(":")):
            raise ValueError(f"not a HOST[:PORT] address: {address!r}")
        port = rest[1:] if rest else None
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, None  # a bare name, IPv4 address or IPv6 address
    if not host or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"not a HOST[:PORT] address: {address!r}")
    return host, None if port is None else int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _format_address(sockaddr: tuple) -> str:
    return join_address(sockaddr[0], sockaddr[1])


class _EventReader:
    """Takes events out of a protocol connection, reading the stream when it needs more.

    A frame that has begun must be complete within stall_timeout of our noticing it:
    otherwise a peer could pin a buffer for ever by sending a byte now and then.
    """

    def __init__(self, stream: trio.SocketStream, conn, stall_timeout: float):
        self._stream = stream
        self._conn = conn
        self._stall_timeout = stall_timeout
        self._frame_started: float | None = None

    async def next_event(self):
        """The next event, or None once the peer has gone. Raises ProtocolError."""
        while True:
            event = self._conn.next_event()
            if event is not None:
                self._frame_started = None
                return event
            data = await self._receive()
            if not data:
                return None
            self._conn.receive_data(data)

    async def _receive(self) -> bytes:
        deadline = self._deadline()
        if deadline == math.inf:  # between frames: no cancel scope to set up
            return await self._receive_some()
        with trio.move_on_at(deadline):
            return await self._receive_some()
        raise ProtocolError(f"stalled: a frame still incomplete after {self._stall_timeout:g} s")

    async def _receive_some(self) -> bytes:
        try:
            return await self._stream.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError:  # reset by the peer: gone, like EOF
            return b""

    def _deadline(self) -> float:
        if not self._conn.buffered:
            self._frame_started = None
            return math.inf
        if self._frame_started is None:
            self._frame_started = trio.current_time()
        return self._frame_started + self._stall_timeout


# -- server ----------------------------------------------------------------------------------


async def _acquire(lock) -> None:
    """Take a trio Lock or Semaphore; unlike acquire(), without a trip through the
    scheduler when it is free (a request's round trip takes several of those)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class _FrameWriter:
    """Writes whole frames, one at a time (trio.Lock is FIFO, so order holds).

    `send` returns None once the frame is out, or why the stream is unusable: it
    broke, or the other side stopped reading for stall_timeout. A send cancelled
    from outside may leave part of a frame out; callers close the stream then.
    """

    def __init__(self, stream: trio.SocketStream, stall_timeout: float):
        self._stream = stream
        self._stall_timeout = stall_timeout
        self._lock = trio.Lock()

    async def send(self, data: bytes) -> str | None:
        await _acquire(self._lock)
        try:
            try:
                sent = _write_now(self._stream, data)
                if sent == len(data):
                    return None
                with trio.move_on_after(self._stall_timeout) as timer:
                    await self._stream.send_all(memoryview(data)[sent:])
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                return f"send failed: {exc}"
        finally:
            self._lock.release()
        if timer.cancelled_caught:
            return f"not reading: a send blocked for {self._stall_timeout:g} s"
        return None


def _write_now(stream: trio.SocketStream, data: bytes) -> int:
    """As much of a frame as the socket takes at once. Most frames go out whole this
    way, without the scheduler pass and the cancel scope of send_all: about a tenth
    of an RPC round trip (interleaved A/B on this machine, 200 against 229 us).
    OSError if the connection is broken or closed."""
    try:
        return os.write(stream.socket.fileno(), data)
    except BlockingIOError:
        return 0


class Peer:
    """One authenticated client connection, as the coordinator sees it."""

    def __init__(self, stream: trio.SocketStream, conn: ServerConnection, reader: _EventReader,
                 address: str, stall_timeout: float, max_concurrent: int, welcome: bytes):
        self.name: str = conn.name
        self.address = address
        self.closed = False
        self.close_reason: str | None = None
        self._stream = stream
        self._conn = conn
        self._reader = reader
        self._welcome = welcome
        self._writer = _FrameWriter(stream, stall_timeout)
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
                     _format_address(listeners[0].socket.getsockname()))
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
            address = _format_address(stream.socket.getpeername())
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
        reader = _EventReader(stream, conn, self._stall_timeout)
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
            await _acquire(peer._slots)
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


# -- client ----------------------------------------------------------------------------------


class _Call:
    def __init__(self):
        self.done = trio.Event()
        self.response: Response | None = None
        self.failure: Exception | None = None

    def finish(self, response: Response | None = None, failure: Exception | None = None):
        self.response, self.failure = response, failure
        self.done.set()

    def unwrap(self) -> Any:
        if self.failure is not None:
            raise self.failure
        if self.response.error is not None:
            code, message = self.response.error
            raise MetaError(code, message)
        return self.response.result


class RpcClient:
    """A node's connection to the coordinator. Make one with RpcClient.connect().

    A background task reads replies and notifications: in the given nursery, or
    else as a trio system task that aclose() (or the end of trio.run) stops.
    Notifications go to `on_notify(kind, body)` one at a time, in order, from a
    task of their own, so that a slow handler (a pause that waits for I/O to drain)
    never holds up the replies that I/O may be waiting for.
    """

    def __init__(self, stream: trio.SocketStream, conn: ClientConnection, reader: _EventReader,
                 address: str, on_notify: NotifyHandler | None,
                 stall_timeout: float = STALL_TIMEOUT):
        self.name = conn.handshake.name
        self.address = address
        self.closed = False
        self.close_reason: str | None = None
        self._stream = stream
        self._conn = conn
        self._reader = reader
        self._on_notify = on_notify
        self._pending: dict[int, _Call] = {}
        self._writer = _FrameWriter(stream, stall_timeout)
        self._scope = trio.CancelScope()  # everything: aclose()
        self._read_scope = trio.CancelScope()  # the reader only: _close()
        self._closed_event = trio.Event()
        self._finished = trio.Event()

    @classmethod
    async def connect(cls, host: str, port: int, key: bytes, name: str, *,
                      on_notify: NotifyHandler | None = None, max_frame: int = MAX_FRAME,
                      timeout: float = CONNECT_TIMEOUT, stall_timeout: float = STALL_TIMEOUT,
                      nursery: trio.Nursery | None = None) -> RpcClient:
        """Connect and authenticate both ways. Raises RpcDisconnected (refused, or the
        server hung up: a wrong key looks like that from here), RpcTimeout, or
        ProtocolError (e.g. the server could not prove the key)."""
        address = f"{host}:{port}"
        conn = ClientConnection(key, name, max_frame=max_frame)
        stream = await _open_stream(host, port, address, timeout)
        reader = _EventReader(stream, conn, stall_timeout)
        try:
            await _handshake(stream, reader, address, timeout)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        log.info("connected to %s as %s", address, name)
        client = cls(stream, conn, reader, address, on_notify, stall_timeout)
        if nursery is None:
            trio.lowlevel.spawn_system_task(client._run, name=f"rpc client {address}")
        else:
            nursery.start_soon(client._run)
        return client

    async def call(self, method: str, args: dict | None = None, *,
                   timeout: float = CALL_TIMEOUT) -> Any:
        """Send a request and wait for its reply. Raises MetaError for a refused request,
        RpcTimeout, RpcDisconnected, or ProtocolError if the request cannot be encoded."""
        if self.closed:
            raise RpcDisconnected(f"connection to {self.address} is closed: {self.close_reason}")
        request_id, data = self._conn.request(method, {} if args is None else args)
        call = self._pending[request_id] = _Call()
        try:
            with trio.move_on_after(timeout):
                await self._send(data)
                await call.done.wait()
                return call.unwrap()
        finally:
            self._pending.pop(request_id, None)
        raise RpcTimeout(f"{method} got no reply from {self.address} within {timeout:g} s")

    async def aclose(self) -> None:
        self._close("closed by this client", logging.INFO)
        self._scope.cancel()
        await self._finished.wait()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    def _close(self, reason: str, level: int = logging.WARNING) -> None:
        """Fail every pending call and stop reading; the reader closes the stream."""
        if self.closed:
            return
        self.closed, self.close_reason = True, reason
        log.log(level, "connection to %s closed: %s", self.address, reason)
        for call in self._pending.values():
            call.finish(failure=RpcDisconnected(f"connection to {self.address} lost: {reason}"))
        self._read_scope.cancel()
        self._closed_event.set()

    async def _send(self, data: bytes) -> None:
        if self.closed:
            raise RpcDisconnected(f"connection to {self.address} lost: {self.close_reason}")
        try:
            failure = await self._writer.send(data)
        except trio.Cancelled:
            self._close("a send was interrupted")  # the stream is out of step for good
            raise
        if failure is not None:
            self._close(failure)
            raise RpcDisconnected(f"connection to {self.address} lost: {failure}")

    async def _run(self) -> None:
        # As a system task, an exception escaping here would crash trio.run: none do.
        try:
            with self._scope:
                notify_send, notify_receive = trio.open_memory_channel(math.inf)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._deliver, notify_receive)
                    async with notify_send:
                        await self._read(notify_send)
        finally:
            with trio.CancelScope(shield=True):  # in case we were cancelled before _read
                await self._stream.aclose()
            self._finished.set()

    async def _read(self, notifications: trio.MemorySendChannel) -> None:
        reason = "closed by this client"
        try:
            with self._read_scope:
                while (event := await self._reader.next_event()) is not None:
                    if isinstance(event, Response):
                        self._resolve(event)
                    else:
                        notifications.send_nowait((event.kind, event.body))
                reason = "the server closed the connection"
        except ProtocolError as exc:
            reason = f"protocol error: {exc.reason}"
        except Exception:
            log.exception("reading from %s failed", self.address)
            reason = "internal error while reading"
        finally:
            self._close(reason)
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    def _resolve(self, response: Response) -> None:
        call = self._pending.get(response.id)
        if call is None:  # its call timed out: nobody is waiting any more
            log.debug("late reply to request %d from %s dropped", response.id, self.address)
            return
        call.finish(response)

    async def _deliver(self, notifications: trio.MemoryReceiveChannel) -> None:
        async with notifications:
            async for kind, body in notifications:
                if self._on_notify is None:
                    continue
                try:
                    await self._on_notify(kind, body)
                except Exception:
                    log.exception("%s notification from %s failed", kind, self.address)
                    # A node that missed an update must not go on with what it has:
                    # drop the session, so that it rejoins and revalidates.
                    self._close(f"the handler of a {kind} notification failed")
                    return


async def _open_stream(host: str, port: int, address: str, timeout: float) -> trio.SocketStream:
    with trio.move_on_after(timeout):
        try:
            return await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise RpcDisconnected(f"cannot connect to {address}: {exc}") from exc
    raise RpcTimeout(f"cannot connect to {address} within {timeout:g} s")


async def _handshake(stream: trio.SocketStream, reader: _EventReader, address: str,
                     timeout: float) -> None:
    with trio.move_on_after(timeout):
        while True:
            try:
                event = await reader.next_event()
                if event is None:
                    raise RpcDisconnected(f"{address} hung up during the handshake "
                                          "(wrong cluster key?)")
                if event.reply:
                    await stream.send_all(event.reply)
            except trio.BrokenResourceError as exc:
                raise RpcDisconnected(f"{address} hung up during the handshake: {exc}") from None
            if isinstance(event, Authenticated):
                return
    raise RpcTimeout(f"no handshake from {address} within {timeout:g} s")
