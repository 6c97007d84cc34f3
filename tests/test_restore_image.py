"""Restoring a volume backup as a new image (csvfs/backup/restore_image.py): the image
is fsck-clean, and a real node mounts it and serves every file as it was."""

import hashlib
import os
import stat

import pytest

from csvfs.backup.errors import CorruptManifest
from csvfs.backup.manifest import ChunkRef, to_item
from csvfs.backup.restore_image import BadBackupError, build_image
from csvfs.fsck import run_fsck
from csvfs.volume.errors import UsageError, VolumeExistsError
from csvfs.volume.extents import BLOCK
from csvfs.volume.image import Volume

pytestmark = pytest.mark.timeout(90)

UNIT = 64 << 10  # small units, so that one chunk spans several of them
CHUNK = 128 << 10
T0 = 1_600_000_000_123_456_789  # times no restore could produce by accident


class Backup:
    """A manifest built by hand, and its chunks in a dict."""

    def __init__(self):
        self.chunks: dict[bytes, bytes] = {}
        self.files: list[dict] = []
        self.tree: list[dict] = []
        self.next_ino = 100
        self.add("/", "dir", 0o755, ino=2)

    def read_chunk(self, chunk_id: bytes) -> bytes:
        return self.chunks[chunk_id]

    def add(self, path, kind, perm, ino=None, **extra) -> dict:
        if ino is None:
            ino, self.next_ino = self.next_ino, self.next_ino + 1
        index = len(self.tree)
        entry = {"path": path, "ino": ino, "type": kind,
                 "mode": _type_bits(kind) | perm, "uid": 0, "gid": 0,
                 "atime_ns": T0 + index * 1000 + 1, "mtime_ns": T0 + index * 1000 + 2,
                 "ctime_ns": T0 + index * 1000 + 3, "xattrs": [], "target": b"", "rdev": 0}
        entry.update(extra)
        self.tree.append(entry)
        return entry

    def add_file(self, path, size, pieces, perm=0o644, **extra) -> dict:
        """pieces: {offset: data}; offsets are multiples of CHUNK."""
        refs = [(offset, data, 0, len(data)) for offset, data in sorted(pieces.items())]
        return self.add_sliced_file(path, size, refs, perm, **extra)[0]

    def add_sliced_file(self, path, size, refs, perm=0o644, **extra) -> tuple[dict, bytes]:
        """refs: (offset, a chunk's data, skip, length): the file's bytes [offset,
        offset+length) are the chunk's [skip, skip+length). Returns the tree entry and
        the bytes the file holds."""
        entry = self.add(path, "file", perm, **extra)
        chunks, content = [], bytearray(size)
        for offset, data, skip, length in refs:
            chunk_id = hashlib.blake2b(data, digest_size=32).digest()
            self.chunks[chunk_id] = data
            chunks.append(to_item(ChunkRef(offset, length, chunk_id, skip)))
            content[offset:offset + length] = data[skip:skip + length]
        self.files.append({"path": path, "ino": entry["ino"], "size": size,
                           "mode": entry["mode"], "uid": entry["uid"], "gid": entry["gid"],
                           "atime_ns": entry["atime_ns"], "mtime_ns": entry["mtime_ns"],
                           "ctime_ns": entry["ctime_ns"], "xattrs": entry["xattrs"],
                           "consistency": "crash", "chunks": chunks})
        return entry, bytes(content)

    def link(self, path, existing: dict) -> None:
        self.tree.append(dict(existing, path=path))

    def manifest(self, kind="volume") -> dict:
        return {"format": 1, "id": "b-0001", "kind": kind, "time_ns": T0, "snapshot": 7,
                "source": {"volume": "00000000-0000-0000-0000-000000000000",
                           "image": "/var/tmp/vol.img", "unit_size": UNIT},
                "chunk_size": CHUNK, "files": self.files, "tree": self.tree,
                "stats": {}, "warnings": []}


def _type_bits(kind: str) -> int:
    return {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK,
            "fifo": stat.S_IFIFO, "chr": stat.S_IFCHR}[kind]


