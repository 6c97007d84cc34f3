"""Restoring one file of a backup to a file descriptor, and the cache that lets a
restore read each chunk once for all the slices it takes of it."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable

from csvfs.backup.errors import CorruptChunk
from csvfs.backup.files import ordered_map, write_all
from csvfs.backup.manifest import ChunkRef, file_chunks
from csvfs.backup.repository import Repository


class ChunkCache:
    """The last few chunks read, for readers that take several slices of one chunk
    (an incremental packs its changed pieces into shared chunks): each is read,
    checked and decompressed once. Safe on several threads."""

    def __init__(self, repo: Repository, size: int = 16):
        self.repo = repo
        self.size = size
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, chunk_id: bytes) -> bytes | None:
        """The chunk if it is here (and now the most recently used), else None."""
        with self._lock:
            data = self._chunks.get(chunk_id)
            if data is not None:
                self._chunks.move_to_end(chunk_id)
            return data

    def get(self, chunk_id: bytes) -> bytes:
        """The chunk, read from the repository (and checked there) if not here."""
        data = self.cached(chunk_id)
        if data is not None:
            return data
        data = self.repo.get_chunk(chunk_id)
        with self._lock:
            self._chunks[chunk_id] = data
            while len(self._chunks) > self.size:
                self._chunks.popitem(last=False)
        return data


def restore_file(repo: Repository, entry: dict, fd: int,
                 progress: Callable[[int], object] | None = None) -> None:
    """Write a file's contents from its manifest entry to fd, sparse: each chunk's
    piece (all of it, or the slice the entry names) at its offset, holes (and pieces
    of zeros) left unwritten, then the size set. So fd must read as zeros where
    nothing is written: a new or truncated file."""
    refs = file_chunks(entry)
    cache = ChunkCache(repo)

    def fetch(ref: ChunkRef) -> tuple[int, bytes]:
        data = cache.get(ref.chunk_id)
        if len(data) < ref.needed:
            raise CorruptChunk(repo.too_short(ref.chunk_id, len(data), ref.needed,
                                               f"{entry['path']} at offset {ref.offset}"))
        return ref.offset, ref.piece(data)

    for offset, piece in ordered_map(fetch, refs):
        if piece != bytes(len(piece)):
            write_all(fd, [piece], offset)
        if progress:
            progress(len(piece))
    os.ftruncate(fd, entry["size"])
