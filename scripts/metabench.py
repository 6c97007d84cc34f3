"""Metadata latency: time single operations through plain os calls on a mounted directory.

Used by bench.py for every target. Each operation is timed on its own, so the
percentiles show the cost of one round trip to the filesystem (and, for
csvfs, to its coordinator and journal). The cluster sections of bench.py also use
`shrink_loop`, and `writer` (run as `metabench.py writer`, in a process of its own)
to measure quiesce pauses and stalls.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

EXTEND_STEP = 4096
# fdatasync: a 4 KiB overwrite and fdatasync, the price of making 4 KiB durable (on the
# raw target, what an extend's journal commit is measured against)
OPERATIONS = ("create", "extend", "truncate", "rename", "unlink", "fdatasync")


def timed(action: Callable[[], object]) -> float:
    """How long action() took, in milliseconds."""
    started = time.perf_counter_ns()
    action()
    return (time.perf_counter_ns() - started) / 1e6


def measure(directory: Path, count: int) -> dict[str, list[float]]:
    """Latencies in milliseconds per operation; an operation the target lacks is absent.

    Files go straight into `directory` (the pass-through baseline has no mkdir).
    """
    names = [directory / f"meta-m{index}" for index in range(count)]
    samples: dict[str, list[float]] = {"create": []}
    for path in names:
        samples["create"].append(timed(
            lambda path=path: os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                                               0o644))))
    samples.update(_extend_and_truncate(directory / "meta-grow", count))
    samples["fdatasync"] = _write_and_sync(directory / "meta-sync", count)
    try:
        renamed = [path.with_name(path.name.replace("-m", "-r")) for path in names]
        samples["rename"] = [timed(lambda a=a, b=b: os.rename(a, b))
                             for a, b in zip(names, renamed, strict=True)]
        names = renamed
    except OSError:
        pass  # the pass-through baseline may not implement rename
    samples["unlink"] = [timed(lambda path=path: os.unlink(path)) for path in names]
    return samples


def _extend_and_truncate(path: Path, count: int) -> dict[str, list[float]]:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    block = b"\x5a" * EXTEND_STEP
    try:
        extend = [timed(lambda: os.write(fd, block)) for _ in range(count)]
        sizes = range(EXTEND_STEP * (count - 1), -1, -EXTEND_STEP)
        truncate = [timed(lambda size=size: os.ftruncate(fd, size)) for size in sizes]
    finally:
        os.close(fd)
        os.unlink(path)
    return {"extend": extend, "truncate": truncate}


def _write_and_sync(path: Path, count: int) -> list[float]:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    block = b"\x5a" * EXTEND_STEP
    try:
        os.write(fd, block)
        return [timed(lambda: (os.pwrite(fd, block, 0), os.fdatasync(fd))) for _ in range(count)]
    finally:
        os.close(fd)
        os.unlink(path)


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return statistics.median(values), cuts[98]


# --- quiesce: shrinking truncates, and paced writes from another node --------------------

WRITE_BLOCK = 4096
REFILL_CHUNK = 2**20


def shrink_loop(path: Path, count: int, big: int, small: int,
                windows: list[tuple[int, int]] | None = None) -> list[float]:
    """Latencies of `count` shrinking truncates of `path` from `big` to `small` bytes.

    Before each one the file is written back up to `big` bytes (not timed), so every
    truncate frees allocated units, which on csvfs pauses I/O on the inode at every node
    that has it open. The file is left `big` bytes long. Each truncate's (start, end) in
    time.monotonic_ns() goes into `windows` if given: the pause lies within it.
    """
    fd = os.open(path, os.O_RDWR)
    chunk = b"\xa5" * REFILL_CHUNK
    latencies = []
    try:
        for _ in range(count):
            _refill(fd, small, big, chunk)
            started = time.monotonic_ns()
            latencies.append(timed(lambda: os.ftruncate(fd, small)))
            if windows is not None:
                windows.append((started, time.monotonic_ns()))
        _refill(fd, small, big, chunk)
    finally:
        os.close(fd)
    return latencies


def rewrite_loop(path: Path, seconds: float, big: int, small: int) -> int:
    """The refill writes of `shrink_loop`, each followed by an fsync, for `seconds`.

    Overwrites only (the file must be `big` bytes long already), so no metadata changes
    and no quiesce; the fsyncs stand in for the journal commits of the extends and the
    truncate, which flush the same image. A control with a similar load on the node.
    Returns the rounds done.
    """
    fd = os.open(path, os.O_RDWR)
    chunk = b"\xa5" * REFILL_CHUNK
    rounds = 0
    try:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            _refill(fd, small, big, chunk, sync=True)
            rounds += 1
    finally:
        os.close(fd)
    return rounds


def _refill(fd: int, start: int, end: int, chunk: bytes, sync: bool = False) -> None:
    for offset in range(start, end, len(chunk)):
        data = chunk[:end - offset]
        if os.pwrite(fd, data, offset) != len(data):
            raise OSError(f"short write at {offset}")
        if sync:
            os.fsync(fd)


def paced_writes(fd: int, span: int, interval: float, stop: Callable[[], bool],
                 max_seconds: float, starts: list[int] | None = None) -> list[float]:
    """Latencies of 4 KiB pwrites cycling through [0, span), one every `interval` seconds.

    A write that comes late does not make the next ones burst to catch up. Stops when
    `stop()` is true or after `max_seconds`. Each write's time.monotonic_ns() when it
    began goes into `starts` if given (the clock is the same in every process).
    """
    block = b"\x3c" * WRITE_BLOCK
    blocks = max(1, span // WRITE_BLOCK)
    latencies = []
    started = next_at = time.perf_counter()
    index = 0
    while not stop() and next_at - started < max_seconds:
        offset = (index % blocks) * WRITE_BLOCK
        if starts is not None:
            starts.append(time.monotonic_ns())
        latencies.append(timed(lambda offset=offset: os.pwrite(fd, block, offset)))
        index += 1
        next_at += interval
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.perf_counter()
    return latencies


def writer_main(argv: list[str] | None = None) -> int:
    """`metabench.py writer PATH ...`: paced writes until SIGUSR1 or SIGTERM.

    Prints "ready" once the file is open, and at the end a JSON object: "ms", the
    latencies in ms, and "start_ns", when each write began in time.monotonic_ns().
    bench.py runs it as a separate process, so that its timing does not share an
    interpreter (and a GIL) with the process it measures against.
    """
    import argparse
    import json
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="metabench.py writer")
    parser.add_argument("path", type=Path)
    parser.add_argument("--span", type=int, required=True, help="bytes to cycle through")
    parser.add_argument("--interval-ms", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    stopped = []
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.append(True))
    fd = os.open(args.path, os.O_WRONLY)
    starts: list[int] = []
    try:
        print("ready", flush=True)
        latencies = paced_writes(fd, args.span, args.interval_ms / 1000,
                                 lambda: bool(stopped), args.max_seconds, starts)
    finally:
        os.close(fd)
    json.dump({"ms": latencies, "start_ns": starts}, sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2 or sys.argv[1] != "writer":
        sys.exit("usage: metabench.py writer PATH --span BYTES [--interval-ms MS]")
    sys.exit(writer_main(sys.argv[2:]))