def _pattern(length: int, seed: int) -> bytes:
    block = hashlib.sha256(bytes([seed])).digest()
    return (block * (length // len(block) + 1))[:length]


def sample_backup() -> tuple[Backup, dict[str, bytes]]:
    """The backup, and the content every regular file must read back as."""
    backup = Backup()
    backup.tree[0]["xattrs"] = [[b"user.root", b"of the tree"]]
    backup.add("/etc", "dir", 0o750, uid=1234, gid=5678)
    backup.add("/etc/deep", "dir", 0o2775)
    backup.add("/etc/deep/er", "dir", 0o700)
    expected = {}
    # Data at the start, a hole in the middle, data, and a hole at the end.
    head, middle = _pattern(CHUNK, 1), _pattern(100_000, 2)
    backup.add_file("/etc/sparse", 20 * UNIT, {0: head, 4 * CHUNK: middle}, perm=0o600,
                    uid=1234, gid=5678,
                    xattrs=[[b"user.one", b"1"], [b"user.bin", bytes(range(256))]])
    sparse = bytearray(20 * UNIT)
    sparse[0:CHUNK] = head
    sparse[4 * CHUNK:4 * CHUNK + len(middle)] = middle
    expected["/etc/sparse"] = bytes(sparse)
    # A small file whose size goes well past its only chunk (and past its first unit).
    small = _pattern(5000, 3)
    expected["/etc/deep/small"] = small + bytes(3 * UNIT - len(small))
    small_entry = backup.add_file("/etc/deep/small", 3 * UNIT, {0: small}, perm=0o4755)
    # A file of several chunks, one of them all zeros, the last one short.
    many = {0: _pattern(CHUNK, 4), CHUNK: bytes(CHUNK), 2 * CHUNK: _pattern(777, 5)}
    expected["/etc/deep/er/many"] = b"".join(many[offset] for offset in sorted(many))
    backup.add_file("/etc/deep/er/many", 2 * CHUNK + 777, many)
    expected["/empty"] = b""
    backup.add_file("/empty", 0, {})
    backup.link("/hardlink", small_entry)
    backup.add("/link", "symlink", 0o777, target=b"etc/deep/small")
    backup.add("/pipe", "fifo", 0o640)
    backup.add("/null", "chr", 0o666, rdev=os.makedev(1, 3))
    expected["/hardlink"] = expected["/etc/deep/small"]
    return backup, expected


def restore(tmp_path, **options):
    backup, expected = sample_backup()
    image = tmp_path / "restored.img"
    seen = []
    stats = build_image(backup.manifest(), backup.read_chunk, image,
                        progress=lambda done, total: seen.append((done, total)), **options)
    return backup, expected, image, stats, seen


@pytest.fixture
def restored(tmp_path):
    return restore(tmp_path)


def test_the_image_is_clean_and_takes_only_what_the_chunks_touch(restored, capsys):
    backup, expected, image, stats, seen = restored
    assert run_fsck(image) == 0
    out = capsys.readouterr().out
    assert "volume is clean" in out
    assert "journal: 0 record(s) replayed" in out
    assert "checkpoint slot B" in out
    # sparse: units 0, 1, 8, 9 (its two chunks); many: units 0-3 and 4 (the zero chunk
    # too: it was allocated in the source); small: two 4 KiB blocks
    assert stats == {"files": 7, "dirs": 4,
                     "bytes": 20 * UNIT + 3 * UNIT + 2 * CHUNK + 777,
                     "allocated": (4 + 5) * UNIT + 2 * BLOCK}
    total = sum(length for entry in backup.files for _offset, length, _id in entry["chunks"])
    assert seen[-1] == (total, total)
    # Sized for the data with 25 % headroom: 10 units (9 whole, 1 of blocks) -> 13
    volume = Volume.open(image)
    assert volume.sb.data_units == 13 and volume.sb.unit_size == UNIT
    volume.close()
    # The image is sparse: the zero chunk and the holes were never written.
    assert os.stat(image).st_blocks * 512 < os.stat(image).st_size // 4


def test_a_node_mounts_it_and_serves_every_file_as_backed_up(restored, nodes):
    backup, expected, image, _stats, _seen = restored
    node = nodes.start(image)
    root = node.mountpoint
    for entry in backup.tree:
        path = os.path.join(root, entry["path"].lstrip("/"))
        info = os.lstat(path)
        where = entry["path"]
        assert stat.S_IFMT(info.st_mode) == _type_bits(entry["type"]), where
        if entry["type"] != "symlink":
            assert stat.S_IMODE(info.st_mode) == stat.S_IMODE(entry["mode"]), where
        assert (info.st_uid, info.st_gid) == (entry["uid"], entry["gid"]), where
        assert info.st_mtime_ns == entry["mtime_ns"], where
        assert info.st_ctime_ns == entry["ctime_ns"], where
        assert info.st_atime_ns == entry["atime_ns"], where
        if entry["type"] != "symlink":
            names = sorted(os.listxattr(path, follow_symlinks=False))
            assert names == sorted(name.decode() for name, _ in entry["xattrs"]), where
            for name, value in entry["xattrs"]:
                assert os.getxattr(path, name, follow_symlinks=False) == value, where
        if entry["type"] == "file":
            with open(path, "rb") as handle:
                assert handle.read() == expected[where], where
            assert info.st_size == len(expected[where]), where
    small, hardlink = os.lstat(os.path.join(root, "etc/deep/small")), \
        os.lstat(os.path.join(root, "hardlink"))
    assert small.st_ino == hardlink.st_ino and small.st_nlink == 2
    assert os.readlink(os.path.join(root, "link")) == "etc/deep/small"
    assert os.lstat(os.path.join(root, "null")).st_rdev == os.makedev(1, 3)
    assert os.lstat(os.path.join(root, "etc")).st_nlink == 3  # ".", its name, deep/..
    assert sorted(os.listdir(root)) == ["empty", "etc", "hardlink", "link", "null", "pipe"]


def test_the_restored_volume_takes_new_writes_and_stays_clean(tmp_path, nodes, capsys):
    # room to grow: the default size leaves only 3 units free
    _backup, expected, image, _stats, _seen = restore(tmp_path, size=64 << 20)
    node = nodes.start(image)
    with open(node.path("etc", "sparse"), "r+b") as handle:
        handle.seek(12 * UNIT)
        handle.write(b"filled a hole")
    with open(node.path("etc", "deep", "small"), "ab") as handle:
        handle.write(_pattern(2 * UNIT, 6))  # past the first unit: blocks become units
    node.path("new").write_bytes(_pattern(3 * UNIT, 7))
    os.unlink(node.path("etc", "deep", "er", "many"))
    assert node.unmount() == 0
    assert run_fsck(image) == 0
    assert "volume is clean" in capsys.readouterr().out
    again = nodes.start(image, "node2")
    assert again.path("etc", "deep", "small").read_bytes() == \
        expected["/etc/deep/small"] + _pattern(2 * UNIT, 6)
    assert again.path("new").read_bytes() == _pattern(3 * UNIT, 7)
    sparse = bytearray(expected["/etc/sparse"])
    sparse[12 * UNIT:12 * UNIT + 13] = b"filled a hole"
    assert again.path("etc", "sparse").read_bytes() == sparse


def test_a_non_empty_target_is_refused_and_left_alone(tmp_path):
    backup, _expected = sample_backup()
    image = tmp_path / "taken.img"
    image.write_bytes(b"precious")
    with pytest.raises(VolumeExistsError, match="not empty"):
        build_image(backup.manifest(), backup.read_chunk, image)
    assert image.read_bytes() == b"precious"
    assert not (tmp_path / "taken.img.key").exists()


def test_an_empty_target_is_used(tmp_path):
    backup, _expected = sample_backup()
    image = tmp_path / "empty.img"
    image.touch()
    build_image(backup.manifest(), backup.read_chunk, image, size=64 << 20)
    assert os.stat(image).st_size == 64 << 20


def test_a_vm_backup_is_refused(tmp_path):
    backup, _expected = sample_backup()
    image = tmp_path / "vm.img"
    with pytest.raises(UsageError) as caught:
        build_image(backup.manifest(kind="vm"), backup.read_chunk, image)
    assert str(caught.value) == "backup b-0001 is a VM backup; restore its files with --file"
    assert not image.exists()


def test_too_small_a_size_is_refused_before_anything_is_written(tmp_path):
    backup, _expected = sample_backup()
    image = tmp_path / "small.img"
    # 9 units of 64 KiB after the metadata regions; the backup needs 10
    with pytest.raises(UsageError, match="has 9 data units of 65536; the backup needs 10"):
        build_image(backup.manifest(), backup.read_chunk, image, size=14_356_480)
    assert not image.exists()


def test_a_bad_chunk_leaves_no_volume_behind(tmp_path):
    backup, _expected = sample_backup()
    chunk_id = next(iter(backup.chunks))
    backup.chunks[chunk_id] = backup.chunks[chunk_id][:-1]
    image = tmp_path / "bad.img"
    with pytest.raises(BadBackupError, match="the manifest says"):
        build_image(backup.manifest(), backup.read_chunk, image)
    assert not image.exists()
    assert not (tmp_path / "bad.img.key").exists()


# -- slices of chunks, as incremental backups write them ---------------------------------------


def sliced_backup() -> tuple[Backup, dict[str, bytes]]:
    """Files whose references mix whole chunks, slices of chunks (with a skip, and
    shorter than their chunk) and holes; and the bytes each holds."""
    backup = Backup()
    a, b = _pattern(CHUNK, 11), _pattern(CHUNK, 12)
    zeros_then_data = bytes(UNIT) + _pattern(CHUNK - UNIT, 13)
    big = [  # (offset, chunk, skip, length)
        (0, a, 0, 100_000),  # the start of a chunk
        (100_000, b, 5_000, 60_000),  # from its middle, over a unit boundary
        # a hole to unit 4
        (4 * UNIT, a, 0, CHUNK),  # a whole chunk, that a slice takes from too
        (6 * UNIT + 1000, zeros_then_data, 0, 20_000),  # zeros: allocated, not written
        (6 * UNIT + 21_000, zeros_then_data, UNIT, 30_000),
        (9 * UNIT - 10, b, CHUNK - 50, 50),  # a chunk's tail, over a unit boundary
        # a hole to the end
    ]
    small = [  # within the first unit: 4 KiB blocks
        (100, a, 7, 5000),
        (5100, b, 0, 3000),
        (30_000, a, 100_000, 9000),
    ]
    expected = {"/big": backup.add_sliced_file("/big", 12 * UNIT, big)[1],
                "/small": backup.add_sliced_file("/small", 40_000, small)[1]}
    return backup, expected


def test_slices_of_chunks_restore_exactly(tmp_path, nodes, capsys):
    backup, expected = sliced_backup()
    image = tmp_path / "sliced.img"
    seen = []
    stats = build_image(backup.manifest(), backup.read_chunk, image,
                        progress=lambda done, total: seen.append((done, total)))
    assert run_fsck(image) == 0
    assert "volume is clean" in capsys.readouterr().out
    # big: units 0, 1, 2, 4, 5, 6, 8, 9; small: blocks 0, 1, 7, 8, 9
    assert stats["allocated"] == 8 * UNIT + 5 * BLOCK
    assert stats["bytes"] == 12 * UNIT + 40_000
    total = sum(item[1] for entry in backup.files for item in entry["chunks"])
    assert seen[-1] == (total, total)
    node = nodes.start(image)
    for path, data in expected.items():
        restored = node.path(path.lstrip("/"))
        assert restored.stat().st_size == len(data), path
        assert restored.read_bytes() == data, path


def test_a_chunk_too_short_for_its_slice_leaves_no_volume_behind(tmp_path):
    backup, _expected = sliced_backup()
    (short_id,) = [chunk_id for chunk_id, data in backup.chunks.items() if data[:UNIT] ==
                   bytes(UNIT)]
    backup.chunks[short_id] = backup.chunks[short_id][:UNIT + 29_999]  # one byte short
    image = tmp_path / "short.img"
    with pytest.raises(BadBackupError, match="the manifest says it holds at least") as caught:
        build_image(backup.manifest(), backup.read_chunk, image)
    assert caught.value.exit_code == 24
    assert not image.exists() and not (tmp_path / "short.img.key").exists()


@pytest.mark.parametrize("skip", [-5, "7"])
def test_a_malformed_skip_is_refused_before_anything_is_made(tmp_path, skip):
    backup, _expected = sliced_backup()
    backup.files[0]["chunks"][1][3] = skip
    image = tmp_path / "bad-skip.img"
    with pytest.raises(CorruptManifest, match="/big") as caught:
        build_image(backup.manifest(), backup.read_chunk, image)
    assert caught.value.exit_code == 24
    assert not image.exists()
