"""The shape of a backup manifest's file entries, checked before anything trusts them
(the repository stores manifests; csvfs/backup/engine.py says what they hold).

A file entry's "chunks" list says where the file's data is, in file order, each
item not overlapping the next and within the file's size; what no item covers is a
hole (zeros). An item is

    [offset, length, chunk_id]         file bytes [offset, offset+length) are the
                                       chunk's bytes [0, length)
    [offset, length, chunk_id, skip]   ... are the chunk's bytes [skip, skip+length)

so that an incremental backup can take the unchanged parts of a file from the
chunks of the backup before it (a slice of a chunk) and store only what changed.
The three-element item is the four-element one with skip 0, and is what to_item
writes then; a full backup's items are whole chunks, exactly `length` bytes long.
Either way a chunk must hold at least skip+length bytes (ChunkRef.needed), which
verify and every reader check: the manifest cannot say how long a chunk is, only
how much of it the file takes.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from csvfs.backup.errors import CorruptManifest

ID_SIZE = 32  # bytes of a chunk id


class ChunkRef(NamedTuple):
    """File bytes [offset, offset+length) are bytes [skip, skip+length) of a chunk."""

    offset: int
    length: int
    chunk_id: bytes
    skip: int = 0

    @property
    def end(self) -> int:
        """Where in the file this reference ends."""
        return self.offset + self.length

    @property
    def needed(self) -> int:
        """The bytes its chunk must hold at least for this reference to read from it."""
        return self.skip + self.length

    def piece(self, data: bytes) -> bytes:
        """This reference's bytes of its chunk's data (data itself when it is all of it)."""
        if self.skip == 0 and self.length == len(data):
            return data
        return data[self.skip:self.skip + self.length]


def manifest_chunks(manifest: dict) -> Iterator[tuple[str, ChunkRef]]:
    """(file path, reference) for every chunk reference in a manifest, its shape
    checked (CorruptManifest)."""
    files = manifest.get("files")
    if not isinstance(files, list):
        raise CorruptManifest(f"manifest {manifest.get('id')}: has no list of files")
    for entry in files:
        try:
            refs = file_chunks(entry)
        except CorruptManifest as exc:  # say which backup, for verify's list of problems
            raise CorruptManifest(f"backup {manifest.get('id')}: {exc}") from None
        for ref in refs:
            yield entry["path"], ref


def chunk_needs(manifests: Iterable[dict]) -> dict[bytes, int]:
    """Chunk id -> the most bytes any reference in these manifests takes of it: what
    verify reads and checks of each chunk (CorruptManifest if one is malformed)."""
    needs: dict[bytes, int] = {}
    for manifest in manifests:
        for _path, ref in manifest_chunks(manifest):
            needs[ref.chunk_id] = max(needs.get(ref.chunk_id, 0), ref.needed)
    return needs


def file_chunks(entry: dict) -> list[ChunkRef]:
    """The chunk references of a manifest's file entry, checked to be well formed, in
    order, not overlapping, and within the file's size (CorruptManifest)."""
    try:
        path, size, items = entry["path"], entry["size"], entry["chunks"]
    except (KeyError, TypeError):
        raise CorruptManifest(f"manifest entry {entry!r:.80}: malformed") from None
    try:
        if type(size) is not int:
            raise TypeError(f"its size {size!r:.20} is not an integer")
        refs = [_parse_item(item) for item in items]
    except (TypeError, ValueError) as exc:
        raise CorruptManifest(f"manifest entry for {path}: malformed: {exc}") from None
    end = 0
    for ref in refs:
        problem = _misplaced(ref, end, size)
        if problem:
            raise CorruptManifest(f"manifest entry for {path}: bad chunk at offset "
                                  f"{ref.offset}: {problem}")
        end = ref.end
    return refs


def _misplaced(ref: ChunkRef, previous_end: int, size: int) -> str | None:
    """What is wrong with where a reference lies, if anything."""
    if ref.offset < previous_end:
        return f"it begins before {previous_end}, where the one before it ends"
    if ref.length <= 0:
        return f"its length is {ref.length}"
    if ref.skip < 0:
        return f"its skip is {ref.skip}"
    if ref.end > size:
        return f"it ends at {ref.end}, past the file's size {size}"
    return None


def _parse_item(item) -> ChunkRef:
    """One "chunks" item as a ChunkRef: TypeError or ValueError unless it has the
    shape the module docstring gives (where it lies is checked by file_chunks)."""
    if not isinstance(item, list | tuple) or len(item) not in (3, 4):
        raise ValueError(f"a chunk item has 3 or 4 elements, not {item!r:.60}")
    ref = ChunkRef(*item)
    for name in ("offset", "length", "skip"):
        value = getattr(ref, name)
        # bool is an int to Python, and int("7") is 7: neither is a number in a manifest
        if type(value) is not int:
            raise TypeError(f"a chunk item's {name} is {value!r:.20}, not an integer")
    if type(ref.chunk_id) is not bytes or len(ref.chunk_id) != ID_SIZE:
        raise ValueError(f"the chunk item at offset {ref.offset} has no {ID_SIZE}-byte id")
    return ref


def to_item(ref: ChunkRef) -> list:
    """The manifest item of a reference: three elements when it starts at its
    chunk's first byte (skip 0), as full backups have always written; four else."""
    if ref.skip:
        return [ref.offset, ref.length, ref.chunk_id, ref.skip]
    return [ref.offset, ref.length, ref.chunk_id]


def slice_refs(refs: list[ChunkRef], start: int, end: int) -> list[ChunkRef]:
    """The parts of refs (in file order, not overlapping, as file_chunks returns them)
    that lie in the file range [start, end), each trimmed to it: its offset and
    length cut, and its skip moved on by what was cut at its start. Holes stay
    holes; a range that meets no reference gives []."""
    sliced = []
    first = bisect.bisect_right(refs, start, key=lambda ref: ref.end)  # ends past start
    for index in range(first, len(refs)):
        ref = refs[index]
        if ref.offset >= end:
            break
        low, high = max(start, ref.offset), min(end, ref.end)
        if low < high:
            sliced.append(ChunkRef(low, high - low, ref.chunk_id, ref.skip + low - ref.offset))
    return sliced
