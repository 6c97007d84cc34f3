"""RPC over TCP with trio: what the coordinator's server (csvfs/cluster/rpc_server.py)
and the nodes' client (csvfs/cluster/rpc_client.py) share.

The wire format and the handshake live in csvfs/cluster/wire.py, as state
machines without I/O; these modules move bytes and enforce time. A peer that
does not authenticate in time, breaks the protocol, leaves a frame half sent,
or stops reading what is pushed to it is cut off with a logged reason;
everyone else goes on.
"""

from __future__ import annotations

import logging
import math
import os

import trio

from csvfs.cluster.wire import ProtocolError, RpcError

log = logging.getLogger(__name__)

STALL_TIMEOUT = 10.0  # a frame half sent or half read for this long cuts the peer off
RECEIVE_SIZE = 1 << 18


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


def format_address(sockaddr: tuple) -> str:
    return join_address(sockaddr[0], sockaddr[1])


class EventReader:
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


async def acquire(lock) -> None:
    """Take a trio Lock or Semaphore; unlike acquire(), without a trip through the
    scheduler when it is free (a request's round trip takes several of those)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class FrameWriter:
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
        await acquire(self._lock)
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
