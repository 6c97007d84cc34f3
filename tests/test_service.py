"""The metadata service driven in process: errnos, rename, allocation, open files, checkpoints."""

from __future__ import annotations

import errno
import random
import stat
from collections import Counter

import pytest
import trio
import trio.testing

import coordinator.service as service_mod
from coordinator import allocation, commit, recovery
from coordinator.model import ROOT_INO
from coordinator.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE
from coordinator.service import MetadataService
from csvfs.cluster.errors import MetaError
from csvfs.cluster.events import EventLog, read_events
from csvfs.datapath import DataPath
from csvfs.mkfs import make_volume
from csvfs.quiesce import FileGates
from csvfs.volume.image import Volume

pytestmark = pytest.mark.timeout(60)

K, M = 1 << 10, 1 << 20
UNIT = 64 * K
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
LINK = stat.S_IFLNK | 0o777


class Cluster:
    """One in-process coordinator over an image, which can be 'restarted' from disk."""

    def __init__(self, image):
        self.image = image
        self.volume: Volume | None = None
        self.epoch = 0
        self.open()

    def open(self) -> MetadataService:
        self.epoch += 1
        self.volume = Volume.open(self.image, writable=True)
        self.recovered = recovery.load(self.volume)
        self.service = MetadataService(self.volume, self.recovered, epoch=self.epoch,
                                       events=EventLog(self.volume, "t"))
        return self.service

    def restart(self) -> MetadataService:
        self.close()
        return self.open()

    def close(self) -> None:
        if self.volume is not None:
            self.volume.close()
            self.volume = None

    async def call(self, method: str, session: str = "n1", **args):
        return await self.service.call(session, method, args)

    async def mknod(self, name: bytes, parent: int = ROOT_INO, mode: int = FILE, **extra):
        """The new inode's attributes (without the parent's, which mknod returns too)."""
        attrs = await self.call("mknod", parent=parent, name=name, mode=mode, uid=1000,
                                gid=100, **extra)
        attrs.pop("parent_attrs")
        return attrs

    async def mkdir(self, name: bytes, parent: int = ROOT_INO):
        return await self.mknod(name, parent, DIR)

    async def names(self, ino: int = ROOT_INO) -> dict[bytes, int]:
        return {name: attrs["ino"] for name, attrs in await self.call("readdir", ino=ino)}

    def units(self, ino: int) -> dict[int, int]:
        return dict(self.service.state.inodes[ino].units)

    @property
    def free(self) -> int:
        return self.service.state.allocator.free_count


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "vol.img"
    make_volume(path, 64 * M, UNIT)
    return path


@pytest.fixture
def cluster(image):
    cluster = Cluster(image)
    yield cluster
    cluster.close()


async def _errno(coroutine) -> int:
    with pytest.raises(MetaError) as caught:
        await coroutine
    return caught.value.errno


# -- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method, args", [
    ("extend", {"ino": 2, "offset": 0}),  # missing
    ("extend", {"ino": 2, "offset": 0, "end": 1, "bogus": 1}),  # unknown
    ("extend", {"ino": "2", "offset": 0, "end": 1}),  # str for int
    ("extend", {"ino": True, "offset": 0, "end": 1}),  # bool for int
    ("lookup", {"parent": ROOT_INO, "name": "file"}),  # str for bytes
    ("kill_setid", {"ino": 2, "groups": [1, "x"]}),  # list[int]
    ("setattr", {"ino": 2, "changes": {"mode": "0644"}}),
    ("setattr", {"ino": 2, "changes": {"size": -1}}),
    ("setattr", {"ino": 2, "changes": {"owner": 0}}),
    ("mknod", {"parent": ROOT_INO, "name": b"x", "mode": FILE, "uid": 0, "gid": 0,
               "req": "one"}),
])
async def test_malformed_arguments_are_refused_before_anything_is_written(cluster, method,
                                                                          args):
    file = await cluster.mknod(b"file")
    assert file["ino"] == 2
    before = cluster.service.state.to_image()
    assert await _errno(cluster.call(method, **args)) == errno.EINVAL
    assert cluster.service.state.to_image() == before
    cluster.restart()
    assert cluster.service.state.to_image() == before


async def test_a_type_error_inside_a_handler_is_a_bug_not_bad_input(cluster, monkeypatch):
    async def broken(self, session):
        return len(5)

    monkeypatch.setattr(service_mod.MetadataService, "op_statfs", broken)
    with pytest.raises(TypeError):
        await cluster.call("statfs")


# -- namespace and errnos ----------------------------------------------------------------------


async def test_mknod_lookup_getattr(cluster):
    attrs = await cluster.call("mknod", parent=ROOT_INO, name=b"file", mode=FILE, uid=1000,
                               gid=100)
    parent_attrs = attrs.pop("parent_attrs")
    assert attrs["ino"] > ROOT_INO
    assert stat.S_ISREG(attrs["mode"]) and attrs["nlink"] == 1 and attrs["size"] == 0
    assert (attrs["uid"], attrs["gid"]) == (1000, 100)
    assert await cluster.call("lookup", parent=ROOT_INO, name=b"file") == attrs
    assert await cluster.call("getattr", ino=attrs["ino"]) == attrs
    root = await cluster.call("getattr", ino=ROOT_INO)
    assert root["mtime_ns"] == attrs["ctime_ns"]
    assert parent_attrs == [root]  # the parent as the change left it
    directory = await cluster.mkdir(b"dir")
    assert directory["nlink"] == 2
    assert (await cluster.call("getattr", ino=ROOT_INO))["nlink"] == 3
    assert await cluster.call("lookup", parent=directory["ino"], name=b"..") == \
        await cluster.call("getattr", ino=ROOT_INO)
    assert (await cluster.call("lookup", parent=directory["ino"], name=b"."))["ino"] == \
        directory["ino"]
    assert await cluster.names() == {b"file": attrs["ino"], b"dir": directory["ino"]}
    link = await cluster.mknod(b"sym", mode=LINK, target=b"file")
    assert link["size"] == 4
    assert await cluster.call("readlink", ino=link["ino"]) == b"file"


