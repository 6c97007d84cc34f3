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
changed since (its base, coordinator/snapshots.py), and of most units the 64 KiB
stripes the nodes wrote. When the repository holds the backup of that base,
only those stripes (and what lies past the base's end) are read, and the
changed runs of a batch are packed into chunks of their own, each run a slice
of one; the rest are slices of that backup's chunks (csvfs/backup/manifest.py).
`--full` reads everything anyway.
"""

from __future__ import annotations

import logging
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import trio

from coordinator.model import Inode
from csvfs.backup.manifest import ChunkRef, file_chunks, slice_refs, to_item
from csvfs.backup.progress import bar
from csvfs.backup.repository import Repository
from csvfs.backup.requester import SNAPSHOT_TIMEOUT, Requester
from csvfs.backup.snapshot_reader import SnapshotView, attributes
from csvfs.volume.errors import ExitCode, UserError
from csvfs.volume.extents import STRIPE
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

BATCH_CHUNKS = 64  # chunks' worth of bytes read between two checks with the coordinator
PACK_BELOW = 4  # pieces under 1/4 of a chunk are packed together (BackupRun._pack)
PLACE_EVERY = 256 << 20  # bytes of new chunks made durable while the copy goes on
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
                 full: bool, inos: set[int]):
        self.repo = repo
        self.requester = requester
        self.view = view
        self.stats = Stats()
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="backup")
        self.bases = {} if full else _bases(repo, view, inos)
        self.placing: Future | None = None  # new chunks being made durable meanwhile

    async def file(self, path: str, inode: Inode, progress) -> dict:
        """The manifest entry of one regular file, its chunks stored."""
        kept, reads = self._plan(inode)
        progress.update(inode.size - sum(length for _offset, length in reads))
        await self._done_with(self._not_needed(inode, reads))
        stored: dict[int, ChunkRef] = {}
        batch_bytes = BATCH_CHUNKS * self.repo.chunk_size
        for batch in batches(reads, self.view.granule(inode), batch_bytes):
            pending = batch
            read: set = set()
            small: dict[int, bytes] = {}  # offset -> a small piece's bytes, to pack
            while pending:  # until a check finds none of them read stale
                live: set = set()
                for offset, _length in pending:
                    stored.pop(offset, None)
                    small.pop(offset, None)
                whole, pieces = await trio.to_thread.run_sync(self._store, inode, pending,
                                                              live)
                stored.update(whole)
                small.update(pieces)
                read |= live
                pending = await self._preserved_meanwhile(inode, pending, live)
                self.stats.reread += len(pending)
            stored.update(await trio.to_thread.run_sync(self._pack, small))
            await self._done_with(read)
            await self._place_meanwhile()
            progress.update(sum(length for _offset, length in batch))
        self.stats.logical += inode.size
        refs = _coalesced(sorted([*kept, *stored.values()]))
        return dict(attributes(inode), path=path, size=inode.size, consistency="crash",
                    chunks=[to_item(ref) for ref in refs],
                    granule=self.view.granule(inode), read="changed" if kept else "all")

    def _plan(self, inode: Inode) -> tuple[list[ChunkRef], list[tuple[int, int]]]:
        """What to take from the base's backup (slices of its chunks), and the byte
        ranges (offset, length) to read, each inside one chunk of the grid."""
        base = self._base_of(inode)
        if base is None:  # no backup in this repository it could build on: read it all
            return [], _on_grid([(0, inode.size)], self.repo.chunk_size)
        entry, changed = base
        last = min(inode.size, entry["size"])  # past the base's end, everything is new
        dirty = _merged([*_aligned(changed, STRIPE), (last, inode.size)], inode.size)
        refs = file_chunks(entry)
        kept = [ref for start, end in _gaps(dirty, last) for ref in slice_refs(refs, start, end)]
        return kept, _on_grid(dirty, self.repo.chunk_size)

    def _base_of(self, inode: Inode) -> tuple[dict, list[tuple[int, int]]] | None:
        """The file's entry in the backup of its newest base that this repository
        holds, and the byte ranges changed since; None if there is none."""
        granule = self.view.granule(inode)
        bases = self.view.tracking.get(inode.ino, {})
        for base in sorted(bases, reverse=True):
            entry = self.bases.get((base, inode.ino))
            if entry is not None and entry.get("granule") == granule:
                return entry, self.view.changed_since(inode, base)
        return None

    def _not_needed(self, inode: Inode, reads: list[tuple[int, int]]) -> set:
        """The file's granules that no read touches: the snapshot need not hold them
        (an incremental takes them from the base), so writes there need no copy."""
        needed: set = set()
        for offset, length in reads:
            needed |= self.view.granules_of(inode, offset, length)
        return self.view.granules_of(inode, 0, inode.size) - needed

    async def _done_with(self, granules: set) -> None:
        """Read and checked: the snapshot need not hold these any more."""
        for kind in ("u", "b"):
            chosen = sorted(granule for each_kind, granule in granules if each_kind == kind)
            if chosen:
                await self.requester.read(self.view.id, kind, chosen)

    async def _preserved_meanwhile(self, inode: Inode, batch: list[tuple[int, int]],
                                   live: set) -> list[tuple[int, int]]:
        """The reads of the batch that read a granule live which has been preserved
        since: they may hold data written after the point. After a failover, the new
        coordinator's copies replace what this view knew (a preserve that never
        became durable is not one), and the batch is read again."""
        reconnects = self.requester.reconnects
        answer = await self.requester.check(self.view.id, self.view.preserved)
        if self.requester.reconnects != reconnects:
            log.info("the coordinator changed: reading the batch again")
            self.view.reset_copies(await self.requester.files(self.view.id))
            return batch
        fresh = self.view.take_copies(answer["copies"], answer["preserved"]) & live
        if not fresh:
            return []
        return [(offset, length) for offset, length in batch
                if self.view.granules_of(inode, offset, length) & fresh]

    def _store(self, inode: Inode, reads: list[tuple[int, int]],
               live: set) -> tuple[dict[int, ChunkRef], dict[int, bytes]]:
        """Read byte ranges (in a worker thread). A whole chunk's is stored at once
        ({offset: ChunkRef}); a small piece's bytes are kept ({offset: bytes}), to be
        packed with others once the check has passed them (`_pack`)."""

        def one(read: tuple[int, int]):
            offset, length = read
            seen: set = set()
            data = self.view.read(inode, offset, length, seen)
            if data is None:
                return offset, None, 0, 0, seen
            if not any(data):  # bytes(...).count would scan twice; any stops early
                return offset, None, len(data), 0, seen
            if len(data) < self.repo.chunk_size // PACK_BELOW:
                return offset, data, len(data), 0, seen
            chunk_id = self.repo.chunk_id(data)
            new = self.repo.put_chunk(data, chunk_id)
            return offset, ChunkRef(offset, len(data), chunk_id), len(data), new, seen

        stored, pieces = {}, {}
        for offset, result, read, new, seen in self.pool.map(one, reads):
            self.stats.read += read
            self.stats.new += new
            live.update(seen)
            if isinstance(result, ChunkRef):
                stored[offset] = result
            elif result is not None:
                pieces[offset] = result
        return stored, pieces

    def _pack(self, pieces: dict[int, bytes]) -> dict[int, ChunkRef]:
        """Store small pieces (in a worker thread) several to a chunk, each then a
        slice of it: an incremental's changed 64 KiB runs cost a hash, a compression
        and a file per chunk, not per run."""
        packs: list[list[tuple[int, bytes]]] = [[]]
        filled = 0
        for offset in sorted(pieces):
            if filled + len(pieces[offset]) > self.repo.chunk_size:
                packs.append([])
                filled = 0
            packs[-1].append((offset, pieces[offset]))
            filled += len(pieces[offset])

        def store(pack: list[tuple[int, bytes]]) -> tuple[list[ChunkRef], int]:
            data = b"".join(piece for _offset, piece in pack)
            chunk_id = self.repo.chunk_id(data)
            new = self.repo.put_chunk(data, chunk_id)
            refs, skip = [], 0
            for offset, piece in pack:
                refs.append(ChunkRef(offset, len(piece), chunk_id, skip))
                skip += len(piece)
            return refs, new

        stored = {}
        for refs, new in self.pool.map(store, [pack for pack in packs if pack]):
            self.stats.new += new
            stored.update((ref.offset, ref) for ref in refs)
        return stored

    async def _place_meanwhile(self) -> None:
        """Once enough new chunks wait in tmp/, make them durable (one round at a time)
        while the copy goes on: the disk writes them back as they come, not all at
        the end, and dirty pages do not pile up."""
        if self.repo.staged_bytes < PLACE_EVERY:
            return
        await self.placed()
        self.placing = self.pool.submit(self.repo.place_staged)

    async def placed(self) -> None:
        """Wait for the round being made durable, if any (its errors are raised here)."""
        placing, self.placing = self.placing, None
        if placing is not None:
            await trio.to_thread.run_sync(placing.result)

    def close(self) -> None:
        self.pool.shutdown()


async def run_backup(image: Path, key_path: Path | None, repo: Repository, kind: str,
                     paths: list[str], snapshot_timeout: float = SNAPSHOT_TIMEOUT,
                     full: bool = False, allow_crash_consistent: bool = False,
                     freeze_timeout: float = 10.0) -> dict:
    """Back up the whole volume (kind "volume") or the given files (kind "vm"); returns
    the manifest as saved."""
    clock = _Phases()
    with repo.lock():
        async with Requester.connect(image, key_path, snapshot_timeout) as requester:
            clock.done("found the coordinator")
            vm = kind == "vm"
            async with requester.snapshot(paths if vm else None, freeze=vm,
                                          allow_crash_consistent=allow_crash_consistent,
                                          freeze_timeout=freeze_timeout) as point:
                clock.done("set the snapshot point")
                files = await requester.files(point["id"])
                clock.done("read the snapshot's namespace")
                volume = Volume.open(image)
                try:
                    view = SnapshotView(files, volume.read)
                    with repo.chunk_batch():  # durable at its end, before the manifest
                        manifest = await _copy(repo, requester, view, kind, paths, point,
                                               full)
                        clock.done("copied")
                        await trio.to_thread.run_sync(repo.place_staged)
                        clock.done("made the chunks durable")
                finally:
                    volume.close()
                manifest["source"]["image"] = str(image)
                # Before the release: only a backup in the repository moves the files'
                # change tracking on to this point.
                repo.save_manifest(manifest)
                clock.done("saved the manifest")
        clock.done("released the snapshot")
    return manifest


class _Phases:
    """Debug log of where a backup's time goes."""

    def __init__(self):
        self.last = time.perf_counter()

    def done(self, what: str) -> None:
        now = time.perf_counter()
        log.debug("%s in %.1f ms", what, (now - self.last) * 1000)
        self.last = now


