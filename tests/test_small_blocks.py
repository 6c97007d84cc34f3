"""Small files in process: the block allocator, block maps, conversion to units, replay."""

from __future__ import annotations

import random

import pytest

from coordinator.allocator import Allocator, NoSpace
from coordinator.model import Inode
from csvfs.fsck import Report, _check_space
from csvfs.mkfs import make_volume
from csvfs.volume.extents import BLOCK
from tests.test_service import UNIT, Cluster

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def cluster(tmp_path):
    path = tmp_path / "vol.img"
    make_volume(path, 64 << 20, UNIT)
    cluster = Cluster(path)
    yield cluster
    cluster.close()

PER = UNIT // BLOCK  # 16 blocks per 64 KiB unit


# -- the allocator -------------------------------------------------------------------------


def _take_blocks(allocator: Allocator, count: int, near: int | None = None) -> list[int]:
    chosen = allocator.find_blocks(count, near)
    for block in chosen:
        allocator.mark_block_used(block)
    return chosen


def test_blocks_pack_into_one_unit_and_give_it_back():
    allocator = Allocator(8, 16)
    assert allocator.free_blocks == 8 * 16
    first = _take_blocks(allocator, 3)
    second = _take_blocks(allocator, 2)
    assert first == [0, 1, 2] and second == [3, 4]  # next-fit: files made in turn pack
    assert allocator.is_block_unit(0) and allocator.used_count == 1
    assert allocator.free_blocks == 8 * 16 - 5
    assert allocator.used_units() == set() and allocator.block_unit_set() == {0}
    with pytest.raises(ValueError, match="split into blocks"):
        allocator.mark_used(0)
    with pytest.raises(ValueError, match="already in use"):
        allocator.mark_block_used(1)
    assert allocator.find(1) == [1]  # units skip block units
    for block in first + second:
        allocator.mark_block_free(block)
    assert not allocator.is_used(0) and allocator.used_count == 0
    assert allocator.free_blocks == 8 * 16 and allocator.block_unit_set() == set()
    with pytest.raises(ValueError, match="already free"):
        allocator.mark_block_free(0)


def test_blocks_never_land_in_a_unit_used_whole():
    allocator = Allocator(4, 16)
    allocator.mark_used(0)
    assert _take_blocks(allocator, 2) == [16, 17]
    with pytest.raises(ValueError, match="in use whole"):
        allocator.mark_block_used(3)
    with pytest.raises(ValueError, match="split into blocks"):
        allocator.mark_free(1)


def test_a_file_grows_contiguously_and_gaps_are_reused():
    allocator = Allocator(4, 16)
    file_a = _take_blocks(allocator, 2)
    file_b = _take_blocks(allocator, 2)
    assert _take_blocks(allocator, 2, near=file_a[-1] + 1) == [4, 5]  # b is in the way
    for block in file_b:
        allocator.mark_block_free(block)
    assert _take_blocks(allocator, 3) == [6, 7, 8]  # on from where the last one ended
    # at the end of the block unit, the gaps inside it come before a new unit
    assert _take_blocks(allocator, 9) == [9, 10, 11, 12, 13, 14, 15, 2, 3]
    assert allocator.used_count == 1


def test_blocks_spill_into_free_units_and_run_out():
    allocator = Allocator(2, 16)
    chosen = _take_blocks(allocator, 20)
    assert sorted(chosen) == list(range(20))
    assert allocator.used_count == 2 and allocator.free_blocks == 12
    with pytest.raises(NoSpace):
        allocator.find_blocks(13)
    with pytest.raises(NoSpace):
        allocator.find(1)