async def test_namespace_errnos(cluster):
    file = await cluster.mknod(b"f")
    directory = await cluster.mkdir(b"d")
    assert await _errno(cluster.mknod(b"f")) == errno.EEXIST
    assert await _errno(cluster.mkdir(b"d")) == errno.EEXIST
    assert await _errno(cluster.mknod(b"x" * 256)) == errno.ENAMETOOLONG
    await cluster.mknod(b"y" * 255)
    for bad in (b"", b".", b"..", b"a/b"):
        assert await _errno(cluster.mknod(bad)) == errno.EINVAL
    assert await _errno(cluster.mknod(b"g", parent=file["ino"])) == errno.ENOTDIR
    assert await _errno(cluster.mknod(b"g", parent=999)) == errno.ENOENT
    assert await _errno(cluster.call("lookup", parent=ROOT_INO, name=b"nope")) == errno.ENOENT
    assert await _errno(cluster.call("lookup", parent=file["ino"], name=b"x")) == errno.ENOTDIR
    assert await _errno(cluster.call("getattr", ino=999)) == errno.ENOENT
    assert await _errno(cluster.call("readlink", ino=file["ino"])) == errno.EINVAL
    assert await _errno(cluster.call("readdir", ino=file["ino"])) == errno.ENOTDIR
    unlink = cluster.call
    assert await _errno(unlink("unlink", parent=ROOT_INO, name=b"nope", is_dir=False)) == \
        errno.ENOENT
    assert await _errno(unlink("unlink", parent=ROOT_INO, name=b"d", is_dir=False)) == \
        errno.EISDIR
    assert await _errno(unlink("unlink", parent=ROOT_INO, name=b"f", is_dir=True)) == \
        errno.ENOTDIR
    await cluster.mknod(b"inner", parent=directory["ino"])
    assert await _errno(unlink("unlink", parent=ROOT_INO, name=b"d", is_dir=True)) == \
        errno.ENOTEMPTY
    assert await _errno(cluster.call("nosuchop")) == errno.ENOSYS
    assert await _errno(cluster.call("getxattr", ino=file["ino"], name=b"user.a")) == \
        errno.ENODATA
    assert await _errno(cluster.call("removexattr", ino=file["ino"], name=b"user.a")) == \
        errno.ENODATA
    # nothing above changed anything
    assert set(await cluster.names()) == {b"f", b"d", b"y" * 255}


async def test_unlink_and_rmdir(cluster):
    directory = await cluster.mkdir(b"d")
    file = await cluster.mknod(b"f", parent=directory["ino"])
    await cluster.call("unlink", parent=directory["ino"], name=b"f", is_dir=False)
    assert file["ino"] not in cluster.service.state.inodes
    assert await _errno(cluster.call("getattr", ino=file["ino"])) == errno.ENOENT
    await cluster.call("unlink", parent=ROOT_INO, name=b"d", is_dir=True)
    assert await cluster.names() == {}
    assert (await cluster.call("getattr", ino=ROOT_INO))["nlink"] == 2
    assert await _errno(cluster.mknod(b"g", parent=directory["ino"])) == errno.ENOENT


async def test_hard_links(cluster):
    file = await cluster.mknod(b"a")
    directory = await cluster.mkdir(b"d")
    attrs = await cluster.call("link", ino=file["ino"], parent=directory["ino"], name=b"b")
    assert attrs["nlink"] == 2
    assert await _errno(cluster.call("link", ino=directory["ino"], parent=ROOT_INO,
                                     name=b"dd")) == errno.EPERM
    assert await _errno(cluster.call("link", ino=file["ino"], parent=ROOT_INO,
                                     name=b"a")) == errno.EEXIST
    await cluster.call("unlink", parent=ROOT_INO, name=b"a", is_dir=False)
    assert (await cluster.call("getattr", ino=file["ino"]))["nlink"] == 1
    await cluster.call("unlink", parent=directory["ino"], name=b"b", is_dir=False)
    assert file["ino"] not in cluster.service.state.inodes


async def test_xattrs(cluster):
    file = await cluster.mknod(b"f")
    await cluster.call("setxattr", ino=file["ino"], name=b"user.a", value=b"1")
    await cluster.call("setxattr", ino=file["ino"], name=b"user.b", value=b"")
    assert await cluster.call("getxattr", ino=file["ino"], name=b"user.a") == b"1"
    assert sorted(await cluster.call("listxattr", ino=file["ino"])) == [b"user.a", b"user.b"]
    await cluster.call("removexattr", ino=file["ino"], name=b"user.a")
    assert await cluster.call("listxattr", ino=file["ino"]) == [b"user.b"]
    assert await _errno(cluster.call("setxattr", ino=file["ino"], name=b"n" * 256,
                                     value=b"")) == errno.ERANGE
    assert await _errno(cluster.call("setxattr", ino=file["ino"], name=b"user.big",
                                     value=b"v" * (64 * K + 1))) == errno.E2BIG


async def test_setattr(cluster):
    file = await cluster.mknod(b"f", mode=FILE | stat.S_ISUID | stat.S_ISGID | 0o010)
    attrs = await cluster.call("setattr", ino=file["ino"],
                               changes={"atime_ns": 5, "mtime_ns": 6})
    assert (attrs["atime_ns"], attrs["mtime_ns"]) == (5, 6)
    attrs = await cluster.call("setattr", ino=file["ino"], changes={"uid": 7})
    assert attrs["uid"] == 7
    assert not attrs["mode"] & (stat.S_ISUID | stat.S_ISGID)  # dropped on chown
    attrs = await cluster.call("setattr", ino=file["ino"],
                               changes={"mode": stat.S_IFREG | 0o600})
    assert stat.S_IMODE(attrs["mode"]) == 0o600


# -- rename ------------------------------------------------------------------------------------


