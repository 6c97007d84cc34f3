"""Append or read records in a file, as a process of its own (tests/test_append.py).

    python -m tests.appender append PATH TAG COUNT [SIZE]
    python -m tests.appender read PATH SECONDS

A record is one line: TAG, a sequence number, a filler whose length varies with
the number (or pads it to SIZE), and a checksum over the rest, so a torn or mixed
record is caught; a SIZE of 10 makes short records without the checksum.
`read` checks every record it sees in the file again and again, and that the
file always ends at the end of a record; it exits 1 on the first bad one.
"""

from __future__ import annotations

import os
import sys
import time
import zlib

SHORT = 10  # the size of a short record: TAG (one letter), eight digits, newline


def record(tag: str, number: int, size: int | None = None) -> bytes:
    if size == SHORT:
        return b"%s%08d\n" % (tag.encode(), number)
    body = b"%s %08d " % (tag.encode(), number)
    if size is None:
        body += b"x" * (number % 61)
    else:
        body += b"y" * max(0, size - len(body) - 10)
    return body + b" %08x\n" % zlib.crc32(body)


def parse(line: bytes) -> tuple[str, int] | None:
    """(tag, number) of an intact record (without its newline), else None."""
    if len(line) == SHORT - 1 and line[1:].isdigit():
        return chr(line[0]), int(line[1:])
    body, _, crc = line.rpartition(b" ")
    if len(crc) != 8 or b"%08x" % zlib.crc32(body) != crc:
        return None
    tag, number, _filler = body.split(b" ", 2)
    return tag.decode(), int(number)


def check(data: bytes) -> list[tuple[str, int]]:
    """Every record in data, in file order; raises ValueError on a bad one."""
    if data and not data.endswith(b"\n"):
        raise ValueError(f"the file ends inside a record: {data[-40:]!r}")
    found = []
    for line in data.split(b"\n")[:-1]:
        parsed = parse(line)
        if parsed is None:
            raise ValueError(f"torn record {line[:60]!r}")
        found.append(parsed)
    return found


def append(path: str, tag: str, count: int, size: int | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for number in range(count):
            data = record(tag, number, size)
            if os.write(fd, data) != len(data):
                raise SystemExit("short append")
    finally:
        os.close(fd)


def read(path: str, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    passes = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while time.monotonic() < deadline:
            check(os.pread(fd, 64 << 20, 0))
            passes += 1
    finally:
        os.close(fd)
    return passes


def main(argv: list[str]) -> int:
    if argv[0] == "append":
        append(argv[1], argv[2], int(argv[3]), int(argv[4]) if len(argv) > 4 else None)
        return 0
    try:
        passes = read(argv[1], float(argv[2]))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(passes)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
