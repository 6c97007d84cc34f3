"""Snapshots and copy-on-write in process: the coordinator's service, a node's data path
in the same process, and a reader of the snapshot straight from the image."""

from __future__ import annotations

import os

import pytest
import trio

from coordinator import allocation
from coordinator.model import ROOT_INO
from csvfs.backup.snapshot_reader import SnapshotView
from csvfs.cluster.errors import MetaError
from csvfs.cluster.events import read_events
from csvfs.datapath import DataPath
from csvfs.fsck import Report, check
from csvfs.mkfs import make_volume
from csvfs.quiesce import FileGates
from tests.test_service import UNIT, Cluster

pytestmark = pytest.mark.timeout(60)

M = 1 << 20


@pytest.fixture
def cluster(tmp_path):
    path = tmp_path / "vol.img"
    make_volume(path, 16 * M, UNIT)
    cluster = Cluster(path)
    yield cluster
    cluster.close()


class Node:
    """The coordinator's own node: a data path whose metadata calls go in process."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        volume = cluster.volume
        self.data = DataPath(volume.fd, volume.sb.data.offset, UNIT, self.meta)
        self.gates = FileGates("own", self.data, _forget_nothing)

    async def meta(self, method: str, **args):
        return await self.cluster.service.call("own", method, args)

    async def join(self) -> None:
        await self.cluster.service.join(self.gates, [])

    async def open(self, ino: int):
        reply = await self.meta("open", ino=ino)
        return self.gates.opened(ino, reply["size"], reply["runs"], reply["version"],
                                 reply.get("granule"), reply.get("ask"))


async def _forget_nothing(stale) -> None:
    pass


async def take(cluster: Cluster, timeout: float = 60.0) -> int:
    reply = await cluster.service.backup_call("backup-1", "snapshot_take",
                                              {"timeout": timeout})
    return reply["id"]


async def view(cluster: Cluster, snap_id: int) -> SnapshotView:
    files = await cluster.service.backup_call("r", "snapshot_files", {"snapshot": snap_id})
    return SnapshotView(files, cluster.volume.read)


async def read_at_point(cluster: Cluster, snap: SnapshotView, path: str) -> bytes:
    """The reader's protocol: read, then check; read again what was preserved meanwhile."""
    inode = snap.lookup(path)
    live: set = set()
    data = snap.read(inode, 0, inode.size, live) or bytes(inode.size)
    answer = await cluster.service.backup_call("r", "snapshot_check",
                                               {"snapshot": snap.id, "since": snap.preserved})
    if snap.take_copies(answer["copies"], answer["preserved"]) & live:
        data = snap.read(inode, 0, inode.size) or bytes(inode.size)
    return data


async def make_file(cluster: Cluster, node: Node, name: bytes, data: bytes):
    attrs = await cluster.mknod(name)
    handle = await node.open(attrs["ino"])
    await node.data.write(handle, 0, data)
    return attrs["ino"], handle


def fsck_problems(cluster: Cluster) -> list[str]:
    report = Report()
    check(cluster.volume, report)
    return report.problems


async def test_a_write_after_the_point_preserves_the_old_contents_once(cluster):
    node = Node(cluster)
    await node.join()
    old = os.urandom(3 * UNIT)
    ino, handle = await make_file(cluster, node, b"disk", old)
    free_before = cluster.free
    snap_id = await take(cluster)
    assert handle.ask == set(handle.units)  # the point marked every granule it holds

    await node.data.write(handle, 10, b"new data")  # unit 0: preserved, then written
    assert 0 not in handle.ask and {1, 2} <= handle.ask
    await node.data.write(handle, 20, b"again")  # no second copy of unit 0
    assert cluster.free == free_before - 1
    live = await node.data.read(handle, 0, 3 * UNIT)
    assert live[10:18] == b"new data" and live[20:25] == b"again"

    snap = await view(cluster, snap_id)
    assert await read_at_point(cluster, snap, "/disk") == old
    rows = cluster.service.snapshots.table()
    assert [row[0] for row in rows] == [snap_id] and rows[0][3] == 1  # one unit preserved

    await cluster.service.backup_call("r", "snapshot_release", {"snapshot": snap_id})
    assert cluster.free == free_before and not cluster.service.state.snapshots
    assert fsck_problems(cluster) == []