async def test_rename_plain_and_replace(cluster):
    a = await cluster.mknod(b"a")
    b = await cluster.mknod(b"b")
    await cluster.call("extend", ino=b["ino"], offset=0, end=3 * UNIT)
    free = cluster.free
    b_units = len(cluster.units(b["ino"]))
    await cluster.call("rename", old_parent=ROOT_INO, old_name=b"a", new_parent=ROOT_INO,
                       new_name=b"b")
    assert await cluster.names() == {b"b": a["ino"]}
    assert b["ino"] not in cluster.service.state.inodes
    assert cluster.free == free + b_units  # the replaced file's units came back


async def test_rename_noreplace(cluster):
    a = await cluster.mknod(b"a")
    b = await cluster.mknod(b"b")
    code = await _errno(cluster.call("rename", old_parent=ROOT_INO, old_name=b"a",
                                     new_parent=ROOT_INO, new_name=b"b",
                                     flags=RENAME_NOREPLACE))
    assert code == errno.EEXIST
    assert await cluster.names() == {b"a": a["ino"], b"b": b["ino"]}
    await cluster.call("rename", old_parent=ROOT_INO, old_name=b"a", new_parent=ROOT_INO,
                       new_name=b"c", flags=RENAME_NOREPLACE)
    assert await cluster.names() == {b"c": a["ino"], b"b": b["ino"]}


async def test_rename_exchange(cluster):
    file = await cluster.mknod(b"file")
    d1 = await cluster.mkdir(b"d1")
    d2 = await cluster.mkdir(b"d2", parent=d1["ino"])
    code = await _errno(cluster.call("rename", old_parent=ROOT_INO, old_name=b"file",
                                     new_parent=ROOT_INO, new_name=b"none",
                                     flags=RENAME_EXCHANGE))
    assert code == errno.ENOENT
    # swap a file at the top with a directory one level down
    await cluster.call("rename", old_parent=ROOT_INO, old_name=b"file", new_parent=d1["ino"],
                       new_name=b"d2", flags=RENAME_EXCHANGE)
    assert await cluster.names() == {b"file": d2["ino"], b"d1": d1["ino"]}
    assert await cluster.names(d1["ino"]) == {b"d2": file["ino"]}
    assert (await cluster.call("getattr", ino=ROOT_INO))["nlink"] == 4
    assert (await cluster.call("getattr", ino=d1["ino"]))["nlink"] == 2
    assert (await cluster.call("lookup", parent=d2["ino"], name=b".."))["ino"] == ROOT_INO
    # a directory cannot be exchanged into itself
    inner = await cluster.mknod(b"inner", parent=d2["ino"])
    code = await _errno(cluster.call("rename", old_parent=ROOT_INO, old_name=b"file",
                                     new_parent=d2["ino"], new_name=b"inner",
                                     flags=RENAME_EXCHANGE))
    assert code == errno.EINVAL
    assert await cluster.names(d2["ino"]) == {b"inner": inner["ino"]}


async def test_rename_errnos(cluster):
    file = await cluster.mknod(b"f")
    d = await cluster.mkdir(b"d")
    sub = await cluster.mkdir(b"sub", parent=d["ino"])
    await cluster.mkdir(b"full")
    await cluster.mknod(b"x", parent=(await cluster.names())[b"full"])
    await cluster.mkdir(b"empty")

    async def rename(old_parent, old_name, new_parent, new_name, flags=0):
        return await cluster.call("rename", old_parent=old_parent, old_name=old_name,
                                  new_parent=new_parent, new_name=new_name, flags=flags)

    assert await _errno(rename(ROOT_INO, b"nope", ROOT_INO, b"x")) == errno.ENOENT
    assert await _errno(rename(ROOT_INO, b"d", sub["ino"], b"d")) == errno.EINVAL
    assert await _errno(rename(ROOT_INO, b"d", d["ino"], b"again")) == errno.EINVAL
    assert await _errno(rename(ROOT_INO, b"f", ROOT_INO, b"d")) == errno.EISDIR
    assert await _errno(rename(ROOT_INO, b"d", ROOT_INO, b"f")) == errno.ENOTDIR
    assert await _errno(rename(ROOT_INO, b"d", ROOT_INO, b"full")) == errno.ENOTEMPTY
    assert await _errno(rename(ROOT_INO, b"f", ROOT_INO, b"a/b")) == errno.EINVAL
    assert await _errno(rename(ROOT_INO, b"f", file["ino"], b"g")) == errno.ENOTDIR
    # a directory over an empty directory replaces it
    root_links = (await cluster.call("getattr", ino=ROOT_INO))["nlink"]
    await rename(ROOT_INO, b"d", ROOT_INO, b"empty")
    names = await cluster.names()
    assert names[b"empty"] == d["ino"] and b"d" not in names
    assert (await cluster.call("getattr", ino=ROOT_INO))["nlink"] == root_links - 1
    # moving a directory to another parent moves its '..' link
    await rename(ROOT_INO, b"empty", names[b"full"], b"moved")
    assert (await cluster.call("lookup", parent=d["ino"], name=b".."))["ino"] == names[b"full"]
    assert (await cluster.call("getattr", ino=names[b"full"]))["nlink"] == 3


async def test_rename_onto_another_link_of_itself_does_nothing(cluster):
    file = await cluster.mknod(b"a")
    await cluster.call("link", ino=file["ino"], parent=ROOT_INO, name=b"b")
    seq = cluster.service.journal.next_seq
    await cluster.call("rename", old_parent=ROOT_INO, old_name=b"a", new_parent=ROOT_INO,
                       new_name=b"b")
    assert await cluster.names() == {b"a": file["ino"], b"b": file["ino"]}
    assert cluster.service.journal.next_seq == seq  # no record


# -- allocation -------------------------------------------------------------------------------


