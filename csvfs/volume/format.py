"""The on-disk format of a csvfs volume, shared by the node and the coordinator.

Layout (offsets in bytes, regions in this order):

    superblock (4 KiB) | lease region | event ring | journal |
    checkpoint A | checkpoint B | data area (unit aligned) ... | superblock copy (4 KiB)

Every structure that can be torn or corrupted is a *checksummed block*:

    magic (4) | crc32 (4) | payload length (4) | payload (msgpack)

with the CRC over the length and the payload. Pure functions only: no I/O here.
"""

from __future__ import annotations

import hashlib
import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass

import msgpack

FORMAT_VERSION = 1
SUPERBLOCK_MAGIC = b"CSVFSVOL"
SUPERBLOCK_SIZE = 4096
SECTOR = 512

LEASE_REGION_SIZE = 64 * 1024
LEASE_RECORD_SIZE = 4096
NODE_SLOT_SIZE = 512
MAX_NODES = 64
EVENT_RING_SIZE = 1 << 20
EVENT_RECORD_SIZE = 256

MIN_UNIT = 64 * 1024
MAX_UNIT = 4 << 20
DEFAULT_UNIT = 1 << 20
MIN_DATA_UNITS = 8

JOURNAL_MAGIC = b"JREC"
CHECKPOINT_MAGIC = b"CKPT"
LEASE_MAGIC = b"LEAS"
NODE_MAGIC = b"NODE"
EVENT_MAGIC = b"EVNT"

_BLOCK_HEADER = struct.Struct("<4sII")
_SB_HEADER = struct.Struct("<8sIII")  # magic, version, body length, crc32


class FormatError(Exception):
    """A structure on the volume is missing, torn or corrupt."""


# -- checksummed blocks ------------------------------------------------------------


def pack_block(magic: bytes, payload: object, pad_to: int = 1) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    crc = zlib.crc32(struct.pack("<I", len(body)) + body)
    block = _BLOCK_HEADER.pack(magic, crc, len(body)) + body
    return block + bytes(-len(block) % pad_to)


def block_length(buf: bytes | memoryview, magic: bytes) -> int:
    """Total length (header + payload) of the block at the start of buf, unpadded."""
    if len(buf) < _BLOCK_HEADER.size:
        raise FormatError("block header is cut short")
    found, _crc, length = _BLOCK_HEADER.unpack_from(buf)
    if found != magic:
        raise FormatError(f"expected magic {magic!r}, found {bytes(found)!r}")
    return _BLOCK_HEADER.size + length


def unpack_block(buf: bytes | memoryview, magic: bytes) -> object:
    total = block_length(buf, magic)
    if total > len(buf):
        raise FormatError("block payload is cut short")
    _magic, crc, length = _BLOCK_HEADER.unpack_from(buf)
    body = bytes(buf[_BLOCK_HEADER.size : total])
    if zlib.crc32(struct.pack("<I", length) + body) != crc:
        raise FormatError("block checksum mismatch")
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData) as exc:
        raise FormatError(f"block payload does not decode: {exc}") from None


# -- superblock ---------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Superblock:
    uuid: str
    size: int
    unit_size: int
    key_id: str
    created_ns: int
    lease: Region
    events: Region
    journal: Region
    checkpoint_a: Region
    checkpoint_b: Region
    data: Region
    version: int = FORMAT_VERSION

    @property
    def data_units(self) -> int:
        return self.data.length // self.unit_size

    @property
    def copy_offset(self) -> int:
        return self.size - SUPERBLOCK_SIZE

    def checkpoint_slots(self) -> tuple[Region, Region]:
        return (self.checkpoint_a, self.checkpoint_b)

    def to_dict(self) -> dict:
        regions = {
            name: [getattr(self, name).offset, getattr(self, name).length]
            for name in ("lease", "events", "journal", "checkpoint_a", "checkpoint_b", "data")
        }
        return {
            "uuid": self.uuid,
            "size": self.size,
            "unit_size": self.unit_size,
            "key_id": self.key_id,
            "created_ns": self.created_ns,
            "regions": regions,
        }

    @classmethod
    def from_dict(cls, body: dict, version: int) -> Superblock:
        try:
            regions = {name: Region(*pair) for name, pair in body["regions"].items()}
            return cls(
                uuid=body["uuid"],
                size=body["size"],
                unit_size=body["unit_size"],
                key_id=body["key_id"],
                created_ns=body["created_ns"],
                version=version,
                **regions,
            )
        except (KeyError, TypeError) as exc:
            raise FormatError(f"superblock body is incomplete: {exc}") from None


def encode_superblock(sb: Superblock) -> bytes:
    body = msgpack.packb(sb.to_dict(), use_bin_type=True)
    head = struct.pack("<II", sb.version, len(body))
    crc = zlib.crc32(head + body)
    block = _SB_HEADER.pack(SUPERBLOCK_MAGIC, sb.version, len(body), crc) + body
    if len(block) > SUPERBLOCK_SIZE:
        raise ValueError("superblock does not fit its block")
    return block + bytes(SUPERBLOCK_SIZE - len(block))


