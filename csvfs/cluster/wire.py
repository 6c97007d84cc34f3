"""The RPC wire protocol without I/O: frames, messages and the key handshake.

A frame is a 4-byte big-endian payload length and one msgpack value. Every
value is a list whose first element is its type:

    [HELLO, server_nonce, version]      server -> client, first frame of a connection
    [AUTH, client_nonce, name, mac]     client -> server, the answer to HELLO
    [WELCOME, mac]                      server -> client, the handshake is done
    [REQUEST, id, method, args]         client -> server
    [RESPONSE, id, error, result]       server -> client; error is None or [errno, message]
    [NOTIFY, kind, body]                server -> client, pushed at any time

Both sides prove that they hold the cluster key without sending it:

    AUTH mac    = HMAC-SHA256(key, b"client" + server_nonce + client_nonce + name)
    WELCOME mac = HMAC-SHA256(key, b"server" + client_nonce + server_nonce)

Each side's fresh nonce makes every proof good for one connection only, and
the labels keep a proof from being reflected back as the other side's.

`ServerConnection` and `ClientConnection` are the state machines of one
connection: feed them bytes, take events out, and send the bytes they return.
The sockets, and every timeout, live in csvfs/cluster/transport.py.
"""

from __future__ import annotations

import hashlib
import hmac
import reprlib
import secrets
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})
MAX_FRAME = 16 << 20
# Until a peer has proved the key it may send no more than this per frame, so that
# a stranger cannot make the server buffer megabytes.
HANDSHAKE_MAX_FRAME = 1024
NONCE_SIZE = 32
MAC_SIZE = hashlib.sha256().digest_size
NAME_MAX = 255  # bytes of UTF-8

HELLO, AUTH, WELCOME, REQUEST, RESPONSE, NOTIFY = range(6)

_PREFIX = struct.Struct(">I")
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_short = _repr.repr  # peers choose what we quote in logs: keep it short


class RpcError(Exception):
    """Base of the RPC layer's own failures (a refused request raises MetaError instead)."""


