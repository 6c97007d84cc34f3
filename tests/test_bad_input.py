"""Bad input gets one clear line, a documented exit code, and no write to the image."""

import dataclasses
import hashlib
import os
import signal
import time

import pytest

from csvfs.cluster.election import read_lease
from csvfs.volume import format as fmt
from csvfs.volume.image import Volume
from scripts.nodes import force_unmount, is_mounted, pid_alive
from tests.cluster import csvfs, make_volume

pytestmark = pytest.mark.timeout(60)

BAD_VOLUME, BAD_KEY, BAD_MOUNTPOINT, VOLUME_BUSY, EXISTS, USAGE = 10, 11, 12, 13, 14, 2


def digest(path):
    return hashlib.blake2b(path.read_bytes()).hexdigest()


def assert_one_line_error(result, code, *words):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def assert_fsck_repairs(image, problem):
    """fsck finds `problem` (exit 4), --repair fixes it (exit 1), then all is clean (0)."""
    report = csvfs("fsck", image, check=False)
    assert report.returncode == 4 and problem in report.stdout, report.stdout
    assert csvfs("fsck", "--repair", image, check=False).returncode == 1
    assert csvfs("fsck", image, check=False).returncode == 0


@pytest.fixture
def small_image(tmp_path):
    return make_volume(tmp_path, size="64M")


@pytest.fixture
def mountpoint(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path)


def refused_without_write(image, mountpoint, code, *words, key=None):
    before = digest(image)
    args = ["mount", image, mountpoint] + (["--key", key] if key else [])
    was_mounted = is_mounted(mountpoint)
    assert_one_line_error(csvfs(*args, check=False), code, *words)
    assert is_mounted(mountpoint) == was_mounted  # nothing mounted by the refused command
    assert digest(image) == before


def test_path_that_is_not_a_volume(tmp_path, mountpoint):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(1 << 20))
    (tmp_path / "junk.bin.key").write_text("00" * 32)
    refused_without_write(junk, mountpoint, BAD_VOLUME, "not a csvfs volume")
    assert_one_line_error(csvfs("fsck", junk, check=False), BAD_VOLUME, "not a csvfs volume")


def test_missing_path_and_directory(tmp_path, mountpoint):
    assert_one_line_error(csvfs("mount", tmp_path / "nope.img", mountpoint, check=False),
                          BAD_VOLUME, "no such file")
    assert_one_line_error(csvfs("fsck", tmp_path, check=False), BAD_VOLUME, "not a csvfs volume")


def test_truncated_image(small_image, mountpoint):
    os.truncate(small_image, 32 << 20)
    refused_without_write(small_image, mountpoint, BAD_VOLUME, "truncated")


def test_corrupt_primary_superblock_uses_the_copy(small_image, mountpoint, nodes):
    with open(small_image, "r+b") as handle:
        handle.seek(40)
        handle.write(b"\xff" * 16)
    node = nodes.start(small_image)
    node.path("works").write_text("yes")
    node.unmount()
    assert_fsck_repairs(small_image, "primary superblock")
    assert nodes.start(small_image, "again").path("works").read_text() == "yes"


def test_both_superblocks_corrupt(small_image, mountpoint):
    size = small_image.stat().st_size
    with open(small_image, "r+b") as handle:
        for offset in (40, size - fmt.SUPERBLOCK_SIZE + 40):
            handle.seek(offset)
            handle.write(b"\xff" * 16)
    refused_without_write(small_image, mountpoint, BAD_VOLUME, "corrupt")


def test_other_format_version(small_image, mountpoint):
    with _open(small_image) as volume:
        sb = volume.sb
    newer = fmt.encode_superblock(dataclasses.replace(sb, version=fmt.FORMAT_VERSION + 1))
    with open(small_image, "r+b") as handle:
        for offset in (0, sb.copy_offset):
            handle.seek(offset)
            handle.write(newer)
    refused_without_write(small_image, mountpoint, BAD_VOLUME, "version")


