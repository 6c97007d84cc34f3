"""Rewrite random 4 KiB blocks of a file with stamped data, and log every write's start
and acknowledgement, so that a snapshot of the file can be checked against its point.

    python -m tests.stamp_writer FILE WRITER_ID BLOCKS SECONDS LOG [THREADS]

Each block written holds (writer, seq, block) repeated; the log holds one row
(writer, seq, block, start_ns, ack_ns) per write, written when the time is up.
With THREADS > 1, that many threads write at once (so that many requests are in
flight on the mount), thread t as writer WRITER_ID * 100 + t.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import threading
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


def write_until(fd: int, writer: int, blocks: int, deadline: float, rows: list) -> None:
    chooser = random.Random(writer)
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        block = chooser.randrange(blocks)
        data = stamped(writer, seq, block)
        start = time.time_ns()
        os.pwrite(fd, data, block * BLOCK)
        rows.append(ROW.pack(writer, seq, block, start, time.time_ns()))


def main() -> None:
    path, writer, blocks, seconds, log_path, *threads = sys.argv[1:]
    writer, blocks, seconds = int(writer), int(blocks), float(seconds)
    count = int(threads[0]) if threads else 1
    writers = [writer] if count == 1 else [writer * 100 + t for t in range(count)]
    rows: list[bytes] = []
    fd = os.open(path, os.O_WRONLY)
    deadline = time.monotonic() + seconds
    workers = [threading.Thread(target=write_until, args=(fd, w, blocks, deadline, rows))
               for w in writers]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    os.close(fd)
    with open(log_path, "wb") as log:
        log.write(b"".join(rows))


if __name__ == "__main__":
    main()
