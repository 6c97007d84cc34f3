"""The stamp every 4 KiB sector of a VM's disk carries, so that any reader can tell
whose data it is, where it belongs and which write put it there.

A sector is a 32-byte header and a filler derived from it:

    magic "VMLS" | crc32 | vm id (8) | sector number (8) | generation (8) | filler

The CRC covers everything but itself, so a torn or mixed sector, a sector written to the
wrong place, another VM's sector and stale data all show. The generation is the VM's
write counter: every write gets the next one, for all the sectors it covers.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

SECTOR = 4096
MAGIC = b"VMLS"
_HEADER = struct.Struct("<4sIQQQ")
_FIELDS = struct.Struct("<QQQ")  # what the CRC starts with: vm id, sector, generation
_ZERO = bytes(SECTOR)


def vm_id(name: str) -> int:
    """A 64-bit id for a VM name (the stamp holds the id, not the name)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _filler(fields: bytes) -> bytes:
    pattern = fields[8:]  # sector and generation: differs between sectors and writes
    return (pattern * (SECTOR // len(pattern)))[:SECTOR - _HEADER.size]


def sector(vm: int, number: int, generation: int) -> bytes:
    """The 4 KiB a write of `generation` puts at sector `number`."""
    fields = _FIELDS.pack(vm, number, generation)
    filler = _filler(fields)
    crc = zlib.crc32(filler, zlib.crc32(fields))
    return _HEADER.pack(MAGIC, crc, vm, number, generation) + filler


def sectors(vm: int, first: int, count: int, generation: int) -> bytes:
    """The buffer for one write of `count` sectors from sector `first`."""
    return b"".join(sector(vm, number, generation) for number in range(first, first + count))


@dataclass(frozen=True)
class Found:
    """What a sector read back holds."""

    kind: str  # "zero" (never written), "stamp", or "garbage"
    vm: int = 0
    number: int = 0
    generation: int = 0

    def describe(self, own_vm: int) -> str:
        if self.kind != "stamp":
            return "zeros" if self.kind == "zero" else "no valid stamp"
        if self.vm != own_vm:
            return f"another VM's sector {self.number} (generation {self.generation})"
        return f"sector {self.number}, generation {self.generation}"


ZERO = Found("zero")
GARBAGE = Found("garbage")


def parse(data: bytes) -> Found:
    """Read one sector's stamp; check it against its CRC."""
    if len(data) != SECTOR:
        return GARBAGE
    if data == _ZERO:
        return ZERO
    magic, crc, vm, number, generation = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return GARBAGE
    fields = _FIELDS.pack(vm, number, generation)
    if zlib.crc32(memoryview(data)[_HEADER.size:], zlib.crc32(fields)) != crc:
        return GARBAGE
    return Found("stamp", vm, number, generation)