async def _copy(repo: Repository, requester: Requester, view: SnapshotView, kind: str,
                paths: list[str], point: dict, full: bool) -> dict:
    chosen = _chosen_files(view, kind, paths)
    run = BackupRun(repo, requester, view, full, {inode.ino for _path, inode in chosen})
    entries = []
    try:
        total = sum(inode.size for _path, inode in chosen)
        with bar(total, f"{kind} backup") as progress:
            for path, inode in chosen:
                entries.append(await run.file(path, inode, progress))
        await run.placed()
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


def batches(reads: list[tuple[int, int]], granule: int, size: int):
    """The reads (offset, length) in batches of about `size` bytes, never splitting
    a granule: its hold ends with the batch that read it (BackupRun._done_with), so
    every read of it must be done by then."""
    batch: list[tuple[int, int]] = []
    filled = 0
    for offset, length in reads:
        if filled >= size and offset // granule != (sum(batch[-1]) - 1) // granule:
            yield batch
            batch, filled = [], 0
        batch.append((offset, length))
        filled += length
    if batch:
        yield batch


def _aligned(ranges: list[tuple[int, int]], alignment: int) -> list[tuple[int, int]]:
    """Each range rounded out to multiples of alignment: an incremental stores what
    changed in pieces of at least a stripe (small files change by the 4 KiB block)."""
    return [(start - start % alignment, -(-end // alignment) * alignment)
            for start, end in ranges]


def _merged(ranges: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """The ranges clipped to [0, limit), sorted, overlapping and touching ones joined."""
    merged: list[list[int]] = []
    for start, end in sorted((start, min(end, limit)) for start, end in ranges):
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def _gaps(ranges: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """What sorted, disjoint ranges leave of [0, limit)."""
    gaps, position = [], 0
    for start, end in ranges:
        if start > position:
            gaps.append((position, min(start, limit)))
        position = max(position, end)
    if position < limit:
        gaps.append((position, limit))
    return [(start, end) for start, end in gaps if start < end]


def _on_grid(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The ranges as reads (offset, length), cut at multiples of `size`: a chunk of
    a full backup, or the changed part of one."""
    reads = []
    for start, end in ranges:
        while start < end:
            stop = min(end, (start // size + 1) * size)
            reads.append((start, stop - start))
            start = stop
    return reads


def _coalesced(refs: list[ChunkRef]) -> list[ChunkRef]:
    """Adjacent slices of one chunk, in order, joined: a manifest stays as short as
    the base's where an incremental cut it around a change that is gone."""
    joined: list[ChunkRef] = []
    for ref in refs:
        last = joined[-1] if joined else None
        if last is not None and last.chunk_id == ref.chunk_id \
                and last.offset + last.length == ref.offset \
                and last.skip + last.length == ref.skip:
            joined[-1] = last._replace(length=last.length + ref.length)
        else:
            joined.append(ref)
    return joined


def _bases(repo: Repository, view: SnapshotView,
           inos: set[int]) -> dict[tuple[int, int], dict]:
    """(snapshot, ino) -> the file's entry in this repository's backup from that
    snapshot of this volume: what an incremental of files `inos` takes unchanged
    chunks from. Reading stops once each file's newest base is found, which is
    in the newest manifest when every backup goes to this repository."""
    newest = {ino: max(view.tracking[ino]) for ino in inos if view.tracking.get(ino)}
    wanted = {base for ino in newest for base in view.tracking[ino]}
    bases = {}
    for backup_id in reversed(repo.backup_ids() if wanted else []):
        manifest = repo.load_manifest(backup_id)
        if manifest["snapshot"] in wanted and manifest["source"]["volume"] == view.volume \
                and manifest["chunk_size"] == repo.chunk_size:
            for entry in manifest["files"]:
                bases[manifest["snapshot"], entry["ino"]] = entry
        if all((base, ino) in bases for ino, base in newest.items()):
            break
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
