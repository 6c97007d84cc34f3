"""The data path in-process: direct I/O against a plain file standing in for the image."""

import errno
import os
import time

import pytest

from csvfs.datapath import DataPath

pytestmark = pytest.mark.timeout(30)
UNIT = 64 * 1024


@pytest.fixture
def image_fd(tmp_path):
    fd = os.open(tmp_path / "image", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 16 * UNIT)
    yield fd
    os.close(fd)


def make_datapath(fd, calls, revalidate=None):
    async def meta(method, **args):
        calls.append((method, args))
        raise AssertionError("the direct path must not call the coordinator")

    return DataPath(fd, data_offset=UNIT, unit_size=UNIT, meta=meta, revalidate=revalidate)


async def test_direct_io_lands_at_the_mapped_unit_and_holes_read_zeros(image_fd):
    calls = []
    data = make_datapath(image_fd, calls)
    handle = data.opened(7, size=3 * UNIT, runs=[[0, 5, 1], [2, 9, 1]], version=1)
    assert await data.write(handle, UNIT - 3, b"abc") == 3
    assert os.pread(image_fd, 3, UNIT + 5 * UNIT + UNIT - 3) == b"abc"
    assert await data.read(handle, UNIT - 3, 3) == b"abc"
    assert await data.read(handle, UNIT, 8) == bytes(8)  # file unit 1 is a hole
    assert await data.read(handle, 3 * UNIT - 2, 10) == bytes(2)  # clipped at EOF
    assert calls == []


async def test_expired_session_revalidates_before_any_byte_reaches_the_image(image_fd):
    calls = []
    data = make_datapath(image_fd, calls)
    handle = data.opened(7, size=UNIT, runs=[[0, 2, 1]], version=1)
    answers = []
    async def revalidate():
        answers.append("asked")
        return time.monotonic() + 10

    async def shut_down():
        return None

    data.revalidate = revalidate
    data.valid_until = time.monotonic() - 1  # a stall outlived the lease
    assert data.write_direct(handle, 0, b"x") is False  # the fast path refuses
    assert await data.write(handle, 0, b"ok") == 2  # revalidated, then written
    assert answers == ["asked"]

    data.revalidate = shut_down  # the node is unmounting
    data.valid_until = time.monotonic() - 1
    with pytest.raises(OSError) as failure:
        await data.write(handle, 0, b"stale")
    assert failure.value.errno == errno.EIO
    assert os.pread(image_fd, 5, UNIT + 2 * UNIT) == b"ok" + bytes(3)
    with pytest.raises(OSError):
        await data.read(handle, 0, 2)
    assert calls == []


async def test_a_real_io_error_sends_the_write_through_the_coordinator(tmp_path):
    """The image opened read-only: pwrite fails for real (EBADF), and the data path
    does the write again through the coordinator, with no error to the caller."""
    path = tmp_path / "image"
    writable = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(writable, 16 * UNIT)
    read_only = os.open(path, os.O_RDONLY)
    calls = []

    async def coordinator(method, **args):  # does the I/O where the path works
        calls.append(method)
        position = UNIT + 5 * UNIT + args["offset"]  # file unit 0 is volume unit 5
        if method == "io_write":
            os.pwrite(writable, args["data"], position)
            return {"written": len(args["data"])}
        return os.pread(writable, args["length"], position)

    try:
        data = DataPath(read_only, data_offset=UNIT, unit_size=UNIT, meta=coordinator)
        handle = data.opened(7, size=UNIT, runs=[[0, 5, 1]], version=1)
        assert await data.write(handle, 100, b"through") == 7
        assert data.storage.redirected and "Bad file descriptor" in data.storage.reason
        assert await data.read(handle, 100, 7) == b"through"
        assert calls == ["io_write", "io_read"]
        assert os.pread(read_only, 7, UNIT + 5 * UNIT + 100) == b"through"
        assert data.storage.probe()  # reads work on this descriptor: the path is back
        data.storage.probed()
        assert not data.storage.redirected
        assert await data.read(handle, 100, 7) == b"through"
        assert calls == ["io_write", "io_read"]  # read directly again
    finally:
        os.close(read_only)
        os.close(writable)