async def test_units_freed_while_held_are_not_reused_until_the_release(cluster):
    node = Node(cluster)
    await node.join()
    old = os.urandom(4 * UNIT)
    ino, handle = await make_file(cluster, node, b"f", old)
    free_before = cluster.free
    snap_id = await take(cluster)
    held = set(cluster.units(ino).values())
    await cluster.call("setattr", ino=ino, changes={"size": UNIT})  # frees units 1..3
    await node.meta("release", ino=ino)
    node.data.closed(handle)
    await cluster.call("unlink", parent=ROOT_INO, name=b"f", is_dir=False)
    assert cluster.free == free_before  # parked, not free
    other = await cluster.mknod(b"other")
    await cluster.call("extend", ino=other["ino"], offset=0, end=4 * UNIT)
    assert not held & set(cluster.units(other["ino"]).values())
    free_before = cluster.free
    snap = await view(cluster, snap_id)
    assert await read_at_point(cluster, snap, "/f") == old
    assert fsck_problems(cluster) == []
    await cluster.service.backup_call("r", "snapshot_release", {"snapshot": snap_id})
    assert cluster.free == free_before + len(held)  # the parked units are free again
    assert fsck_problems(cluster) == []


async def test_a_snapshot_survives_a_restart_with_its_copies(cluster):
    node = Node(cluster)
    await node.join()
    old = os.urandom(2 * UNIT)
    ino, handle = await make_file(cluster, node, b"f", old)
    free_before, units = cluster.free, len(cluster.units(ino))
    snap_id = await take(cluster)
    await node.data.write(handle, 0, b"x" * UNIT)
    await cluster.call("setattr", ino=ino, changes={"size": 0})
    cluster.restart()  # replays the journal
    snap = await view(cluster, snap_id)
    assert await read_at_point(cluster, snap, "/f") == old
    assert fsck_problems(cluster) == []
    await cluster.service.checkpoint_now()
    cluster.restart()  # from the checkpoint now
    snap = await view(cluster, snap_id)
    assert await read_at_point(cluster, snap, "/f") == old
    await cluster.service.backup_call("r", "snapshot_release", {"snapshot": snap_id})
    cluster.restart()
    assert cluster.free == free_before + units and fsck_problems(cluster) == []


async def test_two_snapshots_share_a_copy_and_each_keeps_its_own_point(cluster):
    node = Node(cluster)
    await node.join()
    ino, handle = await make_file(cluster, node, b"f", b"A" * UNIT)
    first = await take(cluster)
    second = await take(cluster)
    await node.data.write(handle, 0, b"B" * UNIT)  # one copy for both
    third = await take(cluster)
    await node.data.write(handle, 0, b"C" * UNIT)  # a copy for the third only
    for snap_id, expected in ((first, b"A"), (second, b"A"), (third, b"B")):
        snap = await view(cluster, snap_id)
        assert await read_at_point(cluster, snap, "/f") == expected * UNIT
    free = cluster.free
    for snap_id in (second, first, third):
        await cluster.service.backup_call("r", "snapshot_release", {"snapshot": snap_id})
    assert cluster.free == free + 2
    assert fsck_problems(cluster) == []


async def test_small_files_are_preserved_per_block(cluster):
    node = Node(cluster)
    await node.join()
    ino, handle = await make_file(cluster, node, b"small", b"s" * 10000)
    assert handle.granule == 4096
    snap_id = await take(cluster)
    await node.data.write(handle, 5000, b"t")  # block 1 only
    assert handle.ask == {0, 2}
    snap = await view(cluster, snap_id)
    assert await read_at_point(cluster, snap, "/small") == b"s" * 10000
    assert (await node.data.read(handle, 4999, 3)) == b"sts"


async def test_the_coordinators_own_writes_preserve_first(cluster):
    """An append into the held last unit, and a punched hole's zeroed edges."""
    node = Node(cluster)
    await node.join()
    old = os.urandom(UNIT + 100)
    ino, handle = await make_file(cluster, node, b"log", old)
    snap_id = await take(cluster)
    await cluster.call("append", ino=ino, data=b"appended", req=1)
    mode = allocation.FALLOC_PUNCH_HOLE | allocation.FALLOC_KEEP_SIZE
    await cluster.call("fallocate", ino=ino, mode=mode, offset=10, length=100)
    snap = await view(cluster, snap_id)
    assert await read_at_point(cluster, snap, "/log") == old