class ProtocolError(RpcError):
    """The peer broke the protocol, or a message cannot be sent under it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# -- messages ------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass, and never a valid field here


def _is_id(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_blob(value: Any, size: int) -> bool:
    return type(value) is bytes and len(value) == size


def _is_fields(value: Any) -> bool:
    """A map that can become keyword arguments."""
    return type(value) is dict and all(type(key) is str for key in value)


def _is_name(value: Any) -> bool:
    if type(value) is not str or not value:
        return False
    try:
        return len(value.encode()) <= NAME_MAX
    except UnicodeEncodeError:  # lone surrogates: cannot go on the wire
        return False


def _is_error(value: Any) -> bool:
    return (value is None or type(value) in (list, tuple) and len(value) == 2
            and _is_int(value[0]) and value[0] > 0 and type(value[1]) is str)


class _Message:
    __slots__ = ()
    TAG: ClassVar[int]
    LABEL: ClassVar[str]

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            raise ProtocolError(f"malformed {self.LABEL}: {what}")

    def to_wire(self) -> list:
        # A slotted dataclass in field order: the names once per class, not per message.
        return [self.TAG, *(getattr(self, name) for name in _FIELD_NAMES[self.TAG])]


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    TAG: ClassVar[int] = HELLO
    LABEL: ClassVar[str] = "HELLO"
    nonce: bytes
    version: int

    def __post_init__(self) -> None:
        self._check(_is_blob(self.nonce, NONCE_SIZE), f"nonce must be {NONCE_SIZE} bytes")
        self._check(_is_id(self.version), "version must be a non-negative int")


@dataclass(frozen=True, slots=True)
class Auth(_Message):
    TAG: ClassVar[int] = AUTH
    LABEL: ClassVar[str] = "AUTH"
    nonce: bytes
    name: str
    mac: bytes

    def __post_init__(self) -> None:
        self._check(_is_blob(self.nonce, NONCE_SIZE), f"nonce must be {NONCE_SIZE} bytes")
        self._check(_is_name(self.name), f"name must be a str of 1 to {NAME_MAX} bytes")
        self._check(_is_blob(self.mac, MAC_SIZE), f"mac must be {MAC_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class Welcome(_Message):
    TAG: ClassVar[int] = WELCOME
    LABEL: ClassVar[str] = "WELCOME"
    mac: bytes

    def __post_init__(self) -> None:
        self._check(_is_blob(self.mac, MAC_SIZE), f"mac must be {MAC_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class Request(_Message):
    TAG: ClassVar[int] = REQUEST
    LABEL: ClassVar[str] = "REQUEST"
    id: int
    method: str
    args: dict

    def __post_init__(self) -> None:
        self._check(_is_id(self.id), "id must be a non-negative int")
        self._check(type(self.method) is str and bool(self.method),
                    "method must be a non-empty str")
        self._check(_is_fields(self.args), "args must be a map with str keys")


@dataclass(frozen=True, slots=True)
class Response(_Message):
    TAG: ClassVar[int] = RESPONSE
    LABEL: ClassVar[str] = "RESPONSE"
    id: int
    error: list | None
    result: Any

    def __post_init__(self) -> None:
        self._check(_is_id(self.id), "id must be a non-negative int")
        self._check(_is_error(self.error), "error must be None or [errno > 0, message str]")
        self._check(self.error is None or self.result is None, "an error carries no result")


@dataclass(frozen=True, slots=True)
class Notify(_Message):
    TAG: ClassVar[int] = NOTIFY
    LABEL: ClassVar[str] = "NOTIFY"
    kind: str
    body: dict

    def __post_init__(self) -> None:
        self._check(type(self.kind) is str and bool(self.kind), "kind must be a non-empty str")
        self._check(_is_fields(self.body), "body must be a map with str keys")


Message = Hello | Auth | Welcome | Request | Response | Notify
_TYPES: dict[int, type] = {cls.TAG: cls for cls in (Hello, Auth, Welcome, Request, Response,
                                                     Notify)}
# dataclasses.fields() on every frame was a few percent of an RPC round trip
_FIELD_NAMES: dict[int, tuple[str, ...]] = {
    tag: tuple(field.name for field in fields(cls)) for tag, cls in _TYPES.items()}


def parse_message(value: Any) -> Message:
    """Turn a decoded msgpack value into a message, or raise ProtocolError."""
    if type(value) is not list or not value:
        raise ProtocolError(f"a message must be a non-empty list, not {_short(value)}")
    cls = _TYPES.get(value[0]) if _is_int(value[0]) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_short(value[0])}")
    arity = len(_FIELD_NAMES[cls.TAG])
    if len(value) != arity + 1:
        raise ProtocolError(f"malformed {cls.LABEL}: {len(value) - 1} fields, expected {arity}")
    return cls(*value[1:])


# -- frames ----------------------------------------------------------------------------------


def _refuse_extension(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def decode_payload(payload: bytes) -> Message:
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=False,
                                ext_hook=_refuse_extension)
    except (ValueError, msgpack.UnpackException) as exc:  # includes bad UTF-8, extra data
        detail = str(exc) or type(exc).__name__
        raise ProtocolError(f"payload is not valid msgpack: {detail}") from None
    return parse_message(value)


def encode(message: Message, max_frame: int = MAX_FRAME) -> bytes:
    """One frame. Raises ProtocolError if the message cannot go on the wire as it is."""
    try:
        payload = msgpack.packb(message.to_wire(), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode {message.LABEL}: {exc}") from None
    if len(payload) > max_frame:
        raise ProtocolError(f"{message.LABEL} of {len(payload)} bytes exceeds the frame limit "
                            f"of {max_frame}")
    return _PREFIX.pack(len(payload)) + payload


class FrameDecoder:
    """Collects bytes and cuts them into frames; checks each frame's length first,
    so an oversized frame is refused before its payload is buffered."""

    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes held that are not a complete frame yet (when next_* returned None)."""
        return len(self._buffer)

    def next_payload(self) -> bytes | None:
        if len(self._buffer) < _PREFIX.size:
            return None
        (length,) = _PREFIX.unpack_from(self._buffer)
        if length > self.max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        end = _PREFIX.size + length
        if len(self._buffer) < end:
            return None
        with memoryview(self._buffer) as view:
            payload = bytes(view[_PREFIX.size:end])
        del self._buffer[:end]
        return payload

    def next_message(self) -> Message | None:
        payload = self.next_payload()
        return None if payload is None else decode_payload(payload)

    def __iter__(self):
        while (message := self.next_message()) is not None:
            yield message


