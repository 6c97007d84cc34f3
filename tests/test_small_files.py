"""Small files on real mounts: 4 KiB blocks, conversion to units, space, df and du."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator import recovery
from csvfs.volume.errors import ExitCode
from csvfs.volume.image import Volume
from tests.cluster import csvfs, make_volume
from tests.small_writer import UNIT, pattern

pytestmark = pytest.mark.timeout(120)

BLOCK = 4096


def _ext4_size(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _used(path: Path) -> int:
    info = os.statvfs(path)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


def test_small_files_written_on_one_node_read_on_another(image, nodes):
    first = nodes.start(image, "n1")
    second = nodes.start(image, "n2")
    rng = random.Random(1)
    sizes = [0, 1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, UNIT - 1, UNIT]
    sizes += [rng.randint(0, 40 * 1024) for _ in range(200)]
    contents = {f"d{index % 7}/f{index}": rng.randbytes(size) for index, size in
                enumerate(sizes)}
    for index in range(7):
        first.path(f"d{index}").mkdir()
    for name, data in contents.items():
        first.path(name).write_bytes(data)
    for name, data in contents.items():
        assert second.path(name).read_bytes() == data, name
        st = os.stat(second.path(name))
        assert st.st_size == len(data)
        assert st.st_blocks * 512 == _ext4_size(len(data)), (name, len(data), st.st_blocks)
    # rewrite some in place from the other node, and grow others there
    for name in list(contents)[:40]:
        data = contents[name]
        extra = rng.randbytes(rng.randint(1, 9000))
        with open(second.path(name), "r+b") as file:
            file.seek(len(data) // 2)
            file.write(extra)
        contents[name] = data[: len(data) // 2] + extra + data[len(data) // 2 + len(extra):]
    for name, data in contents.items():
        assert first.path(name).read_bytes() == data, name


def test_space_of_small_files_df_and_du(image, nodes):
    node = nodes.start(image, "n1")
    root = node.mountpoint
    info = os.statvfs(root)
    assert info.f_bsize == info.f_frsize == BLOCK
    volume = Volume.open(image)
    volume.close()
    assert info.f_blocks == volume.sb.data_units * (UNIT // BLOCK)
    before = _used(root)
    rng = random.Random(2)
    sizes = [rng.randint(0, 40 * 1024) for _ in range(500)]
    tree = root / "tree"
    tree.mkdir()
    for index, size in enumerate(sizes):
        (tree / f"f{index}").write_bytes(pattern(size, index))
    ext4 = sum(_ext4_size(size) for size in sizes)
    grown = _used(root) - before
    print(f"500 small files: {grown} bytes used, {ext4} on ext4: ratio {grown / ext4:.3f}")
    assert grown <= 1.5 * ext4
    assert grown >= ext4  # every block of data is counted
    # du counts st_blocks; df the volume's 4 KiB blocks
    du = subprocess.run(["du", "-s", "-B1", str(tree)], capture_output=True, text=True,
                        check=True)
    assert int(du.stdout.split()[0]) == ext4
    df = subprocess.run(["df", "-B4096", "--output=size,used,avail", str(root)],
                        capture_output=True, text=True, check=True)
    size, used, avail = map(int, df.stdout.splitlines()[1].split())
    assert size == info.f_blocks and used + avail == size
    assert used * BLOCK == _used(root)
    for index in range(len(sizes)):
        assert (tree / f"f{index}").read_bytes() == pattern(sizes[index], index)
    for index in range(len(sizes)):
        (tree / f"f{index}").unlink()
    assert _used(root) == before  # every block back, and every block unit with them
    node.unmount()
    result = csvfs("fsck", image, check=False)
    assert result.returncode == 0, result.stdout


def test_growing_past_one_unit_while_another_node_reads(image, nodes, tmp_path):
    first = nodes.start(image, "n1")
    second = nodes.start(image, "n2")
    path = first.path("grows")
    data = pattern(3 * UNIT)
    with open(path, "wb") as file:
        file.write(data[:100])
    assert os.stat(path).st_blocks == BLOCK // 512
    chunk = 64 * 1024
    reader = subprocess.Popen([sys.executable, "-m", "tests.small_writer", "reader",
                               str(second.path("grows")), "6", str(chunk)],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        fd = os.open(path, os.O_WRONLY)
        try:
            written = 100
            while written < len(data):
                end = min(len(data), written + rng_step(written, chunk))
                os.pwrite(fd, data[written:end], written)
                written = end
                time.sleep(0.002)
            os.fsync(fd)
        finally:
            os.close(fd)
        output, _ = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, output
    assert int(output) > 10
    assert second.path("grows").read_bytes() == data
    blocks = os.stat(second.path("grows")).st_blocks  # whole units now, some allocated ahead
    assert blocks >= 3 * UNIT // 512 and blocks % (UNIT // 512) == 0

    # shrink: it stays unit-mapped; regrow from the other node
    os.truncate(path, 50)
    assert second.path("grows").read_bytes() == data[:50]
    assert os.stat(path).st_blocks == UNIT // 512
    with open(second.path("grows"), "r+b") as file:
        file.seek(50)
        file.write(data[50:200_000])
    assert first.path("grows").read_bytes() == data[:200_000]
    # a file emptied and rewritten small is small again
    os.truncate(path, 0)
    path.write_bytes(b"tiny")
    assert os.stat(second.path("grows")).st_blocks == BLOCK // 512
    assert second.path("grows").read_bytes() == b"tiny"
    for node in (first, second):
        node.unmount()
    result = csvfs("fsck", image, check=False)
    assert result.returncode == 0, result.stdout


def rng_step(written: int, chunk: int) -> int:
    """Write sizes that cross blocks, block-unit ends and the first unit's end."""
    return (chunk - 1) if written % 3 else 4097


