"""A volume on a block device, read and written with O_DIRECT: SectorIO against a model
at any offset and length, the choice of O_DIRECT on opening, the block-device CLI, and
nodes on a loop device that see what "another host" wrote past their page cache."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from csvfs.volume import direct
from csvfs.volume import format as fmt
from csvfs.volume.image import Volume
from scripts.nodes import fd_flags, fds_open_on
from tests.cluster import csvfs, make_loop_volume

pytestmark = pytest.mark.timeout(120)

needs_loop_devices = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("losetup") or not os.path.exists("/dev/loop-control"),
    reason="needs root and loop devices")


@pytest.fixture
def loop_device(tmp_path):
    """A blank 64 MiB loop device (losetup --direct-io=on), detached afterwards."""
    backing = tmp_path / "device.backing"
    subprocess.run(["truncate", "-s", "64M", backing], check=True)
    device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", backing],
                            check=True, capture_output=True, text=True).stdout.strip()
    yield Path(device), backing
    subprocess.run(["losetup", "--detach", device], capture_output=True)


# -- SectorIO, in process ------------------------------------------------------------------


def open_direct(path: Path) -> tuple[int, direct.SectorIO]:
    fd = os.open(path, os.O_RDWR)
    return fd, direct.enable(fd)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sector_io_reads_and_writes_like_pread_and_pwrite_at_any_offset(tmp_path, seed):
    size = 256 * 1024
    path = tmp_path / "image"
    path.write_bytes(bytes(size))
    model = bytearray(size)
    fd, sectors = open_direct(path)
    chance = random.Random(seed)
    try:
        assert fd_flags("self", fd) & os.O_DIRECT
        for _ in range(300):
            offset = chance.randrange(size - 1)
            length = chance.choice([1, 3, 511, 512, 513, 4096, 5000, 70_000])
            length = min(length, size - offset)
            if chance.random() < 0.6:
                data = chance.randbytes(length)
                assert sectors.pwrite(data, offset) == length
                model[offset : offset + length] = data
            else:
                assert sectors.pread(length, offset) == model[offset : offset + length]
        assert sectors.pread(size, 0) == model
        assert sectors.pread(4096, size - 100) == model[-100:]  # short at the end
        assert sectors.pread(10, size + 4096) == b""
    finally:
        os.close(fd)
    assert path.read_bytes() == model  # what it wrote is really on the file


def test_a_write_within_one_sector_keeps_the_rest_of_it(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(bytes(range(256)) * 16)
    fd, sectors = open_direct(path)
    try:
        sectors.pwrite(b"XY", 700)
        sectors.pwrite(b"Z" * 600, 1000)  # spans the sector boundary at 1024
    finally:
        os.close(fd)
    expected = bytearray(bytes(range(256)) * 16)
    expected[700:702] = b"XY"
    expected[1000:1600] = b"Z" * 600
    assert path.read_bytes() == expected


def test_an_image_file_uses_the_page_cache_unless_asked(tmp_path):
    image = tmp_path / "vol.img"
    csvfs("mkfs", image, "--size", "64M")
    volume = Volume.open(image, writable=True)
    try:
        assert not volume.direct and not fd_flags("self", volume.fd) & os.O_DIRECT
    finally:
        volume.close()
    volume = Volume.open(image, writable=True, direct_io=True)
    try:
        assert volume.direct and fd_flags("self", volume.fd) & os.O_DIRECT
        assert volume.read(0, 4)[:4] == fmt.encode_superblock(volume.sb)[:4]
    finally:
        volume.close()


# -- a block device ---------------------------------------------------------------------------


@needs_loop_devices
def test_mkfs_on_a_block_device_needs_a_key_file_and_takes_the_whole_device(tmp_path,
                                                                            loop_device):
    device, _ = loop_device
    key = tmp_path / "cluster.key"
    refused = csvfs("mkfs", device, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"csvfs: error: {device} is a block device: name its "
                                      "cluster key file with --key (or CSVFS_KEY)")
    too_big = csvfs("mkfs", device, "--size", "1G", "--key", key, check=False)
    assert too_big.returncode == 2 and "holds only 67108864 bytes" in too_big.stderr
    assert not key.exists()
    made = csvfs("mkfs", device, "--key", key)
    assert f"on {device}: 64M" in made.stdout and f"cluster key in {key}" in made.stdout
    again = csvfs("mkfs", device, "--key", key, check=False)
    assert again.returncode == 14 and "already holds csvfs volume" in again.stderr
    volume = Volume.open(device)
    try:
        assert volume.direct and volume.sb.size == 64 << 20
        assert direct.sector_size(volume.fd) == 512  # the loop device's logical sector
    finally:
        volume.close()
    assert "volume is clean" in csvfs("fsck", device).stdout


@needs_loop_devices
def test_mkfs_refuses_a_device_that_holds_data(tmp_path, loop_device):
    device, backing = loop_device
    with open(backing, "r+b") as handle:
        handle.write(b"someone else's file system")
    refused = csvfs("mkfs", device, "--key", tmp_path / "key", check=False)
    assert refused.returncode == 14 and "is not empty; use --force" in refused.stderr
    csvfs("mkfs", device, "--key", tmp_path / "key", "--force")


@needs_loop_devices
def test_metadata_reads_bypass_the_page_cache(tmp_path, loop_device):
    """What another host writes to the shared device (here: written to the loop
    device's backing file, past /dev/loopN's page cache) is what the next read sees."""
    device, backing = loop_device
    csvfs("mkfs", device, "--key", tmp_path / "key")
    direct_volume, cached_volume = Volume.open(device), Volume.open(device, direct_io=False)
    lease = direct_volume.sb.lease.offset
    try:
        before = cached_volume.read(lease, 512)
        assert direct_volume.read(lease, 512) == before
        write_past_this_host(backing, lease, b"\xee" * 512)
        assert direct_volume.read(lease, 512) == b"\xee" * 512
        assert cached_volume.read(lease, 512) == before  # the page cache has not seen it
    finally:
        direct_volume.close()
        cached_volume.close()


def write_past_this_host(backing: Path, offset: int, data: bytes) -> None:
    fd = os.open(backing, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- nodes on a loop device, on real mounts ----------------------------------------------------


def image_fd_flags(node, device: Path) -> int:
    fds = fds_open_on(node.process.pid, os.fspath(device))
    assert fds, f"{node.name} has no descriptor on {device}"
    return fd_flags(node.process.pid, fds[0])


@needs_loop_devices
def test_nodes_on_a_block_device_use_o_direct_and_see_each_others_unaligned_writes(
        tmp_path, nodes):
    device = make_loop_volume(tmp_path, "128M", [])
    first, second = nodes.start(device, "n1"), nodes.start(device, "n2")
    assert image_fd_flags(first, device) & os.O_DIRECT
    assert image_fd_flags(second, device) & os.O_DIRECT
    model = bytearray(os.urandom(3 << 20))
    first.path("disk").write_bytes(model)
    chance = random.Random(7)
    fds = [os.open(node.path("disk"), os.O_RDWR) for node in (first, second)]
    try:
        for step in range(200):
            offset = chance.randrange(len(model) - 9000)
            data = chance.randbytes(chance.choice([1, 100, 511, 513, 4096, 8999]))
            os.pwrite(fds[step % 2], data, offset)
            model[offset : offset + len(data)] = data
            if step % 20 == 0:
                os.fsync(fds[step % 2])
            reader = fds[(step + 1) % 2]
            assert os.pread(reader, len(data) + 10, offset) == model[offset : offset +
                                                                         len(data) + 10]
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    assert second.path("disk").read_bytes() == model
    assert first.path("disk").read_bytes() == model


@needs_loop_devices
@pytest.mark.parametrize("direct_io", [True, False], ids=["o-direct", "page-cache"])
def test_a_node_sees_file_data_another_host_wrote(tmp_path, nodes, direct_io):
    """Another host's write to the shared device reaches an O_DIRECT node's readers;
    a node reading through its page cache keeps serving the old bytes, which is why
    O_DIRECT is the default for a block device."""
    device = make_loop_volume(tmp_path, "64M", [])
    node = nodes.start(device, "n1", "--direct-io" if direct_io else "--no-direct-io")
    marker = b"csvfs-direct-io-marker-" + os.urandom(8).hex().encode()
    with open(node.path("file"), "wb") as file:
        file.write(marker + bytes(8192 - len(marker)))
        file.flush()
        os.fsync(file.fileno())  # on the shared device, where the other host looks
    fd = os.open(node.path("file"), os.O_RDONLY)
    try:
        assert os.pread(fd, len(marker), 0) == marker  # now in any cache on the way
        where = (tmp_path / "vol.backing").read_bytes().index(marker)
        write_past_this_host(tmp_path / "vol.backing", where, b"X" * len(marker))
        seen = os.pread(fd, len(marker), 0)
    finally:
        os.close(fd)
    assert seen == (b"X" * len(marker) if direct_io else marker)


@needs_loop_devices
def test_a_device_with_4k_sectors_is_refused_for_writing_with_o_direct(tmp_path):
    backing = tmp_path / "4k.backing"
    subprocess.run(["truncate", "-s", "64M", backing], check=True)
    device = subprocess.run(["losetup", "--find", "--show", "--sector-size", "4096",
                             backing], check=True, capture_output=True, text=True).stdout.strip()
    try:
        key = tmp_path / "key"
        csvfs("mkfs", device, "--key", key)
        volume = Volume.open(device)  # reading is fine: status, events, backups
        volume.close()
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        refused = csvfs("mount", device, mountpoint, "--key", key, check=False)
        assert refused.returncode == 10
        assert refused.stderr.strip() == (
            f"csvfs: error: {device}: its logical sector is 4096 bytes; csvfs writes it with "
            "O_DIRECT in 512-byte sectors (use a device with 512-byte logical sectors, or "
            "--no-direct-io on one host)")
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True)
