"""The shape of a backup manifest's file entries, checked before anything trusts them
(the repository stores manifests; csvfs/backup/engine.py says what they hold)."""

from __future__ import annotations

from collections.abc import Iterator

from csvfs.backup.errors import CorruptManifest

ID_SIZE = 32  # bytes of a chunk id


def manifest_chunks(manifest: dict) -> Iterator[tuple[str, int, int, bytes]]:
    """(file path, offset, length, chunk id) of every chunk a manifest references,
    its shape checked (CorruptManifest)."""
    files = manifest.get("files")
    if not isinstance(files, list):
        raise CorruptManifest(f"manifest {manifest.get('id')}: has no list of files")
    for entry in files:
        for offset, length, chunk_id in file_chunks(entry):
            yield entry["path"], offset, length, chunk_id


def file_chunks(entry: dict) -> list[tuple[int, int, bytes]]:
    """The (offset, length, chunk id) of a manifest's file entry, checked to be in
    order, not overlapping, and within the file's size (CorruptManifest)."""
    try:
        path, size, chunks = entry["path"], entry["size"], entry["chunks"]
        refs = [(int(offset), int(length), bytes(chunk_id)) for offset, length, chunk_id in chunks]
    except (KeyError, TypeError, ValueError):
        raise CorruptManifest(f"manifest entry {entry!r:.80}: malformed") from None
    end = 0
    for offset, length, chunk_id in refs:
        if offset < end or length <= 0 or offset + length > size or len(chunk_id) != ID_SIZE:
            raise CorruptManifest(f"manifest entry for {path}: bad chunk at offset {offset}")
        end = offset + length
    return refs

