"""What an fsync does on a node, when the fast lane leaves it to Python.

Three parts, run at once, so that an fsync waits for the slowest and not for
their sum (csvfs/_fast_path.c does the common fdatasync itself, in C):

1. the image's fdatasync (`DataPath.sync`: through the coordinator instead
   while this node's I/O is redirected);
2. the coordinator's part, one round trip, only if it holds something of the
   file not yet durable: the time of the node's writes (an fsync records it;
   like ext4's, an fdatasync leaves it to the next fsync or close), or data
   the coordinator wrote for the node (appends, redirected writes), which it
   flushes. Every metadata change was durable when it returned, so there is
   nothing else;
3. dropping the pages a shared map left in the kernel: fsync and msync are
   where a map catches up with other nodes' writes.

A part that fails fails the fsync, and what it was to make durable stays
marked for the next one.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import pyfuse3
import trio

from csvfs.datapath import DataPath, OpenFile


async def fsync(data: DataPath, meta, ino: int | None, file: OpenFile | None,
                datasync: bool) -> None:
    """fsync or fdatasync (`datasync`) of inode `ino`, open here as `file`; `ino` is
    None for a handle this node does not know, which syncs everything."""
    if ino is None:
        await at_once(data.sync, functools.partial(meta, "sync"))
        return
    written = 0
    if not datasync and file is not None:
        written, file.dirty_mtime = file.dirty_mtime, 0
    steps = [data.sync, functools.partial(drop_cached_pages, ino)]
    if written:
        steps.append(functools.partial(meta, "sync", ino=ino, written_ns=written))
    elif file is None or file.coordinator_wrote:
        steps.append(functools.partial(meta, "sync"))
    wrote = file is not None and file.coordinator_wrote
    if file is not None:
        file.coordinator_wrote = False
    try:
        await at_once(*steps)
    except BaseException:
        if file is not None:  # the next fsync tries again
            file.coordinator_wrote |= wrote
            file.dirty_mtime = max(file.dirty_mtime, written)
        raise


async def at_once(*steps: Callable[[], Awaitable]) -> None:
    """Run the steps concurrently; the first failure is raised as it is (no group)."""
    failures: list[Exception] = []

    async def run(step) -> None:
        try:
            await step()
        except Exception as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for step in steps:
            nursery.start_soon(run, step)
    if failures:
        raise failures[0]


async def drop_cached_pages(ino: int) -> None:
    """Only shared maps have pages in the kernel (everything else is direct_io), and
    the kernel wrote their dirty pages back before it asked for the fsync. A page
    dirtied since is written back first, as a write to this very node: so the
    invalidation runs in a worker thread, with the trio thread free to serve that
    write (the fast lane's syncer does the same in C)."""
    await trio.to_thread.run_sync(_invalidate_pages, ino)


def _invalidate_pages(ino: int) -> None:
    try:
        pyfuse3.invalidate_inode(ino, attr_only=False)
    except OSError:
        pass  # the kernel does not know the inode: nothing cached
