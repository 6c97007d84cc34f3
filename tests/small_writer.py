"""Workers for tests/test_small_files.py, each in a process of its own on a mount.

  reader PATH SECONDS CHUNK: keep reading PATH and check every read against
      pattern(), written by appends of at most CHUNK bytes; zeros only where the
      last two appends are still on their way. Prints the number of reads and
      exits 1 at the first mismatch.
  grower DIR ACKLOG: for file after file, write 100 bytes, fsync, then grow it past
      one unit in steps, fsync after each; log "name size" after every fsync.
      Runs until killed, its mount fails, or 150 files are written.
"""

from __future__ import annotations

import os
import sys
import time

UNIT = 1 << 20


def pattern(length: int, seed: int = 0) -> bytes:
    """Never a zero byte, and different at every offset of a 251-byte cycle."""
    cycle = bytes((index * 7 + seed) % 251 + 1 for index in range(251))
    return (cycle * (length // 251 + 1))[:length]


def reader(path: str, seconds: float, chunk: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    reads = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            data = os.pread(fd, 8 * UNIT, 0)
            # The kernel splits a large read into several requests, so the last
            # writes may show in part: zeros are allowed there, and only there.
            expected = pattern(len(data))
            settled = max(0, len(data) - 2 * chunk)
            if data[:settled] != expected[:settled] or any(
                    byte and byte != want for byte, want in zip(data[settled:],
                                                                 expected[settled:],
                                                                 strict=True)):
                first = next(index for index in range(len(data))
                             if data[index] != expected[index])
                print(f"mismatch after {reads} reads of {len(data)} bytes: first "
                      f"difference at {first}: {data[first:first + 8]!r} for "
                      f"{expected[first:first + 8]!r}", flush=True)
                return 1
            reads += 1
    finally:
        os.close(fd)
    print(reads, flush=True)
    return 0


def grower(directory: str, ack_log: str) -> int:
    with open(ack_log, "a", buffering=1) as log:
        index = 0
        while index < 150:  # 3 units each: within a 1 GiB volume
            name = f"g{index:04d}"
            data = pattern(UNIT + 300_000, index)
            fd = os.open(os.path.join(directory, name), os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                written = 0
                for end in (100, 20_000, UNIT - 5, UNIT + 4096, len(data)):
                    os.pwrite(fd, data[written:end], written)
                    written = end
                    os.fsync(fd)
                    log.write(f"{name} {written}\n")
                    time.sleep(0.01)
            finally:
                os.close(fd)
            index += 1


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    if kind == "reader":
        sys.exit(reader(args[0], float(args[1]), int(args[2])))
    sys.exit(grower(*args))
