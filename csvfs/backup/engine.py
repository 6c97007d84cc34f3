"""Taking a backup: set a snapshot point, copy the snapshot into the repository while
the nodes go on writing, and write one manifest.

The copy reads the image directly (csvfs/backup/snapshot_reader.py), in batches
of chunks. Each batch is read and stored on a few threads (BLAKE3, zstd and the
chunk writes release the GIL), then checked with the coordinator: a chunk that
read a live granule which was preserved meanwhile is read again, from the copy,
and stored again. A chunk of zeros is a hole: it is neither stored nor listed,
so a restore is sparse.

Every backup is a logical full: its manifest lists every chunk of every file,
and chunks already in the repository cost a hash but no space. An incremental
reads less: the coordinator tracks, for each file a backup took, the granules
changed since (its base, coordinator/snapshots.py); when the repository holds
the backup of that base, only the chunks over changed granules (and the tail,
whose length may differ) are read, and the others are that backup's chunks.
`--full` reads everything anyway.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import trio

from coordinator.model import Inode
from csvfs.backup.progress import bar
from csvfs.backup.repository import Repository
from csvfs.backup.requester import SNAPSHOT_TIMEOUT, Requester
from csvfs.backup.snapshot_reader import SnapshotView, attributes
from csvfs.volume.errors import ExitCode, UserError

log = logging.getLogger(__name__)

BATCH_CHUNKS = 64  # chunks read between two checks with the coordinator
WORKERS = 4

TYPES = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
         stat.S_IFIFO: "fifo", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFSOCK: "sock"}


class NoSuchFile(UserError):
    exit_code = ExitCode.NO_SUCH_FILE


@dataclass
class Stats:
    logical: int = 0  # bytes of file data, holes included
    read: int = 0  # bytes read from the image
    new: int = 0  # bytes the repository stored anew (compressed)
    reread: int = 0  # chunks read again because their granule was preserved meanwhile
    started: float = field(default_factory=time.monotonic)


class BackupRun:
    """One backup of the files of one snapshot into one repository."""

    def __init__(self, repo: Repository, requester: Requester, view: SnapshotView,
                 full: bool):
        self.repo = repo
        self.requester = requester
        self.view = view
        self.stats = Stats()
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="backup")
        self.bases = {} if full else _bases(repo, view)

    async def file(self, path: str, inode: Inode, progress) -> dict:
        """The manifest entry of one regular file, its chunks stored."""
        size = self.repo.chunk_size
        chunks, offsets = self._unchanged(inode)
        progress.update(sum(min(size, inode.size - offset) for offset in chunks))
        for batch in batches(offsets, self.view.granule(inode)):
            pending = batch
            read: set = set()
            while pending:  # until a check finds none of them read stale
                live: set = set()
                for offset in pending:
                    chunks.pop(offset, None)
                chunks.update(await trio.to_thread.run_sync(self._store, inode, pending, live))
                read |= live
                pending = await self._preserved_meanwhile(inode, pending, live)
                self.stats.reread += len(pending)
            await self._done_with(read)
            progress.update(sum(min(size, inode.size - offset) for offset in batch))
        self.stats.logical += inode.size
        return dict(attributes(inode), path=path, size=inode.size, consistency="crash",
                    chunks=[chunks[offset] for offset in sorted(chunks)],
                    granule=self.view.granule(inode),
                    read="changed" if len(offsets) < len(range(0, inode.size, size)) else "all")

    def _unchanged(self, inode: Inode) -> tuple[dict[int, list], list[int]]:
        """The chunks to take from the base's backup, and the offsets to read."""
        size = self.repo.chunk_size
        every = list(range(0, inode.size, size))
        granule = self.view.granule(inode)
        bases = self.view.tracking.get(inode.ino, {})
        found = [base for base in sorted(bases, reverse=True) if (base, inode.ino) in self.bases
                 and self.bases[base, inode.ino].get("granule") == granule]
        if not found:  # no backup in this repository it could build on: read it all
            return {}, every
        entry, changed = self.bases[found[0], inode.ino], bases[found[0]]
        dirty = {chunk for index in changed  # the chunks a changed granule lies in
                 for chunk in range(index * granule // size,
                                    ((index + 1) * granule - 1) // size + 1)}
        before = {chunk[0]: list(chunk) for chunk in entry["chunks"]}
        last = min(inode.size, entry["size"])  # the tail chunk's length may differ
        reuse = {offset: before[offset] for offset in every
                 if offset + size <= last and offset // size not in dirty and offset in before}
        read = [offset for offset in every
                if offset + size > last or offset // size in dirty]
        return reuse, read

    async def _done_with(self, granules: set) -> None:
        """Read and checked: the snapshot need not hold these any more."""
        for kind in ("u", "b"):
            chosen = sorted(granule for each_kind, granule in granules if each_kind == kind)
            if chosen:
                await self.requester.read(self.view.id, kind, chosen)

    async def _preserved_meanwhile(self, inode: Inode, batch: list[int],
                                   live: set) -> list[int]:
        """Offsets of the chunks of the batch that read a granule live which has been
        preserved since: they may hold data written after the point. After a
        failover, the new coordinator's copies replace what this view knew (a preserve
        that never became durable is not one), and the batch is read again."""
        reconnects = self.requester.reconnects
        answer = await self.requester.check(self.view.id, self.view.preserved)
        if self.requester.reconnects != reconnects:
            log.info("the coordinator changed: reading the batch again")
            self.view.reset_copies(await self.requester.files(self.view.id))
            return batch
        fresh = self.view.take_copies(answer["copies"], answer["preserved"]) & live
        if not fresh:
            return []
        size = self.repo.chunk_size
        return [offset for offset in batch
                if self.view.granules_of(inode, offset, size) & fresh]

    def _store(self, inode: Inode, offsets: list[int], live: set) -> dict:
        """Read and store chunks (in a worker thread): {offset: [offset, length, id]}."""
        size = self.repo.chunk_size

        def one(offset: int):
            seen: set = set()
            data = self.view.read(inode, offset, size, seen)
            if data is None:
                return offset, None, 0, 0, seen
            read = len(data)
            if not any(data):  # bytes(...).count would scan twice; any stops early
                return offset, None, read, 0, seen
            chunk_id = self.repo.chunk_id(data)
            new = self.repo.put_chunk(data, chunk_id)
            return offset, [offset, len(data), chunk_id], read, new, seen

        stored = {}
        for offset, entry, read, new, seen in self.pool.map(one, offsets):
            self.stats.read += read
            self.stats.new += new
            live.update(seen)
            if entry is not None:
                stored[offset] = entry
        return stored

    def close(self) -> None:
        self.pool.shutdown()


async def run_backup(image: Path, key_path: Path | None, repo: Repository, kind: str,
                     paths: list[str], snapshot_timeout: float = SNAPSHOT_TIMEOUT,
                     full: bool = False, allow_crash_consistent: bool = False,
                     freeze_timeout: float = 10.0) -> dict:
    """Back up the whole volume (kind "volume") or the given files (kind "vm"); returns
    the manifest as saved."""
    with repo.lock():
        async with Requester.connect(image, key_path, snapshot_timeout) as requester:
            vm = kind == "vm"
            async with requester.snapshot(paths if vm else None, freeze=vm,
                                          allow_crash_consistent=allow_crash_consistent,
                                          freeze_timeout=freeze_timeout) as point:
                files = await requester.files(point["id"])
                fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    view = SnapshotView(files, fd)
                    manifest = await _copy(repo, requester, view, kind, paths, point, full)
                finally:
                    os.close(fd)
                manifest["source"]["image"] = str(image)
                # Before the release: only a backup in the repository moves the files'
                # change tracking on to this point.
                repo.save_manifest(manifest)
    return manifest


async def _copy(repo: Repository, requester: Requester, view: SnapshotView, kind: str,
                paths: list[str], point: dict, full: bool) -> dict:
    chosen = _chosen_files(view, kind, paths)
    run = BackupRun(repo, requester, view, full)
    entries = []
    try:
        total = sum(inode.size for _path, inode in chosen)
        with bar(total, f"{kind} backup") as progress:
            for path, inode in chosen:
                entries.append(await run.file(path, inode, progress))
    finally:
        run.close()
    stats = run.stats
    warnings = []
    for entry in entries:  # a vm backup says how each file was taken; a volume, crash
        consistency, why = point["consistency"].get(entry["path"], ["crash", ""])
        entry["consistency"] = consistency
        if why:
            entry["consistency_detail"] = why
        if consistency == "application":  # vmload verify --at-freeze checks a restore
            entry["freeze_id"] = point["freeze_id"]
        if consistency != "application" and kind == "vm":
            warnings.append(f"{entry['path']}: {why}")
    return {
        "format": 1, "kind": kind, "time_ns": view.t_ns, "snapshot": view.id,
        "source": {"volume": view.volume, "image": "", "unit_size": view.unit_size},
        "chunk_size": repo.chunk_size,
        "files": entries,
        "tree": _tree(view) if kind == "volume" else [],
        "stats": {"logical": stats.logical, "read": stats.read, "new": stats.new,
                  "reread_chunks": stats.reread, "pause_s": point["pause_s"],
                  "duration_s": round(time.monotonic() - stats.started, 3)},
        "warnings": warnings,
    }


def batches(offsets: list[int], granule: int, size: int = BATCH_CHUNKS):
    """The chunk offsets in batches of about `size`, never splitting a granule: its
    hold ends with the batch that read it (BackupRun._done_with), so every chunk of
    it must be read by then."""
    batch: list[int] = []
    for offset in offsets:
        if len(batch) >= size and offset // granule != batch[-1] // granule:
            yield batch
            batch = []
        batch.append(offset)
    if batch:
        yield batch


def _bases(repo: Repository, view: SnapshotView) -> dict[tuple[int, int], dict]:
    """(snapshot, ino) -> the file's entry in this repository's backup from that
    snapshot of this volume: what an incremental takes unchanged chunks from."""
    wanted = {base for bases in view.tracking.values() for base in bases}
    bases = {}
    for manifest in repo.backups() if wanted else ():
        if manifest["snapshot"] in wanted and manifest["source"]["volume"] == view.volume \
                and manifest["chunk_size"] == repo.chunk_size:
            for entry in manifest["files"]:
                bases[manifest["snapshot"], entry["ino"]] = entry
    return bases


def _chosen_files(view: SnapshotView, kind: str, paths: list[str]) -> list:
    """(path, inode) of each regular file to copy: one per inode for a volume."""
    if kind == "volume":
        seen, chosen = set(), []
        for path, inode in view.walk():
            if inode.is_reg and inode.ino not in seen:
                seen.add(inode.ino)
                chosen.append((path, inode))
        return chosen
    chosen = []
    for path in paths:
        path = "/" + path.strip("/")
        inode = view.lookup(path)
        if inode is None:
            raise NoSuchFile(f"{path}: no such file on the volume at the snapshot point")
        if not inode.is_reg:
            raise NoSuchFile(f"{path}: not a regular file")
        chosen.append((path, inode))
    return chosen


def _tree(view: SnapshotView) -> list[dict]:
    """Every name on the volume, parents first, for a restore of the whole volume."""
    tree = []
    for path, inode in view.walk():
        entry = dict(attributes(inode), path=path,
                     type=TYPES.get(stat.S_IFMT(inode.mode), "file"))
        if entry["type"] == "symlink":
            entry["target"] = inode.target
        if entry["type"] in ("chr", "blk"):
            entry["rdev"] = inode.rdev
        tree.append(entry)
    return tree
