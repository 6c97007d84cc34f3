"""`csvfs backup mount`: a backup's files, read-only through FUSE.

Each repository and manifest is built here through the Repository API (no cluster),
then mounted by `csvfs backup mount` in a subprocess and read with plain os calls.
"""

import errno
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import trio

from csvfs.backup.manifest import ChunkRef, to_item
from csvfs.backup.mount import BackupOperations
from csvfs.backup.repository import Repository
from scripts.nodes import REPO, MountProcess, csvfs_command, is_mounted, wait_until

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(subprocess.run(["which", "fusermount3"], capture_output=True)
                       .returncode != 0, reason="no fusermount3"),
]

CHUNK = 64 * 1024
T0 = 1_700_000_000_123_456_789  # a time with nanoseconds, to see them kept


def pattern(seed: int, size: int) -> bytes:
    """Data that differs from chunk to chunk and file to file (no dedup, no zeros)."""
    block = bytes((seed * 31 + i * 7) % 251 + 1 for i in range(4093))
    return (block * (size // len(block) + 1))[:size]


def store(repo: Repository, data: bytes) -> list:
    """Put data's chunks in the repository; chunks of zeros are holes, as a backup
    leaves them out."""
    chunks = []
    for offset in range(0, len(data), CHUNK):
        piece = data[offset:offset + CHUNK]
        if any(piece):
            chunk_id = repo.chunk_id(piece)
            repo.put_chunk(piece, chunk_id)
            chunks.append([offset, len(piece), chunk_id])
    return chunks


def attrs(ino: int, mode: int, uid: int = 0, gid: int = 0, t: int = T0, xattrs=()) -> dict:
    return {"ino": ino, "mode": mode, "uid": uid, "gid": gid, "atime_ns": t,
            "mtime_ns": t + 1, "ctime_ns": t + 2, "xattrs": [list(pair) for pair in xattrs]}


def manifest(kind: str, files: list, tree: list) -> dict:
    return {"format": 1, "kind": kind, "time_ns": T0, "snapshot": 1,
            "source": {"volume": "test", "image": "", "unit_size": 1 << 20},
            "chunk_size": CHUNK, "files": files, "tree": tree,
            "stats": {"logical": 0, "read": 0, "new": 0, "reread_chunks": 0, "pause_s": 0.0,
                      "duration_s": 0.0},
            "warnings": []}


# What the volume backup holds: (path, data) of its regular files.
NOTE = b"a note, kept in a nested directory\n"
SPARSE = pattern(1, CHUNK) + bytes(CHUNK) + pattern(2, CHUNK) + bytes(500)
CORRUPT = pattern(3, 3000)
GONE = pattern(4, 5000)
XATTR = (b"user.origin", b"backup test \x00\xff")


def file_entry(repo: Repository, path: str, ino: int, data: bytes, mode: int,
               **extra) -> dict:
    return dict(attrs(ino, mode, **extra), path=path, size=len(data),
                consistency="crash", chunks=store(repo, data))


def volume_manifest(repo: Repository) -> dict:
    files = [
        file_entry(repo, "/corrupt-me.bin", 14, CORRUPT, 0o100644),
        file_entry(repo, "/gone.bin", 15, GONE, 0o100600),
        file_entry(repo, "/hard.txt", 10, NOTE, 0o100640, uid=1234, gid=5678,
                   xattrs=[XATTR]),
        file_entry(repo, "/sparse.img", 11, SPARSE, 0o100600),
    ]
    by_ino = {entry["ino"]: entry for entry in files}

    def file(path: str, ino: int) -> dict:
        entry = by_ino[ino]
        return dict(attrs(ino, entry["mode"], entry["uid"], entry["gid"],
                          xattrs=entry["xattrs"]), path=path, type="file")

    tree = [  # parents first, as a backup walks the volume
        dict(attrs(1, 0o40755), path="/", type="dir"),
        file("/corrupt-me.bin", 14),
        dict(attrs(2, 0o40750), path="/docs", type="dir"),
        dict(attrs(13, 0o10644), path="/fifo", type="fifo"),
        file("/gone.bin", 15),
        file("/hard.txt", 10),
        file("/sparse.img", 11),
        dict(attrs(12, 0o120777), path="/sym", type="symlink", target=b"docs/deep/note.txt"),
        dict(attrs(3, 0o40700), path="/docs/deep", type="dir"),
        file("/docs/deep/note.txt", 10),
    ]
    return manifest("volume", files, tree)


DB = pattern(5, 2 * CHUNK + 777)
WEB = pattern(6, 1000)


def vm_manifest(repo: Repository) -> dict:
    files = [file_entry(repo, "/vms/prod/db.qcow2", 20, DB, 0o100600),
             file_entry(repo, "/web.img", 21, WEB, 0o100644)]
    return manifest("vm", files, [])


@pytest.fixture
def repo(tmp_path):
    return Repository.create(tmp_path / "repo", chunk_size=CHUNK)


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def any_repo(request, tmp_path):
    return Repository.create(tmp_path / "repo", chunk_size=CHUNK, encrypt=request.param)


def chunk_file(repo: Repository, chunk_id: bytes) -> Path:
    return repo.path / "chunks" / chunk_id.hex()[:2] / chunk_id.hex()


class BackupMount:
    """`csvfs backup mount` in a subprocess; stop() leaves neither mount nor process."""

    def __init__(self, repo: Repository, backup_id: str, mountpoint: Path, log: Path):
        command = [*csvfs_command(), "backup", "mount", "--repo", repo.path,
                   "--repo-key", repo.key_path, backup_id, mountpoint]
        self.log = log
        self.server = MountProcess(command, mountpoint, label="backup mount", output=log,
                                   env={"PYTHONPATH": os.fspath(REPO)})
        self.path = mountpoint

    def start(self) -> "BackupMount":
        self.server.start()
        # the line comes once pyfuse3 serves requests
        assert wait_until(lambda: "mounted read-only" in self.output(), 10), self.output()
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", os.fspath(self.path)],
                       capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
        self.server.stop()  # SIGTERM, then SIGKILL, if the unmount did not end it
        if self.server.process is not None and self.server.process.poll() is None:
            self.server.process.kill()
            self.server.process.wait(timeout=10)


@pytest.fixture
def mounts(tmp_path):
    """mounts.start(repo, manifest) saves the manifest and mounts it; all are stopped."""
    started: list[BackupMount] = []

    class Starter:
        def start(self, repo: Repository, body: dict) -> BackupMount:
            backup_id = repo.save_manifest(body)
            name = f"mnt{len(started)}"
            mount = BackupMount(repo, backup_id, tmp_path / name, tmp_path / f"{name}.log")
            started.append(mount)
            return mount.start()

    try:
        yield Starter()
    finally:
        for mount in started:
            mount.stop()
        assert not [mount.path for mount in started if is_mounted(mount.path)]


def read(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def pread(path: Path, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def expect_errno(code: int, action, *args) -> None:
    with pytest.raises(OSError) as caught:
        action(*args)
    assert caught.value.errno == code, caught.value


# -- a volume backup -------------------------------------------------------------------------


def test_volume_tree(repo, mounts):
    body = volume_manifest(repo)
    mp = mounts.start(repo, body).path
    assert sorted(os.listdir(mp)) == ["corrupt-me.bin", "docs", "fifo", "gone.bin",
                                      "hard.txt", "sparse.img", "sym"]
    assert os.listdir(mp / "docs") == ["deep"]
    assert os.listdir(mp / "docs/deep") == ["note.txt"]
    for entry in body["tree"]:
        st = os.lstat(mp / entry["path"].lstrip("/"))
        kind = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK,
                "fifo": stat.S_IFIFO}[entry["type"]]
        assert st.st_mode == kind | stat.S_IMODE(entry["mode"]), entry["path"]
        assert (st.st_uid, st.st_gid) == (entry["uid"], entry["gid"]), entry["path"]
        assert st.st_mtime_ns == entry["mtime_ns"], entry["path"]
        assert st.st_atime_ns == entry["atime_ns"], entry["path"]
        assert st.st_ctime_ns == entry["ctime_ns"], entry["path"]
    # directories: 2 + their subdirectories
    assert [os.stat(mp / path).st_nlink for path in ("", "docs", "docs/deep")] == [3, 3, 2]


def test_volume_contents(repo, mounts):
    mp = mounts.start(repo, volume_manifest(repo)).path
    for name, data in (("docs/deep/note.txt", NOTE), ("hard.txt", NOTE),
                       ("sparse.img", SPARSE), ("corrupt-me.bin", CORRUPT),
                       ("gone.bin", GONE)):
        assert os.stat(mp / name).st_size == len(data), name
        assert read(mp / name) == data, name
    sparse = mp / "sparse.img"
    assert pread(sparse, 20, CHUNK - 10) == SPARSE[CHUNK - 10:CHUNK] + bytes(10)
    assert pread(sparse, CHUNK, CHUNK) == bytes(CHUNK)  # the hole
    assert pread(sparse, 100, 2 * CHUNK - 50) == bytes(50) + SPARSE[2 * CHUNK:2 * CHUNK + 50]
    assert pread(sparse, 1000, len(SPARSE) - 600) == SPARSE[-600:]
    assert pread(sparse, 100, len(SPARSE) + 10) == b""
    # a sparse file takes what its chunks hold, not its size
    assert os.stat(sparse).st_blocks * 512 == 2 * CHUNK


def test_hard_link_symlink_xattrs_fifo(repo, mounts):
    mp = mounts.start(repo, volume_manifest(repo)).path
    note, hard = os.stat(mp / "docs/deep/note.txt"), os.stat(mp / "hard.txt")
    assert note.st_ino == hard.st_ino
    assert note.st_nlink == hard.st_nlink == 2
    assert os.stat(mp / "sparse.img").st_nlink == 1
    assert os.readlink(mp / "sym") == "docs/deep/note.txt"
    assert read(mp / "sym") == NOTE
    assert os.listxattr(mp / "hard.txt") == ["user.origin"]
    assert os.getxattr(mp / "docs/deep/note.txt", "user.origin") == XATTR[1]
    expect_errno(errno.ENODATA, os.getxattr, mp / "hard.txt", "user.other")
    assert os.listxattr(mp / "sparse.img") == []
    assert stat.S_ISFIFO(os.stat(mp / "fifo").st_mode)
    expect_errno(errno.ENOENT, os.stat, mp / "docs/missing")
    expect_errno(errno.ENOENT, os.stat, mp / "docs/missing")  # cached as absent now


def test_writes_fail_read_only(repo, mounts):
    mp = mounts.start(repo, volume_manifest(repo)).path
    note = mp / "hard.txt"
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC,
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND):
        expect_errno(errno.EROFS, os.open, note, flags)
    expect_errno(errno.EROFS, os.open, mp / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    expect_errno(errno.EROFS, os.truncate, note, 0)
    expect_errno(errno.EROFS, os.chmod, note, 0o600)
    expect_errno(errno.EROFS, os.chown, note, 1, 1)
    expect_errno(errno.EROFS, os.utime, note, (1, 1))
    expect_errno(errno.EROFS, os.unlink, note)
    expect_errno(errno.EROFS, os.rename, note, mp / "moved.txt")
    expect_errno(errno.EROFS, os.mkdir, mp / "newdir")
    expect_errno(errno.EROFS, os.rmdir, mp / "docs/deep")
    expect_errno(errno.EROFS, os.symlink, "x", mp / "newlink")
    expect_errno(errno.EROFS, os.link, note, mp / "another")
    expect_errno(errno.EROFS, os.mkfifo, mp / "newfifo")
    expect_errno(errno.EROFS, os.setxattr, note, "user.new", b"v")
    expect_errno(errno.EROFS, os.removexattr, note, "user.origin")
    assert os.statvfs(mp).f_flag & os.ST_RDONLY
    assert read(note) == NOTE  # nothing changed


def test_corrupt_and_missing_chunks_fail_only_their_reads(repo, mounts):
    body = volume_manifest(repo)
    chunks = {entry["path"]: entry["chunks"] for entry in body["files"]}
    corrupt = chunk_file(repo, chunks["/corrupt-me.bin"][0][2])
    stored = bytearray(corrupt.read_bytes())
    stored[len(stored) // 2] ^= 0x40
    corrupt.write_bytes(bytes(stored))
    chunk_file(repo, chunks["/gone.bin"][0][2]).unlink()
    mount = mounts.start(repo, body)
    mp = mount.path
    expect_errno(errno.EIO, read, mp / "corrupt-me.bin")
    expect_errno(errno.EIO, read, mp / "gone.bin")
    assert os.stat(mp / "corrupt-me.bin").st_size == len(CORRUPT)  # metadata still there
    assert read(mp / "sparse.img") == SPARSE
    assert read(mp / "docs/deep/note.txt") == NOTE
    expect_errno(errno.EIO, read, mp / "corrupt-me.bin")  # again: still failing, not cached
    assert mount.server.running() and is_mounted(mp)
    output = mount.output()
    assert "corrupt-me.bin" in output and "gone.bin" in output, output
    assert "Traceback" not in output, output


# -- a VM backup -----------------------------------------------------------------------------


def test_vm_backup(any_repo, mounts):
    mp = mounts.start(any_repo, vm_manifest(any_repo)).path
    assert sorted(os.listdir(mp)) == ["vms", "web.img"]
    assert os.listdir(mp / "vms") == ["prod"]
    for directory in ("", "vms", "vms/prod"):
        st = os.stat(mp / directory)
        assert st.st_mode == stat.S_IFDIR | 0o555, directory
        assert st.st_mtime_ns == T0, directory
    assert os.stat(mp / "vms").st_nlink == 3
    db = mp / "vms/prod/db.qcow2"
    assert read(db) == DB
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    assert os.stat(db).st_size == len(DB)
    assert os.stat(db).st_mtime_ns == T0 + 1
    assert pread(db, 5000, CHUNK - 2500) == DB[CHUNK - 2500:CHUNK + 2500]
    assert read(mp / "web.img") == WEB
    expect_errno(errno.EROFS, os.open, db, os.O_RDWR)


# -- slices of chunks, as incremental backups write them --------------------------------------


X, Y, W = pattern(7, CHUNK), pattern(8, CHUNK), pattern(9, 3000)
SLICES = [  # (offset, chunk, skip, length) of /sliced.img, whose size is SLICED_SIZE
    (0, X, 0, 10_000),  # the start of a chunk
    (10_000, Y, 20_000, 40_000),  # from a chunk's middle
    (50_000, W, 0, 3000),  # a whole chunk
    # a hole [53000, 70000)
    (70_000, X, 5, CHUNK - 5),  # a chunk's end
    (70_000 + CHUNK - 5, Y, 0, CHUNK),  # a whole chunk, that a slice takes from too
    # a hole to the end
]
SLICED_SIZE = 300_000


def sliced_entry(repo: Repository, path: str, ino: int, refs: list) -> tuple[dict, bytes]:
    items, data = [], bytearray(SLICED_SIZE)
    for offset, chunk, skip, length in refs:
        chunk_id = repo.chunk_id(chunk)
        repo.put_chunk(chunk, chunk_id)
        items.append(to_item(ChunkRef(offset, length, chunk_id, skip)))
        data[offset:offset + length] = chunk[skip:skip + length]
    entry = dict(attrs(ino, 0o100644), path=path, size=SLICED_SIZE, consistency="crash",
                 chunks=items)
    return entry, bytes(data)


def test_slices_of_chunks_read_exactly(any_repo, mounts):
    entry, expected = sliced_entry(any_repo, "/sliced.img", 30, SLICES)
    # bytes [20000, 70000) of W, which holds 3000: every read of them fails
    short, _ = sliced_entry(any_repo, "/short.img", 31, [(1000, W, 20_000, 50_000)])
    assert sorted({len(item) for item in entry["chunks"]}) == [3, 4]
    mount = mounts.start(any_repo, manifest("vm", [entry, short], []))
    sliced = mount.path / "sliced.img"
    assert os.stat(sliced).st_size == SLICED_SIZE
    assert read(sliced) == expected
    assert os.stat(sliced).st_blocks == -(-sum(length for *_, length in SLICES) // 512)
    # reads that begin or end at every boundary, and that span several slices
    edges = sorted({edge for offset, _chunk, _skip, length in SLICES
                    for edge in (offset, offset + length)})
    for edge in edges:
        for size in (1, 100, 5000, CHUNK + 1):
            for start in (edge - size, edge - size // 2, edge):
                start = max(start, 0)
                assert pread(sliced, size, start) == expected[start:start + size], (edge, start)
    assert pread(sliced, 60_000, 5_000) == expected[5_000:65_000]  # four slices and a hole
    assert pread(sliced, 10_000, 55_000) == bytes(10_000)  # in the hole
    expect_errno(errno.EIO, read, mount.path / "short.img")
    # its hole still reads (far enough that the kernel's readahead stays out of the slice)
    assert pread(mount.path / "short.img", 500, 200_000) == bytes(500)
    assert read(sliced) == expected and mount.server.running()
    assert "too short" in mount.output() and "Traceback" not in mount.output()


def test_a_read_anywhere_takes_the_right_bytes_of_each_slice(repo):
    """The read path alone, at offsets and sizes the kernel's page cache never asks."""
    entry, expected = sliced_entry(repo, "/sliced.img", 30, SLICES)
    operations = BackupOperations(repo, dict(manifest("vm", [entry], []), id="direct"))
    (node,) = [node for node in operations.nodes.values() if node.path == "/sliced.img"]
    for start in range(0, SLICED_SIZE + 1000, 997):
        for size in (1, 4096, 70_001):
            got = trio.run(operations._read, node, start, size)
            assert got == expected[start:start + size], (start, size)


# -- running and stopping ----------------------------------------------------------------------


def test_unmount_and_signals_end_it_cleanly(repo, mounts):
    first = mounts.start(repo, vm_manifest(repo))
    assert subprocess.run(["fusermount3", "-u", os.fspath(first.path)]).returncode == 0
    assert first.server.process.wait(timeout=10) == 0
    second = mounts.start(repo, vm_manifest(repo))
    second.server.process.send_signal(signal.SIGTERM)
    assert second.server.process.wait(timeout=10) == 0
    third = mounts.start(repo, vm_manifest(repo))
    third.server.process.send_signal(signal.SIGINT)
    assert third.server.process.wait(timeout=10) == 0
    time.sleep(0.1)
    assert not any(is_mounted(mount.path) for mount in (first, second, third))


def run_csvfs(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*csvfs_command(), *map(os.fspath, args)], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": os.fspath(REPO)})


def test_refusals(repo, tmp_path):
    backup_id = repo.save_manifest(vm_manifest(repo))
    common = ["backup", "mount", "--repo", repo.path, "--repo-key", repo.key_path]
    missing = run_csvfs(*common, backup_id, tmp_path / "nowhere")
    assert missing.returncode == 12, missing.stderr
    assert "does not exist" in missing.stderr
    (tmp_path / "file").write_bytes(b"")
    not_dir = run_csvfs(*common, backup_id, tmp_path / "file")
    assert not_dir.returncode == 12, not_dir.stderr
    (tmp_path / "mp").mkdir()
    unknown = run_csvfs(*common, "19990101T000000Z-000000", tmp_path / "mp")
    assert unknown.returncode == 25, unknown.stderr
    assert not is_mounted(tmp_path / "mp")
