"""Restore a volume backup as a new volume image, offline.

The image is built without any node or coordinator running, but with the
coordinator's own code, so that what comes out is exactly what a live
cluster would have written:

1. Check the manifest (a volume backup, a consistent tree) and size the
   volume: the units every file needs plus 25 % headroom, and checkpoint
   slots that hold the restored metadata (measured by a dry run of step 3),
   or `size` if it holds both.
2. `csvfs.mkfs.make_volume` lays the volume out (it refuses a target that
   exists and is not empty) and writes a checkpoint holding just the root.
3. `coordinator.recovery.load` turns that into a `MetadataState`. Every
   change is then one record, built as coordinator/namespace.py and
   coordinator/allocation.py build them, and given to `MetadataState.apply`,
   which keeps the directories, link counts and the allocator consistent:
   mknod (or link, for a further name of an inode already made), map or
   bmap for a regular file's data, setxattr, and last setattr, since the
   records before it move the times.
4. Each file's chunk references (a whole chunk, or a slice of one) are
   written at their units' offsets in the image. Only units (or, for a small
   file, 4 KiB blocks) that some reference touches are allocated, so holes
   stay holes; pieces of zeros are not written, so the image stays sparse.
   Then one fdatasync.
5. Only then is the state written as a checkpoint, into the slot recovery
   did not load from, with a sequence number past the mkfs checkpoint's (so
   recovery takes it) and a new journal generation (so the journal, blank
   anyway, replays nothing). A crash before this leaves an empty volume,
   never one whose metadata points at data not yet written.

Small files (all data within the first unit) get 4 KiB blocks, as the
coordinator gives them; larger ones whole units.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coordinator import recovery
from coordinator.allocator import NoSpace
from coordinator.model import NAME_MAX, ROOT_INO, MetadataState
from csvfs.backup.manifest import ChunkRef, file_chunks
from csvfs.mkfs import make_volume
from csvfs.volume import format as fmt
from csvfs.volume.errors import ExitCode, UsageError, UserError, VolumeError
from csvfs.volume.extents import BLOCK, pieces, to_runs
from csvfs.volume.image import Volume, default_key_path

log = logging.getLogger(__name__)

TYPES = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK,
         "fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "sock": stat.S_IFSOCK}
# What every entry of a manifest's tree carries (a symlink's "target", a device's
# "rdev" and "xattrs" may be left out).
ENTRY_KEYS = ("path", "ino", "type", "mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns")

ReadChunk = Callable[[bytes], bytes]
Progress = Callable[[int, int], None]  # (bytes of file data written so far, in all)


class BadBackupError(UserError):
    """The manifest or a chunk is not what a volume backup holds."""

    exit_code = ExitCode.REPO_CORRUPT


@dataclass
class Plan:
    """A regular file's data: where its chunk references go, in the file's granules."""

    size: int
    chunks: list[ChunkRef]
    blocks: bool  # small: mapped in 4 KiB blocks, not whole units
    granules: list[int] = field(default_factory=list)  # file granules some chunk touches


# -- the entry point ---------------------------------------------------------------------


def build_image(manifest: dict, read_chunk: ReadChunk, target, key_path=None,
                size: int | None = None, unit_size: int | None = None,
                progress: Progress | None = None) -> dict:
    """Make a new volume at `target` holding the backup's files; returns its stats:
    {"files", "dirs", "bytes" (logical), "allocated" (bytes of data area)}."""
    try:
        _check_manifest(manifest)
        unit_size = unit_size or manifest["source"]["unit_size"]
        plans = _plan_files(manifest, unit_size)
    except (KeyError, TypeError, ValueError) as exc:
        raise BadBackupError(f"backup {_name(manifest)}: malformed manifest ({exc!r})") from None
    size = _volume_size(plans, unit_size, size, _metadata_bytes(manifest, plans, unit_size))
    target = Path(target)
    key_path = Path(key_path) if key_path else default_key_path(target)
    created = not target.exists(), not key_path.exists()
    make_volume(target, size, unit_size, key_path=key_path)  # refuses a non-empty target
    try:
        stats = _fill(target, manifest, plans, read_chunk, progress)
    except BaseException:
        _undo(target, key_path, *created)
        raise
    log.info("restored backup %s into %s: %d files, %d directories, %d bytes",
             _name(manifest), target, stats["files"], stats["dirs"], stats["bytes"])
    return stats


def _fill(target: Path, manifest: dict, plans: dict[int, Plan], read_chunk: ReadChunk,
          progress: Progress | None) -> dict:
    volume = Volume.open(target, writable=True)
    try:
        loaded = recovery.load(volume)
        builder = Builder(volume, loaded.state, plans, read_chunk, progress)
        builder.build(manifest["tree"])
        volume.sync()  # the data is durable before any metadata points at it
        _write_state(volume, loaded, builder)
        return builder.stats()
    finally:
        volume.close()


def _undo(target: Path, key_path: Path, target_was_absent: bool, key_was_absent: bool) -> None:
    """A failed restore leaves no half-built volume behind (mkfs made it, so it is ours)."""
    if target_was_absent:
        target.unlink(missing_ok=True)
    else:
        os.truncate(target, 0)  # it was an empty file: leave it so
    if key_was_absent:
        key_path.unlink(missing_ok=True)


# -- checking and planning -----------------------------------------------------------------


def _check_manifest(manifest: dict) -> None:
    if not isinstance(manifest, dict) or "tree" not in manifest:
        raise BadBackupError("not a backup manifest (it has no file tree)")
    name = _name(manifest)
    if manifest.get("kind") == "vm":
        raise UsageError(f"backup {name} is a VM backup; restore its files with --file")
    if manifest.get("kind") != "volume":
        raise BadBackupError(f"backup {name} is of unknown kind {manifest.get('kind')!r}")
    if manifest.get("format") != 1:
        raise BadBackupError(f"backup {name} has manifest format {manifest.get('format')!r}; "
                             f"this csvfs reads format 1")
    tree = manifest["tree"]
    for entry in tree:
        missing = [key for key in ENTRY_KEYS if key not in entry]
        if missing:
            raise BadBackupError(f"backup {name}: tree entry {entry.get('path')!r} lacks "
                                 f"{', '.join(missing)}")
    if not tree or tree[0]["path"] != "/" or tree[0]["type"] != "dir":
        raise BadBackupError(f"backup {name}: its tree does not start with the root directory")


def _plan_files(manifest: dict, unit_size: int) -> dict[int, Plan]:
    """Source inode -> the plan of its data, for every regular file in the tree."""
    contents = {entry["ino"]: entry for entry in manifest.get("files", [])}
    plans = {}
    for entry in manifest["tree"]:
        if entry["type"] != "file" or entry["ino"] in plans:
            continue
        content = contents.get(entry["ino"])
        if content is None:
            log.warning("%s: the backup holds no content for it; restored empty", entry["path"])
            content = {"size": 0, "chunks": []}
        plans[entry["ino"]] = _plan(entry["path"], content, unit_size)
    return plans


def _plan(path: str, content: dict, unit_size: int) -> Plan:
    # checked as every reader checks a file entry (CorruptManifest)
    refs = file_chunks(dict(content, path=path))
    end = refs[-1].end if refs else 0
    # The coordinator's rule for a file with no map yet: blocks while it stays in its
    # first unit (coordinator/allocation.py, _in_blocks).
    blocks = 0 < end < unit_size
    granule = BLOCK if blocks else unit_size
    touched = set()
    for ref in refs:
        touched.update(range(ref.offset // granule, (ref.end - 1) // granule + 1))
    return Plan(content["size"], refs, blocks, sorted(touched))


def _units_needed(plans: dict[int, Plan], unit_size: int) -> int:
    """Units the files take: whole units, and the block units their blocks pack into."""
    units = sum(len(plan.granules) for plan in plans.values() if not plan.blocks)
    blocks = sum(len(plan.granules) for plan in plans.values() if plan.blocks)
    return units + -(-blocks // (unit_size // BLOCK))


def _metadata_bytes(manifest: dict, plans: dict[int, Plan], unit_size: int) -> int:
    """The size of the restored metadata's checkpoint: a dry run of the build, with no
    volume, so that the volume can be made large enough for its checkpoint slots."""
    units = max(fmt.MIN_DATA_UNITS, -(-_units_needed(plans, unit_size) * 5 // 4))
    builder = Builder(None, MetadataState.fresh(units, 0, unit_size), plans, None, None)
    builder.build(manifest["tree"])
    return len(fmt.encode_checkpoint(0, 0, builder.state.to_image()))


def _volume_size(plans: dict[int, Plan], unit_size: int, size: int | None,
                 metadata: int) -> int:
    needed = _units_needed(plans, unit_size)
    if size is not None:
        sb = _layout(size, unit_size)
        if sb.data_units < needed:
            raise UsageError(f"a volume of {size} bytes has {sb.data_units} data units of "
                             f"{unit_size}; the backup needs {needed}")
        if sb.checkpoint_a.length < metadata:
            raise UsageError(f"a volume of {size} bytes has checkpoint slots of "
                             f"{sb.checkpoint_a.length} bytes; the backup's metadata takes "
                             f"{metadata}")
        return size
    return max(_size_for_units(needed, unit_size), _size_for_checkpoint(metadata, unit_size))


def _size_for_checkpoint(metadata: int, unit_size: int) -> int:
    """A size whose checkpoint slots (1/64 of the volume, up to a cap) hold the metadata
    with 25 % to grow."""
    wanted = -(-metadata * 5 // 4)
    size = 64 * wanted
    largest = _layout(1 << 40, unit_size).checkpoint_a.length  # past the cap already
    if largest < wanted:
        raise BadBackupError(f"the backup's metadata ({metadata} bytes) is larger than the "
                             f"checkpoint slots of any volume")
    return size


def _size_for_units(needed: int, unit_size: int) -> int:
    # 25 % headroom: a volume that is full on arrival is of little use
    want = max(fmt.MIN_DATA_UNITS, -(-needed * 5 // 4))
    # The metadata regions grow with the volume (up to a cap). First grow a size until
    # it holds `want` units past its regions; then shrink it to the regions that size
    # needs plus `want` units until it settles: a smaller volume never needs larger
    # regions, so every step still holds `want` units.
    size = want * unit_size + unit_size + (16 << 20) + fmt.SUPERBLOCK_SIZE  # > the least
    while (have := _layout(size, unit_size).data_units) < want:
        size += (want - have) * unit_size
    while True:
        smaller = _layout(size, unit_size).data.offset + want * unit_size + fmt.SUPERBLOCK_SIZE
        if smaller >= size:
            return size
        size = smaller


def _layout(size: int, unit_size: int) -> fmt.Superblock:
    try:
        return fmt.plan_layout(size, unit_size, "", 0)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# -- building the metadata, and writing the data --------------------------------------------


class Builder:
    """Applies one record per change to the state, as the coordinator would, and
    writes the files' data where the records map it (with no volume, a dry run: the
    metadata alone)."""

    def __init__(self, volume: Volume | None, state: MetadataState, plans: dict[int, Plan],
                 read_chunk: ReadChunk | None, progress: Progress | None):
        self.volume = volume
        self.state = state
        self.plans = plans
        self.read_chunk = read_chunk
        self.progress = progress
        self.records = 0
        self.by_path: dict[str, int] = {}  # path -> new inode
        self.by_source: dict[int, int] = {}  # source inode -> new inode
        self.total = sum(ref.length for plan in plans.values() for ref in plan.chunks)
        self.written = 0

    def apply(self, op: dict) -> None:
        self.state.apply(op)
        self.records += 1

    def build(self, tree: list[dict]) -> None:
        root = tree[0]
        self.by_path["/"] = self.by_source[root["ino"]] = ROOT_INO
        made = [(root, ROOT_INO)]
        for entry in tree[1:]:
            ino = self.add_name(entry)
            if ino is not None:
                made.append((entry, ino))
        for entry, ino in made:
            if entry["type"] == "file":
                self.add_data(ino, self.plans[entry["ino"]], entry["path"])
            for name, value in entry.get("xattrs", ()):
                self.apply({"op": "setxattr", "ino": ino, "name": _bytes(name),
                            "value": _bytes(value), "t": entry["ctime_ns"]})
        # Last: every record before moved some times (a parent's mtime at each name).
        for entry, ino in made:
            self.apply({"op": "setattr", "ino": ino, "mode": _mode(entry), "uid": entry["uid"],
                        "gid": entry["gid"], "atime_ns": entry["atime_ns"],
                        "mtime_ns": entry["mtime_ns"], "ctime_ns": entry["ctime_ns"]})

    def add_name(self, entry: dict) -> int | None:
        """mknod for a new inode, link for another name of one made already; returns the
        new inode, or None for a further name."""
        path = entry["path"]
        parent_path, _, name = path.rpartition("/")
        parent = self.by_path.get(parent_path or "/")
        if parent is None or not self.state.inodes[parent].is_dir:
            raise BadBackupError(f"{path}: its parent directory comes not before it in the "
                                 f"backup's tree")
        name = os.fsencode(name)
        if not name or len(name) > NAME_MAX or name in (b".", b"..") or path in self.by_path:
            raise BadBackupError(f"{path}: not a valid new name")
        known = self.by_source.get(entry["ino"])
        if known is not None:
            if entry["type"] == "dir" or self.state.inodes[known].is_dir:
                raise BadBackupError(f"{path}: a second name of a directory")
            self.apply({"op": "link", "ino": known, "parent": parent, "name": name,
                        "t": entry["ctime_ns"]})
            self.by_path[path] = known
            return None
        ino = self.state.next_ino
        self.apply({"op": "mknod", "ino": ino, "parent": parent, "name": name,
                    "mode": _mode(entry), "uid": entry["uid"], "gid": entry["gid"],
                    "rdev": entry.get("rdev", 0), "target": _bytes(entry.get("target", b"")),
                    "t": entry["ctime_ns"]})
        self.by_path[path] = self.by_source[entry["ino"]] = ino
        return ino

    def add_data(self, ino: int, plan: Plan, path: str) -> None:
        """Allocate what the chunks touch, in one map (or bmap) record, then write them."""
        allocator = self.state.allocator
        try:
            if plan.blocks:
                chosen = allocator.find_blocks(len(plan.granules))
            else:
                chosen = allocator.find(len(plan.granules))
        except NoSpace as exc:
            raise VolumeError(f"{path}: the new volume is full ({exc})") from None
        added = dict(zip(plan.granules, chosen, strict=True))
        op = "bmap" if plan.blocks else "map"
        self.apply({"op": op, "ino": ino, "add": to_runs(added), "size": plan.size})
        if self.volume is not None:
            self.write_chunks(ino, plan, path)

    def write_chunks(self, ino: int, plan: Plan, path: str) -> None:
        inode = self.state.inodes[ino]
        granule = inode.granule(self.state.unit_size)
        base = self.volume.sb.data.offset
        for ref in plan.chunks:
            data = self.read_chunk(ref.chunk_id)
            if len(data) < ref.needed:
                raise BadBackupError(f"{path}: chunk {_hex(ref.chunk_id)} has {len(data)} "
                                     f"bytes, the manifest says it holds at least {ref.needed}")
            piece = ref.piece(data)
            # Pieces of zeros stay unwritten: the new image reads zeros there already.
            if piece != bytes(ref.length):
                view = memoryview(piece)
                for start, end, file_granule in pieces(ref.offset, ref.end, granule):
                    at = base + inode.units[file_granule] * granule + start % granule
                    self.volume.write(at, view[start - ref.offset:end - ref.offset])
            self.written += ref.length
            if self.progress is not None:
                self.progress(self.written, self.total)

    def stats(self) -> dict:
        inodes = self.state.inodes.values()
        unit = self.state.unit_size
        return {"files": sum(not inode.is_dir for inode in inodes),
                "dirs": sum(inode.is_dir for inode in inodes),
                "bytes": sum(inode.size for inode in inodes if inode.is_reg),
                "allocated": sum(inode.allocated(unit) for inode in inodes)}


def _write_state(volume: Volume, loaded: recovery.Recovered, builder: Builder) -> None:
    """The built state as the checkpoint recovery takes: the other slot than mkfs's, a
    seq as if each record had been journaled after it, a new journal generation."""
    seq = loaded.last_seq + max(1, builder.records)
    try:
        recovery.write_checkpoint(volume, loaded.next_checkpoint_slot, loaded.last_epoch, seq,
                                  builder.state, gen=recovery.new_journal_gen())
    except OSError as exc:
        raise VolumeError(f"{volume.path}: {exc}; give a larger size") from None
    again = recovery.load(volume)
    if again.checkpoint is None or again.checkpoint.seq != seq or again.replay.records:
        raise VolumeError(f"{volume.path}: the restored metadata does not load back")


# -- small helpers -----------------------------------------------------------------------------


def _mode(entry: dict) -> int:
    """The type from "type" (what the tree says the inode is), the rest from "mode"."""
    kind = TYPES.get(entry["type"])
    if kind is None:
        raise BadBackupError(f"{entry['path']}: unknown type {entry['type']!r}")
    return kind | stat.S_IMODE(entry["mode"])


def _bytes(value) -> bytes:
    """Names and values are bytes in the manifest; a str (from JSON) is taken as os does."""
    return os.fsencode(value) if isinstance(value, str) else bytes(value)


def _name(manifest) -> str:
    return str(manifest.get("id", "?")) if isinstance(manifest, dict) else "?"


def _hex(chunk_id) -> str:
    return chunk_id.hex()[:16] if isinstance(chunk_id, bytes | bytearray) else str(chunk_id)