async def test_extend_allocates_and_grows(cluster):
    file = await cluster.mknod(b"f")
    free = cluster.free
    reply = await cluster.call("extend", ino=file["ino"], offset=0, end=UNIT + 10)
    assert reply["size"] == UNIT + 10
    units = cluster.units(file["ino"])
    assert {0, 1} <= set(units)
    assert cluster.free == free - len(units)
    assert reply["runs"] == [[0, units[0], len(units)]]  # one contiguous run
    attrs = await cluster.call("getattr", ino=file["ino"])
    assert attrs["size"] == UNIT + 10
    assert attrs["blocks"] == len(units) * UNIT // 512
    # the units exposed read as zeros
    volume = cluster.service.commits.volume
    for unit in units.values():
        assert volume.read(volume.sb.data.offset + unit * UNIT, UNIT) == bytes(UNIT)


def _file_bytes(cluster, ino: int, length: int) -> bytes:
    """The file's first `length` bytes as its map places them on the image."""
    commits = cluster.service.commits
    inode = cluster.service.state.inodes[ino]
    return b"".join(commits.volume.read(commits.position(inode, offset), 1)
                    for offset in range(length))


async def test_append_writes_at_the_end_and_survives_a_restart(cluster):
    file = await cluster.mknod(b"log")
    first = await cluster.call("append", ino=file["ino"], data=b"a" * (UNIT - 3), req=1)
    second = await cluster.call("append", ino=file["ino"], data=b"bcdefg", req=2)
    assert (first["offset"], second["offset"]) == (0, UNIT - 3)
    assert second["size"] == UNIT + 3
    assert _file_bytes(cluster, file["ino"], UNIT + 3) == b"a" * (UNIT - 3) + b"bcdefg"
    cluster.restart()
    assert (await cluster.call("getattr", ino=file["ino"]))["size"] == UNIT + 3
    assert _file_bytes(cluster, file["ino"], UNIT + 3) == b"a" * (UNIT - 3) + b"bcdefg"


async def test_appends_that_take_a_small_file_past_its_first_unit(cluster):
    file = await cluster.mknod(b"log")
    chunks = [bytes([65 + index % 26]) * 1000 for index in range(70)]  # 70,000 bytes
    for index, chunk in enumerate(chunks):
        reply = await cluster.call("append", ino=file["ino"], data=chunk, req=100 + index)
        assert reply["offset"] == index * 1000
    assert not cluster.service.state.inodes[file["ino"]].blocks  # converted on the way
    expected = b"".join(chunks)
    assert _file_bytes(cluster, file["ino"], len(expected)) == expected


async def test_an_append_retried_after_a_failover_is_not_done_twice(cluster):
    file = await cluster.mknod(b"log")
    await cluster.call("append", ino=file["ino"], data=b"once", req=7)
    cluster.restart()  # the node lost the reply and asks the new coordinator again
    reply = await cluster.call("append", ino=file["ino"], data=b"once", req=7)
    assert reply["size"] == 4
    assert _file_bytes(cluster, file["ino"], 4) == b"once"


async def test_extend_inside_the_allocation_changes_nothing(cluster):
    file = await cluster.mknod(b"f")
    await cluster.call("extend", ino=file["ino"], offset=0, end=4 * UNIT)
    units, seq = cluster.units(file["ino"]), cluster.service.journal.next_seq
    reply = await cluster.call("extend", ino=file["ino"], offset=UNIT, end=2 * UNIT)
    assert reply["size"] == 4 * UNIT
    assert cluster.units(file["ino"]) == units
    assert cluster.service.journal.next_seq == seq


async def test_allocate_ahead_for_a_growing_file(cluster):
    file = await cluster.mknod(b"grow")
    other = await cluster.mknod(b"other")
    for index in range(48):  # append one unit at a time, interleaved with another file
        await cluster.call("extend", ino=file["ino"], offset=index * UNIT,
                           end=(index + 1) * UNIT)
        units = cluster.units(file["ino"])
        ahead = len(units) - (index + 1)
        assert ahead >= 1  # always something past EOF
        assert set(units) == set(range(len(units)))  # no holes
        if index % 8 == 0:
            await cluster.call("extend", ino=other["ino"], offset=index * UNIT,
                               end=(index + 1) * UNIT)
    assert (await cluster.call("getattr", ino=file["ino"]))["size"] == 48 * UNIT
    # the window grows with the file: a quarter of what it has
    assert ahead >= 48 // 4
    # the file breaks at most once per allocation of the file growing beside it
    runs = (await cluster.call("open", ino=file["ino"]))["runs"]
    assert len(runs) <= 1 + 48 // 8
    # a write that is not growing the file does not allocate ahead
    hole = await cluster.mknod(b"hole")
    await cluster.call("setattr", ino=hole["ino"], changes={"size": 10 * UNIT})
    await cluster.call("extend", ino=hole["ino"], offset=2 * UNIT, end=3 * UNIT)
    assert set(cluster.units(hole["ino"])) == {2}


async def test_extend_errnos(cluster):
    directory = await cluster.mkdir(b"d")
    link = await cluster.mknod(b"l", mode=LINK, target=b"x")
    assert await _errno(cluster.call("extend", ino=directory["ino"], offset=0, end=1)) == \
        errno.EISDIR
    assert await _errno(cluster.call("extend", ino=link["ino"], offset=0, end=1)) == \
        errno.EINVAL
    assert await _errno(cluster.call("extend", ino=999, offset=0, end=1)) == errno.ENOENT


async def test_no_space(cluster):
    file = await cluster.mknod(b"big")
    total = cluster.service.state.allocator.units
    free = cluster.free
    await cluster.call("extend", ino=file["ino"], offset=0, end=(free - 2) * UNIT)
    # allocate-ahead is best effort; the units asked for are not
    other = await cluster.mknod(b"other")
    await cluster.call("extend", ino=other["ino"], offset=0, end=UNIT)
    code = await _errno(cluster.call("extend", ino=other["ino"], offset=UNIT,
                                     end=(cluster.free + 2) * UNIT))
    assert code == errno.ENOSPC
    statfs = await cluster.call("statfs")
    assert statfs["units"] == total and statfs["free_units"] == cluster.free
    await cluster.call("setattr", ino=file["ino"], changes={"size": 0})
    assert cluster.free > free - 10


