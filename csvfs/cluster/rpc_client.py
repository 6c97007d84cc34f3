"""A node's RPC client: its connection to the coordinator (the shared framing is
csvfs/cluster/transport.py).

`RpcClient.connect` opens the connection and runs the key handshake both ways
(csvfs/cluster/wire.py); `call` sends a request and waits, up to a timeout, for
its reply; the server's pushes go to `on_notify` in order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from csvfs.cluster.errors import MetaError
from csvfs.cluster.transport import (
    STALL_TIMEOUT,
    EventReader,
    FrameWriter,
    RpcDisconnected,
    RpcTimeout,
)
from csvfs.cluster.wire import (
    MAX_FRAME,
    Authenticated,
    ClientConnection,
    ProtocolError,
    Response,
)

log = logging.getLogger(__name__)

CALL_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0

NotifyHandler = Callable[[str, dict], Awaitable[None]]


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

    def __init__(self, stream: trio.SocketStream, conn: ClientConnection, reader: EventReader,
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
        self._writer = FrameWriter(stream, stall_timeout)
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
        reader = EventReader(stream, conn, stall_timeout)
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


async def _handshake(stream: trio.SocketStream, reader: EventReader, address: str,
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
