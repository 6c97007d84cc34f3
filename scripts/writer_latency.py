"""What a backup costs the applications: paced writer processes that time every 4 KiB
pwrite, and a snapshot driver that sets and releases points one after another (as a
backup's requester does). scripts/backupbench.py lines the writes up against the points.

    python scripts/writer_latency.py take-snapshots IMAGE COUNT GAP
"""

from __future__ import annotations

import array
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

from bench_targets import BenchError

SECTOR = 4096
SNAPSHOT_TIMEOUT = 60.0
WRITE_INTERVAL_NS = 1_000_000  # the paced writers: one 4 KiB pwrite per millisecond


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of values (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))]


def _write_loop(path: str, size: int, fixed: bool, fsync_every: int, seed: int, ready,
                stop, out: str) -> None:
    """A paced 4 KiB pwrite loop (in a process of its own): at offset 0 if fixed, else at
    random sectors; (start ns, latency ns) of every write go to out at the end."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = os.open(path, os.O_RDWR)
    rng = random.Random(seed)
    block = os.urandom(SECTOR)
    sectors = size // SECTOR
    samples = array.array("q")
    count = 0
    ready.set()
    due = time.perf_counter_ns()
    while not stop.is_set():
        offset = 0 if fixed else rng.randrange(sectors) * SECTOR
        started = time.perf_counter_ns()
        os.pwrite(fd, block, offset)
        samples.append(started)
        samples.append(time.perf_counter_ns() - started)
        count += 1
        if fsync_every and count % fsync_every == 0:
            os.fsync(fd)
        due += WRITE_INTERVAL_NS
        delay = due - time.perf_counter_ns()
        if delay > 0:
            time.sleep(delay / 1e9)
        else:
            due = time.perf_counter_ns()  # behind: no burst to catch up
    os.close(fd)
    with open(out, "wb") as output:
        samples.tofile(output)


class Writer:
    """One paced writer process; samples() is [(start ns, latency ms)]."""

    def __init__(self, path: Path, size: int, fixed: bool, fsync_every: int, seed: int,
                 out: Path):
        self.out = out
        self.ready, self.stop_event = multiprocessing.Event(), multiprocessing.Event()
        self.process = multiprocessing.Process(
            target=_write_loop, args=(os.fspath(path), size, fixed, fsync_every, seed,
                                      self.ready, self.stop_event, os.fspath(out)))

    def __enter__(self) -> Writer:
        self.process.start()
        if not self.ready.wait(30):
            raise BenchError("the writer did not start")
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(10)
        self.out.unlink(missing_ok=True)

    def finish(self) -> list[tuple[int, float]]:
        self.stop_event.set()
        self.process.join(60)
        if self.process.exitcode != 0:
            raise BenchError(f"the writer failed (exit {self.process.exitcode})")
        raw = array.array("q")
        with open(self.out, "rb") as source:
            raw.frombytes(source.read())
        return [(raw[i], raw[i + 1] / 1e6) for i in range(0, len(raw), 2)]


def take_snapshots(image: str, count: int, gap: float) -> None:
    """Set and release count snapshot points one after another, gap seconds apart; one
    JSON line per point on stdout: the take and release call's times (perf_counter_ns)
    and the coordinator's pause_s."""
    import trio

    from csvfs.backup.requester import Requester
    from csvfs.cluster import messages

    async def main() -> None:
        async with Requester.connect(Path(image), None, SNAPSHOT_TIMEOUT) as requester:
            for _ in range(count):
                take = time.perf_counter_ns()
                point = await requester.call(messages.SNAPSHOT_TAKE, timeout=SNAPSHOT_TIMEOUT)
                taken = time.perf_counter_ns()
                await requester.call(messages.SNAPSHOT_RELEASE, snapshot=point["id"],
                                     outcome="done")
                released = time.perf_counter_ns()
                print(json.dumps({"take": take, "taken": taken, "released": released,
                                  "pause_s": point["pause_s"]}), flush=True)
                await trio.sleep(gap)

    trio.run(main)


def overlapping(samples: list[tuple[int, float]], windows: list[tuple[int, int]]) -> list:
    """Latencies (ms) of the writes whose [start, end] overlaps one of the windows."""
    found = []
    for started, latency in samples:
        ended = started + latency * 1e6
        if any(started <= end and ended >= begin for begin, end in windows):
            found.append(latency)
    return found


def first_after(samples: list[tuple[int, float]], moments: list[int]) -> list[float]:
    """The latency of the first write that started after each moment."""
    starts = [started for started, _latency in samples]
    found = []
    for moment in moments:
        index = next((i for i, started in enumerate(starts) if started >= moment), None)
        if index is not None:
            found.append(samples[index][1])
    return found


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "take-snapshots":
        sys.exit("usage: writer_latency.py take-snapshots IMAGE COUNT GAP")
    take_snapshots(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