def test_corrupt_journal_record(small_image, tmp_path, nodes):
    node = nodes.start(small_image)
    for index in range(5):
        os.mkdir(node.path(f"dir{index}"))
    node.kill(signal.SIGKILL)  # no clean checkpoint: the records stay in the journal
    with _open(small_image) as volume:
        start = volume.sb.journal.offset
        offsets = [o for o in range(0, volume.sb.journal.length, fmt.SECTOR)
                   if volume.read(start + o, 4) == fmt.JOURNAL_MAGIC]
    assert len(offsets) >= 5
    with open(small_image, "r+b") as handle:
        handle.seek(start + offsets[2] + 20)
        handle.write(b"\x00\xff\x00\xff")
    mountpoint = tmp_path / "mnt-check"
    mountpoint.mkdir()
    refused_without_write(small_image, mountpoint, BAD_VOLUME, "journal record", "fsck")
    assert_fsck_repairs(small_image, "corrupt")
    survivor = nodes.start(small_image, "after-repair")
    names = set(os.listdir(survivor.mountpoint))
    assert {"dir0"} <= names and "dir4" not in names


def test_missing_and_wrong_key(small_image, tmp_path, mountpoint):
    key = small_image.with_name(small_image.name + ".key")
    other = tmp_path / "other.key"
    other.write_text("ab" * 32)
    other.chmod(0o600)
    refused_without_write(small_image, mountpoint, BAD_KEY, "does not belong", key=other)
    key.unlink()
    refused_without_write(small_image, mountpoint, BAD_KEY, "does not exist")