async def test_truncate_frees_units(cluster):
    file = await cluster.mknod(b"f")
    free = cluster.free
    await cluster.call("extend", ino=file["ino"], offset=0, end=10 * UNIT)
    assert cluster.free < free - 9
    attrs = await cluster.call("setattr", ino=file["ino"], changes={"size": UNIT + UNIT // 2})
    assert attrs["size"] == UNIT + UNIT // 2
    assert set(cluster.units(file["ino"])) == {0, 1}
    assert cluster.free == free - 2
    attrs = await cluster.call("setattr", ino=file["ino"], changes={"size": 0})
    assert attrs["size"] == 0 and attrs["blocks"] == 0
    assert cluster.units(file["ino"]) == {}
    assert cluster.free == free
    # growing by truncate allocates nothing (a hole)
    attrs = await cluster.call("setattr", ino=file["ino"], changes={"size": 5 * UNIT})
    assert attrs["size"] == 5 * UNIT and cluster.free == free
    assert cluster.service.state.allocator.used_units() == set()


async def test_fallocate_and_punch(cluster):
    file = await cluster.mknod(b"f")
    free = cluster.free
    reply = await cluster.call("fallocate", ino=file["ino"], mode=0, offset=0,
                               length=4 * UNIT)
    assert reply["size"] == 4 * UNIT and cluster.free == free - 4
    reply = await cluster.call("fallocate", ino=file["ino"], mode=allocation.FALLOC_KEEP_SIZE,
                               offset=4 * UNIT, length=2 * UNIT)
    assert reply["size"] == 4 * UNIT and cluster.free == free - 6
    mode = allocation.FALLOC_PUNCH_HOLE | allocation.FALLOC_KEEP_SIZE
    await cluster.call("fallocate", ino=file["ino"], mode=mode, offset=UNIT // 2,
                       length=2 * UNIT)
    assert set(cluster.units(file["ino"])) == {0, 2, 3, 4, 5}  # only unit 1 was whole
    assert cluster.free == free - 5
    assert await _errno(cluster.call("fallocate", ino=file["ino"],
                                     mode=allocation.FALLOC_PUNCH_HOLE, offset=0,
                                     length=1)) == errno.EOPNOTSUPP
    assert await _errno(cluster.call("fallocate", ino=file["ino"], mode=0, offset=0,
                                     length=0)) == errno.EINVAL


# -- open files -------------------------------------------------------------------------------


async def test_unlink_of_an_open_file_keeps_it_until_release(cluster):
    file = await cluster.mknod(b"f")
    ino = file["ino"]
    free = cluster.free
    await cluster.call("extend", ino=ino, offset=0, end=3 * UNIT)
    used = free - cluster.free
    assert used >= 3
    opened = await cluster.call("open", ino=ino)
    assert opened["size"] == 3 * UNIT and opened["attrs"]["ino"] == ino
    await cluster.call("open", ino=ino, session="n2")
    await cluster.call("unlink", parent=ROOT_INO, name=b"f", is_dir=False)
    assert await _errno(cluster.call("lookup", parent=ROOT_INO, name=b"f")) == errno.ENOENT
    attrs = await cluster.call("getattr", ino=ino)
    assert attrs["nlink"] == 0 and attrs["size"] == 3 * UNIT
    assert cluster.free == free - used
    assert cluster.service.state.orphans() == [ino]
    assert cluster.service.open_table() == {ino: {"n1": 1, "n2": 1}}
    # still usable by whoever holds it open
    await cluster.call("extend", ino=ino, offset=3 * UNIT, end=4 * UNIT)
    await cluster.call("release", ino=ino)
    assert ino in cluster.service.state.inodes
    await cluster.call("release", ino=ino, session="n2")
    assert ino not in cluster.service.state.inodes
    assert cluster.free == free
    assert cluster.service.open_table() == {}
    await cluster.call("release", ino=ino, session="n2")  # a stray release is harmless
    cluster.restart()
    assert ino not in cluster.service.state.inodes and cluster.free == free


async def test_release_of_a_linked_file_keeps_it(cluster):
    file = await cluster.mknod(b"f")
    await cluster.call("open", ino=file["ino"])
    await cluster.call("open", ino=file["ino"])
    await cluster.call("release", ino=file["ino"])
    assert cluster.service.open_table() == {file["ino"]: {"n1": 1}}
    await cluster.call("release", ino=file["ino"])
    assert file["ino"] in cluster.service.state.inodes


async def test_rename_over_an_open_file_keeps_it_until_release(cluster):
    await cluster.mknod(b"a")
    target = await cluster.mknod(b"b")
    await cluster.call("extend", ino=target["ino"], offset=0, end=UNIT)
    free = cluster.free
    await cluster.call("open", ino=target["ino"])
    await cluster.call("rename", old_parent=ROOT_INO, old_name=b"a", new_parent=ROOT_INO,
                       new_name=b"b")
    assert target["ino"] in cluster.service.state.inodes
    assert cluster.free == free
    await cluster.call("release", ino=target["ino"])
    assert target["ino"] not in cluster.service.state.inodes
    assert cluster.free > free


async def test_orphan_left_by_a_crash_is_reclaimed_at_start(cluster):
    file = await cluster.mknod(b"f")
    free = cluster.free
    await cluster.call("extend", ino=file["ino"], offset=0, end=2 * UNIT)
    await cluster.call("open", ino=file["ino"])
    await cluster.call("unlink", parent=ROOT_INO, name=b"f", is_dir=False)
    cluster.restart()  # the node that had it open is gone
    assert cluster.service.state.orphans() == [file["ino"]]
    await cluster.service.start()
    assert cluster.service.state.orphans() == []
    assert cluster.free == free
    assert any(event["kind"] == "reclaim" for event in read_events(cluster.volume))
    cluster.restart()
    assert file["ino"] not in cluster.service.state.inodes


# -- checkpoints and reload -------------------------------------------------------------------


async def _every_kind_of_op(cluster: Cluster) -> None:
    d = await cluster.mkdir(b"d")
    f = await cluster.mknod(b"f", parent=d["ino"])
    await cluster.mknod(b"sym", mode=LINK, target=b"d/f")
    await cluster.mknod(b"fifo", mode=stat.S_IFIFO | 0o600)
    await cluster.mknod(b"dev", mode=stat.S_IFCHR | 0o600, rdev=0x0103)
    await cluster.call("link", ino=f["ino"], parent=ROOT_INO, name=b"hard")
    await cluster.call("extend", ino=f["ino"], offset=0, end=5 * UNIT)
    await cluster.call("setattr", ino=f["ino"], changes={"size": 2 * UNIT + 1})
    await cluster.call("setattr", ino=f["ino"], changes={"mode": FILE | 0o600, "mtime_ns": 77})
    await cluster.call("setxattr", ino=f["ino"], name=b"user.k", value=b"v")
    await cluster.call("setxattr", ino=d["ino"], name=b"user.gone", value=b"v")
    await cluster.call("removexattr", ino=d["ino"], name=b"user.gone")
    await cluster.call("fallocate", ino=f["ino"], mode=0, offset=4 * UNIT, length=UNIT)
    mode = allocation.FALLOC_PUNCH_HOLE | allocation.FALLOC_KEEP_SIZE
    await cluster.call("fallocate", ino=f["ino"], mode=mode, offset=0, length=UNIT)
    e = await cluster.mkdir(b"e")
    await cluster.call("rename", old_parent=ROOT_INO, old_name=b"hard", new_parent=e["ino"],
                       new_name=b"moved")
    await cluster.call("rename", old_parent=ROOT_INO, old_name=b"e", new_parent=d["ino"],
                       new_name=b"e2")
    await cluster.call("rename", old_parent=ROOT_INO, old_name=b"fifo", new_parent=ROOT_INO,
                       new_name=b"dev", flags=RENAME_EXCHANGE)
    await cluster.mknod(b"tmp")
    await cluster.call("unlink", parent=ROOT_INO, name=b"tmp", is_dir=False)
    g = await cluster.mknod(b"open-unlinked")
    await cluster.call("extend", ino=g["ino"], offset=0, end=UNIT)
    await cluster.call("open", ino=g["ino"])
    await cluster.call("unlink", parent=ROOT_INO, name=b"open-unlinked", is_dir=False)


async def test_every_op_survives_checkpoint_and_reload(cluster):
    await _every_kind_of_op(cluster)
    expected = cluster.service.state.to_image()
    used = cluster.service.state.allocator.used_units()
    cluster.restart()  # journal only, on top of mkfs's root-only checkpoint
    checkpoint = cluster.recovered.checkpoint
    assert (checkpoint.slot, checkpoint.seq, checkpoint.epoch) == (0, 0, 0)
    records = cluster.recovered.replay.records
    assert records and [record.seq for record in records] == list(range(1, len(records) + 1))
    assert cluster.service.state.to_image() == expected
    await cluster.service.checkpoint_now()
    cluster.restart()  # checkpoint only
    checkpoint = cluster.recovered.checkpoint
    assert (checkpoint.slot, checkpoint.seq, checkpoint.epoch) == (1, len(records), 2)
    assert cluster.recovered.replay.records == []
    assert cluster.service.state.to_image() == expected
    assert cluster.service.state.allocator.used_units() == used
    await cluster.mknod(b"after")
    expected = cluster.service.state.to_image()
    cluster.restart()  # checkpoint plus journal
    assert len(cluster.recovered.replay.records) == 1
    assert cluster.service.state.to_image() == expected
    assert cluster.recovered.last_epoch == 3


async def test_checkpoint_when_the_journal_fills(cluster):
    """Records near 60 KiB fill the 4 MiB journal after ~70: only checkpoints keep it going."""
    file = await cluster.mknod(b"f")
    journal = cluster.service.journal
    total = 0
    for index in range(150):
        value = bytes([index % 256]) * (60 * K)
        await cluster.call("setxattr", ino=file["ino"], name=b"user.%d" % (index % 3),
                           value=value)
        total += 60 * K
        assert journal.used_fraction <= commit.CHECKPOINT_AT + 0.02
    assert total > 2 * journal.region.length
    assert cluster.service.commits.checkpoint_slot in (0, 1)
    expected = cluster.service.state.to_image()
    cluster.restart()
    assert cluster.recovered.checkpoint.epoch == 1  # one of the service's, not mkfs's
    assert cluster.recovered.replay.corrupt is None
    assert cluster.service.state.to_image() == expected
    xattr = await cluster.call("getxattr", ino=file["ino"], name=b"user.2")
    assert xattr == bytes([149]) * (60 * K)


async def test_checkpoints_alternate_with_many_small_ops(cluster, monkeypatch):
    monkeypatch.setattr(commit, "CHECKPOINT_AT", 0.01)  # ~80 records of 512 bytes
    written = []
    real = recovery.checkpoint_blob

    def spy(volume, slot, epoch, seq, state, gen):
        written.append((slot, seq))
        return real(volume, slot, epoch, seq, state, gen)

    monkeypatch.setattr(recovery, "checkpoint_blob", spy)
    directory = await cluster.mkdir(b"d")
    for index in range(400):
        await cluster.mknod(b"%04d" % index, parent=directory["ino"])
        if index % 2:
            await cluster.call("unlink", parent=directory["ino"], name=b"%04d" % (index - 1),
                               is_dir=False)
    assert len(written) >= 5
    # mkfs wrote A, so the service starts with B
    assert [slot for slot, _ in written] == [1 - index % 2 for index in range(len(written))]
    assert [seq for _, seq in written] == sorted(seq for _, seq in written)
    expected = cluster.service.state.to_image()
    cluster.restart()
    assert cluster.recovered.checkpoint.seq == written[-1][1]
    assert cluster.service.state.to_image() == expected
    assert len(await cluster.names(directory["ino"])) == 200


async def test_readers_wait_for_durability(cluster):
    """Nothing is visible before its record is durable: lookups wait for pending records."""
    await cluster.mknod(b"first")
    journal = cluster.service.journal
    gate = trio.Event()
    real_flush = journal._flush

    async def slow_flush():
        await gate.wait()
        await real_flush()

    journal._flush = slow_flush
    seen = {}

    async def create():
        seen["create"] = await cluster.mknod(b"second")

    async def look():
        seen["lookup"] = await cluster.call("lookup", parent=ROOT_INO, name=b"second")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(create)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(look)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == {}  # the record is applied but not durable yet
        gate.set()
    assert seen["create"] == seen["lookup"]


async def test_concurrent_requests_commit_together(cluster):
    async def create(index: int) -> None:
        await cluster.mknod(b"f%03d" % index)

    async with trio.open_nursery() as nursery:
        for index in range(100):
            nursery.start_soon(create, index)
    assert len(await cluster.names()) == 100
    records = recovery.journal.scan(cluster.volume, 0, 0).records
    assert len(records) == 100
    assert len({record.batch_first for record in records}) < 100
    expected = cluster.service.state.to_image()
    cluster.restart()
    assert cluster.service.state.to_image() == expected


async def test_concurrent_requests_across_the_checkpoint_threshold(cluster, monkeypatch):
    monkeypatch.setattr(commit, "CHECKPOINT_AT", 0.01)

    async def create(index: int) -> None:
        await cluster.mknod(b"f%03d" % index)

    async with trio.open_nursery() as nursery:
        for index in range(200):
            nursery.start_soon(create, index)
    assert len(await cluster.names()) == 200
    expected = cluster.service.state.to_image()
    cluster.restart()
    assert cluster.recovered.checkpoint.epoch == 1  # one of the service's, not mkfs's
    assert cluster.service.state.to_image() == expected


# -- random operations against the invariants ----------------------------------------------


def _check_invariants(service: MetadataService) -> None:
    state = service.state
    names, subdirs, owners = Counter(), Counter(), {}
    for directory, entries in state.entries.items():
        assert directory in state.inodes
        for child in entries.values():
            assert child in state.inodes
            names[child] += 1
            if state.inodes[child].is_dir:
                subdirs[directory] += 1
                assert state.parents[child] == directory
    assert set(state.parents) == set(state.entries)
    for directory in state.entries:  # every directory reaches the root, without a cycle
        seen, cursor = set(), directory
        while cursor != ROOT_INO:
            assert cursor not in seen
            seen.add(cursor)
            cursor = state.parents[cursor]
    for ino, inode in state.inodes.items():
        if inode.nlink == 0:
            assert names[ino] == 0 and service.holders.counts.get(ino)  # orphans are open
        else:
            assert inode.nlink == (2 + subdirs[ino] if inode.is_dir else names[ino])
        for unit in inode.units.values():
            assert unit not in owners
            owners[unit] = ino
    assert state.allocator.used_units() == set(owners)


class StoppedNode:
    """A session that never pauses: a node stopped with SIGSTOP, say."""

    in_process = False

    def __init__(self, name: str, grant_left: float):
        self.name = name
        self.grant_left = grant_left
        self.evicted_because: str | None = None
        self.maps: list = []

    async def pause(self, ino: int) -> None:
        await trio.sleep_forever()

    async def take_map(self, ino, reply, resume, forget, wait) -> None:
        self.maps.append((ino, reply["size"]))

    def resume(self, ino: int) -> None:
        pass

    async def invalidate(self, stale: dict, wait: bool) -> None:
        pass

    def evict(self, reason: str) -> float:
        self.evicted_because = reason
        return trio.current_time() + self.grant_left


async def test_a_stuck_quiesce_stalls_only_its_inode(cluster):
    """A node that will not pause holds up the change to its file, and nothing else:
    other files' metadata goes on, and an open of that file waits for the new map."""
    service = cluster.service
    service.sessions.pause_timeout = 0.4
    stuck, other = await cluster.mknod(b"stuck"), await cluster.mknod(b"other")
    await cluster.call("extend", ino=stuck["ino"], offset=0, end=3 * UNIT)
    node = StoppedNode("n9", grant_left=0.4)
    await service.join(node, [[stuck["ino"], 1]])
    times = {}

    async def truncate():
        started = trio.current_time()
        await cluster.call("setattr", ino=stuck["ino"], changes={"size": 0})
        times["truncate"] = trio.current_time() - started

    async with trio.open_nursery() as nursery:
        nursery.start_soon(truncate)
        await trio.sleep(0.1)  # the quiesce is waiting for n9 now
        started = trio.current_time()
        for step in range(1, 5):
            await cluster.call("extend", ino=other["ino"], offset=0, end=step * UNIT)
        await cluster.mknod(b"meanwhile")
        times["others"] = trio.current_time() - started
        opened = await cluster.call("open", ino=stuck["ino"])  # waits for the quiesce
        times["open"] = trio.current_time() - started
    assert times["others"] < 0.2, times  # not held up by the stuck quiesce
    assert times["truncate"] >= 0.75, times  # the pause timeout, then the rest of the grant
    assert times["open"] >= 0.6 and opened["size"] == 0 and opened["runs"] == []
    assert "did not acknowledge pause" in node.evicted_because
    assert node.maps == []  # an evicted node hears nothing more; it rejoins for its maps


def own_node(cluster, forget_in_kernel) -> FileGates:
    """The coordinator's own node, as its service sees it: in process."""
    volume = cluster.volume
    return FileGates("own", DataPath(volume.fd, volume.sb.data.offset, UNIT, None),
                     forget_in_kernel)


async def test_the_coordinators_own_node_is_waited_for_and_never_evicted(cluster):
    """Its kernel may take long to drop a name (a request of its own holds the
    directory); evicting it would leave the coordinator without its own session."""
    service = cluster.service
    service.sessions.pause_timeout = 0.2
    forgotten = []

    async def slow_forget(stale):
        await trio.sleep(0.5)
        forgotten.append(stale["entries"])

    own = own_node(cluster, slow_forget)
    await service.join(own, [])
    await cluster.mkdir(b"d")
    await cluster.call("unlink", "n1", parent=ROOT_INO, name=b"d", is_dir=True)
    assert [[ROOT_INO, b"d"]] in forgotten
    assert "own" in service.sessions


async def test_the_coordinators_own_node_is_not_evicted_when_it_fails(cluster, caplog):
    service = cluster.service
    async def failing_forget(stale):
        if stale["entries"]:  # a name to drop: the invalidation the service waits for
            raise RuntimeError("injected")

    own = own_node(cluster, failing_forget)
    await service.join(own, [])
    await cluster.mkdir(b"d")
    await cluster.call("unlink", "n1", parent=ROOT_INO, name=b"d", is_dir=True)
    assert "own" in service.sessions
    assert "not evicting this node's own session (own)" in caplog.text


@pytest.mark.parametrize("seed", range(4))
async def test_random_operations_keep_the_invariants(cluster, seed):
    rng = random.Random(seed)
    pick_name = [b"a", b"b", b"c", b"d"]
    service = cluster.service
    for _ in range(250):
        state = service.state
        dirs = [ino for ino in state.entries]
        files = [ino for ino, inode in state.inodes.items() if inode.is_reg]
        parent, name = rng.choice(dirs), rng.choice(pick_name)
        kind = rng.choice(["mknod", "mkdir", "unlink", "rmdir", "rename", "link", "extend",
                           "truncate", "open", "release", "fallocate", "punch", "checkpoint"])
        session = rng.choice(["n1", "n2"])
        ino = rng.choice(files) if files else None
        offset = rng.randrange(0, 20 * UNIT)
        try:
            if kind in ("mknod", "mkdir"):
                await cluster.mknod(name, parent, DIR if kind == "mkdir" else FILE)
            elif kind in ("unlink", "rmdir"):
                await cluster.call("unlink", session, parent=parent, name=name,
                                   is_dir=kind == "rmdir")
            elif kind == "rename":
                await cluster.call("rename", session, old_parent=parent, old_name=name,
                                   new_parent=rng.choice(dirs), new_name=rng.choice(pick_name),
                                   flags=rng.choice([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
            elif kind == "checkpoint":
                await service.checkpoint_now()
            elif kind == "release" and service.holders.counts:
                await cluster.call("release", session, ino=rng.choice(list(service.holders.counts)))
            elif ino is None:
                continue
            elif kind == "link":
                await cluster.call("link", session, ino=ino, parent=parent, name=name)
            elif kind == "extend":
                await cluster.call("extend", session, ino=ino, offset=offset,
                                   end=offset + rng.randrange(1, 4 * UNIT))
            elif kind == "truncate":
                await cluster.call("setattr", session, ino=ino, changes={"size": offset})
            elif kind == "open":
                await cluster.call("open", session, ino=ino)
            elif kind in ("fallocate", "punch"):
                mode = rng.choice([0, allocation.FALLOC_KEEP_SIZE,
                                   allocation.FALLOC_ZERO_RANGE])
                if kind == "punch":
                    mode = allocation.FALLOC_KEEP_SIZE | allocation.FALLOC_PUNCH_HOLE
                await cluster.call("fallocate", session, ino=ino, mode=mode, offset=offset,
                                   length=rng.randrange(1, 3 * UNIT))
        except MetaError:
            pass
        _check_invariants(service)
    expected = service.state.to_image()
    cluster.restart()
    assert cluster.recovered.replay.corrupt is None
    assert cluster.service.state.to_image() == expected


async def test_a_file_closed_while_its_node_was_cut_off_is_reclaimed_when_it_rejoins(cluster):
    """The node's release never reached us; its registration no longer lists the file,
    and nobody else has it open, so its space goes back at once."""
    service = cluster.service
    gone, kept = await cluster.mknod(b"gone"), await cluster.mknod(b"kept")
    await cluster.call("extend", ino=gone["ino"], offset=0, end=2 * UNIT)
    node = StoppedNode("n9", grant_left=0)
    await service.join(node, [[gone["ino"], 1], [kept["ino"], 1]])
    await cluster.call("unlink", parent=ROOT_INO, name=b"gone", is_dir=False)
    assert gone["ino"] in service.state.inodes  # still open on n9
    maps = await service.join(node, [[kept["ino"], 1]])  # closed it while cut off
    assert [ino for ino, _ in maps] == [kept["ino"]]
    assert gone["ino"] not in service.state.inodes
    assert kept["ino"] in service.state.inodes


async def test_a_failing_journal_makes_the_coordinator_step_down(cluster, monkeypatch):
    """Not EIO to the nodes: they retry with the next coordinator."""

    from csvfs.cluster.errors import NotCoordinator

    fenced = []
    cluster.service.commits._on_fenced = lambda: fenced.append(True)

    volume = cluster.service.commits.volume

    def failing(offset, data):  # the record reaches the image, but its sync fails
        volume.write(offset, data)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(volume, "write_durable", failing)
    with pytest.raises(NotCoordinator, match="stepped down"):
        await cluster.mknod(b"lost")
    assert cluster.service.fenced and fenced == [True]
    monkeypatch.undo()
    with pytest.raises(NotCoordinator):  # and takes no request any more
        await cluster.call("statfs")
    cluster.restart()  # the next coordinator serves again
    # The record reached the image before its sync failed, so it is replayed; a
    # node's retry of that mknod gets the first answer (ONCE_ONLY in coordinator/service.py).
    assert (await cluster.call("lookup", parent=ROOT_INO, name=b"lost"))["ino"] > ROOT_INO
