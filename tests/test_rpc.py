"""RPC over real loopback sockets: calls, pushes, timeouts, and peers that misbehave.

The misbehaving peers are raw sockets that write their bytes by hand, so these
tests check the wire format as documented, not as the client happens to speak it.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import struct
from functools import partial

import msgpack
import pytest
import trio

from csvfs.cluster.errors import MetaError
from csvfs.cluster.rpc_client import RpcClient
from csvfs.cluster.rpc_server import RpcServer
from csvfs.cluster.transport import RpcDisconnected, RpcTimeout
from csvfs.cluster.wire import AUTH, HELLO, REQUEST, WELCOME, ProtocolError

pytestmark = pytest.mark.timeout(30)

KEY = bytes(range(32))
HOST = "127.0.0.1"


class Backend:
    """The request handler: a few methods that answer, fail or wait on demand."""

    def __init__(self):
        self.gates: dict[str, trio.Event] = {}
        self.finished: list[str] = []

    def gate(self, name: str) -> trio.Event:
        return self.gates.setdefault(name, trio.Event())

    async def __call__(self, peer, method, args):
        if method == "echo":
            return {"peer": peer.name, "args": args}
        if method == "fail":
            raise MetaError(args["errno"], args.get("message", ""))
        if method == "crash":
            raise RuntimeError("a bug in the coordinator")
        if method == "wait":
            await self.gate(args["gate"]).wait()
            self.finished.append(args["gate"])
            return args["gate"]
        if method == "unencodable":
            return {1, 2}
        raise MetaError(errno.ENOSYS, f"unknown method {method!r}")


@pytest.fixture
def backend():
    return Backend()


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="csvfs.cluster")
    return caplog


async def start_server(nursery, backend, **options) -> RpcServer:
    server = RpcServer(KEY, backend, **options)
    await nursery.start(server.serve)
    return server


async def connect(server, name="node1", **options) -> RpcClient:
    return await RpcClient.connect(HOST, server.port, KEY, name, **options)


def cut_offs(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and record.getMessage().startswith("cut off")]


async def wait_until(predicate, timeout=5.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


# -- a peer that speaks the protocol by hand --------------------------------------------------


def frame(value) -> bytes:
    payload = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


class RawPeer:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int) -> RawPeer:
        peer = cls(await trio.open_tcp_stream(HOST, port))
        peer.hello = await peer.read()
        assert peer.hello[0] == HELLO and len(peer.hello[1]) == 32 and peer.hello[2] == 1
        return peer

    async def read(self):
        with trio.fail_after(5):
            while True:
                if len(self.buffer) >= 4:
                    (length,) = struct.unpack(">I", self.buffer[:4])
                    if len(self.buffer) >= 4 + length:
                        payload = self.buffer[4:4 + length]
                        self.buffer = self.buffer[4 + length:]
                        return msgpack.unpackb(payload, raw=False)
                data = await self.stream.receive_some(1 << 16)
                assert data, "the server closed the connection"
                self.buffer += data

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def auth(self, key=KEY, name="raw") -> bytes:
        nonce = os.urandom(32)
        self.client_nonce = nonce
        mac = hmac.new(key, b"client" + self.hello[1] + nonce + name.encode(),
                       hashlib.sha256).digest()
        return frame([AUTH, nonce, name, mac])

    async def authenticate(self, name="raw") -> None:
        await self.send(self.auth(name=name))
        welcome = await self.read()
        expected = hmac.new(KEY, b"server" + self.client_nonce + self.hello[1],
                            hashlib.sha256).digest()
        assert welcome == [WELCOME, expected]

    async def closed_by_server(self, timeout=5.0) -> bool:
        with trio.move_on_after(timeout):
            try:
                while await self.stream.receive_some(1 << 16):
                    pass
            except trio.BrokenResourceError:  # reset: the server closed with data unread
                pass
            return True
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


# -- calls -------------------------------------------------------------------------------------


async def test_call_round_trip(nursery, backend, logs):
    server = await start_server(nursery, backend)
    client = await connect(server, nursery=nursery)
    args = {"ino": 1 << 40, "name": b"\x00\xff", "runs": [[0, 1, 2]], "text": "é", "none": None}
    assert await client.call("echo", args) == {"peer": "node1", "args": args}
    assert await client.call("echo") == {"peer": "node1", "args": {}}
    assert [peer.name for peer in server.peers] == ["node1"]
    peer = next(iter(server.peers))
    assert peer.address.startswith("127.0.0.1:") and not peer.closed
    await client.aclose()
    assert client.closed
    with pytest.raises(RpcDisconnected):
        await client.call("echo")
    assert not cut_offs(logs)


async def test_concurrent_calls_complete_out_of_order(nursery, backend):
    server = await start_server(nursery, backend)
    client = await connect(server)
    names = [f"g{i}" for i in range(5)]
    results: dict[str, str] = {}
    completed: list[str] = []

    async def call(name):
        results[name] = await client.call("wait", {"gate": name})
        completed.append(name)

    async with trio.open_nursery() as calls:
        for name in names:
            calls.start_soon(call, name)
        await wait_until(lambda: len(backend.gates) == len(names))  # all in flight at once
        for name in reversed(names):
            backend.gate(name).set()
            await wait_until(lambda name=name: name in completed)
    assert results == {name: name for name in names}
    assert completed == list(reversed(names))
    await client.aclose()


async def test_meta_error_errno_travels(nursery, backend, logs):
    server = await start_server(nursery, backend)
    client = await connect(server)
    with pytest.raises(MetaError) as caught:
        await client.call("fail", {"errno": errno.ENOENT, "message": "no inode 7"})
    assert caught.value.errno == errno.ENOENT and str(caught.value) == "no inode 7"
    with pytest.raises(MetaError) as caught:
        await client.call("nope")
    assert caught.value.errno == errno.ENOSYS
    await client.aclose()


async def test_other_exceptions_become_eio_and_are_logged(nursery, backend, logs):
    server = await start_server(nursery, backend)
    client = await connect(server)
    with pytest.raises(MetaError) as caught:
        await client.call("crash")
    assert caught.value.errno == errno.EIO
    with pytest.raises(MetaError) as caught:
        await client.call("unencodable")
    assert caught.value.errno == errno.EIO
    errors = [r for r in logs.records if r.levelno == logging.ERROR]
    assert any(r.exc_info and "crash from node1" in r.getMessage() for r in errors)
    assert any("cannot reply to unencodable" in r.getMessage() for r in errors)
    assert await client.call("echo") == {"peer": "node1", "args": {}}  # still connected
    await client.aclose()


async def test_call_timeout(nursery, backend):
    server = await start_server(nursery, backend)
    client = await connect(server)
    start = trio.current_time()
    with pytest.raises(RpcTimeout, match="wait got no reply .* within 0.2 s") as caught:
        await client.call("wait", {"gate": "late"}, timeout=0.2)
    assert isinstance(caught.value, TimeoutError)
    assert 0.2 <= trio.current_time() - start < 2
    backend.gate("late").set()  # the late reply arrives and is dropped
    await wait_until(lambda: backend.finished == ["late"])
    assert await client.call("echo", {"x": 1}) == {"peer": "node1", "args": {"x": 1}}
    assert not client.closed
    await client.aclose()


async def test_refusals_before_anything_is_sent(nursery, backend):
    server = await start_server(nursery, backend, max_frame=4096)
    client = await connect(server, max_frame=4096)
    with pytest.raises(ProtocolError, match="exceeds the frame limit"):
        await client.call("echo", {"data": b"x" * 5000})
    with pytest.raises(ProtocolError, match="cannot encode"):
        await client.call("echo", {"data": object()})
    assert await client.call("echo", {"ok": True}) == {"peer": "node1", "args": {"ok": True}}
    await client.aclose()


# -- pushes and disconnects ----------------------------------------------------------------


async def test_server_push_arrives_in_order(nursery, backend):
    server = await start_server(nursery, backend)
    received = []

    async def on_notify(kind, body):
        received.append((kind, body["n"]))
        if body["n"] % 10 == 0:
            await trio.sleep(0)  # a handler that yields must not reorder anything

    client = await connect(server, on_notify=on_notify)
    (peer,) = server.peers
    sent = [("map" if n % 2 else "pause", n) for n in range(200)]
    for kind, n in sent:
        await peer.notify(kind, {"n": n})
    await wait_until(lambda: len(received) == len(sent))
    assert received == sent
    await client.aclose()


async def test_a_slow_notification_handler_does_not_hold_up_replies(nursery, backend):
    server = await start_server(nursery, backend)
    release = trio.Event()
    handled = []

    async def on_notify(kind, body):
        await release.wait()  # like a pause that waits for in-flight I/O to drain
        handled.append(kind)

    client = await connect(server, on_notify=on_notify)
    (peer,) = server.peers
    await peer.notify("pause", {"ino": 2})
    await peer.notify("resume", {"ino": 2})
    assert await client.call("echo", timeout=2) == {"peer": "node1", "args": {}}
    release.set()
    await wait_until(lambda: handled == ["pause", "resume"])
    await client.aclose()


async def test_client_disconnect_detected_by_the_server(nursery, backend, logs):
    connected, disconnected = [], []
    server = await start_server(nursery, backend, on_connect=connected.append,
                                on_disconnect=disconnected.append)
    client = await connect(server)
    (peer,) = server.peers
    assert connected == [peer]
    await client.aclose()
    with trio.fail_after(5):
        await peer.wait_closed()
    await wait_until(lambda: disconnected == [peer])
    assert peer.closed and peer.close_reason == "disconnected"
    assert not server.peers
    with pytest.raises(RpcDisconnected):
        await peer.notify("map", {})
    assert any(r.getMessage() == f"{peer} disconnected" for r in logs.records)
    assert not cut_offs(logs)


async def test_pending_calls_fail_when_the_connection_drops(nursery, backend):
    server = await start_server(nursery, backend)
    client = await connect(server)
    (peer,) = server.peers
    failures = []

    async def call():
        with pytest.raises(RpcDisconnected, match="server closed the connection"):
            await client.call("wait", {"gate": "evicted"})
        failures.append(True)

    async with trio.open_nursery() as calls:
        calls.start_soon(call)
        await wait_until(lambda: "evicted" in backend.gates)
        peer.close("evicted: no ack to pause")
    assert failures == [True]
    with trio.fail_after(5):
        await client.wait_closed()
    assert client.closed
    # The request itself was not cancelled with its connection: it runs to its end.
    backend.gate("evicted").set()
    await wait_until(lambda: backend.finished == ["evicted"])
    await client.aclose()


async def test_a_failing_notification_handler_drops_the_session(nursery, backend, logs):
    server = await start_server(nursery, backend)

    async def on_notify(kind, body):
        raise RuntimeError("cannot apply the map")

    client = await connect(server, on_notify=on_notify)
    (peer,) = server.peers
    await peer.notify("map", {"ino": 2})
    with trio.fail_after(5):
        await client.wait_closed()
        await peer.wait_closed()
    assert client.close_reason == "the handler of a map notification failed"
    assert any(r.exc_info and "map notification from" in r.getMessage() for r in logs.records)
    with pytest.raises(RpcDisconnected):
        await client.call("echo")
    await client.aclose()


async def test_a_peer_that_does_not_read_is_cut_off(nursery, backend, logs):
    server = await start_server(nursery, backend, stall_timeout=0.5)
    raw = await RawPeer.connect(server.port)
    await raw.authenticate()
    (peer,) = server.peers
    body = {"data": b"x" * (1 << 20)}
    with trio.fail_after(20), pytest.raises(RpcDisconnected, match="cut off"):
        for _ in range(1000):  # until the socket buffers are full and a send blocks
            await peer.notify("map", body)
    assert peer.closed
    assert any("not reading: a send blocked for 0.5 s" in line for line in cut_offs(logs))
    await raw.aclose()
    client = await connect(server)
    assert await client.call("echo") == {"peer": "node1", "args": {}}
    await client.aclose()


# -- the handshake, seen from the client ---------------------------------------------------------


async def test_client_with_the_wrong_key_is_refused(nursery, backend, logs):
    server = await start_server(nursery, backend)
    with pytest.raises(RpcDisconnected, match="hung up during the handshake"):
        await RpcClient.connect(HOST, server.port, b"not the key", "intruder")
    await wait_until(lambda: cut_offs(logs))
    assert cut_offs(logs)[0].endswith(": wrong cluster key")
    assert not server.peers


async def test_client_refuses_an_impostor_coordinator(nursery):
    """A server without the key cannot produce WELCOME, whatever it sends."""
    got_auth = []

    async def impostor(stream):
        async with stream:
            await stream.send_all(frame([HELLO, os.urandom(32), 1]))
            got_auth.append(await stream.receive_some(4096))
            await stream.send_all(frame([WELCOME, os.urandom(32)]))
            await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, impostor, 0, host=HOST))
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(ProtocolError, match="failed to prove the cluster key"):
        await RpcClient.connect(HOST, port, KEY, "node1")
    assert got_auth


async def test_connect_failures_are_rpc_errors():
    async def silent(stream):
        async with stream:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host=HOST))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(RpcTimeout, match="no handshake"):
            await RpcClient.connect(HOST, port, KEY, "node1", timeout=0.3)
        nursery.cancel_scope.cancel()  # nobody listens on that port any more
    with pytest.raises(RpcDisconnected, match="cannot connect"):
        await RpcClient.connect(HOST, port, KEY, "node1")


# -- raw peers that misbehave ----------------------------------------------------------------


MISBEHAVIOUR = {
    "request before authentication": (False, frame([REQUEST, 1, "getattr", {"ino": 1}]),
                                      "request before authentication"),
    "wrong key": (False, None, "wrong cluster key"),
    "garbage before authentication": (False, b"\x00\x00\x00\x03\xc1\xc1\xc1",
                                      "payload is not valid msgpack"),
    "big frame before authentication": (False, struct.pack(">I", 4096),
                                        "frame of 4096 bytes exceeds the limit of 1024"),
    "malformed frame": (True, b"\x00\x00\x00\x03\xc1\xc1\xc1", "payload is not valid msgpack"),
    "malformed request": (True, frame([REQUEST, "1", "getattr", {}]),
                          "malformed REQUEST: id must be"),
    "not a list": (True, frame({"method": "getattr"}), "a message must be a non-empty list"),
    "oversized length prefix": (True, b"\xff\xff\xff\xff",
                                "frame of 4294967295 bytes exceeds the limit of 16777216"),
    "stalled partial frame": (True, b"\x00\x00\x00\x10\x94\x03",
                              "stalled: a frame still incomplete after 0.5 s"),
    "silent during the handshake": (False, b"", "no authentication within 0.5 s"),
    "partial frame during the handshake": (False, b"\x00\x00", "no authentication within 0.5 s"),
}


@pytest.mark.parametrize(("authenticate", "data", "reason"), MISBEHAVIOUR.values(),
                         ids=MISBEHAVIOUR.keys())
async def test_misbehaving_peer_is_cut_off(nursery, backend, logs, authenticate, data, reason):
    server = await start_server(nursery, backend, stall_timeout=0.5, handshake_timeout=0.5)
    bystander = await connect(server, "bystander")
    raw = await RawPeer.connect(server.port)
    if authenticate:
        await raw.authenticate()
        assert len(server.peers) == 2
    if data is None:  # the wrong key
        data = raw.auth(key=b"some other key")
    await raw.send(data)
    start = trio.current_time()
    assert await raw.closed_by_server(), "the server did not close the connection"
    elapsed = trio.current_time() - start
    await raw.aclose()

    (line,) = cut_offs(logs)
    assert line.startswith("cut off ") and ": " + reason in line, line
    if authenticate:
        assert "raw at 127.0.0.1:" in line
    if "0.5 s" in reason:
        assert 0.4 <= elapsed < 3
    else:
        assert elapsed < 1
    await wait_until(lambda: len(server.peers) == 1)

    # Everyone else is still served: the connection that was there, and a new one.
    assert await bystander.call("echo") == {"peer": "bystander", "args": {}}
    client = await connect(server)
    assert await client.call("echo", {"after": reason}) == {"peer": "node1",
                                                            "args": {"after": reason}}
    await client.aclose()
    await bystander.aclose()


async def test_a_slow_but_steady_frame_is_still_a_stall(nursery, backend, logs):
    """A byte now and then does not keep a half-sent frame alive."""
    server = await start_server(nursery, backend, stall_timeout=0.5)
    raw = await RawPeer.connect(server.port)
    await raw.authenticate()
    data = frame([REQUEST, 1, "echo", {"pad": b"p" * 100}])
    start = trio.current_time()
    with trio.move_on_after(5):
        try:
            for byte in data:
                await raw.send(bytes([byte]))
                await trio.sleep(0.1)
        except trio.BrokenResourceError:
            pass
    assert await raw.closed_by_server()
    assert trio.current_time() - start < 2
    await raw.aclose()
    assert any("stalled" in line for line in cut_offs(logs))


async def test_a_pipelined_request_after_auth_is_served(nursery, backend):
    server = await start_server(nursery, backend)
    raw = await RawPeer.connect(server.port)
    await raw.send(raw.auth() + frame([REQUEST, 41, "echo", {"a": 1}]))
    assert (await raw.read())[0] == WELCOME
    assert await raw.read() == [4, 41, None, {"peer": "raw", "args": {"a": 1}}]
    await raw.aclose()


async def test_server_close_ends_serve_and_connections(backend):
    async with trio.open_nursery() as nursery:
        server = RpcServer(KEY, backend)
        await nursery.start(server.serve)
        client = await connect(server)
        server.close()
    with trio.fail_after(5):
        await client.wait_closed()
    with pytest.raises(RpcDisconnected):
        await client.call("echo")
    await client.aclose()