def decode_superblock(buf: bytes) -> Superblock:
    """Decode a superblock, raising FormatError with the reason when it is unusable."""
    if len(buf) < _SB_HEADER.size:
        raise FormatError("superblock is cut short")
    magic, version, length, crc = _SB_HEADER.unpack_from(buf)
    if magic != SUPERBLOCK_MAGIC:
        raise FormatError("no csvfs superblock (bad magic)")
    body = buf[_SB_HEADER.size : _SB_HEADER.size + length]
    if len(body) != length or zlib.crc32(struct.pack("<II", version, length) + body) != crc:
        raise FormatError("superblock checksum mismatch")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(version)
    try:
        fields = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.ExtraData) as exc:
        raise FormatError(f"superblock body does not decode: {exc}") from None
    return Superblock.from_dict(fields, version)


class UnsupportedVersion(FormatError):
    def __init__(self, version: int):
        super().__init__(f"format version {version} (this csvfs reads version {FORMAT_VERSION})")
        self.version = version


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_layout(size: int, unit_size: int, key_id: str, created_ns: int) -> Superblock:
    """Place every region for a volume of `size` bytes. Raises ValueError if it cannot fit."""
    if unit_size & (unit_size - 1) or not MIN_UNIT <= unit_size <= MAX_UNIT:
        raise ValueError("allocation unit must be a power of two from 64K to 4M")
    journal_len = _round_up(_clamp(size // 128, 4 << 20, 64 << 20), SECTOR)
    checkpoint_len = _round_up(_clamp(size // 64, 4 << 20, 256 << 20), SECTOR)
    cursor = SUPERBLOCK_SIZE
    regions = {}
    for name, length in (
        ("lease", LEASE_REGION_SIZE),
        ("events", EVENT_RING_SIZE),
        ("journal", journal_len),
        ("checkpoint_a", checkpoint_len),
        ("checkpoint_b", checkpoint_len),
    ):
        regions[name] = Region(cursor, length)
        cursor += length
    data_start = _round_up(cursor, unit_size)
    data_units = (size - SUPERBLOCK_SIZE - data_start) // unit_size
    if data_units < MIN_DATA_UNITS:
        minimum = data_start + MIN_DATA_UNITS * unit_size + SUPERBLOCK_SIZE
        raise ValueError(f"volume too small: needs at least {minimum} bytes for this unit size")
    return Superblock(
        uuid=str(uuidlib.uuid4()),
        size=size,
        unit_size=unit_size,
        key_id=key_id,
        created_ns=created_ns,
        data=Region(data_start, data_units * unit_size),
        **regions,
    )


def key_id(key: bytes) -> str:
    """A public fingerprint of the cluster key, stored in the superblock."""
    return hashlib.blake2b(key, digest_size=16, person=b"csvfs-key-id").hexdigest()


# -- journal records ------------------------------------------------------------------


@dataclass(frozen=True)
class JournalRecord:
    epoch: int
    seq: int
    batch_first: int  # seq of the first record in the same group commit
    op: dict
    # Random tag of the journal generation, set at each checkpoint. Replay takes only
    # records of the current generation, so stale bytes that happen to look like a
    # record (a file name or xattr value crafted by a user) can never be replayed.
    gen: int = 0


def encode_journal_record(record: JournalRecord) -> bytes:
    payload = [record.epoch, record.seq, record.batch_first, record.gen, record.op]
    return pack_block(JOURNAL_MAGIC, payload, pad_to=SECTOR)


def decode_journal_record(buf: bytes | memoryview) -> tuple[JournalRecord, int]:
    """Decode the record at the start of buf; return it and its padded length."""
    payload = unpack_block(buf, JOURNAL_MAGIC)
    try:
        epoch, seq, batch_first, gen, op = payload
    except (TypeError, ValueError):
        raise FormatError("journal record has the wrong shape") from None
    numbers = (epoch, seq, batch_first, gen)
    if not isinstance(op, dict) or not all(isinstance(v, int) for v in numbers):
        raise FormatError("journal record has the wrong field types")
    padded = _round_up(block_length(buf, JOURNAL_MAGIC), SECTOR)
    return JournalRecord(epoch, seq, batch_first, op, gen), padded


# -- checkpoints -----------------------------------------------------------------------


def encode_checkpoint(epoch: int, seq: int, image: dict) -> bytes:
    compressed = zlib.compress(msgpack.packb(image, use_bin_type=True), 1)
    return pack_block(CHECKPOINT_MAGIC, [epoch, seq, compressed], pad_to=SECTOR)


def decode_checkpoint(buf: bytes | memoryview) -> tuple[int, int, dict]:
    payload = unpack_block(buf, CHECKPOINT_MAGIC)
    try:
        epoch, seq, compressed = payload
        image = msgpack.unpackb(zlib.decompress(compressed), raw=False, strict_map_key=False)
    except (TypeError, ValueError, zlib.error, msgpack.ExtraData):
        raise FormatError("checkpoint payload does not decode") from None
    return epoch, seq, image


# -- lease region and event ring ---------------------------------------------------------


def node_slot_offset(sb: Superblock, slot: int) -> int:
    return sb.lease.offset + LEASE_RECORD_SIZE + slot * NODE_SLOT_SIZE


def event_slot_offset(sb: Superblock, index: int) -> int:
    return sb.events.offset + (index % (sb.events.length // EVENT_RECORD_SIZE)) * EVENT_RECORD_SIZE


def encode_event(event: dict) -> bytes:
    block = pack_block(EVENT_MAGIC, event)
    if len(block) > EVENT_RECORD_SIZE:
        trimmed = dict(event, msg=event.get("msg", "")[:120] + "…")
        block = pack_block(EVENT_MAGIC, trimmed)
    return block + bytes(EVENT_RECORD_SIZE - len(block))
