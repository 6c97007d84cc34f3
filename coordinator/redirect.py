"""Redirected I/O, the coordinator's side: the data I/O of nodes whose own path to
the image failed, and every node's I/O mode.

The whole sequence is told in csvfs/redirect.py. Here:

- IO_WRITE {ino, offset, data}: under the metadata lock, the range must lie inside
  the file's size and its allocated granules, as the coordinator's own map says;
  if not, the reply is that map, and the node takes it and starts the write over
  (an extend first, if it needs one). Otherwise the granules a snapshot holds
  are preserved and the tracked ones marked changed (coordinator/snapshots.py
  `before_write`, as for the coordinator's own writes), and the data is written
  at the mapped offsets. Holding the lock orders the write with every quiesce,
  truncate and snapshot point, so it never lands on a unit freed or given to
  another file.
- IO_READ {ino, offset, length}: the bytes at the mapped offsets, zeros in holes,
  clipped at the end of the file; resolved and read without yielding, so no
  change comes in between.
- IO_SYNC: fdatasync of the image.
- IO_MODE {mode, reason, since_ns, path_lost}: a node's mode changed (or it joined this
  coordinator while Redirected). It is kept for `csvfs status` and, when it
  differs from what the node said before, written to the event ring.
"""

from __future__ import annotations

import errno
import logging

import trio

from coordinator.commit import Commits, Request
from coordinator.snapshots import Snapshots
from csvfs.cluster.errors import MetaError
from csvfs.cluster.events import EventLog
from csvfs.volume.extents import pieces

log = logging.getLogger(__name__)

MAX_IO = 16 << 20  # the largest redirected read or write (FUSE sends at most 1 MiB)
MODES = ("direct", "redirected")
MAX_REASON = 300


class Redirect:
    def __init__(self, commits: Commits, snapshots: Snapshots, events: EventLog):
        self.commits = commits
        self.snapshots = snapshots
        self.events = events
        self.modes: dict[str, dict] = {}  # node name -> {mode, reason, since_ns}
        # node name -> the redirected I/O done for it: {reads, writes, syncs, bytes}
        self.served: dict[str, dict[str, int]] = {}

    async def op_io_write(self, request: Request, ino: int, offset: int, data: bytes) -> dict:
        """The node's write, done here; {"written": n}, or the map to start over with."""
        end = offset + len(data)
        _check_range(offset, len(data))
        commits = self.commits
        async with commits.mutation():
            inode = commits.regular(ino)
            if not self._mapped(inode, offset, end):
                reply = commits.map_of(inode)
            else:
                reply = None
                await self.snapshots.before_write(inode, offset, end)
                self._write(inode, offset, data)
        await commits.durable()
        if reply is not None:
            return reply
        self._count(request.session, "writes", len(data))
        return {"written": len(data)}

    async def op_io_read(self, request: Request, ino: int, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        await self.commits.durable()  # nobody reads what is not committed
        inode = self.commits.regular(ino)
        end = min(offset + length, inode.size)
        if offset >= end:
            return b""
        data = b"".join(self._read(inode, offset, end))
        self._count(request.session, "reads", len(data))
        return data

    async def op_io_sync(self, request: Request) -> None:
        try:
            await trio.to_thread.run_sync(self.commits.volume.sync)
        except OSError as exc:
            raise MetaError(errno.EIO, f"fdatasync of the image failed: {exc}") from None
        self._count(request.session, "syncs", 0)

    async def op_io_mode(self, request: Request, mode: str, reason: str, since_ns: int,
                         path_lost: bool = False) -> None:
        if mode not in MODES or len(reason) > MAX_REASON:
            raise MetaError(errno.EINVAL, f"bad I/O mode {mode!r}")
        node = request.session
        before = self.modes.get(node)
        self.modes[node] = {"mode": mode, "reason": reason, "since_ns": since_ns,
                            "path_lost": path_lost}
        if before is not None and before["mode"] == mode and before["reason"] == reason:
            return
        if before is None and mode == "direct":
            return  # nothing new: every node starts in Direct mode
        level = "warning" if mode == "redirected" else "info"
        self.events.emit("io_mode", f"{node} is {mode}: {reason}", level=level)

    def _count(self, node: str, kind: str, size: int) -> None:
        served = self.served.setdefault(node, {"reads": 0, "writes": 0, "syncs": 0,
                                               "bytes": 0})
        served[kind] += 1
        served["bytes"] += size

    def state_of(self, node: str) -> dict | None:
        """What status shows: the node's mode, and the I/O done for it."""
        mode = self.modes.get(node)
        return None if mode is None else {**mode, "served": self.served.get(node, {})}

    def forget(self, node: str) -> None:
        """The node left: its mode is whatever it reports when it joins again."""
        self.modes.pop(node, None)

    # -- the image -------------------------------------------------------------------------

    def _mapped(self, inode, offset: int, end: int) -> bool:
        if end > inode.size:
            return False
        granule = inode.granule(self.commits.unit)
        return all(index in inode.units for index in range(offset // granule,
                                                          (end - 1) // granule + 1))

    def _write(self, inode, offset: int, data: bytes) -> None:
        try:
            self.commits.write_data(inode.units, inode.granule(self.commits.unit), offset,
                                    data)
        except OSError as exc:
            raise MetaError(errno.EIO, f"redirected write failed: {exc}") from None

    def _read(self, inode, offset: int, end: int):
        volume = self.commits.volume
        for start, piece_end, _index in pieces(offset, end, inode.granule(self.commits.unit)):
            position = self.commits.position(inode, start)
            if position is None:
                yield bytes(piece_end - start)
                continue
            try:
                yield volume.read(position, piece_end - start)
            except OSError as exc:
                raise MetaError(errno.EIO, f"redirected read failed: {exc}") from None


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0 or length > MAX_IO:
        raise MetaError(errno.EINVAL, f"bad range: offset {offset}, length {length}")