def write_key(path, content: bytes, mode: int = 0o600):
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_key_file_that_is_not_text(small_image, tmp_path, mountpoint, nodes):
    key = write_key(tmp_path / "bad.key", bytes(range(256)) * 8 + os.urandom(32))
    refused_without_write(small_image, mountpoint, BAD_KEY, "not a csvfs key", key=key)
    nodes.start(small_image)  # status needs the key only to ask a live coordinator
    result = csvfs("status", small_image, "--key", key, check=False)
    assert_one_line_error(result, BAD_KEY, "not a csvfs key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_key_file_open_to_others_is_refused(small_image, tmp_path, mountpoint, mode, nodes):
    """Like ssh with a private key: whoever can read the key can join the cluster."""
    good = small_image.with_name(small_image.name + ".key").read_bytes()
    key = write_key(tmp_path / "loose.key", good, mode)
    refused_without_write(small_image, mountpoint, BAD_KEY, f"mode {mode:04o}", "chmod 600",
                          key=key)
    nodes.start(small_image)
    result = csvfs("status", small_image, "--key", key, check=False)
    assert_one_line_error(result, BAD_KEY, "open to group or others")


def test_busy_and_missing_mountpoint(small_image, tmp_path, nodes):
    node = nodes.start(small_image)
    (tmp_path / "second").mkdir()
    second = make_volume(tmp_path / "second", size="64M")
    refused_without_write(second, node.mountpoint, BAD_MOUNTPOINT, "busy")
    refused_without_write(second, tmp_path / "absent", BAD_MOUNTPOINT, "does not exist")


def test_node_name_already_in_use(small_image, tmp_path, nodes):
    first = nodes.start(small_image)
    other = tmp_path / "mnt-other"
    other.mkdir()
    result = csvfs("mount", small_image, other, "--name", first.name, check=False)
    assert_one_line_error(result, VOLUME_BUSY, "already mounted", first.name)
    assert not is_mounted(other)


def test_bad_listen_and_lease_arguments(small_image, tmp_path, nodes):
    first = nodes.start(small_image)
    other = tmp_path / "mnt-other"
    other.mkdir()
    for args in (["--listen", "nowhere"], ["--listen", "127.0.0.1:99999"], ["--lease", "0"],
                 ["--lease", "abc"], ["--advertise", "[::1"], ["--advertise", "host:0"],
                 ["--listen", "127.0.0.1:0", "--advertise", "0.0.0.0"],
                 ["--io-threads", "17"], ["--io-threads", "-1"], ["--io-threads", "many"]):
        assert_one_line_error(csvfs("mount", small_image, other, *args, check=False), USAGE)
    for wildcard in ("0.0.0.0:0", "[::]:0"):  # other nodes could not reach it
        result = csvfs("mount", small_image, other, "--listen", wildcard, check=False)
        assert_one_line_error(result, USAGE, "--advertise")
    taken = first.rpc_address()
    result = csvfs("mount", small_image, other, "--listen", taken, check=False)
    assert_one_line_error(result, USAGE, "cannot listen", taken)
    assert not is_mounted(other)


def test_mkfs_refuses_to_overwrite_and_bad_sizes(small_image, tmp_path):
    before = digest(small_image)
    assert_one_line_error(csvfs("mkfs", small_image, "--size", "64M", check=False), EXISTS,
                          "--force")
    assert digest(small_image) == before
    for size in ("12Q", "abc", "-5M", "1M"):
        assert_one_line_error(csvfs("mkfs", tmp_path / "x.img", "--size", size, check=False),
                              USAGE)
    assert_one_line_error(csvfs("mkfs", tmp_path / "x.img", "--size", "64M", "--unit", "3M",
                                check=False), USAGE, "power of two")
    assert csvfs("mkfs", small_image, "--size", "64M", "--force", check=False).returncode == 0


def test_mkfs_1t_is_sparse(tmp_path):
    image = tmp_path / "big.img"
    csvfs("mkfs", image, "--size", "1T")
    assert image.stat().st_size == 1 << 40
    assert image.stat().st_blocks * 512 < 8 << 20


def test_unknown_command_and_option():
    assert csvfs("frobnicate", check=False).returncode == USAGE
    assert csvfs("mount", check=False).returncode == USAGE


def test_background_mount_returns_ready_and_stops_on_sigterm(small_image, mountpoint):
    result = csvfs("mount", small_image, mountpoint, "--name", "daemon")
    assert result.returncode == 0 and is_mounted(mountpoint)
    (mountpoint / "file").write_bytes(b"data")
    with _open(small_image) as volume:
        pid = read_lease(volume).owner_pid
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while is_mounted(mountpoint) or pid_alive(pid):
        assert time.monotonic() < deadline, "node did not stop on SIGTERM"
        time.sleep(0.05)
    assert csvfs("fsck", small_image, check=False).returncode == 0
    with _open(small_image) as volume:
        assert read_lease(volume).owner_slot == -1  # the lease was given up cleanly


class _open:
    def __init__(self, path):
        self.volume = Volume.open(path)

    def __enter__(self):
        return self.volume

    def __exit__(self, *exc):
        self.volume.close()


def test_unit_mapped_twice_is_refused_then_repaired(small_image, tmp_path, nodes):
    node = nodes.start(small_image)
    # both larger than a unit, so unit-mapped (a smaller file takes 4 KiB blocks)
    first, second = os.urandom(2 << 20), os.urandom(2 << 20)
    node.path("first").write_bytes(first)
    node.path("second").write_bytes(second)
    node.unmount()
    _map_second_onto_first(small_image)

    mountpoint = tmp_path / "mnt-check"
    mountpoint.mkdir()
    refused_without_write(small_image, mountpoint, BAD_VOLUME, "inconsistent", "fsck")
    assert_fsck_repairs(small_image, "already mapped by another inode")
    survivor = nodes.start(small_image, "after-repair")
    assert survivor.path("first").read_bytes() == first  # the owner keeps its data
    # the intruder's map is now that one unit, which becomes a hole
    assert survivor.path("second").read_bytes() == bytes(2 << 20)


def _map_second_onto_first(image):
    """Rewrite the newest checkpoint so that `second` claims one of `first`'s units."""
    from coordinator import recovery

    volume = Volume.open(image, writable=True)
    try:
        newest = max(recovery.read_checkpoints(volume)[0], key=lambda c: (c.seq, c.epoch))
        rows = {row[0]: row for row in newest.image["inodes"]}
        names = dict(next(names for ino, names in newest.image["dirs"] if ino == 1))
        first_runs = rows[names[b"first"]][-1]
        rows[names[b"second"]][-1] = [[0, first_runs[0][1], 1]]
        blob = fmt.encode_checkpoint(newest.epoch, newest.seq, newest.image)
        volume.write(volume.sb.checkpoint_slots()[newest.slot].offset, blob)
        volume.sync()
    finally:
        volume.close()
