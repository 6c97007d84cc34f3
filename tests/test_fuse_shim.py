"""The FUSE shim on a real pyfuse3 mount: fallocate(2), and reads of /dev/fuse
that never block the loop.

The filesystem (tests/shim_fs.py) runs in a subprocess, so the shim is
loaded before pyfuse3 there, whatever this pytest process has imported.
"""

import concurrent.futures
import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csvfs import fuse_shim
from scripts.nodes import MountProcess

HELPER = "tests.shim_fs"  # run with -m from the repository root, as pytest is
SHIM = Path(fuse_shim.__file__).with_name(fuse_shim.SHIM_NAME)

# Values mirrored from tests/shim_fs.py.
FILE_INODE = 2
FIRST_FH = 42
BOOM_OFFSET = 13
SLOW_OFFSET = 777
WITHDRAW_OFFSET = 1 << 20

KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
ZERO_RANGE = 0x10

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="no fusermount3"),
]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """The raw syscall: unlike posix_fallocate, no fallback to writing zeros."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Mount:
    def __init__(self, base: Path, flags: tuple[str, ...]) -> None:
        self.dir = base / "mnt"
        self.file = self.dir / "data"
        self.record_path = base / "records.jsonl"
        self.tick_path = base / "records.jsonl.tick"
        self.victim_path = base / "records.jsonl.victim"
        self.stderr_path = base / "fs.stderr"
        self.server = MountProcess(
            [sys.executable, "-m", HELPER, self.dir, self.record_path, *flags], self.dir,
            label="the test filesystem", output=self.stderr_path)

    def start(self) -> None:
        self.server.start(timeout=15)

    def stop(self) -> None:
        self.server.stop()

    def records(self) -> list[dict[str, int]]:
        if not self.record_path.exists():
            return []
        return [json.loads(line) for line in self.record_path.read_text().splitlines()]

    def last_tick(self) -> int:
        return self.tick_path.stat().st_mtime_ns

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@pytest.fixture
def make_mount(tmp_path):
    if not SHIM.exists():
        fuse_shim.build()
    mounts: list[Mount] = []

    def start(*flags: str) -> Mount:
        m = Mount(tmp_path / f"m{len(mounts)}", flags)
        mounts.append(m)
        m.start()
        return m

    try:
        yield start
    finally:
        for m in mounts:
            m.stop()


@pytest.fixture
def mount(make_mount):
    return make_mount()


def open_file(m: Mount) -> int:
    return os.open(m.file, os.O_RDWR)


def expect(m: Mount, mode: int, offset: int, length: int) -> None:
    want = {"inode": FILE_INODE, "mode": mode, "offset": offset, "length": length,
            "fh": FIRST_FH}
    assert m.records()[-1] == want


@pytest.mark.timeout(60)
def test_shim_is_active(mount):
    assert "active=True" in mount.stderr()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("repeat", range(3))
def test_a_withdrawn_request_does_not_stall_the_loop(mount, repeat):
    """A caller killed after trio saw its request and before pyfuse3 read it: without
    the shim, pyfuse3's read of /dev/fuse blocks, holding the GIL, until another
    request comes, and nothing else in the process runs meanwhile."""
    os.truncate(mount.file, 2 * WITHDRAW_OFFSET)  # a read at the offset reaches the fs
    victim = subprocess.Popen([sys.executable, "-c",
                               "import os, sys\nwhile True: os.stat(sys.argv[1])", mount.file])
    try:
        mount.victim_path.write_text(str(victim.pid))
        fd = os.open(mount.file, os.O_RDONLY)
        try:
            os.pread(fd, 1, WITHDRAW_OFFSET)  # returns once the victim was killed
            assert victim.wait(timeout=10) == -signal.SIGKILL
            # No request of ours until the check is over: one would unblock the read.
            before = mount.last_tick()
            time.sleep(0.5)
            assert mount.last_tick() > before, "the filesystem's loop stopped"
        finally:
            os.close(fd)
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.timeout(60)
def test_posix_fallocate_grows_size(mount):
    fd = open_file(mount)
    try:
        os.posix_fallocate(fd, 4096, 8192)
    finally:
        os.close(fd)
    assert os.stat(mount.file).st_size == 12288
    expect(mount, 0, 4096, 8192)
    assert len(mount.records()) == 1


@pytest.mark.timeout(60)
def test_keep_size_keeps_size(mount):
    fd = open_file(mount)
    try:
        os.write(fd, b"a" * 100)
        fallocate(fd, KEEP_SIZE, 0, 1 << 20)
    finally:
        os.close(fd)
    assert os.stat(mount.file).st_size == 100
    expect(mount, KEEP_SIZE, 0, 1 << 20)


@pytest.mark.timeout(60)
def test_punch_hole(mount):
    fd = open_file(mount)
    try:
        os.write(fd, b"x" * 8192)
        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 4096, 4096)
        assert os.pread(fd, 8192, 0) == b"x" * 4096 + bytes(4096)
    finally:
        os.close(fd)
    assert os.stat(mount.file).st_size == 8192
    expect(mount, PUNCH_HOLE | KEEP_SIZE, 4096, 4096)


@pytest.mark.timeout(60)
def test_zero_range(mount):
    fd = open_file(mount)
    try:
        fallocate(fd, ZERO_RANGE, 0, 16384)
    finally:
        os.close(fd)
    assert os.stat(mount.file).st_size == 16384
    expect(mount, ZERO_RANGE, 0, 16384)


@pytest.mark.timeout(60)
def test_fuse_error_errno_reaches_caller(mount):
    fd = open_file(mount)
    try:
        with pytest.raises(OSError) as exc:
            fallocate(fd, 0, 0, 2 << 30)
        assert exc.value.errno == errno.ENOSPC
        # posix_fallocate only falls back to writing on EOPNOTSUPP.
        with pytest.raises(OSError) as exc:
            os.posix_fallocate(fd, 0, 2 << 30)
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.stat(mount.file).st_size == 0
    expect(mount, 0, 0, 2 << 30)


@pytest.mark.timeout(60)
def test_handler_bug_gives_eio(mount):
    fd = open_file(mount)
    try:
        with pytest.raises(OSError) as exc:
            fallocate(fd, KEEP_SIZE, BOOM_OFFSET, 10)
        assert exc.value.errno == errno.EIO
        # The filesystem survived the exception and still answers.
        fallocate(fd, 0, 0, 10)
    finally:
        os.close(fd)
    assert os.stat(mount.file).st_size == 10
    assert "injected handler bug" in mount.stderr()


@pytest.mark.timeout(60)
def test_slow_handler_does_not_block_other_requests(mount):
    fd = open_file(mount)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(fallocate, fd, KEEP_SIZE, SLOW_OFFSET, 1)
            while not mount.records():
                time.sleep(0.01)
            # The handler now sleeps for 2 s; the mount must keep serving.
            assert os.listdir(mount.dir) == ["data"]
            assert not slow.done()
            slow.result(timeout=30)
    finally:
        os.close(fd)
    expect(mount, KEEP_SIZE, SLOW_OFFSET, 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", ["--no-handler", "--no-shim"])
def test_unsupported_without_handler(make_mount, flag):
    m = make_mount(flag)
    fd = open_file(m)
    try:
        with pytest.raises(OSError) as exc:
            fallocate(fd, 0, 0, 4096)
        assert exc.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert m.records() == []


@pytest.mark.timeout(60)
def test_build_into_directory(tmp_path):
    out = fuse_shim.build(tmp_path)
    assert out == tmp_path / fuse_shim.SHIM_NAME
    assert out.stat().st_size > 0


@pytest.mark.timeout(60)
def test_load_refuses_missing_shim(tmp_path):
    assert fuse_shim.load(tmp_path / "missing.so") is False


@pytest.mark.timeout(60)
def test_load_refuses_after_pyfuse3_import():
    import pyfuse3  # noqa: F401

    assert fuse_shim.load() is False
    assert fuse_shim.active() is False
    assert fuse_shim.set_handler("fallocate", None) is False
    assert fuse_shim.locks_active() is False
    assert fuse_shim.set_handler("setlk", None) is False


def test_set_handler_knows_its_operations():
    with pytest.raises(ValueError):
        fuse_shim.set_handler("lseek", None)