def test_sigkill_of_the_coordinator_during_conversions(tmp_path, nodes):
    image = make_volume(tmp_path, "1G")
    nodes.start(image, "n1")
    worker_node = nodes.start(image, "n2")
    ack_log = tmp_path / "acks.log"
    ack_log.touch()
    workdir = worker_node.path("grow")
    workdir.mkdir()
    worker = subprocess.Popen([sys.executable, "-m", "tests.small_writer", "grower",
                               str(workdir), str(ack_log)], stderr=subprocess.PIPE)
    try:
        time.sleep(2.0)
        victim = nodes.started[0]
        victim.kill(signal.SIGKILL, unmount=False)
        time.sleep(3.0)  # n2 takes over; the grower goes on through the failover
        assert worker.poll() is None, worker.stderr.read()
        written = len(ack_log.read_text().splitlines())
        time.sleep(1.0)
        assert len(ack_log.read_text().splitlines()) > written  # and on after it
    finally:
        worker.kill()
        worker.wait()
        worker.stderr.close()
    acked: dict[str, int] = {}
    for line in ack_log.read_text().splitlines():
        name, size = line.split()
        acked[name] = int(size)
    assert sum(1 for size in acked.values() if size > UNIT) >= 2, acked
    print(f"{len(acked)} files, {sum(size > UNIT for size in acked.values())} converted")
    for index, (name, size) in enumerate(sorted(acked.items())):
        data = (workdir / name).read_bytes()
        assert len(data) >= size, name
        assert data[:size] == pattern(UNIT + 300_000, index)[:size], name
    for node in nodes.started:
        node.stop()
    result = csvfs("fsck", image, check=False)
    assert result.returncode == 0, result.stdout


def test_fsck_reports_two_files_claiming_one_block(image, nodes):
    node = nodes.start(image, "n1")
    node.path("a").write_bytes(b"a" * 100)
    node.path("b").write_bytes(b"b" * 100)
    node.unmount()
    volume = Volume.open(image, writable=True)
    try:
        recovered = recovery.load(volume)
        state = recovered.state
        names = state.entries[1]
        first, second = state.inodes[names[b"a"]], state.inodes[names[b"b"]]
        assert first.blocks and second.blocks
        second.units = dict(first.units)
        recovery.write_checkpoint(volume, recovered.next_checkpoint_slot, recovered.last_epoch,
                                  recovered.last_seq + 1, state, recovery.new_journal_gen())
    finally:
        volume.close()
    result = csvfs("fsck", image, check=False)
    assert result.returncode == ExitCode.FSCK_UNREPAIRED, result.stdout
    assert "is already mapped by another inode" in result.stdout
