"""The RPC wire protocol without sockets: framing, message shapes and the handshake."""

from __future__ import annotations

import hashlib
import hmac
import struct

import msgpack
import pytest

from csvfs.cluster.wire import (
    AUTH,
    HANDSHAKE_MAX_FRAME,
    HELLO,
    MAC_SIZE,
    NAME_MAX,
    NONCE_SIZE,
    NOTIFY,
    REQUEST,
    RESPONSE,
    WELCOME,
    Auth,
    Authenticated,
    ClientConnection,
    ClientHandshake,
    FrameDecoder,
    HandshakeReply,
    Hello,
    Notify,
    ProtocolError,
    Request,
    Response,
    ServerConnection,
    ServerHandshake,
    Welcome,
    client_mac,
    encode,
    parse_message,
    server_mac,
)

pytestmark = pytest.mark.timeout(30)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NONCE_A = b"a" * NONCE_SIZE
NONCE_B = b"b" * NONCE_SIZE
MAC = b"m" * MAC_SIZE


def frame(value, length: int | None = None) -> bytes:
    """A frame written by hand, not by the module under test."""
    payload = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(payload) if length is None else length) + payload


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


SAMPLES = [
    Hello(NONCE_A, 1),
    Auth(NONCE_B, "node1", MAC),
    Welcome(MAC),
    Request(7, "mknod", {"parent": 1, "name": b"f\xff", "mode": 0o100644}),
    Response(7, None, {"ino": 2, "runs": [[0, 4, 9]]}),
    Response(8, [2, "no such file"], None),
    Notify("map", {"ino": 2, "size": 1 << 40, "runs": []}),
]


# -- framing --------------------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.LABEL)
def test_every_message_round_trips(message):
    data = encode(message)
    assert data == frame(message.to_wire())
    decoder = FrameDecoder()
    decoder.feed(data)
    assert decoder.next_message() == message
    assert decoder.next_message() is None
    assert decoder.buffered == 0


def test_split_at_every_byte():
    stream = b"".join(encode(message) for message in SAMPLES)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        decoder.feed(stream[:cut])
        got = list(decoder)
        decoder.feed(stream[cut:])
        got += list(decoder)
        assert got == SAMPLES, f"cut at {cut}"
        assert decoder.buffered == 0


def test_one_byte_at_a_time():
    stream = b"".join(encode(message) for message in SAMPLES)
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        decoder.feed(stream[i:i + 1])
        got += list(decoder)
    assert got == SAMPLES
    assert decoder.buffered == 0


def test_several_frames_in_one_chunk_with_a_partial_tail():
    stream = b"".join(encode(message) for message in SAMPLES)
    tail = encode(Notify("resume", {"ino": 3}))
    decoder = FrameDecoder()
    decoder.feed(stream + tail[:5])
    assert list(decoder) == SAMPLES
    assert decoder.buffered == 5
    decoder.feed(tail[5:])
    assert list(decoder) == [Notify("resume", {"ino": 3})]


def test_oversized_length_refused_before_the_payload_arrives():
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(struct.pack(">I", 101))
    with pytest.raises(ProtocolError, match="frame of 101 bytes exceeds the limit of 100"):
        decoder.next_message()
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.next_message()


def test_frame_of_exactly_max_frame_is_accepted():
    message = Notify("data", {"b": b"x" * 200})
    data = encode(message)
    length = len(data) - 4
    assert encode(message, max_frame=length) == data
    decoder = FrameDecoder(max_frame=length)
    decoder.feed(data)
    assert decoder.next_message() == message
    decoder = FrameDecoder(max_frame=length - 1)
    decoder.feed(data)
    with pytest.raises(ProtocolError, match=f"frame of {length} bytes"):
        decoder.next_message()


def test_encode_refuses_what_the_peer_would_refuse():
    with pytest.raises(ProtocolError, match="exceeds the frame limit of 64"):
        encode(Notify("data", {"b": b"x" * 100}), max_frame=64)
    with pytest.raises(ProtocolError, match="cannot encode REQUEST"):
        encode(Request(1, "x", {"v": object()}))
    with pytest.raises(ProtocolError, match="cannot encode RESPONSE"):
        encode(Response(1, None, 1 << 70))