# -- the handshake ----------------------------------------------------------------------------


def client_mac(key: bytes, server_nonce: bytes, client_nonce: bytes, name: str) -> bytes:
    data = b"client" + server_nonce + client_nonce + name.encode()
    return hmac.new(key, data, hashlib.sha256).digest()


def server_mac(key: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(key, b"server" + client_nonce + server_nonce, hashlib.sha256).digest()


def check_key(key: bytes) -> bytes:
    if type(key) is not bytes or not key:
        raise ValueError("the cluster key must be non-empty bytes")
    return key


def _not_now(message: Message, when: str) -> ProtocolError:
    if isinstance(message, Request):
        return ProtocolError(f"request {when}")
    return ProtocolError(f"unexpected {message.LABEL} {when}")


class ServerHandshake:
    """Send hello(), then give the client's first message to receive(), which returns
    the WELCOME to send or raises ProtocolError. A failed handshake is final."""

    def __init__(self, key: bytes, nonce: bytes | None = None):
        self._key = check_key(key)
        self.nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self.name: str | None = None  # the client's, once authenticated
        self.done = False

    def hello(self) -> Hello:
        return Hello(self.nonce, PROTOCOL_VERSION)

    def receive(self, message: Message) -> Welcome:
        if self.done:
            raise _not_now(message, "after authentication")
        if not isinstance(message, Auth):
            raise _not_now(message, "before authentication")
        expected = client_mac(self._key, self.nonce, message.nonce, message.name)
        if not hmac.compare_digest(expected, message.mac):
            raise ProtocolError("wrong cluster key")
        self.name, self.done = message.name, True
        return Welcome(server_mac(self._key, message.nonce, self.nonce))


class ClientHandshake:
    """receive(HELLO) returns the AUTH to send; receive(WELCOME) checks the server's
    proof and returns None. Anything else, or a bad proof, raises ProtocolError."""

    def __init__(self, key: bytes, name: str, nonce: bytes | None = None):
        if not _is_name(name):
            raise ValueError(f"a node name must be a str of 1 to {NAME_MAX} bytes")
        self._key = check_key(key)
        self.name = name
        self.nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self._server_nonce: bytes | None = None
        self.done = False

    def receive(self, message: Message) -> Auth | None:
        if self.done:
            raise _not_now(message, "after the handshake")
        if self._server_nonce is None:
            return self._hello(message)
        if not isinstance(message, Welcome):
            raise _not_now(message, "before WELCOME")
        expected = server_mac(self._key, self.nonce, self._server_nonce)
        if not hmac.compare_digest(expected, message.mac):
            raise ProtocolError("the server failed to prove the cluster key "
                                "(wrong key, or not our coordinator)")
        self.done = True
        return None

    def _hello(self, message: Message) -> Auth:
        if not isinstance(message, Hello):
            raise _not_now(message, "before HELLO")
        if message.version not in SUPPORTED_VERSIONS:
            raise ProtocolError(f"protocol version {message.version} not supported")
        self._server_nonce = message.nonce
        return Auth(self.nonce, self.name, client_mac(self._key, message.nonce, self.nonce,
                                                      self.name))


# -- connections -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeReply:
    """Send `reply`; the handshake goes on."""

    reply: bytes


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The handshake is done: send `reply` (possibly empty) before anything else.
    `name` is the client's name on both sides."""

    name: str
    reply: bytes = b""


class ServerConnection:
    """The server's side of one connection: HELLO out, AUTH in, then requests.

    next_event() gives Authenticated once, then Request events; every answer to a
    request goes through respond(), and pushes through notify().
    """

    def __init__(self, key: bytes, *, max_frame: int = MAX_FRAME, nonce: bytes | None = None):
        self.handshake = ServerHandshake(key, nonce)
        self._max_frame = max_frame
        self._decoder = FrameDecoder(min(max_frame, HANDSHAKE_MAX_FRAME))
        self._in_flight: set[int] = set()

    @property
    def authenticated(self) -> bool:
        return self.handshake.done

    @property
    def name(self) -> str | None:
        return self.handshake.name

    @property
    def buffered(self) -> int:
        return self._decoder.buffered

    def hello(self) -> bytes:
        return encode(self.handshake.hello())

    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)

    def next_event(self) -> Authenticated | Request | None:
        message = self._decoder.next_message()
        if message is None:
            return None
        if not self.handshake.done:
            welcome = self.handshake.receive(message)
            self._decoder.max_frame = self._max_frame
            return Authenticated(message.name, encode(welcome))
        if not isinstance(message, Request):
            raise ProtocolError(f"unexpected {message.LABEL} from a client")
        if message.id in self._in_flight:
            raise ProtocolError(f"request id {message.id} is already in flight")
        self._in_flight.add(message.id)
        return message

    def respond(self, request_id: int, error: list | None = None, result: Any = None) -> bytes:
        """The reply frame; the request stays in flight if this raises, so that the
        caller can send an error reply instead."""
        if request_id not in self._in_flight:
            raise ValueError(f"no request {request_id} in flight")
        data = encode(Response(request_id, error, result), self._max_frame)
        self._in_flight.discard(request_id)
        return data

    def notify(self, kind: str, body: dict) -> bytes:
        if not self.handshake.done:
            raise RuntimeError("no notifications before the client has authenticated")
        return encode(Notify(kind, body), self._max_frame)