async def test_a_read_that_races_the_preserve_is_read_again(cluster):
    node = Node(cluster)
    await node.join()
    old = os.urandom(2 * UNIT)
    ino, handle = await make_file(cluster, node, b"f", old)
    snap_id = await take(cluster)
    snap = await view(cluster, snap_id)
    inode = snap.lookup("/f")
    live: set = set()
    first_read = snap.read(inode, 0, inode.size, live)  # both units read live
    assert first_read == old and len(live) == 2
    await node.data.write(handle, UNIT, b"z" * UNIT)  # ... then unit 1 is preserved
    answer = await cluster.service.backup_call("r", "snapshot_check",
                                               {"snapshot": snap_id, "since": snap.preserved})
    fresh = snap.take_copies(answer["copies"], answer["preserved"])
    assert fresh & live == {("u", cluster.units(ino)[1])}
    assert snap.read(inode, 0, inode.size) == old  # from the copy now


async def test_no_space_for_a_copy_drops_the_snapshot_not_the_write(cluster):
    node = Node(cluster)
    await node.join()
    ino, handle = await make_file(cluster, node, b"f", b"a" * (2 * UNIT))
    filler = await cluster.mknod(b"filler")
    await cluster.call("extend", ino=filler["ino"], offset=0, end=cluster.free * UNIT)
    assert cluster.free == 0
    snap_id = await take(cluster)
    await node.data.write(handle, 0, b"b" * 100)  # must not fail
    assert (await node.data.read(handle, 0, 3)) == b"bbb"
    with pytest.raises(MetaError, match="ran out of space"):
        await view(cluster, snap_id)
    assert not cluster.service.state.snapshots
    events = [event["msg"] for event in read_events(cluster.volume)]
    assert any("ran out of space" in message for message in events)
    assert fsck_problems(cluster) == []


async def test_a_snapshot_whose_requester_stops_renewing_is_released(cluster):
    node = Node(cluster)
    await node.join()
    await make_file(cluster, node, b"f", b"a" * UNIT)
    snap_id = await take(cluster, timeout=1.0)
    await cluster.service.backup_call("r", "snapshot_renew", {"snapshot": snap_id})
    await cluster.service.snapshots.expire()
    assert snap_id in cluster.service.state.snapshots.by_id  # renewed in time
    await trio.sleep(1.1)
    await cluster.service.snapshots.expire()
    assert not cluster.service.state.snapshots
    with pytest.raises(MetaError, match="stopped renewing"):
        await cluster.service.backup_call("r", "snapshot_renew", {"snapshot": snap_id})


async def test_the_hold_stops_io_until_the_point_is_set(cluster):
    node = Node(cluster)
    await node.join()
    ino, handle = await make_file(cluster, node, b"f", b"a" * UNIT)
    await node.gates.hold()
    assert node.data.read_direct(handle, 0, 1) is None
    assert not node.data.write_direct(handle, 0, b"x")
    node.gates.snapshot_set(0)  # a hold that set no point marks nothing
    assert node.data.write_direct(handle, 0, b"x") and handle.ask == set()
    # a map older than the point asks first everywhere, even one that arrives late
    node.data.end_hold(handle.version + 5)
    assert handle.ask == set(handle.units)
    node.data.update_map(ino, handle.size, [[0, handle.units[0], 1]], handle.version + 1,
                         None, [])
    assert handle.ask == {0}


# -- change tracking ---------------------------------------------------------------------


async def test_a_tracked_file_marks_each_granule_changed_once_and_durably(cluster):
    node = Node(cluster)
    await node.join()
    ino, handle = await make_file(cluster, node, b"disk", os.urandom(4 * UNIT))
    snap_id = await take(cluster)
    await cluster.service.backup_call("r", "snapshot_release", {"snapshot": snap_id})
    inode = cluster.service.state.inodes[ino]
    assert inode.tracking == {snap_id: set()}
    assert handle.ask == set(handle.units)  # tracked: every granule asks first

    seq = cluster.service.journal.next_seq
    await node.data.write(handle, UNIT + 5, b"x")
    assert inode.tracking[snap_id] == {1} and handle.ask == set(handle.units) - {1}
    assert cluster.service.journal.next_seq == seq + 1  # one "changed" record
    await node.data.write(handle, UNIT + 9, b"y")  # no second record
    assert cluster.service.journal.next_seq == seq + 1
    await node.data.write(handle, 5 * UNIT, b"z")  # growth marks what it adds
    assert {1, 5} <= inode.tracking[snap_id]
    await cluster.call("setattr", ino=ino, changes={"size": 3 * UNIT})  # drops are changes
    assert {3, 4} <= inode.tracking[snap_id]

    cluster.restart()  # durable: replayed from the journal
    changed = cluster.service.state.inodes[ino].tracking[snap_id]
    assert {1, 3, 4, 5} <= changed and 0 not in changed
    await cluster.service.checkpoint_now()
    cluster.restart()
    assert cluster.service.state.inodes[ino].tracking == {snap_id: changed}


