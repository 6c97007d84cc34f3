"""Rewrite random 4 KiB blocks of a file with stamped data, and log every write's start
and acknowledgement, so that a snapshot of the file can be checked against its point.

    python -m tests.stamp_writer FILE WRITER_ID BLOCKS SECONDS LOG

Each block written holds (writer, seq, block) repeated; the log holds one row
(writer, seq, block, start_ns, ack_ns) per write, written when the time is up.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import time

BLOCK = 4096
STAMP = struct.Struct("<IIQ")  # writer, seq, block
ROW = struct.Struct("<IIQqq")  # writer, seq, block, start_ns, ack_ns


def stamped(writer: int, seq: int, block: int) -> bytes:
    return STAMP.pack(writer, seq, block) * (BLOCK // STAMP.size)


def read_stamp(data: bytes) -> tuple[int, int, int] | None:
    """The stamp of a block, or None if it is not one whole stamped block."""
    first = data[:STAMP.size]
    if len(data) != BLOCK or data != first * (BLOCK // STAMP.size):
        return None
    return STAMP.unpack(first)


def read_log(path) -> list[tuple[int, int, int, int, int]]:
    with open(path, "rb") as log:
        raw = log.read()
    return [ROW.unpack_from(raw, offset) for offset in range(0, len(raw), ROW.size)]


def main() -> None:
    path, writer, blocks, seconds, log_path = sys.argv[1:]
    writer, blocks, seconds = int(writer), int(blocks), float(seconds)
    rows = []
    fd = os.open(path, os.O_WRONLY)
    chooser = random.Random(writer)
    deadline = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        block = chooser.randrange(blocks)
        data = stamped(writer, seq, block)
        start = time.time_ns()
        os.pwrite(fd, data, block * BLOCK)
        rows.append(ROW.pack(writer, seq, block, start, time.time_ns()))
    os.close(fd)
    with open(log_path, "wb") as log:
        log.write(b"".join(rows))


if __name__ == "__main__":
    main()
