"""The backup repository: a directory of deduplicated, compressed chunks and one
authenticated manifest per backup. Every backup is a logical full; chunks that
several backups share are stored once.

Layout::

    REPO/config                      msgpack: format, repository id, encrypted flag, chunk
                                     size, and a key check value
    REPO/chunks/<2 hex>/<64 hex id>  one chunk: a format byte, then a zstd frame; when
                                     encrypted: the byte, a 12-byte random nonce, then
                                     ChaCha20-Poly1305 of the frame, the chunk id as AAD
    REPO/manifests/<backup id>       msgpack body + 32-byte keyed BLAKE3 MAC; when
                                     encrypted: nonce + AEAD(body), AAD b"manifest:" + id
    REPO/lock                        flock'd by the one process that writes; names it
    REPO/tmp/                        where every file is written before it is renamed

Keys (csvfs/backup/keys.py). The 32-byte master key lives outside the repository, in a key file
(REPO.key unless told otherwise; hex, mode 0600, like the cluster key). Sub-keys
are derived from it with BLAKE3's key derivation: one keys the chunk ids (the
BLAKE3-256 of the plaintext, so equal data dedups but ids reveal nothing to
whoever lacks the key), one authenticates manifests, one encrypts, and one
computes the key check value in the config, which binds the key to the config's
fields: a wrong key, or an altered config, is refused at open.

Guarantees.
- A file appears whole or not at all: it is written in tmp/, fsync'd, renamed
  into place, and its directory fsync'd. put_chunk returns once the chunk is
  durable, and a backup writes its manifest after all its chunks, so an
  interrupted backup leaves only chunks that no manifest references; prune
  removes them, and the leftovers in tmp/. Inside `chunk_batch` the chunks wait
  in tmp/ and become durable together at its end (fsyncs on many threads at
  once, which the filesystem commits together, instead of two per chunk in
  turn); only then are they renamed into place.
- Nothing read back is trusted: a chunk is authenticated (when encrypted),
  decompressed and re-hashed against its id; a manifest's MAC or AEAD tag covers
  its id too, so a manifest renamed or swapped is caught as well.
- One process writes at a time (`lock`); within it, put_chunk may run on many
  threads at once (BLAKE3 and zstd release the GIL).
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import blake3
import msgpack
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from csvfs.backup.config import FORMAT, read_config, refuse_existing, unpack
from csvfs.backup.errors import (
    AmbiguousBackup,
    CorruptChunk,
    CorruptManifest,
    MissingChunk,
    NoSuchBackup,
    RepositoryCorrupt,
    RepositoryKeyError,
    RepositoryLocked,
)
from csvfs.backup.files import SYNC_WORKERS, fsync_dir, fsync_path, ordered_map, write_all
from csvfs.backup.keys import (
    Keys,
    default_key_path,
    key_check,
    key_for_new_repository,
    read_key,
)
from csvfs.backup.manifest import ID_SIZE, manifest_chunks
from csvfs.volume.errors import UsageError

log = logging.getLogger(__name__)

NONCE_SIZE = 12
MAC_SIZE = 32
TAG_SIZE = 16
DEFAULT_CHUNK_SIZE = 1 << 20
# put_chunk refuses bigger data, and get_chunk a frame that claims to hold more,
# so that a corrupt frame header cannot make a reader allocate without bound.
MAX_CHUNK = 1 << 28
_CHUNK_PLAIN = 1
_CHUNK_ENCRYPTED = 2
_ZSTD_LEVEL = 3
_BACKUP_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")
_CHUNK_NAME = re.compile(r"[0-9a-f]{64}")


class Repository:
    """An opened repository; see the module docstring for what it guarantees."""

    def __init__(self, path: Path, config: dict, keys: Keys, key_path: Path):
        self.path = path
        self.key_path = key_path
        self.repo_id: str = config["repo_id"]
        self.encrypted: bool = config["encrypted"]
        self.chunk_size: int = config["chunk_size"]
        self._keys = keys
        self._aead = ChaCha20Poly1305(keys.encryption) if self.encrypted else None
        # Held from "is this chunk there yet?" to its rename, so that of two threads
        # storing the same chunk exactly one counts the bytes.
        self._store_lock = threading.Lock()
        # Inside chunk_batch: chunk id -> the file in tmp/ that will become it
        self._staged: dict[bytes, Path] | None = None
        self.staged_bytes = 0  # what they hold
        self._lock_guard = threading.Lock()
        self._lock_depth = 0
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"Repository({str(self.path)!r}, id={self.repo_id})"

    # Creating and opening

    @classmethod
    def create(cls, path, key_path=None, encrypt: bool = False,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> Repository:
        """A new, empty repository at path (which must not exist, or be an empty
        directory). An existing key file at key_path is reused; otherwise a new
        key is written there."""
        path = Path(path)
        key_path = Path(key_path) if key_path is not None else default_key_path(path)
        if not isinstance(chunk_size, int) or not 4096 <= chunk_size <= MAX_CHUNK:
            raise UsageError(f"chunk size {chunk_size} is out of range "
                             f"(4096 to {MAX_CHUNK} bytes)")
        refuse_existing(path)
        keys = Keys.derive(key_for_new_repository(key_path))
        for sub in ("chunks", "manifests", "tmp"):
            (path / sub).mkdir(mode=0o700)
        for prefix in range(256):  # made now, so that writers never race to make them
            (path / "chunks" / f"{prefix:02x}").mkdir(mode=0o700)
        fsync_dir(path / "chunks")
        fsync_dir(path)
        config = {"format": FORMAT, "repo_id": secrets.token_hex(16), "encrypted": bool(encrypt),
                  "chunk_size": chunk_size}
        config["key_check"] = key_check(keys, config)
        repo = cls(path, config, keys, key_path)
        # Last: until the config is there, the directory is not a repository.
        repo._write_file(path / "config", msgpack.packb(config))
        log.info("created backup repository %s (%s, encrypted=%s, key %s)", path,
                 repo.repo_id, repo.encrypted, key_path)
        return repo

    @classmethod
    def open(cls, path, key_path=None) -> Repository:
        path = Path(path)
        key_path = Path(key_path) if key_path is not None else default_key_path(path)
        config = read_config(path)
        keys = Keys.derive(read_key(key_path))
        if not hmac.compare_digest(key_check(keys, config), config["key_check"]):
            raise RepositoryKeyError(f"key file {key_path} does not open the repository at "
                                     f"{path} (wrong key, or its config was altered)")
        return cls(path, config, keys, key_path)

    # The writers' lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[Repository]:
        """Hold the repository's exclusive lock (re-entrant within this object), as
        every write does: backup, forget, prune."""
        with self._lock_guard:
            if self._lock_depth == 0:
                self._lock_fd = self._acquire_lock()
            self._lock_depth += 1
        try:
            yield self
        finally:
            with self._lock_guard:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    self._release_lock()

    def _acquire_lock(self) -> int:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise RepositoryLocked(f"repository {self.path} is locked by "
                                   f"{holder or 'another process'}") from None
        except BaseException:
            os.close(fd)
            raise
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {since}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        return fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.ftruncate(fd, 0)  # the flock is the truth; this only tidies the name away
            os.close(fd)

    # Chunks

    def chunk_id(self, data: bytes) -> bytes:
        return blake3.blake3(data, key=self._keys.chunk_id).digest()

    def has_chunk(self, chunk_id: bytes) -> bool:
        return self._chunk_path(chunk_id).exists()

    def put_chunk(self, data: bytes, chunk_id: bytes | None = None) -> int:
        """Store data unless a chunk with its id is there; returns the bytes newly
        stored on disk (0 if it was there). A chunk_id given is trusted to be
        self.chunk_id(data): it saves hashing twice."""
        if len(data) > MAX_CHUNK:
            raise ValueError(f"chunk of {len(data)} bytes is over the limit of {MAX_CHUNK}")
        if chunk_id is None:
            chunk_id = self.chunk_id(data)
        final = self._chunk_path(chunk_id)
        if final.exists() or self._is_staged(chunk_id):
            return 0
        stored = self._seal_chunk(chunk_id, data)  # the parts of the file, not joined
        staging = self._staged is not None
        temporary = self._write_temporary(final.name, stored, durable=not staging)
        with self._store_lock:
            duplicate = final.exists() or self._is_staged(chunk_id)
            if not duplicate and staging:
                self._staged[chunk_id] = temporary
                self.staged_bytes += sum(map(len, stored))
            elif not duplicate:
                os.replace(temporary, final)
        if duplicate:  # another thread stored it meanwhile
            os.unlink(temporary)
            return 0
        if not staging:
            fsync_dir(final.parent)
        return sum(map(len, stored))

    def _is_staged(self, chunk_id: bytes) -> bool:
        staged = self._staged
        return staged is not None and chunk_id in staged

    @contextlib.contextmanager
    def chunk_batch(self) -> Iterator[None]:
        """Chunks put inside are durable, in place, once it ends without an error (a
        manifest naming them may follow); after an error they are gone. Call
        `place_staged` (on a worker thread, say) before the end to choose where the
        fsyncs wait."""
        if self._staged is not None:
            raise RuntimeError("chunk batches do not nest")
        self._staged = {}
        try:
            yield
            self.place_staged()
        except BaseException:
            for temporary in self._staged.values():
                temporary.unlink(missing_ok=True)
            raise
        finally:
            self._staged = None

    def place_staged(self) -> None:
        """Make the chunks staged so far durable, rename them into place, then make
        the renames durable: a chunk file in chunks/ always holds its whole chunk."""
        with self._store_lock:
            staged, self._staged = self._staged or {}, {}
            self.staged_bytes = 0
        for _ in ordered_map(fsync_path, staged.values(), SYNC_WORKERS):
            pass
        directories = set()
        for chunk_id, temporary in staged.items():
            final = self._chunk_path(chunk_id)
            os.replace(temporary, final)
            directories.add(final.parent)
        for _ in ordered_map(fsync_dir, sorted(directories), SYNC_WORKERS):
            pass

    def get_chunk(self, chunk_id: bytes) -> bytes:
        """The chunk's data, checked: CorruptChunk unless it decrypts, decompresses
        and hashes back to its id; MissingChunk if it is not there."""
        try:
            stored = self._chunk_path(chunk_id).read_bytes()
        except FileNotFoundError:
            raise MissingChunk(self._chunk_problem(chunk_id, "missing")) from None
        data = self._decompress(chunk_id, self._unseal_chunk(chunk_id, stored))
        if not hmac.compare_digest(self.chunk_id(data), chunk_id):
            raise CorruptChunk(self._chunk_problem(
                chunk_id, "stored data does not match its id (corrupt)"))
        return data

    def _chunk_path(self, chunk_id: bytes) -> Path:
        if not isinstance(chunk_id, bytes) or len(chunk_id) != ID_SIZE:
            raise ValueError(f"a chunk id is {ID_SIZE} bytes, not {chunk_id!r}")
        name = chunk_id.hex()
        return self.path / "chunks" / name[:2] / name

    def _chunk_problem(self, chunk_id: bytes, what: str) -> str:
        return f"chunk {chunk_id.hex()[:16]}… in {self.path}: {what}"

    def _seal_chunk(self, chunk_id: bytes, data: bytes) -> list[bytes]:
        """The stored chunk, in parts: a megabyte joined to its format byte would be
        one more copy (and a fresh allocation) per chunk."""
        frame = _compressor().compress(data)
        if self._aead is None:
            return [bytes([_CHUNK_PLAIN]), frame]
        nonce = os.urandom(NONCE_SIZE)
        return [bytes([_CHUNK_ENCRYPTED]) + nonce, self._aead.encrypt(nonce, frame, chunk_id)]

    def _unseal_chunk(self, chunk_id: bytes, stored: bytes) -> bytes:
        """The zstd frame in a stored chunk."""
        # A plain chunk in an encrypted repository is refused too: nothing
        # unauthenticated is read there.
        expected = _CHUNK_ENCRYPTED if self._aead else _CHUNK_PLAIN
        if not stored or stored[0] != expected:
            kind = f"format byte {stored[0]}" if stored else "an empty file"
            raise CorruptChunk(self._chunk_problem(chunk_id, f"unexpected {kind} (corrupt)"))
        if self._aead is None:
            return stored[1:]
        nonce, sealed = stored[1:1 + NONCE_SIZE], stored[1 + NONCE_SIZE:]
        try:
            return self._aead.decrypt(nonce, sealed, chunk_id)
        except (InvalidTag, ValueError):
            raise CorruptChunk(self._chunk_problem(
                chunk_id, "fails authentication (corrupt or altered)")) from None

    def _decompress(self, chunk_id: bytes, frame: bytes) -> bytes:
        try:
            size = zstandard.frame_content_size(frame)
            if not 0 <= size <= MAX_CHUNK:
                raise zstandard.ZstdError(f"frame claims {size} bytes")
            return _decompressor().decompress(frame)
        except zstandard.ZstdError:
            raise CorruptChunk(self._chunk_problem(
                chunk_id, "does not decompress (corrupt)")) from None

    # Manifests

    def save_manifest(self, manifest: dict) -> str:
        """Give the manifest its id (sortable: UTC time, then a random suffix) and
        write it; returns the id. Write it only after every chunk it names."""
        backup_id = self._new_backup_id()
        manifest["id"] = backup_id
        body = msgpack.packb(manifest, use_bin_type=True)
        self._write_file(self.path / "manifests" / backup_id,
                         self._seal_manifest(backup_id, body))
        log.info("saved backup %s in %s", backup_id, self.path)
        return backup_id

    def load_manifest(self, backup_id: str) -> dict:
        """The manifest of a backup, named by its id or a unique prefix of it."""
        return self._read_manifest(self._resolve(backup_id))

    def backups(self) -> list[dict]:
        """Every backup's manifest, oldest first."""
        manifests = [self._read_manifest(backup_id) for backup_id in self._backup_ids()]
        return sorted(manifests, key=_age)

    def backup_ids(self) -> list[str]:
        """Every backup's id, oldest first (ids sort by the time they were saved)."""
        return self._backup_ids()

    def _backup_ids(self) -> list[str]:
        names = os.listdir(self.path / "manifests")
        return sorted(name for name in names if _BACKUP_ID.fullmatch(name))

    def _resolve(self, prefix: str) -> str:
        ids = self._backup_ids()
        if not prefix:
            raise NoSuchBackup(f"no backup id given for the repository at {self.path}")
        if prefix in ids:
            return prefix
        matches = [backup_id for backup_id in ids if backup_id.startswith(prefix)]
        if not matches:
            raise NoSuchBackup(f"no backup {prefix} in the repository at {self.path}")
        if len(matches) > 1:
            shown = ", ".join(matches[:4]) + (", …" if len(matches) > 4 else "")
            raise AmbiguousBackup(f"backup id {prefix} matches {len(matches)} backups in "
                                  f"{self.path} ({shown}): give more of it")
        return matches[0]

    def _new_backup_id(self) -> str:
        while True:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            backup_id = f"{stamp}-{secrets.token_hex(3)}"
            if not (self.path / "manifests" / backup_id).exists():
                return backup_id

    def _seal_manifest(self, backup_id: str, body: bytes) -> bytes:
        bound = b"manifest:" + backup_id.encode()
        if self._aead is None:
            return body + blake3.blake3(bound + body, key=self._keys.mac).digest()
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, body, bound)

    def _read_manifest(self, backup_id: str) -> dict:
        try:
            raw = (self.path / "manifests" / backup_id).read_bytes()
        except FileNotFoundError:
            raise NoSuchBackup(f"no backup {backup_id} in the repository at "
                               f"{self.path}") from None
        body = self._unseal_manifest(backup_id, raw)
        manifest = unpack(body)
        if not isinstance(manifest, dict) or manifest.get("id") != backup_id:
            raise CorruptManifest(f"manifest {backup_id} in {self.path}: authenticated but "
                                  f"malformed")
        return manifest

    def _unseal_manifest(self, backup_id: str, raw: bytes) -> bytes:
        bound = b"manifest:" + backup_id.encode()
        failed = CorruptManifest(f"manifest {backup_id} in {self.path}: fails authentication "
                                 f"(corrupt or altered)")
        if self._aead is None:
            body, mac = raw[:-MAC_SIZE], raw[-MAC_SIZE:]
            expected = blake3.blake3(bound + body, key=self._keys.mac).digest()
            if len(raw) < MAC_SIZE or not hmac.compare_digest(mac, expected):
                raise failed
            return body
        try:
            return self._aead.decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], bound)
        except (InvalidTag, ValueError):
            raise failed from None

    # Checking

    def verify(self, ids: Iterable[str] | None = None,
               progress: Callable[[int], object] | None = None) -> list[str]:
        """Re-read every manifest, and re-read and re-hash every chunk the chosen
        backups (default: all) reference, checking that it holds the bytes every
        reference takes of it. Returns one line per problem; none means all is well.
        progress, if given, is called with the bytes each chunk is needed for
        (chunk_needs says how many in all)."""
        problems: list[str] = []
        chosen = set(self._backup_ids() if ids is None else map(self._resolve, ids))
        wanted: dict[bytes, tuple[int, str]] = {}  # chunk id -> (bytes needed, who needs them)
        for backup_id in self._backup_ids():
            try:
                manifest = self._read_manifest(backup_id)
                refs = list(manifest_chunks(manifest))
            except RepositoryCorrupt as exc:
                problems.append(str(exc))
                continue
            if backup_id in chosen:
                for path, ref in refs:  # the reference that needs the most of a chunk
                    if ref.needed > wanted.get(ref.chunk_id, (0, ""))[0]:
                        wanted[ref.chunk_id] = (ref.needed, f"backup {backup_id}, file {path}")
        problems += self._check_chunks(wanted, progress)
        return problems

    def _check_chunks(self, wanted: dict[bytes, tuple[int, str]],
                      progress: Callable[[int], object] | None) -> list[str]:
        def check(item: tuple[bytes, tuple[int, str]]) -> tuple[str | None, int]:
            chunk_id, (needed, user) = item
            try:
                data = self.get_chunk(chunk_id)
            except RepositoryCorrupt as exc:
                return f"{exc} (used by {user})", needed
            if len(data) < needed:
                return self.too_short(chunk_id, len(data), needed, user), needed
            return None, needed

        problems = []
        for problem, needed in ordered_map(check, wanted.items()):
            if problem:
                problems.append(problem)
            if progress:
                progress(needed)
        return problems

    def too_short(self, chunk_id: bytes, held: int, needed: int, user: str) -> str:
        return self._chunk_problem(chunk_id, f"holds {held} bytes where {user} "
                                   f"needs {needed} (too short)")

    # Removing

    def forget(self, ids: Iterable[str]) -> list[str]:
        """Delete the manifests of these backups (ids or unique prefixes); their
        chunks stay until prune. Returns the ids removed."""
        with self.lock():
            # Every id is resolved before anything is deleted: a typo deletes nothing.
            chosen = list(dict.fromkeys(self._resolve(backup_id) for backup_id in ids))
            for backup_id in chosen:
                os.unlink(self.path / "manifests" / backup_id)
                log.info("forgot backup %s in %s", backup_id, self.path)
            fsync_dir(self.path / "manifests")
        return chosen

    def prune(self, keep_last: int | None = None) -> dict:
        """Forget all but the newest keep_last backups (if given), then delete every
        chunk no manifest references, and what interrupted writes left in tmp/."""
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise UsageError(f"keep_last must be at least 1, not {keep_last} "
                             f"(forget removes every backup)")
        with self.lock():
            forgotten = []
            if keep_last is not None:
                ordered = [manifest["id"] for manifest in self.backups()]
                forgotten = self.forget(ordered[:-keep_last]) if len(ordered) > keep_last else []
            removed, freed = self._collect_garbage()
            self._clean_tmp()
        log.info("pruned %s: forgot %d backups, removed %d chunks (%d bytes)", self.path,
                 len(forgotten), removed, freed)
        return {"forgotten": forgotten, "chunks_removed": removed, "bytes_freed": freed}

    def _collect_garbage(self) -> tuple[int, int]:
        # Any manifest that cannot be read stops the collection (CorruptManifest):
        # the chunks it references must not be deleted on a guess.
        referenced = {ref.chunk_id for backup_id in self._backup_ids()
                      for _path, ref in manifest_chunks(self._read_manifest(backup_id))}
        removed = freed = 0
        for directory in sorted((self.path / "chunks").iterdir()):
            touched = False
            for entry in os.scandir(directory):
                if not _CHUNK_NAME.fullmatch(entry.name):
                    continue  # not a chunk: not ours to delete
                if bytes.fromhex(entry.name) not in referenced:
                    freed += entry.stat().st_size
                    os.unlink(entry.path)
                    removed += 1
                    touched = True
            if touched:
                fsync_dir(directory)
        return removed, freed

    def _clean_tmp(self) -> None:
        """Files in tmp/ are only ever in flight under the lock, which we hold: any
        there now were left by an interrupted writer."""
        for entry in os.scandir(self.path / "tmp"):
            log.info("removing %s, left by an interrupted write", entry.path)
            os.unlink(entry.path)

    def stored_bytes(self) -> int:
        """Bytes the chunks and manifests take (file sizes)."""
        total = 0
        for directory in (self.path / "chunks").iterdir():
            total += sum(entry.stat().st_size for entry in os.scandir(directory))
        total += sum(entry.stat().st_size for entry in os.scandir(self.path / "manifests"))
        return total

    # Files

    def _write_file(self, final: Path, data: bytes) -> None:
        os.replace(self._write_temporary(final.name, data), final)
        fsync_dir(final.parent)

    def _write_temporary(self, name: str, data: bytes | list[bytes],
                         durable: bool = True) -> Path:
        """A file in tmp/ holding data, or its parts one after another (durable unless
        told), under a name no other writer uses."""
        temporary = self.path / "tmp" / f"{name}.{secrets.token_hex(6)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, [data] if isinstance(data, bytes) else data, 0)
            if durable:
                os.fsync(fd)
        except BaseException:
            os.unlink(temporary)
            raise
        finally:
            os.close(fd)
        return temporary


def _age(manifest: dict) -> tuple:
    """Oldest first: by the time the backup was taken, then by id (sortable too)."""
    taken = manifest.get("time_ns")
    return (taken if isinstance(taken, int) else 0, manifest["id"])


_codecs = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # A zstd context serves one thread at a time: one per thread.
    if not hasattr(_codecs, "compressor"):
        _codecs.compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True)
    return _codecs.compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_codecs, "decompressor"):
        _codecs.decompressor = zstandard.ZstdDecompressor()
    return _codecs.decompressor
