"""Metadata latency: time single operations through plain os calls on a mounted directory.

Used by bench.py for every target. Each operation is timed on its own, so the
percentiles show the cost of one round trip to the filesystem (and, for
csvfs, to its coordinator and journal).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

EXTEND_STEP = 4096
OPERATIONS = ("create", "extend", "truncate", "rename", "unlink")


def _timed(action: Callable[[], object]) -> float:
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
        samples["create"].append(_timed(
            lambda path=path: os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                                               0o644))))
    samples.update(_extend_and_truncate(directory / "meta-grow", count))
    try:
        renamed = [path.with_name(path.name.replace("-m", "-r")) for path in names]
        samples["rename"] = [_timed(lambda a=a, b=b: os.rename(a, b))
                             for a, b in zip(names, renamed, strict=True)]
        names = renamed
    except OSError:
        pass  # the pass-through baseline may not implement rename
    samples["unlink"] = [_timed(lambda path=path: os.unlink(path)) for path in names]
    return samples


def _extend_and_truncate(path: Path, count: int) -> dict[str, list[float]]:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    block = b"\x5a" * EXTEND_STEP
    try:
        extend = [_timed(lambda: os.write(fd, block)) for _ in range(count)]
        sizes = range(EXTEND_STEP * (count - 1), -1, -EXTEND_STEP)
        truncate = [_timed(lambda size=size: os.ftruncate(fd, size)) for size in sizes]
    finally:
        os.close(fd)
        os.unlink(path)
    return {"extend": extend, "truncate": truncate}


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return statistics.median(values), cuts[98]