class ClientConnection:
    """The client's side of one connection.

    next_event() gives HandshakeReply (AUTH to send), then Authenticated once the
    server has proved the key, then Response and Notify events.
    """

    def __init__(self, key: bytes, name: str, *, max_frame: int = MAX_FRAME,
                 nonce: bytes | None = None):
        self.handshake = ClientHandshake(key, name, nonce)
        self._max_frame = max_frame
        self._decoder = FrameDecoder(min(max_frame, HANDSHAKE_MAX_FRAME))
        self._next_id = 1

    @property
    def authenticated(self) -> bool:
        return self.handshake.done

    @property
    def buffered(self) -> int:
        return self._decoder.buffered

    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)

    def next_event(self) -> HandshakeReply | Authenticated | Response | Notify | None:
        message = self._decoder.next_message()
        if message is None:
            return None
        if not self.handshake.done:
            auth = self.handshake.receive(message)
            if auth is not None:
                return HandshakeReply(encode(auth))
            self._decoder.max_frame = self._max_frame
            return Authenticated(self.handshake.name)
        if isinstance(message, Response):
            if not 0 < message.id < self._next_id:
                raise ProtocolError(f"response to request {message.id}, which was never sent")
            return message
        if isinstance(message, Notify):
            return message
        raise ProtocolError(f"unexpected {message.LABEL} from the server")

    def request(self, method: str, args: dict) -> tuple[int, bytes]:
        """A new request id and its frame."""
        if not self.handshake.done:
            raise RuntimeError("no requests before the server has proved the key")
        request = Request(self._next_id, method, args)
        data = encode(request, self._max_frame)
        self._next_id += 1
        return request.id, data
