"""The on-disk format: superblock, layout, checksummed blocks, codecs, human sizes."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import msgpack
import pytest

from csvfs.mkfs import make_volume
from csvfs.volume import format as fmt
from csvfs.volume.errors import KeyFileError, UsageError, VolumeError, VolumeExistsError
from csvfs.volume.image import Volume, default_key_path, read_key
from csvfs.volume.sizes import format_size, parse_size

pytestmark = pytest.mark.timeout(60)

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SB_HEADER = struct.calcsize("<8sIII")


def _superblock(size: int = 10 * G, unit: int = M) -> fmt.Superblock:
    return fmt.plan_layout(size, unit, fmt.key_id(b"k" * 32), 1_700_000_000_123_456_789)


def _body_end(block: bytes) -> int:
    """Offset just past the checksummed part of an encoded superblock."""
    _magic, _version, length, _crc = struct.unpack_from("<8sIII", block)
    return SB_HEADER + length


# -- superblock --------------------------------------------------------------------------


def test_superblock_round_trip():
    sb = _superblock()
    block = fmt.encode_superblock(sb)
    assert len(block) == fmt.SUPERBLOCK_SIZE
    assert block[:8] == fmt.SUPERBLOCK_MAGIC
    assert fmt.decode_superblock(block) == sb


def test_superblock_every_field_survives():
    sb = fmt.Superblock(
        uuid="0f0e0d0c-0b0a-4908-8706-050403020100",
        size=123 * G + 4096,
        unit_size=256 * K,
        key_id="ab" * 16,
        created_ns=2**62 + 7,
        lease=fmt.Region(4096, 1),
        events=fmt.Region(8192, 2),
        journal=fmt.Region(16384, 3),
        checkpoint_a=fmt.Region(32768, 4),
        checkpoint_b=fmt.Region(65536, 5),
        data=fmt.Region(1 << 40, 6 * 256 * K),
    )
    decoded = fmt.decode_superblock(fmt.encode_superblock(sb))
    for field in dataclasses.fields(fmt.Superblock):
        assert getattr(decoded, field.name) == getattr(sb, field.name), field.name
    assert decoded.data_units == 6
    assert decoded.copy_offset == sb.size - fmt.SUPERBLOCK_SIZE
    assert decoded.checkpoint_slots() == (sb.checkpoint_a, sb.checkpoint_b)


def test_superblock_flipped_byte_anywhere_is_rejected():
    block = fmt.encode_superblock(_superblock())
    end = _body_end(block)
    assert SB_HEADER < end <= fmt.SUPERBLOCK_SIZE
    for position in range(end):
        for flip in (0x01, 0x80):
            damaged = bytearray(block)
            damaged[position] ^= flip
            with pytest.raises(fmt.FormatError):
                fmt.decode_superblock(bytes(damaged))


def test_superblock_padding_is_not_checksummed():
    block = fmt.encode_superblock(_superblock())
    damaged = bytearray(block)
    damaged[_body_end(block)] ^= 0xFF
    damaged[-1] ^= 0xFF
    assert fmt.decode_superblock(bytes(damaged)) == fmt.decode_superblock(block)


@pytest.mark.parametrize("cut", [0, 1, SB_HEADER - 1, SB_HEADER, SB_HEADER + 10])
def test_superblock_cut_short(cut):
    block = fmt.encode_superblock(_superblock())
    with pytest.raises(fmt.FormatError):
        fmt.decode_superblock(block[:cut])


def test_superblock_zeros_or_garbage():
    with pytest.raises(fmt.FormatError, match="bad magic"):
        fmt.decode_superblock(bytes(fmt.SUPERBLOCK_SIZE))
    with pytest.raises(fmt.FormatError, match="bad magic"):
        fmt.decode_superblock(b"x" * fmt.SUPERBLOCK_SIZE)


@pytest.mark.parametrize("version", [0, 2, 99])
def test_superblock_wrong_version(version):
    sb = dataclasses.replace(_superblock(), version=version)
    with pytest.raises(fmt.UnsupportedVersion) as caught:
        fmt.decode_superblock(fmt.encode_superblock(sb))
    assert caught.value.version == version
    assert isinstance(caught.value, fmt.FormatError)


def test_superblock_valid_checksum_but_incomplete_body():
    body = msgpack.packb({"uuid": "x", "size": 1}, use_bin_type=True)
    crc = zlib.crc32(struct.pack("<II", fmt.FORMAT_VERSION, len(body)) + body)
    block = struct.pack("<8sIII", fmt.SUPERBLOCK_MAGIC, fmt.FORMAT_VERSION, len(body), crc) + body
    with pytest.raises(fmt.FormatError, match="incomplete"):
        fmt.decode_superblock(block)


# -- layout ---------------------------------------------------------------------------------

UNITS = [64 * K, 128 * K, 256 * K, 512 * K, M, 2 * M, 4 * M]
REGION_NAMES = ("lease", "events", "journal", "checkpoint_a", "checkpoint_b", "data")


def _clamp(value, low, high):
    return max(low, min(high, value))


@pytest.mark.parametrize("size", [64 * M, 10 * G, T])
@pytest.mark.parametrize("unit", UNITS)
def test_plan_layout(size, unit):
    sb = fmt.plan_layout(size, unit, "key", 5)
    assert (sb.size, sb.unit_size, sb.key_id, sb.created_ns) == (size, unit, "key", 5)
    regions = [getattr(sb, name) for name in REGION_NAMES]
    # in order, back to back up to the data area, which is unit aligned
    assert regions[0].offset == fmt.SUPERBLOCK_SIZE
    for before, after in zip(regions[:-2], regions[1:-1], strict=True):
        assert after.offset == before.end
    assert regions[-1].offset >= regions[-2].end
    assert sb.data.offset % unit == 0
    assert sb.data.offset - regions[-2].end < unit
    for region in regions:
        assert region.length > 0
        assert region.offset % fmt.SECTOR == 0
        assert region.length % fmt.SECTOR == 0
    # no overlap, and the superblock copy sits past the data area
    assert sb.data.end <= sb.copy_offset == size - fmt.SUPERBLOCK_SIZE
    assert sb.copy_offset - sb.data.end < unit  # every whole unit is used
    assert sb.data.length == sb.data_units * unit
    assert sb.data_units >= fmt.MIN_DATA_UNITS
    # sizes as documented
    assert sb.lease.length == fmt.LEASE_REGION_SIZE
    assert sb.events.length == fmt.EVENT_RING_SIZE
    assert sb.journal.length == _clamp(size // 128, 4 * M, 64 * M)
    assert sb.checkpoint_a.length == sb.checkpoint_b.length == _clamp(size // 64, 4 * M, 256 * M)
    assert fmt.decode_superblock(fmt.encode_superblock(sb)) == sb


def test_plan_layout_region_sizes_at_the_clamps():
    assert fmt.plan_layout(64 * M, M, "k", 0).journal.length == 4 * M
    assert fmt.plan_layout(2 * G, M, "k", 0).journal.length == 16 * M  # size / 128
    assert fmt.plan_layout(10 * G, M, "k", 0).journal.length == 64 * M
    assert fmt.plan_layout(T, M, "k", 0).journal.length == 64 * M
    assert fmt.plan_layout(T, M, "k", 0).checkpoint_a.length == 256 * M
    assert fmt.plan_layout(10 * G, M, "k", 0).checkpoint_b.length == 160 * M


def test_plan_layout_odd_size():
    size = 64 * M + 12345
    sb = fmt.plan_layout(size, 64 * K, "k", 0)
    assert sb.data.end <= sb.copy_offset == size - fmt.SUPERBLOCK_SIZE


def test_plan_layout_new_uuid_each_time():
    assert fmt.plan_layout(64 * M, M, "k", 0).uuid != fmt.plan_layout(64 * M, M, "k", 0).uuid


@pytest.mark.parametrize("unit", [0, -M, 1, 4096, 32 * K, 96 * K, 3 * M, 8 * M, M + 1])
def test_plan_layout_rejects_bad_units(unit):
    with pytest.raises(ValueError, match="allocation unit"):
        fmt.plan_layout(10 * G, unit, "k", 0)


@pytest.mark.parametrize("unit", UNITS)
def test_plan_layout_minimum_size(unit):
    with pytest.raises(ValueError, match="too small") as caught:
        fmt.plan_layout(12 * M, unit, "k", 0)
    minimum = int(str(caught.value).split("at least ")[1].split()[0])
    sb = fmt.plan_layout(minimum, unit, "k", 0)
    assert sb.data_units == fmt.MIN_DATA_UNITS
    with pytest.raises(ValueError, match="too small"):
        fmt.plan_layout(minimum - 1, unit, "k", 0)


@pytest.mark.parametrize("size", [0, 4096, M, 8 * M])
def test_plan_layout_rejects_tiny_sizes(size):
    with pytest.raises(ValueError, match="too small"):
        fmt.plan_layout(size, M, "k", 0)


def test_key_id_is_stable_and_distinct():
    assert fmt.key_id(b"a" * 32) == fmt.key_id(b"a" * 32)
    assert fmt.key_id(b"a" * 32) != fmt.key_id(b"b" * 32)
    assert len(fmt.key_id(b"a" * 32)) == 32


# -- checksummed blocks --------------------------------------------------------------------------

PAYLOADS = [None, 0, -1, 2**63 - 1, "text ✓", b"\0\xff" * 100, [1, [2, 3]],
            {"a": 1, 2: b"x", "nested": {"k": [True, False]}}, b"x" * 5000]


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("pad", [1, 512, 4096])
def test_block_round_trip(payload, pad):
    block = fmt.pack_block(b"TEST", payload, pad_to=pad)
    assert len(block) % pad == 0
    assert fmt.unpack_block(block, b"TEST") == payload
    assert fmt.unpack_block(memoryview(block + b"trailing"), b"TEST") == payload
    assert fmt.block_length(block, b"TEST") <= len(block) < fmt.block_length(block, b"TEST") + pad


def test_block_checksum_failure_anywhere():
    block = fmt.pack_block(b"TEST", {"name": b"file", "size": 12345})
    for position in range(len(block)):
        damaged = bytearray(block)
        damaged[position] ^= 0x10
        with pytest.raises(fmt.FormatError):
            fmt.unpack_block(bytes(damaged), b"TEST")


def test_block_errors():
    block = fmt.pack_block(b"TEST", [1, 2, 3])
    with pytest.raises(fmt.FormatError, match="magic"):
        fmt.unpack_block(block, b"OTHR")
    with pytest.raises(fmt.FormatError, match="header"):
        fmt.unpack_block(block[:11], b"TEST")
    with pytest.raises(fmt.FormatError, match="cut short"):
        fmt.unpack_block(block[:-1], b"TEST")
    with pytest.raises(fmt.FormatError):
        fmt.unpack_block(bytes(64), b"TEST")


# -- journal records and checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("op", [
    {"op": "mknod", "ino": 2, "parent": 1, "name": b"f", "mode": 0o100644, "t": 1},
    {"op": "map", "ino": 9, "add": [[0, 5, 3]], "drop": [[7, 1]], "size": 2**40},
    {"op": "setxattr", "ino": 3, "name": b"user.x", "value": b"v" * 3000, "t": 2},
])
def test_journal_record_round_trip(op):
    record = fmt.JournalRecord(epoch=3, seq=1234567, batch_first=1234560, op=op)
    blob = fmt.encode_journal_record(record)
    assert len(blob) % fmt.SECTOR == 0
    decoded, length = fmt.decode_journal_record(blob + bytes(1024))
    assert decoded == record
    assert length == len(blob)


@pytest.mark.parametrize("payload", [[1, 2, 3], [1, 2, 3, "op"], ["1", 2, 3, {}], {"op": 1}, 7])
def test_journal_record_wrong_shape(payload):
    blob = fmt.pack_block(fmt.JOURNAL_MAGIC, payload, pad_to=fmt.SECTOR)
    with pytest.raises(fmt.FormatError, match="journal record"):
        fmt.decode_journal_record(blob)


def test_journal_record_torn():
    record = fmt.JournalRecord(1, 2, 2, {"op": "setxattr", "value": b"z" * 700})
    blob = fmt.encode_journal_record(record)
    for cut in range(0, fmt.block_length(blob, fmt.JOURNAL_MAGIC), 7):
        torn = blob[:cut] + bytes(len(blob) - cut)
        with pytest.raises(fmt.FormatError):
            fmt.decode_journal_record(torn)


def test_checkpoint_round_trip():
    image = {"next_ino": 42, "inodes": [[1, 0o40755, 0, 0, 2, 1, 2, 3, 0, 0, b"", [], []]],
             "dirs": [[1, [[b"a", 2], [b"\xff", 3]]]], "big": b"\0" * 100_000}
    blob = fmt.encode_checkpoint(7, 99, image)
    assert len(blob) % fmt.SECTOR == 0
    assert len(blob) < 10_000  # compressed
    assert fmt.decode_checkpoint(blob + bytes(512)) == (7, 99, image)


def test_checkpoint_corrupt():
    blob = fmt.encode_checkpoint(1, 2, {"next_ino": 2})
    damaged = bytearray(blob)
    damaged[20] ^= 1
    with pytest.raises(fmt.FormatError):
        fmt.decode_checkpoint(bytes(damaged))
    with pytest.raises(fmt.FormatError):
        fmt.decode_checkpoint(fmt.pack_block(fmt.CHECKPOINT_MAGIC, [1, 2, b"not zlib"]))
    with pytest.raises(fmt.FormatError):
        fmt.decode_checkpoint(fmt.pack_block(fmt.CHECKPOINT_MAGIC, [1, 2]))
    with pytest.raises(fmt.FormatError):
        fmt.decode_checkpoint(fmt.encode_journal_record(fmt.JournalRecord(1, 1, 1, {})))


def test_event_record_fits_its_slot():
    event = {"seq": 1, "kind": "warning", "msg": "m" * 1000}
    block = fmt.encode_event(event)
    assert len(block) == fmt.EVENT_RECORD_SIZE
    decoded = fmt.unpack_block(block, fmt.EVENT_MAGIC)
    assert decoded["seq"] == 1 and decoded["msg"].startswith("mmm")


# -- opening volumes --------------------------------------------------------------------------


def _volume(tmp_path, size=64 * M):
    image = tmp_path / "vol.img"
    sb = make_volume(image, size, 64 * K)
    return image, sb


def test_volume_open(tmp_path):
    image, sb = _volume(tmp_path)
    volume = Volume.open(image)
    try:
        assert volume.sb == sb and not volume.used_copy
    finally:
        volume.close()


def test_volume_open_falls_back_to_the_copy(tmp_path):
    image, sb = _volume(tmp_path)
    _flip_byte(image, 30)
    volume = Volume.open(image)
    try:
        assert volume.sb == sb and volume.used_copy
    finally:
        volume.close()


def test_volume_open_both_superblocks_bad(tmp_path):
    image, sb = _volume(tmp_path)
    for offset in (30, sb.copy_offset + 30):
        _flip_byte(image, offset)
    with pytest.raises(VolumeError, match="corrupt"):
        Volume.open(image)


def test_volume_open_rejects_bad_images(tmp_path):
    with pytest.raises(VolumeError, match="no such file"):
        Volume.open(tmp_path / "missing")
    with pytest.raises(VolumeError, match="not a regular file"):
        Volume.open(tmp_path)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(VolumeError, match="only 0 bytes"):
        Volume.open(empty)
    zeros = tmp_path / "zeros"
    zeros.write_bytes(bytes(64 * K))
    with pytest.raises(VolumeError, match="not a csvfs volume"):
        Volume.open(zeros)


def test_volume_open_truncated(tmp_path):
    image, sb = _volume(tmp_path)
    with open(image, "r+b") as handle:
        handle.truncate(sb.size - M)
    with pytest.raises(VolumeError, match="truncated"):
        Volume.open(image)


def test_volume_open_other_version(tmp_path):
    image, sb = _volume(tmp_path)
    block = fmt.encode_superblock(dataclasses.replace(sb, version=2))
    with open(image, "r+b") as handle:
        handle.write(block)
    with pytest.raises(VolumeError, match="unsupported"):
        Volume.open(image)


def test_make_volume_refuses_to_clobber(tmp_path):
    image, sb = _volume(tmp_path)
    with pytest.raises(VolumeExistsError, match=sb.uuid):
        make_volume(image, 64 * M)
    other = tmp_path / "data"
    other.write_bytes(b"precious")
    with pytest.raises(VolumeExistsError, match="not empty"):
        make_volume(other, 64 * M)
    assert other.read_bytes() == b"precious"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert make_volume(empty, 64 * M).size == 64 * M
    again = make_volume(image, 128 * M, force=True)
    assert again.uuid != sb.uuid
    volume = Volume.open(image)
    try:
        assert volume.sb == again and volume.sb.size == 128 * M
    finally:
        volume.close()


def test_make_volume_writes_the_cluster_key(tmp_path):
    image, _sb = _volume(tmp_path)
    key_path = default_key_path(image)
    key = read_key(key_path)
    assert len(key) == 32
    volume = Volume.open(image)
    try:
        volume.check_key(key)
        with pytest.raises(KeyFileError):
            volume.check_key(bytes(32))
    finally:
        volume.close()
    key_path.write_text("not hex")
    with pytest.raises(KeyFileError, match="expected hex"):
        read_key(key_path)
    key_path.write_bytes(b"\xff\xfe" + key)
    with pytest.raises(KeyFileError, match="expected hex"):
        read_key(key_path)
    key_path.write_text(key.hex())
    key_path.chmod(0o644)
    with pytest.raises(KeyFileError, match="group or others"):
        read_key(key_path)
    key_path.chmod(0o400)
    assert read_key(key_path) == key
    with pytest.raises(KeyFileError):
        read_key(tmp_path / "missing.key")


def test_make_volume_errors(tmp_path):
    with pytest.raises(UsageError, match="too small"):
        make_volume(tmp_path / "small.img", 8 * M)
    with pytest.raises(UsageError, match="allocation unit"):
        make_volume(tmp_path / "unit.img", 64 * M, 3 * M)


# -- human sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("64M", 64 * M), ("10G", 10 * G), ("1T", T), ("1MiB", M), ("1MB", M), ("4k", 4 * K),
    ("  2g ", 2 * G), ("1024", 1024), ("0", 0), ("3P", 3 << 50), ("512B", 512), ("7b", 7),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", [
    "", " ", "M", "MiB", "B", "1.5G", "-1G", "10X", "1 G", "G1", "1iB", "1KK", "0x10", "²",
    "1e9",
])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.mark.parametrize("value, text", [
    (0, "0B"), (512, "512B"), (K, "1K"), (1536, "1.5K"), (64 * M, "64M"), (10 * G, "10G"),
    (T, "1T"), (3 * T // 2, "1.5T"), (1 << 50, "1P"),
])
def test_format_size(value, text):
    assert format_size(value) == text


@pytest.mark.parametrize("value", [0, 1, 512, K, 64 * K, 64 * M, 10 * G, T, 5 << 50])
def test_format_then_parse(value):
    assert parse_size(format_size(value)) == value


def test_mkfs_keeps_a_key_file_that_is_there(tmp_path):
    """Volumes of one cluster may share a key: a second mkfs with the same --key uses
    it, rather than overwrite the key the first volume needs."""
    key_path = tmp_path / "cluster.key"
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    make_volume(first, 64 << 20, key_path=key_path)
    key = read_key(key_path)
    make_volume(second, 64 << 20, key_path=key_path)
    assert read_key(key_path) == key
    for image in (first, second):
        volume = Volume.open(image)
        try:
            volume.check_key(key)
        finally:
            volume.close()
    key_path.write_text("not hex")
    with pytest.raises(KeyFileError, match="expected hex"):
        make_volume(tmp_path / "third.img", 64 << 20, key_path=key_path)
    assert not (tmp_path / "third.img").exists()


def _flip_byte(path, offset: int) -> None:
    """Corrupt one byte for sure: writing a fixed value finds it there one time in 256."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0xFF]))