def test_random_blocks_and_units_agree_with_a_model():
    rng = random.Random(7)
    allocator = Allocator(16, 16)
    blocks: set[int] = set()
    units: set[int] = set()
    for _ in range(2000):
        if rng.random() < 0.5 and allocator.free_blocks:
            for block in _take_blocks(allocator, rng.randint(1, min(5, allocator.free_blocks))):
                assert block not in blocks and block // 16 not in units
                blocks.add(block)
        elif rng.random() < 0.2 and allocator.free_count:
            unit = allocator.find(1)[0]
            allocator.mark_used(unit)
            assert not any(block // 16 == unit for block in blocks)
            units.add(unit)
        elif blocks and rng.random() < 0.8:
            block = rng.choice(sorted(blocks))
            allocator.mark_block_free(block)
            blocks.discard(block)
        elif units:
            unit = units.pop()
            allocator.mark_free(unit)
        assert allocator.used_blocks() == blocks and allocator.used_units() == units
        split = {block // 16 for block in blocks}
        assert allocator.block_unit_set() == split
        assert allocator.free_blocks == (16 - len(units) - len(split)) * 16 + \
            len(split) * 16 - len(blocks)


def test_old_inode_rows_load_as_unit_mapped():
    inode = Inode(5, 0o100644, 0, 0, 1, 1, 2, 3, size=10, units={0: 7}, blocks=True)
    row = inode.to_list()
    assert Inode.from_list(row) == inode
    unit_mapped = Inode(5, 0o100644, 0, 0, 1, 1, 2, 3, size=10, units={0: 7})
    assert unit_mapped.to_list() == row[:-1]  # as rows were before block maps
    assert Inode.from_list(row[:-1]) == unit_mapped


# -- the service ---------------------------------------------------------------------------


def _inode(cluster: Cluster, ino: int) -> Inode:
    return cluster.service.state.inodes[ino]


def _write(cluster: Cluster, ino: int, offset: int, data: bytes) -> None:
    """Write as a node would, through the file's map (byte by byte position lookup)."""
    commits = cluster.service.commits
    inode = _inode(cluster, ino)
    granule = inode.granule(commits.unit)
    while data:
        step = min(len(data), granule - offset % granule)
        position = commits.position(inode, offset)
        assert position is not None
        commits.volume.write(position, data[:step])
        offset, data = offset + step, data[step:]


def _read(cluster: Cluster, ino: int, offset: int, length: int) -> bytes:
    commits = cluster.service.commits
    inode = _inode(cluster, ino)
    granule = inode.granule(commits.unit)
    out = b""
    while length:
        step = min(length, granule - offset % granule)
        position = commits.position(inode, offset)
        out += bytes(step) if position is None else commits.volume.read(position, step)
        offset, length = offset + step, length - step
    return out


def _fsck_problems(cluster: Cluster) -> list[str]:
    report = Report()
    _check_space(cluster.service.state, report)
    return report.problems


async def test_small_files_take_blocks_and_share_a_unit(cluster):
    free = cluster.free
    files = []
    for index, size in enumerate([1, 100, BLOCK, BLOCK + 1, 3 * BLOCK]):
        ino = (await cluster.mknod(f"f{index}".encode()))["ino"]
        reply = await cluster.call("extend", ino=ino, offset=0, end=size)
        assert reply["granule"] == BLOCK and reply["size"] == size
        inode = _inode(cluster, ino)
        assert inode.blocks and len(inode.units) == -(-size // BLOCK)
        attrs = await cluster.call("getattr", ino=ino)
        assert attrs["blocks"] == len(inode.units) * BLOCK // 512
        files.append(ino)
    # 1 + 1 + 1 + 2 + 3 = 8 blocks: half of one 64 KiB unit
    assert cluster.free == free - 1
    info = await cluster.call("statfs")
    assert info["block_size"] == BLOCK
    assert info["free_blocks"] == info["free_units"] * PER + PER - 8
    assert _fsck_problems(cluster) == []
    for ino in files:
        await cluster.call("unlink", parent=1, name=f"f{files.index(ino)}".encode(),
                           is_dir=False)
    assert cluster.free == free
    assert cluster.service.state.allocator.block_unit_set() == set()


async def test_a_file_of_a_whole_unit_is_unit_mapped_from_the_start(cluster):
    for name, end in ((b"one", UNIT), (b"more", UNIT + 1)):
        ino = (await cluster.mknod(name))["ino"]
        reply = await cluster.call("extend", ino=ino, offset=0, end=end)
        assert reply["granule"] == UNIT and not _inode(cluster, ino).blocks


async def test_conversion_copies_the_data_and_frees_the_blocks(cluster):
    other = (await cluster.mknod(b"neighbour"))["ino"]
    await cluster.call("extend", ino=other, offset=0, end=2 * BLOCK)
    ino = (await cluster.mknod(b"grows"))["ino"]
    data = random.Random(1).randbytes(3 * BLOCK + 100)
    await cluster.call("extend", ino=ino, offset=0, end=len(data))
    _write(cluster, ino, 0, data)
    _write(cluster, other, 0, b"n" * 2 * BLOCK)
    used_before = cluster.service.state.allocator.used_blocks()
    reply = await cluster.call("extend", ino=ino, offset=UNIT, end=UNIT + 10)
    inode = _inode(cluster, ino)
    assert reply["granule"] == UNIT and not inode.blocks and 0 in inode.units
    assert reply["size"] == UNIT + 10
    assert _read(cluster, ino, 0, len(data)) == data
    assert _read(cluster, ino, len(data), UNIT + 10 - len(data)) == bytes(UNIT + 10 - len(data))
    assert _read(cluster, other, 0, 2 * BLOCK) == b"n" * 2 * BLOCK
    assert cluster.service.state.allocator.used_blocks() == used_before - {
        block for block in used_before if block not in _inode(cluster, other).units.values()}
    assert _fsck_problems(cluster) == []
    # shrinking again keeps units; the record kinds replay to the same state
    await cluster.call("setattr", ino=ino, changes={"size": 10})
    assert not _inode(cluster, ino).blocks and len(_inode(cluster, ino).units) == 1
    expected = cluster.service.state.to_image()
    blocks = cluster.service.state.allocator.used_blocks()
    units = cluster.service.state.allocator.used_units()
    cluster.restart()  # replays bmap, convert and map records
    assert cluster.service.state.to_image() == expected
    assert cluster.service.state.allocator.used_blocks() == blocks
    assert cluster.service.state.allocator.used_units() == units
    assert _read(cluster, ino, 0, 10) == data[:10]
    await cluster.service.checkpoint_now()
    cluster.restart()  # from the checkpoint's rows
    assert cluster.service.state.to_image() == expected
    assert cluster.service.state.allocator.used_blocks() == blocks


async def test_fallocate_past_one_unit_converts_too(cluster):
    ino = (await cluster.mknod(b"f"))["ino"]
    await cluster.call("extend", ino=ino, offset=0, end=5000)
    _write(cluster, ino, 0, b"x" * 5000)
    reply = await cluster.call("fallocate", ino=ino, mode=1, offset=0, length=3 * UNIT)
    assert reply["granule"] == UNIT and reply["size"] == 5000
    assert sorted(_inode(cluster, ino).units) == [0, 1, 2]
    assert _read(cluster, ino, 0, 5000) == b"x" * 5000


async def test_shrink_punch_and_regrow_in_blocks(cluster):
    ino = (await cluster.mknod(b"f"))["ino"]
    await cluster.call("extend", ino=ino, offset=0, end=8 * BLOCK)
    _write(cluster, ino, 0, b"a" * 8 * BLOCK)
    await cluster.call("fallocate", ino=ino, mode=3, offset=BLOCK + 10, length=3 * BLOCK)
    assert sorted(_inode(cluster, ino).units) == [0, 1, 4, 5, 6, 7]  # blocks 2, 3 freed
    assert _read(cluster, ino, BLOCK, 2 * BLOCK) == b"a" * 10 + bytes(2 * BLOCK - 10)
    assert _read(cluster, ino, 4 * BLOCK, 20) == bytes(10) + b"a" * 10
    await cluster.call("setattr", ino=ino, changes={"size": BLOCK + 5})
    assert sorted(_inode(cluster, ino).units) == [0, 1]
    await cluster.call("extend", ino=ino, offset=BLOCK + 5, end=3 * BLOCK)
    assert _inode(cluster, ino).blocks
    assert _read(cluster, ino, BLOCK, 2 * BLOCK) == b"a" * 5 + bytes(2 * BLOCK - 5)
    # truncate up far past one unit keeps blocks (nothing allocated), and reads holes
    await cluster.call("setattr", ino=ino, changes={"size": 10 * UNIT})
    assert _inode(cluster, ino).blocks
    assert _fsck_problems(cluster) == []


async def test_fsck_reports_a_block_mapped_twice(cluster):
    first = (await cluster.mknod(b"a"))["ino"]
    second = (await cluster.mknod(b"b"))["ino"]
    await cluster.call("extend", ino=first, offset=0, end=100)
    await cluster.call("extend", ino=second, offset=0, end=100)
    _inode(cluster, second).units[0] = _inode(cluster, first).units[0]
    problems = _fsck_problems(cluster)
    assert any("is mapped by inodes" in problem for problem in problems)


def _block_bytes(cluster, ino: int) -> bytes:
    commits = cluster.service.commits
    inode = _inode(cluster, ino)
    return b"".join(commits.volume.read(commits.position(inode, index * BLOCK), BLOCK)
                    for index in sorted(inode.units))


async def test_new_blocks_read_as_zeros_fresh_or_reused(cluster):
    """A unit split into blocks is cleared once and its blocks skip zeroing until first
    handed out; a block freed and handed out again is zeroed on its own."""
    volume = cluster.service.commits.volume
    data = volume.sb.data
    volume.write(data.offset, b"\xff" * (8 * UNIT))  # old garbage in the first units
    first = (await cluster.mknod(b"first"))["ino"]
    await cluster.call("extend", ino=first, offset=0, end=3 * BLOCK)
    second = (await cluster.mknod(b"second"))["ino"]
    for end in range(BLOCK, 5 * BLOCK + 1, BLOCK):  # one block at a time: clean ones
        await cluster.call("extend", ino=second, offset=end - BLOCK, end=end)
    assert _block_bytes(cluster, first) == bytes(3 * BLOCK)
    assert _block_bytes(cluster, second) == bytes(5 * BLOCK)
    filler = (await cluster.mknod(b"filler"))["ino"]  # the rest of the first block unit
    await cluster.call("extend", ino=filler, offset=0, end=(PER - 8) * BLOCK)
    commits = cluster.service.commits
    old_blocks = set(_inode(cluster, first).units.values())
    for index in _inode(cluster, first).units:  # the first file writes, then goes
        volume.write(commits.position(_inode(cluster, first), index * BLOCK), b"\xee" * BLOCK)
    await cluster.call("unlink", parent=1, name=b"first", is_dir=False)
    third = (await cluster.mknod(b"third"))["ino"]
    await cluster.call("extend", ino=third, offset=0, end=3 * BLOCK)
    assert set(_inode(cluster, third).units.values()) == old_blocks  # the gaps are reused
    assert _block_bytes(cluster, third) == bytes(3 * BLOCK)
