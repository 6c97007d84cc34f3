"""coordinator/endpoint.py: a node's session as the metadata service sees it."""

from __future__ import annotations

import contextlib
import errno

import pytest
import trio

from coordinator import recovery
from coordinator.endpoint import CoordinatorEndpoint, RemoteSession
from coordinator.service import MetadataService
from csvfs.cluster.errors import MetaError
from csvfs.cluster.events import EventLog
from csvfs.cluster.transport import RpcDisconnected
from csvfs.mkfs import make_volume
from csvfs.volume.image import Volume


class QuietPeer:
    """The connection end a session pushes through; it records, never answers."""

    name = "n2"
    closed = False

    def __init__(self):
        self.sent = []

    async def notify(self, kind, body):
        self.sent.append((kind, body))

    async def wait_closed(self):
        await trio.sleep_forever()

    def close(self, reason):
        self.closed = True


MAP = {"size": 4096, "runs": [[0, 7, 1]], "version": 3}


async def test_pushes_go_out_in_order():
    peer = QuietPeer()
    session = RemoteSession(peer, slot=1, grant_seconds=3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.send_notifications)
        await session.invalidate({"inos": [5], "entries": []}, wait=False)
        await session.take_map(5, MAP, resume=True, forget=False, wait=False)
        session.resume(6)
        await trio.sleep(0.01)
        session.close()
    assert [kind for kind, _ in peer.sent] == ["invalidate", "map", "resume"]
    assert peer.sent[1][1] == dict(MAP, ino=5, resume=True, forget=False)


async def test_a_closed_session_drops_pushes_and_refuses_requests():
    """The coordinator stepping down closes every session while requests may still be
    finishing: what they push without waiting is dropped (the node registers afresh
    anyway), and what waits for an answer fails at once instead of hanging."""
    peer = QuietPeer()
    session = RemoteSession(peer, slot=1, grant_seconds=3)
    session.close()
    await session.invalidate({"inos": [5], "entries": []}, wait=False)
    await session.take_map(5, MAP, resume=False, forget=True, wait=False)
    session.resume(5)
    with trio.fail_after(1):
        await session.send_notifications()  # ends at once: the outbox is closed
    assert peer.sent == []
    with trio.fail_after(1):
        with pytest.raises(RpcDisconnected):
            await session.pause(5)
        with pytest.raises(RpcDisconnected):
            await session.take_map(5, MAP, resume=True, forget=True, wait=True)


@contextlib.asynccontextmanager
async def an_endpoint(tmp_path):
    """A coordinator's endpoint over a fresh volume, whose control and move handlers
    must never be reached (the requests are malformed)."""
    image = tmp_path / "vol.img"
    make_volume(image, 64 * 2**20, 2**20)
    volume = Volume.open(image, writable=True)
    try:
        service = MetadataService(volume, recovery.load(volume), epoch=1,
                                  events=EventLog(volume, "t"))
        async with trio.open_nursery() as nursery:
            yield CoordinatorEndpoint(service, nursery, 3.0, lambda slot: True, dict,
                                      never_called, never_called)
    finally:
        volume.close()


async def never_called(*args):
    raise AssertionError("a malformed request reached its handler")


@pytest.mark.parametrize("args", [
    {"slot": 1, "opens": [[2]]},
    {"slot": 1, "opens": [["2", 1]]},
    {"slot": "1", "opens": []},
    {"slot": 1},
])
async def test_a_malformed_registration_is_refused(tmp_path, args):
    async with an_endpoint(tmp_path) as endpoint:
        with pytest.raises(MetaError) as caught:
            await endpoint.handle(QuietPeer(), "register", args)
        assert caught.value.errno == errno.EINVAL
        assert endpoint.sessions == {} and endpoint.service.sessions.by_name == {}


@pytest.mark.parametrize("method, args", [
    ("control", {}),
    ("control", {"node": "n1"}),
    ("control", {"node": 7, "action": "storage-down"}),
    ("control", {"node": "n1", "action": ["storage-down"]}),
    ("control", {"node": "n1", "action": "storage-down", "extra": 1}),
    ("move", {"to": 5}),
    ("move", {"to": "n2", "why": "x"}),
])
async def test_a_malformed_control_or_move_request_is_refused(tmp_path, method, args):
    async with an_endpoint(tmp_path) as endpoint:
        with pytest.raises(MetaError) as caught:
            await endpoint.handle(QuietPeer(), method, args)
        assert caught.value.errno == errno.EINVAL