async def test_the_next_point_hands_the_changes_to_its_snapshot(cluster):
    node = Node(cluster)
    await node.join()
    ino, handle = await make_file(cluster, node, b"disk", os.urandom(2 * UNIT))
    first = await take(cluster)
    await cluster.service.backup_call("r", "snapshot_release", {"snapshot": first})
    await node.data.write(handle, 0, b"changed")
    second = await take(cluster)
    snap = await view(cluster, second)
    assert snap.tracking[ino] == {first: ([0], {})}  # what the incremental reads (whole: one
    # stripe is the whole of a 64 KiB unit)
    inode = cluster.service.state.inodes[ino]
    assert inode.tracking == {first: {0}, second: set()}  # a base for each backup
    await node.data.write(handle, UNIT, b"more")
    assert inode.tracking == {first: {0, 1}, second: {1}}
    # a failed backup is no base; the one before it tracked every change all along
    await cluster.service.backup_call("r", "snapshot_release",
                                      {"snapshot": second, "outcome": "failed"})
    assert inode.tracking == {first: {0, 1}}
    for _ in range(5):  # only the last few bases are kept
        await cluster.service.backup_call("r", "snapshot_release",
                                          {"snapshot": await take(cluster)})
    assert len(inode.tracking) == 4 and first not in inode.tracking


async def test_a_backup_of_some_files_tracks_only_those(cluster):
    node = Node(cluster)
    await node.join()
    taken, _ = await make_file(cluster, node, b"taken", b"a" * UNIT)
    other, _ = await make_file(cluster, node, b"other", b"b" * UNIT)
    reply = await cluster.service.backup_call("r", "snapshot_take",
                                              {"files": ["/taken", "/missing"]})
    state = cluster.service.state
    assert reply["id"] in state.inodes[taken].tracking and state.inodes[other].tracking == {}


async def test_granules_read_for_good_are_held_no_more(cluster):
    node = Node(cluster)
    await node.join()
    ino, handle = await make_file(cluster, node, b"disk", os.urandom(3 * UNIT))
    snap_id = await take(cluster)
    units = cluster.units(ino)
    await cluster.service.backup_call("r", "snapshot_read", {
        "snapshot": snap_id, "kind": "u", "granules": [units[0], units[1]]})
    free = cluster.free
    await node.data.write(handle, 0, b"no copy needed")  # unit 0: read already
    assert cluster.free == free
    await node.data.write(handle, 2 * UNIT, b"a copy")  # unit 2: still held
    assert cluster.free == free - 1
    await cluster.call("setattr", ino=ino, changes={"size": 0})
    # units 0 and 1 (read) and 2 (copied) are free; the rest (allocated ahead) parked
    parked = len(units) - 3
    assert cluster.free == free - 1 + 3
    cluster.restart()  # the same after a replay
    assert cluster.free == free - 1 + 3 and fsck_problems(cluster) == []
    await cluster.service.backup_call("r", "snapshot_release", {"snapshot": snap_id})
    assert cluster.free == free + 3 + parked  # the copy and the parked units too


def test_backup_batches_never_split_a_granule():
    from csvfs.backup.engine import batches

    chunk = 1 << 20
    reads = [(index * chunk, chunk) for index in (0, 1, 2, 5, 6, 7, 8, 13)]
    # 4 MiB granules: 0-3, 4-7, 8-11, 12-15 (in chunks); batches of about 2 chunks
    assert list(batches(reads, 4 * chunk, 2 * chunk)) == [reads[:3], reads[3:6], reads[6:]]
    assert list(batches(reads, 64 << 10, 3 * chunk)) == [reads[:3], reads[3:6], reads[6:]]
    # a read that ends inside the next granule keeps it in its batch
    crossing = [(0, chunk), (chunk, 2 * chunk), (3 * chunk, chunk), (4 * chunk, 10)]
    assert list(batches(crossing, 2 * chunk, chunk)) == [crossing[:3], crossing[3:]]
    small = [(index * chunk, 64 << 10) for index in range(40)]  # batches count bytes
    assert list(batches(small, chunk, chunk)) == [small[:16], small[16:32], small[32:]]