MALFORMED = {
    "empty payload": b"",
    "never-used byte": b"\xc1",
    "truncated array": b"\x93\x03\x01",
    "two values": msgpack.packb([REQUEST, 1, "x", {}]) + b"\x90",
    "bad utf-8": b"\x94\x03\x01\xa2\xff\xfe\x80",
    "extension type": b"\x92\x05\xd4\x05\x00",
    "deep nesting": b"\x91" * 5000 + b"\xc0",
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_payload_that_is_not_msgpack(payload):
    decoder = FrameDecoder()
    decoder.feed(raw_frame(payload))
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decoder.next_message()


BAD_SHAPES = {
    "a map": ({"op": 1}, "must be a non-empty list"),
    "an int": (3, "must be a non-empty list"),
    "a string": ("REQUEST", "must be a non-empty list"),
    "nil": (None, "must be a non-empty list"),
    "empty list": ([], "must be a non-empty list"),
    "unknown type": ([99, 1], "unknown message type 99"),
    "negative type": ([-1], "unknown message type -1"),
    "type as bool": ([True, 1, "x", {}], "unknown message type True"),
    "type as str": (["REQUEST", 1, "x", {}], "unknown message type"),
    "type as list": ([[REQUEST], 1, "x", {}], "unknown message type"),
    "too few fields": ([REQUEST, 1, "x"], "malformed REQUEST: 2 fields, expected 3"),
    "too many fields": ([NOTIFY, "k", {}, 1], "malformed NOTIFY: 3 fields, expected 2"),
    "id as str": ([REQUEST, "1", "x", {}], "id must be"),
    "id negative": ([REQUEST, -1, "x", {}], "id must be"),
    "id as bool": ([REQUEST, True, "x", {}], "id must be"),
    "id as float": ([REQUEST, 1.0, "x", {}], "id must be"),
    "method empty": ([REQUEST, 1, "", {}], "method must be"),
    "method as bytes": ([REQUEST, 1, b"getattr", {}], "method must be"),
    "method as int": ([REQUEST, 1, 5, {}], "method must be"),
    "args as list": ([REQUEST, 1, "x", [1, 2]], "args must be"),
    "args nil": ([REQUEST, 1, "x", None], "args must be"),
    "args int key": ([REQUEST, 1, "x", {1: 2}], "args must be"),
    "args bytes key": ([REQUEST, 1, "x", {b"ino": 2}], "args must be"),
    "error errno 0": ([RESPONSE, 1, [0, "x"], None], "error must be"),
    "error errno str": ([RESPONSE, 1, ["2", "x"], None], "error must be"),
    "error one item": ([RESPONSE, 1, [2], None], "error must be"),
    "error bytes message": ([RESPONSE, 1, [2, b"x"], None], "error must be"),
    "error as int": ([RESPONSE, 1, 2, None], "error must be"),
    "error and result": ([RESPONSE, 1, [2, "x"], 5], "an error carries no result"),
    "notify kind empty": ([NOTIFY, "", {}], "kind must be"),
    "notify body list": ([NOTIFY, "map", []], "body must be"),
    "hello short nonce": ([HELLO, b"n" * 31, 1], "nonce must be 32 bytes"),
    "hello nonce str": ([HELLO, "n" * 32, 1], "nonce must be 32 bytes"),
    "hello version str": ([HELLO, NONCE_A, "1"], "version must be"),
    "auth name empty": ([AUTH, NONCE_A, "", MAC], "name must be"),
    "auth name bytes": ([AUTH, NONCE_A, b"node", MAC], "name must be"),
    "auth name too long": ([AUTH, NONCE_A, "n" * (NAME_MAX + 1), MAC], "name must be"),
    "auth long mac": ([AUTH, NONCE_A, "node", MAC + b"x"], "mac must be"),
    "welcome mac nil": ([WELCOME, None], "mac must be"),
}


@pytest.mark.parametrize(("value", "reason"), BAD_SHAPES.values(), ids=BAD_SHAPES.keys())
def test_payload_of_the_wrong_shape(value, reason):
    decoder = FrameDecoder()
    decoder.feed(frame(value))
    with pytest.raises(ProtocolError) as caught:
        decoder.next_message()
    assert reason in caught.value.reason


def test_long_values_are_quoted_briefly():
    with pytest.raises(ProtocolError) as caught:
        parse_message(["x" * 100_000])
    assert len(caught.value.reason) < 100


def test_messages_are_checked_when_built_too():
    with pytest.raises(ProtocolError, match="args must be"):
        Request(1, "x", {1: 2})
    with pytest.raises(ProtocolError, match="body must be"):
        Notify("map", None)


# -- the handshake state machines -------------------------------------------------------------


def handshake(server_key=KEY, client_key=KEY, name="node1"):
    server = ServerHandshake(server_key)
    client = ClientHandshake(client_key, name)
    auth = client.receive(server.hello())
    return server, client, auth


def test_handshake_with_the_right_key():
    server, client, auth = handshake()
    welcome = server.receive(auth)
    assert server.done and server.name == "node1"
    assert client.receive(welcome) is None
    assert client.done
    # The proofs are exactly the HMACs the design documents.
    expected = hmac.new(KEY, b"client" + server.nonce + client.nonce + b"node1",
                        hashlib.sha256).digest()
    assert auth.mac == expected == client_mac(KEY, server.nonce, client.nonce, "node1")
    assert welcome.mac == hmac.new(KEY, b"server" + client.nonce + server.nonce,
                                   hashlib.sha256).digest()


def test_nonces_are_fresh():
    assert ServerHandshake(KEY).nonce != ServerHandshake(KEY).nonce
    assert ClientHandshake(KEY, "n").nonce != ClientHandshake(KEY, "n").nonce
    assert len(ServerHandshake(KEY).nonce) == NONCE_SIZE


def test_client_with_the_wrong_key_is_refused():
    server, _, auth = handshake(client_key=OTHER_KEY)
    with pytest.raises(ProtocolError, match="wrong cluster key"):
        server.receive(auth)
    assert not server.done and server.name is None


def test_server_with_the_wrong_key_is_refused_by_the_client():
    """An impostor coordinator cannot produce the WELCOME proof."""
    impostor = ServerHandshake(OTHER_KEY)
    client = ClientHandshake(KEY, "node1")
    auth = client.receive(impostor.hello())
    forged = Welcome(server_mac(OTHER_KEY, auth.nonce, impostor.nonce))
    with pytest.raises(ProtocolError, match="failed to prove the cluster key"):
        client.receive(forged)
    assert not client.done


def test_replayed_auth_is_refused():
    server, _, auth = handshake()
    server.receive(auth)
    later = ServerHandshake(KEY)  # a new connection: a new server nonce
    with pytest.raises(ProtocolError, match="wrong cluster key"):
        later.receive(auth)


def test_replayed_welcome_is_refused():
    server = ServerHandshake(KEY, nonce=NONCE_A)
    first = ClientHandshake(KEY, "node1")
    welcome = server.receive(first.receive(server.hello()))
    # Even a server replaying its own nonce cannot reuse a WELCOME: the client's nonce changed.
    second = ClientHandshake(KEY, "node1")
    second.receive(Hello(NONCE_A, 1))
    with pytest.raises(ProtocolError, match="failed to prove"):
        second.receive(welcome)


@pytest.mark.parametrize("byte", [0, 13, MAC_SIZE - 1])
def test_garbled_auth_mac_is_refused(byte):
    server, _, auth = handshake()
    mac = bytearray(auth.mac)
    mac[byte] ^= 0x01
    with pytest.raises(ProtocolError, match="wrong cluster key"):
        server.receive(Auth(auth.nonce, auth.name, bytes(mac)))


def test_garbled_welcome_mac_is_refused():
    server, client, auth = handshake()
    mac = bytearray(server.receive(auth).mac)
    mac[-1] ^= 0x80
    with pytest.raises(ProtocolError, match="failed to prove"):
        client.receive(Welcome(bytes(mac)))


def test_a_proof_is_bound_to_the_name_and_the_nonces():
    server, _, auth = handshake()
    with pytest.raises(ProtocolError, match="wrong cluster key"):
        server.receive(Auth(auth.nonce, "node2", auth.mac))
    with pytest.raises(ProtocolError, match="wrong cluster key"):
        server.receive(Auth(NONCE_B, auth.name, auth.mac))


def test_the_clients_proof_reflected_back_is_no_welcome():
    server, client, auth = handshake()
    with pytest.raises(ProtocolError, match="failed to prove"):
        client.receive(Welcome(auth.mac))


@pytest.mark.parametrize(("message", "reason"), [
    (Request(1, "getattr", {"ino": 1}), "request before authentication"),
    (Hello(NONCE_A, 1), "unexpected HELLO before authentication"),
    (Welcome(MAC), "unexpected WELCOME before authentication"),
    (Response(1, None, None), "unexpected RESPONSE before authentication"),
    (Notify("map", {}), "unexpected NOTIFY before authentication"),
])
def test_server_refuses_anything_but_auth_first(message, reason):
    with pytest.raises(ProtocolError, match=reason):
        ServerHandshake(KEY).receive(message)


def test_server_refuses_a_second_auth():
    server, _, auth = handshake()
    server.receive(auth)
    with pytest.raises(ProtocolError, match="unexpected AUTH after authentication"):
        server.receive(auth)


@pytest.mark.parametrize(("message", "reason"), [
    (Welcome(MAC), "unexpected WELCOME before HELLO"),
    (Auth(NONCE_A, "x", MAC), "unexpected AUTH before HELLO"),
    (Notify("map", {}), "unexpected NOTIFY before HELLO"),
    (Response(1, None, None), "unexpected RESPONSE before HELLO"),
])
def test_client_wants_hello_first(message, reason):
    with pytest.raises(ProtocolError, match=reason):
        ClientHandshake(KEY, "node1").receive(message)


def test_client_wants_welcome_second():
    client = ClientHandshake(KEY, "node1")
    client.receive(Hello(NONCE_A, 1))
    with pytest.raises(ProtocolError, match="unexpected HELLO before WELCOME"):
        client.receive(Hello(NONCE_A, 1))
    with pytest.raises(ProtocolError, match="unexpected NOTIFY before WELCOME"):
        client.receive(Notify("map", {}))


@pytest.mark.parametrize("version", [0, 2, 1 << 40])
def test_client_refuses_other_protocol_versions(version):
    with pytest.raises(ProtocolError, match=f"protocol version {version} not supported"):
        ClientHandshake(KEY, "node1").receive(Hello(NONCE_A, version))


@pytest.mark.parametrize("key", [b"", "a str key", None])
def test_a_bad_key_is_a_local_error(key):
    with pytest.raises(ValueError, match="cluster key"):
        ServerHandshake(key)
    with pytest.raises(ValueError, match="cluster key"):
        ClientHandshake(key, "node1")


@pytest.mark.parametrize("name", ["", "n" * (NAME_MAX + 1), "\udc80", b"node1"])
def test_a_bad_name_is_a_local_error(name):
    with pytest.raises(ValueError, match="node name"):
        ClientHandshake(KEY, name)


# -- whole connections, bytes in and out ------------------------------------------------------


def connect(name="node1", max_frame=1 << 20):
    server = ServerConnection(KEY, max_frame=max_frame)
    client = ClientConnection(KEY, name, max_frame=max_frame)
    client.receive_data(server.hello())
    reply = client.next_event()
    assert isinstance(reply, HandshakeReply)
    server.receive_data(reply.reply)
    done = server.next_event()
    assert done == Authenticated("node1", done.reply) and done.reply
    client.receive_data(done.reply)
    assert client.next_event() == Authenticated("node1", b"")
    assert server.authenticated and client.authenticated
    return server, client


def test_connection_request_response_notify():
    server, client = connect()
    first, data1 = client.request("getattr", {"ino": 1})
    second, data2 = client.request("statfs", {})
    assert second == first + 1
    server.receive_data(data1 + data2)
    assert server.next_event() == Request(first, "getattr", {"ino": 1})
    assert server.next_event() == Request(second, "statfs", {})
    assert server.next_event() is None
    client.receive_data(server.respond(second, None, {"free": 3})
                        + server.notify("pause", {"ino": 1})
                        + server.respond(first, [2, "gone"]))
    assert client.next_event() == Response(second, None, {"free": 3})
    assert client.next_event() == Notify("pause", {"ino": 1})
    assert client.next_event() == Response(first, [2, "gone"], None)


def test_a_pipelined_request_after_auth_is_read_after_it():
    server = ServerConnection(KEY)
    handshake = ClientHandshake(KEY, "node1")
    server_nonce = server.handshake.nonce
    auth = handshake.receive(Hello(server_nonce, 1))
    server.receive_data(encode(auth) + frame([REQUEST, 1, "x", {"pad": b"p" * 4000}]))
    assert isinstance(server.next_event(), Authenticated)
    assert server.next_event() == Request(1, "x", {"pad": b"p" * 4000})


def test_frames_before_authentication_are_kept_small():
    server = ServerConnection(KEY)
    server.receive_data(struct.pack(">I", HANDSHAKE_MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="exceeds the limit of 1024"):
        server.next_event()
    client = ClientConnection(KEY, "node1")
    client.receive_data(struct.pack(">I", 1 << 20))
    with pytest.raises(ProtocolError, match="exceeds the limit of 1024"):
        client.next_event()


def test_after_authentication_the_full_limit_applies():
    server, client = connect(max_frame=10_000)
    _, data = client.request("write", {"data": b"x" * 9000})
    server.receive_data(data)
    assert server.next_event().args["data"] == b"x" * 9000
    server.receive_data(struct.pack(">I", 10_001))
    with pytest.raises(ProtocolError, match="exceeds the limit of 10000"):
        server.next_event()


def test_duplicate_request_id_in_flight():
    server, _ = connect()
    server.receive_data(frame([REQUEST, 5, "x", {}]) * 2)
    server.next_event()
    with pytest.raises(ProtocolError, match="request id 5 is already in flight"):
        server.next_event()


def test_an_answered_id_may_be_used_again():
    server, _ = connect()
    server.receive_data(frame([REQUEST, 5, "x", {}]))
    server.next_event()
    server.respond(5, None, 1)
    server.receive_data(frame([REQUEST, 5, "x", {}]))
    assert server.next_event() == Request(5, "x", {})
    with pytest.raises(ValueError, match="no request 6 in flight"):
        server.respond(6)


def test_an_unencodable_result_leaves_room_for_an_error_reply():
    server, client = connect()
    server.receive_data(client.request("x", {})[1])
    server.next_event()
    with pytest.raises(ProtocolError, match="cannot encode"):
        server.respond(1, None, {1, 2})
    client.receive_data(server.respond(1, [5, "EIO"]))
    assert client.next_event() == Response(1, [5, "EIO"], None)


@pytest.mark.parametrize(("value", "reason"), [
    ([RESPONSE, 1, None, None], "unexpected RESPONSE from a client"),
    ([NOTIFY, "map", {}], "unexpected NOTIFY from a client"),
    ([AUTH, NONCE_A, "x", MAC], "unexpected AUTH from a client"),
    ([HELLO, NONCE_A, 1], "unexpected HELLO from a client"),
])
def test_server_takes_only_requests_after_authentication(value, reason):
    server, _ = connect()
    server.receive_data(frame(value))
    with pytest.raises(ProtocolError, match=reason):
        server.next_event()


@pytest.mark.parametrize(("value", "reason"), [
    ([RESPONSE, 1, None, None], "response to request 1, which was never sent"),
    ([RESPONSE, 0, None, None], "response to request 0, which was never sent"),
    ([REQUEST, 1, "x", {}], "unexpected REQUEST from the server"),
    ([HELLO, NONCE_A, 1], "unexpected HELLO from the server"),
    ([WELCOME, MAC], "unexpected WELCOME from the server"),
])
def test_client_takes_only_responses_and_notifications(value, reason):
    _, client = connect()
    client.receive_data(frame(value))
    with pytest.raises(ProtocolError, match=reason):
        client.next_event()


def test_nothing_is_sent_before_authentication():
    with pytest.raises(RuntimeError):
        ServerConnection(KEY).notify("map", {})
    with pytest.raises(RuntimeError):
        ClientConnection(KEY, "node1").request("x", {})


def test_a_failed_encode_does_not_use_up_an_id():
    _, client = connect()
    with pytest.raises(ProtocolError):
        client.request("x", {"v": object()})
    assert client.request("x", {})[0] == 1


def test_advertised_addresses():
    from csvfs.cluster.transport import join_address, split_advertised

    assert split_advertised("node7") == ("node7", None)
    assert split_advertised("10.0.0.5:7000") == ("10.0.0.5", 7000)
    assert split_advertised("fe80::1") == ("fe80::1", None)
    assert split_advertised("[fe80::1]:7000") == ("fe80::1", 7000)
    assert split_advertised("[fe80::1]") == ("fe80::1", None)
    for bad in ("", ":7000", "host:x", "host:0", "[fe80::1", "[fe80::1]7000", "host:70000"):
        with pytest.raises(ValueError):
            split_advertised(bad)
    assert join_address("fe80::1", 7000) == "[fe80::1]:7000"
