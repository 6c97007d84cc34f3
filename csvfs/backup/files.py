"""Writing files that a crash cannot leave half written, and the threads that read
and write many at once (csvfs/backup/repository.py)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Threads that read chunks back for verify and restores.
WORKERS = min(8, os.cpu_count() or 1)
SYNC_WORKERS = 16  # fsyncs in flight at once: the filesystem commits them together


def write_all(fd: int, parts: list[bytes], offset: int) -> None:
    """Write the parts one after another at offset, however short each write is."""
    views = [memoryview(part) for part in parts if part]
    while views:
        written = os.pwritev(fd, views, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]


def fsync_path(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in the directory durable."""
    fsync_path(path, os.O_DIRECTORY)


def ordered_map(fn, items: Iterable, workers: int = WORKERS) -> Iterator:
    """fn over items on a few threads, results in order, with few in flight so that
    memory stays bounded however many items there are."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
