"""The backup repository on real files: keys, dedup, compression, encryption,
corruption found by verify, the writers' lock across processes, interrupted
writes, prune, sparse restore, and put_chunk on many threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import pytest

from csvfs.backup import progress
from csvfs.backup.errors import (
    AmbiguousBackup,
    CorruptChunk,
    CorruptManifest,
    MissingChunk,
    NoSuchBackup,
    RepositoryExists,
    RepositoryKeyError,
    RepositoryLocked,
    RepositoryMissing,
)
from csvfs.backup.keys import write_key
from csvfs.backup.manifest import ChunkRef, to_item
from csvfs.backup.repository import Repository
from csvfs.backup.restore_file import restore_file
from csvfs.volume.errors import ExitCode
from tests.cluster import csvfs

ROOT = Path(__file__).resolve().parent.parent
KIB = 1 << 10
MIB = 1 << 20


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def repo(request, tmp_path):
    return Repository.create(tmp_path / "repo", encrypt=request.param)


def blob(seed: int, size: int = 64 * KIB) -> bytes:
    """Incompressible data, different for each seed."""
    return os.urandom(8) + seed.to_bytes(8, "big") + os.urandom(size - 16)


def manifest_of(repo: Repository, files: dict[str, list[tuple[int, bytes]]],
                time_ns: int = 0) -> dict:
    """Store the chunks and return a manifest naming them: files maps a path to
    (offset, data) pairs."""
    entries = []
    for path, pieces in files.items():
        chunks = []
        for offset, data in pieces:
            chunk_id = repo.chunk_id(data)
            repo.put_chunk(data, chunk_id)
            chunks.append([offset, len(data), chunk_id])
        size = max((offset + len(data) for offset, data in pieces), default=0)
        entries.append({"path": path, "ino": 0, "size": size, "mode": 0o100644, "uid": 0,
                        "gid": 0, "atime_ns": 0, "mtime_ns": 0, "ctime_ns": 0, "xattrs": [],
                        "consistency": "crash", "chunks": chunks})
    return {"format": 1, "kind": "volume", "time_ns": time_ns, "snapshot": 1,
            "source": {"volume": "v", "image": "i", "unit_size": 4096},
            "chunk_size": repo.chunk_size, "files": entries, "tree": [],
            "stats": {"logical": 0, "read": 0, "new": 0, "duration_s": 0.0}, "warnings": []}


def chunk_files(repo: Repository) -> list[Path]:
    return sorted(path for path in (repo.path / "chunks").rglob("*") if path.is_file())


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


# Creating and opening


def test_create_then_open(tmp_path):
    created = Repository.create(tmp_path / "repo", chunk_size=256 * KIB)
    key_file = tmp_path / "repo.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(key_file.read_text())) == 32
    opened = Repository.open(tmp_path / "repo")
    assert (opened.repo_id, opened.encrypted, opened.chunk_size) == (created.repo_id, False,
                                                                     256 * KIB)
    assert opened.path == tmp_path / "repo" and opened.backups() == []
    assert opened.verify() == []


def test_a_key_file_elsewhere_and_reused(tmp_path):
    key = tmp_path / "keys" / "backup.key"
    key.parent.mkdir()
    first = Repository.create(tmp_path / "a", key_path=key, encrypt=True)
    second = Repository.create(tmp_path / "b", key_path=key)  # the same key serves both
    assert not (tmp_path / "a.key").exists()
    data = b"shared" * 100
    assert first.chunk_id(data) == second.chunk_id(data)
    assert Repository.open(tmp_path / "a", key_path=key).encrypted


def test_wrong_key_is_refused(tmp_path):
    Repository.create(tmp_path / "repo")
    write_key(tmp_path / "other.key", os.urandom(32))
    with pytest.raises(RepositoryKeyError) as exc:
        Repository.open(tmp_path / "repo", key_path=tmp_path / "other.key")
    assert "wrong key" in one_line(exc) and exc.value.exit_code == ExitCode.REPO_KEY == 23


def test_an_altered_config_is_refused(tmp_path):
    Repository.create(tmp_path / "repo", encrypt=True)
    config_path = tmp_path / "repo" / "config"
    config = msgpack.unpackb(config_path.read_bytes())
    config["encrypted"] = False  # a downgrade to plaintext must not pass
    config_path.write_bytes(msgpack.packb(config))
    with pytest.raises(RepositoryKeyError):
        Repository.open(tmp_path / "repo")


def test_key_file_missing_too_open_or_not_a_key(tmp_path):
    Repository.create(tmp_path / "repo")
    key_file = tmp_path / "repo.key"
    key_file.chmod(0o644)
    with pytest.raises(RepositoryKeyError) as exc:
        Repository.open(tmp_path / "repo")
    assert "chmod 600" in one_line(exc)
    key_file.write_text("not hex\n")
    key_file.chmod(0o600)
    with pytest.raises(RepositoryKeyError, match="not a csvfs backup key"):
        Repository.open(tmp_path / "repo")
    key_file.unlink()
    with pytest.raises(RepositoryKeyError, match="does not exist") as exc:
        Repository.open(tmp_path / "repo")
    assert exc.value.exit_code == 23


def test_not_a_repository(tmp_path):
    with pytest.raises(RepositoryMissing) as exc:
        Repository.open(tmp_path / "nothing")
    assert "no backup repository" in one_line(exc)
    assert exc.value.exit_code == ExitCode.REPO_MISSING == 20
    (tmp_path / "plain-dir").mkdir()
    with pytest.raises(RepositoryMissing, match="not a backup repository"):
        Repository.open(tmp_path / "plain-dir")
    (tmp_path / "a-file").write_bytes(b"x")
    with pytest.raises(RepositoryMissing, match="not a backup repository"):
        Repository.open(tmp_path / "a-file")
    (tmp_path / "plain-dir" / "config").write_bytes(b"\xc1 garbage")
    with pytest.raises(RepositoryMissing, match="not a csvfs backup repository config"):
        Repository.open(tmp_path / "plain-dir")


def test_create_refuses_an_existing_repository_or_a_full_directory(tmp_path):
    Repository.create(tmp_path / "repo")
    with pytest.raises(RepositoryExists) as exc:
        Repository.create(tmp_path / "repo")
    assert "already a backup repository" in one_line(exc)
    assert exc.value.exit_code == ExitCode.REPO_EXISTS == 21
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "precious").write_text("keep me")
    with pytest.raises(RepositoryExists, match="not empty"):
        Repository.create(tmp_path / "full")
    assert (tmp_path / "full" / "precious").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    Repository.create(tmp_path / "empty")  # an empty directory is fine


# Chunks


def test_the_same_chunk_is_stored_once(repo):
    data = blob(1)
    stored = repo.put_chunk(data)
    assert 64 * KIB <= stored < 65 * KIB
    assert repo.put_chunk(data) == 0
    assert repo.put_chunk(data, repo.chunk_id(data)) == 0
    assert len(chunk_files(repo)) == 1 and repo.has_chunk(repo.chunk_id(data))
    assert repo.get_chunk(repo.chunk_id(data)) == data


def test_a_chunk_batch_places_its_chunks_at_its_end(repo):
    first, second = blob(1), blob(2)
    with repo.chunk_batch():
        assert repo.put_chunk(first) > 0
        assert repo.put_chunk(first) == 0, "staged already: stored once"
        assert repo.put_chunk(second) > 0
        assert chunk_files(repo) == [], "nothing in place before the batch ends"
        repo.place_staged()  # as a backup does, on a worker thread
        assert len(chunk_files(repo)) == 2
        third = blob(3)
        repo.put_chunk(third)
    assert len(chunk_files(repo)) == 3 and repo.get_chunk(repo.chunk_id(third)) == third
    assert list((repo.path / "tmp").iterdir()) == []


def test_a_failed_chunk_batch_leaves_nothing(repo):
    with pytest.raises(RuntimeError, match="copy failed"), repo.chunk_batch():
        repo.put_chunk(blob(4))
        raise RuntimeError("copy failed")
    assert chunk_files(repo) == [] and list((repo.path / "tmp").iterdir()) == []
    assert repo.put_chunk(blob(4)) > 0  # and the repository works on


def test_two_backups_of_the_same_data_share_its_chunks(repo):
    pieces = [(0, blob(1)), (64 * KIB, blob(2))]
    repo.save_manifest(manifest_of(repo, {"/a": pieces}))
    after_first = repo.stored_bytes()
    manifests_before = sum(p.stat().st_size for p in (repo.path / "manifests").iterdir())
    repo.save_manifest(manifest_of(repo, {"/a": pieces, "/copy-of-a": pieces}))
    manifests_after = sum(p.stat().st_size for p in (repo.path / "manifests").iterdir())
    assert len(chunk_files(repo)) == 2
    # Only the second manifest was added.
    assert repo.stored_bytes() - after_first == manifests_after - manifests_before < 2 * KIB


def test_chunk_ids_are_keyed(tmp_path):
    one = Repository.create(tmp_path / "one")
    other = Repository.create(tmp_path / "other")
    assert one.chunk_id(b"same") != other.chunk_id(b"same")
    assert len(one.chunk_id(b"same")) == 32


def test_a_chunk_of_zeros_is_compressed(repo):
    data = bytearray(MIB)
    data[1000:1010] = b"not zeros!"
    stored = repo.put_chunk(bytes(data))
    assert 0 < stored < 4 * KIB
    assert repo.get_chunk(repo.chunk_id(bytes(data))) == data


def test_an_encrypted_repository_hides_data_and_manifests(tmp_path):
    repo = Repository.create(tmp_path / "repo", encrypt=True)
    secret = b"the launch code is 0000" * 200
    manifest = manifest_of(repo, {"/very/secret/name.txt": [(0, secret)]})
    repo.save_manifest(manifest)
    for path in (tmp_path / "repo").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"launch code" not in content and b"secret/name" not in content, path
    manifest_file = next((tmp_path / "repo" / "manifests").iterdir())
    # Not even the manifest's field names show through.
    assert b"consistency" not in manifest_file.read_bytes()
    reopened = Repository.open(tmp_path / "repo")
    assert reopened.encrypted
    loaded = reopened.load_manifest(manifest_file.name)
    assert loaded["files"][0]["path"] == "/very/secret/name.txt"
    assert reopened.get_chunk(loaded["files"][0]["chunks"][0][2]) == secret


def test_get_chunk_refuses_a_corrupt_or_missing_chunk(repo):
    data = blob(7)
    chunk_id = repo.chunk_id(data)
    repo.put_chunk(data)
    (path,) = chunk_files(repo)
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(CorruptChunk) as exc:
        repo.get_chunk(chunk_id)
    assert chunk_id.hex()[:16] in one_line(exc)
    assert exc.value.exit_code == ExitCode.REPO_CORRUPT == 24
    path.unlink()
    with pytest.raises(MissingChunk, match="missing") as exc:
        repo.get_chunk(chunk_id)
    assert exc.value.exit_code == 24


def test_a_chunk_under_another_id_is_refused(repo):
    """A chunk file copied over another's name decompresses fine but hashes wrong."""
    first, second = blob(1), blob(2)
    repo.put_chunk(first)
    repo.put_chunk(second)
    first_path = repo.path / "chunks" / repo.chunk_id(first).hex()[:2] / repo.chunk_id(first).hex()
    second_path = (repo.path / "chunks" / repo.chunk_id(second).hex()[:2]
                   / repo.chunk_id(second).hex())
    second_path.write_bytes(first_path.read_bytes())
    with pytest.raises(CorruptChunk):
        repo.get_chunk(repo.chunk_id(second))


# Verify


def test_verify_finds_a_flipped_byte_in_any_chunk(repo):
    manifest = manifest_of(repo, {"/a": [(i * 16 * KIB, blob(i, 16 * KIB)) for i in range(3)],
                                  "/b": [(0, b"\0" * 32 * KIB)]})
    repo.save_manifest(manifest)
    assert repo.verify() == []
    for path in chunk_files(repo):
        original = path.read_bytes()
        for position in (0, 1, len(original) // 2, len(original) - 1):
            flip_byte(path, position)
            problems = repo.verify()
            assert len(problems) == 1 and path.name[:16] in problems[0], (path, position)
            path.write_bytes(original)
    assert repo.verify() == []


def test_verify_finds_a_flipped_byte_in_a_manifest(repo):
    backup_id = repo.save_manifest(manifest_of(repo, {"/a": [(0, blob(1))]}))
    path = repo.path / "manifests" / backup_id
    original = path.read_bytes()
    for position in (0, len(original) // 2, len(original) - 1):
        flip_byte(path, position)
        problems = repo.verify()
        assert len(problems) == 1 and backup_id in problems[0]
        with pytest.raises(CorruptManifest, match=backup_id):
            repo.backups()
        path.write_bytes(original)
    assert repo.verify() == []


def test_a_manifest_renamed_to_another_id_fails(repo):
    first = repo.save_manifest(manifest_of(repo, {"/a": [(0, blob(1))]}))
    second = repo.save_manifest(manifest_of(repo, {"/b": [(0, blob(2))]}))
    (repo.path / "manifests" / first).replace(repo.path / "manifests" / second)
    with pytest.raises(CorruptManifest):
        repo.load_manifest(second)


def test_verify_reports_a_missing_chunk_and_reads_only_chosen_backups(repo):
    kept = repo.save_manifest(manifest_of(repo, {"/a": [(0, blob(1))]}))
    data = blob(2)
    broken = repo.save_manifest(manifest_of(repo, {"/b": [(0, data)]}))
    chunk_id = repo.chunk_id(data)
    (repo.path / "chunks" / chunk_id.hex()[:2] / chunk_id.hex()).unlink()
    seen = []
    assert repo.verify([kept], progress=seen.append) == []
    assert sum(seen) == 64 * KIB
    (problem,) = repo.verify()
    assert "missing" in problem and broken in problem and "/b" in problem


# Manifests


def test_load_manifest_by_id_or_unique_prefix(repo):
    ids = [repo.save_manifest(manifest_of(repo, {f"/{i}": [(0, blob(i))]}, time_ns=i))
           for i in range(3)]
    for backup_id in ids:
        assert repo.load_manifest(backup_id)["id"] == backup_id
        assert repo.load_manifest(backup_id[:-1])["id"] == backup_id  # unique: the suffix
    assert [m["id"] for m in repo.backups()] == ids
    with pytest.raises(AmbiguousBackup) as exc:
        repo.load_manifest(os.path.commonprefix(ids))  # the time they share, at least "20"
    assert exc.value.exit_code == ExitCode.NO_SUCH_BACKUP == 25
    assert isinstance(exc.value, NoSuchBackup) and "matches 3 backups" in one_line(exc)
    with pytest.raises(NoSuchBackup) as exc:
        repo.load_manifest("19990101")
    assert "no backup 19990101" in one_line(exc)


def test_save_manifest_assigns_a_sortable_id_and_keeps_the_fields(repo):
    manifest = manifest_of(repo, {"/a": [(0, blob(1))]}, time_ns=123)
    manifest["files"][0]["xattrs"] = [[b"user.k", b"\x00\xffvalue"]]
    backup_id = repo.save_manifest(manifest)
    assert manifest["id"] == backup_id
    date, suffix = backup_id.split("-")
    assert len(date) == 16 and date[8] == "T" and date.endswith("Z") and len(suffix) == 6
    loaded = repo.load_manifest(backup_id)
    assert loaded["files"][0]["xattrs"] == [[b"user.k", b"\x00\xffvalue"]]
    assert loaded["files"][0]["chunks"] == manifest["files"][0]["chunks"]
    assert loaded["time_ns"] == 123 and loaded["stats"]["duration_s"] == 0.0


# The lock


HOLDER = """
import sys, time
from csvfs.backup.repository import Repository
repo = Repository.open(sys.argv[1])
with repo.lock():
    print("locked", flush=True)
    time.sleep(60)
"""

ATTEMPT = """
import sys
from csvfs.backup.repository import Repository, RepositoryLocked
try:
    with Repository.open(sys.argv[1]).lock():
        pass
except RepositoryLocked as exc:
    print(exc)
    sys.exit(exc.exit_code)
"""


def python(code: str, *args, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, text=True, **kwargs)


def test_the_lock_excludes_another_process_until_its_holder_is_killed(tmp_path):
    repo = Repository.create(tmp_path / "repo")
    holder = python(HOLDER, repo.path)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RepositoryLocked) as exc:
            with repo.lock():
                pass
        assert f"pid {holder.pid} on " in one_line(exc) and " since " in str(exc.value)
        assert exc.value.exit_code == ExitCode.REPO_LOCKED == 22
        with pytest.raises(RepositoryLocked):
            repo.prune()  # writes take the lock themselves
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    with repo.lock():  # the kernel dropped the dead holder's lock
        with repo.lock():  # and the lock is re-entrant within its holder
            attempt = python(ATTEMPT, repo.path)
            output, _ = attempt.communicate(timeout=30)
            assert attempt.returncode == 22 and f"pid {os.getpid()}" in output
        assert repo.prune()["forgotten"] == []
    attempt = python(ATTEMPT, repo.path)
    attempt.communicate(timeout=30)
    assert attempt.returncode == 0


# Interruptions, forget and prune


def test_an_interrupted_backup_leaves_the_repository_valid(repo):
    data = blob(1)
    repo.save_manifest(manifest_of(repo, {"/a": [(0, data)]}))
    # A backup killed midway: one chunk stored without a manifest, and a chunk
    # file and a manifest half written in tmp/.
    orphan = blob(2)
    orphan_size = repo.put_chunk(orphan)
    (repo.path / "tmp" / ("ab" * 32 + ".1234")).write_bytes(b"\x01half a chunk")
    (repo.path / "tmp" / "20261201T000000Z-abcdef.99").write_bytes(b"half a manifest")
    reopened = Repository.open(repo.path)
    assert reopened.verify() == [] and len(reopened.backups()) == 1
    result = reopened.prune()
    assert result == {"forgotten": [], "chunks_removed": 1, "bytes_freed": orphan_size}
    assert not reopened.has_chunk(reopened.chunk_id(orphan))
    assert list((repo.path / "tmp").iterdir()) == []
    assert reopened.verify() == []
    assert reopened.get_chunk(reopened.chunk_id(data)) == data


def test_forget_and_prune_free_only_unreferenced_chunks(repo):
    shared = blob(0)
    backups = []
    for i in range(1, 4):
        unique = blob(i)
        manifest = manifest_of(repo, {"/f": [(0, shared), (64 * KIB, unique)]}, time_ns=i)
        backups.append((repo.save_manifest(manifest), unique))
    assert len(chunk_files(repo)) == 4
    sizes = {path.name: path.stat().st_size for path in chunk_files(repo)}
    result = repo.prune(keep_last=1)
    assert result["forgotten"] == [backups[0][0], backups[1][0]]
    assert result["chunks_removed"] == 2
    freed = [sizes[repo.chunk_id(unique).hex()] for _, unique in backups[:2]]
    assert result["bytes_freed"] == sum(freed)
    newest, unique = backups[2]
    assert [m["id"] for m in repo.backups()] == [newest]
    assert repo.get_chunk(repo.chunk_id(shared)) == shared
    assert repo.get_chunk(repo.chunk_id(unique)) == unique
    assert repo.verify() == []
    assert repo.forget([newest[:-2]]) == [newest]
    assert repo.prune() == {"forgotten": [], "chunks_removed": 2,
                            "bytes_freed": sum(sizes.values()) - sum(freed)}
    assert chunk_files(repo) == [] and repo.stored_bytes() == 0


def test_forget_an_unknown_id_deletes_nothing(repo):
    backup_id = repo.save_manifest(manifest_of(repo, {"/a": [(0, blob(1))]}))
    with pytest.raises(NoSuchBackup):
        repo.forget([backup_id, "nope"])
    assert [m["id"] for m in repo.backups()] == [backup_id]


def test_prune_deletes_nothing_while_a_manifest_is_corrupt(repo):
    backup_id = repo.save_manifest(manifest_of(repo, {"/a": [(0, blob(1))]}))
    repo.put_chunk(blob(2))  # an orphan prune would remove
    flip_byte(repo.path / "manifests" / backup_id, 3)
    with pytest.raises(CorruptManifest, match=backup_id):
        repo.prune()
    assert len(chunk_files(repo)) == 2


# Restore


def test_restore_file_is_sparse_and_exact(repo, tmp_path):
    size = 64 * MIB
    start, middle = blob(1, 256 * KIB), blob(2, 256 * KIB)
    zeros = bytes(256 * KIB)  # stored data that happens to be zeros stays a hole too
    pieces = [(0, start), (8 * MIB, zeros), (32 * MIB + 4096, middle), (size - 10, b"tail end!!")]
    manifest = manifest_of(repo, {"/disk.img": pieces})
    backup_id = repo.save_manifest(manifest)
    entry = repo.load_manifest(backup_id)["files"][0]
    target = tmp_path / "restored.img"
    done = []
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        restore_file(repo, entry, fd, progress=done.append)
    finally:
        os.close(fd)
    assert target.stat().st_size == size
    assert target.stat().st_blocks * 512 < 2 * MIB
    assert sum(done) == sum(len(data) for _, data in pieces)
    with open(target, "rb") as restored:
        for offset, data in pieces:
            restored.seek(offset)
            assert restored.read(len(data)) == data
        restored.seek(len(start))
        assert restored.read(MIB) == bytes(MIB)  # a hole reads as zeros


def test_restore_file_ends_in_a_hole_and_refuses_a_corrupt_chunk(repo, tmp_path):
    data = blob(1, 4 * KIB)
    manifest = manifest_of(repo, {"/f": [(0, data)]})
    entry = manifest["files"][0]
    entry["size"] = 1 * MIB  # the file goes on as a hole past its last chunk
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        restore_file(repo, entry, fd)
        assert os.fstat(fd).st_size == MIB and os.pread(fd, 5 * KIB, 0) == data + bytes(KIB)
        (path,) = chunk_files(repo)
        flip_byte(path, 10)
        with pytest.raises(CorruptChunk):
            restore_file(repo, entry, fd)
    finally:
        os.close(fd)


def test_restore_file_refuses_overlapping_chunks(repo, tmp_path):
    entry = manifest_of(repo, {"/f": [(0, blob(1)), (4096, blob(2))]})["files"][0]
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(CorruptManifest, match="/f"):
            restore_file(repo, entry, fd)
    finally:
        os.close(fd)
    assert (tmp_path / "out").stat().st_size == 0  # refused before writing anything


# Slices of chunks


def sliced_entry(repo: Repository, path: str = "/sliced") -> tuple[dict, bytes]:
    """A file entry that mixes whole chunks, slices of chunks and holes, as an
    incremental backup writes them, and the bytes the file holds."""
    old, other, fresh = blob(1, 256 * KIB), blob(2, 128 * KIB), blob(3, 64 * KIB)
    half_zeros = bytes(32 * KIB) + blob(4, 32 * KIB)
    for data in (old, other, fresh, half_zeros):
        repo.put_chunk(data)
    size = MIB
    refs = [  # (offset in the file, the chunk's data, skip, length)
        (0, old, 0, 64 * KIB),  # the start of a chunk: a 3-element item, shorter
        (64 * KIB, fresh, 0, 64 * KIB),  # a whole chunk
        (128 * KIB, old, 128 * KIB, 128 * KIB),  # a chunk's end
        # a hole [256 KiB, 320 KiB)
        (320 * KIB, other, 32 * KIB, 32 * KIB),  # the middle of a chunk
        (352 * KIB, other, 0, 128 * KIB),  # the same chunk, whole
        (480 * KIB, half_zeros, 0, 32 * KIB),  # a slice of zeros (stays a hole)
        (512 * KIB, half_zeros, 32 * KIB, 32 * KIB),
        (900 * KIB, old, 10, 1000),  # odd offsets and lengths; then a hole to the end
    ]
    expected = bytearray(size)
    items = []
    for offset, data, skip, length in refs:
        expected[offset:offset + length] = data[skip:skip + length]
        items.append(to_item(ChunkRef(offset, length, repo.chunk_id(data), skip)))
    return file_entry(path, size, items), bytes(expected)


def file_entry(path: str, size: int, items: list) -> dict:
    return {"path": path, "ino": 0, "size": size, "mode": 0o100644, "uid": 0, "gid": 0,
            "atime_ns": 0, "mtime_ns": 0, "ctime_ns": 0, "xattrs": [],
            "consistency": "crash", "chunks": items}


def backup_of(repo: Repository, *entries: dict) -> str:
    manifest = manifest_of(repo, {})
    manifest["files"] = list(entries)
    return repo.save_manifest(manifest)


def restore_to(repo: Repository, entry: dict, target: Path, done=None) -> None:
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        restore_file(repo, entry, fd, progress=done)
    finally:
        os.close(fd)


def test_restore_file_takes_slices_of_chunks(repo, tmp_path):
    entry, expected = sliced_entry(repo)
    backup_id = backup_of(repo, entry)
    loaded = repo.load_manifest(backup_id)["files"][0]
    assert loaded["chunks"] == entry["chunks"]
    assert sorted({len(item) for item in loaded["chunks"]}) == [3, 4]
    done = []
    restore_to(repo, loaded, tmp_path / "out", done.append)
    assert (tmp_path / "out").read_bytes() == expected
    assert sum(done) == sum(item[1] for item in entry["chunks"])
    assert (tmp_path / "out").stat().st_blocks * 512 < 600 * KIB  # holes stayed holes
    assert repo.verify() == []


def test_verify_checks_each_chunk_for_the_most_any_slice_takes(repo):
    entry, _expected = sliced_entry(repo)
    backup_id = backup_of(repo, entry)
    seen = []
    assert repo.verify([backup_id], progress=seen.append) == []
    # old: up to 256 KiB; other and half_zeros: whole; fresh: whole
    assert sorted(seen) == [64 * KIB, 64 * KIB, 128 * KIB, 256 * KIB]


def test_a_chunk_shorter_than_a_slice_is_found_and_refused(repo, tmp_path):
    data = blob(1, 16 * KIB)
    chunk_id = repo.chunk_id(data)
    repo.put_chunk(data)
    fits = file_entry("/fits", 64 * KIB,
                      [[0, 8 * KIB, chunk_id], [8 * KIB, 8 * KIB, chunk_id, 8 * KIB]])
    # bytes [12 KiB, 20 KiB) of a chunk of 16 KiB
    past = file_entry("/past", 64 * KIB, [[4096, 8 * KIB, chunk_id, 12 * KIB]])
    backup_id = backup_of(repo, fits, past)
    (problem,) = repo.verify()
    assert chunk_id.hex()[:16] in problem and backup_id in problem and "/past" in problem
    assert f"holds {16 * KIB} bytes" in problem and f"needs {20 * KIB}" in problem
    restore_to(repo, fits, tmp_path / "fits")
    assert (tmp_path / "fits").read_bytes() == data + bytes(48 * KIB)
    with pytest.raises(CorruptChunk) as exc:
        restore_to(repo, past, tmp_path / "past")
    assert chunk_id.hex()[:16] in one_line(exc) and "/past" in str(exc.value)
    assert exc.value.exit_code == ExitCode.REPO_CORRUPT == 24
    key = ["--repo-key", repo.key_path]
    result = csvfs("backup", "verify", "--repo", repo.path, *key, check=False)
    assert result.returncode == 24 and f"needs {20 * KIB}" in result.stdout, result
    result = csvfs("backup", "restore", "--repo", repo.path, *key, backup_id, "--file", "/past",
                   "--to", tmp_path / "cli-past", check=False)
    assert result.returncode == 24 and chunk_id.hex()[:16] in result.stderr, result
    assert "Traceback" not in result.stderr
    result = csvfs("backup", "restore", "--repo", repo.path, *key, backup_id, "--file", "/fits",
                   "--to", tmp_path / "cli-fits")
    assert (tmp_path / "cli-fits").read_bytes() == data + bytes(48 * KIB)


@pytest.mark.parametrize("skip", [-1, "5", 1.5, None])
def test_a_malformed_skip_is_a_corrupt_manifest(repo, tmp_path, skip):
    data = blob(1, 16 * KIB)
    repo.put_chunk(data)
    entry = file_entry("/bad-skip", 64 * KIB, [[0, 4 * KIB, repo.chunk_id(data), skip]])
    backup_id = backup_of(repo, entry)
    (problem,) = repo.verify()
    assert backup_id in problem and "/bad-skip" in problem and "skip" in problem
    with pytest.raises(CorruptManifest, match="/bad-skip") as exc:
        restore_to(repo, entry, tmp_path / "out")
    assert exc.value.exit_code == 24
    assert (tmp_path / "out").stat().st_size == 0  # refused before writing anything
    with pytest.raises(CorruptManifest):
        repo.prune()  # which chunks it needs cannot be told: nothing is deleted
    assert repo.has_chunk(repo.chunk_id(data))


def test_prune_keeps_a_chunk_only_a_slice_still_uses(repo):
    data, other = blob(1), blob(2)
    whole = repo.save_manifest(manifest_of(repo, {"/f": [(0, data), (64 * KIB, other)]},
                                           time_ns=1))
    sliced = file_entry("/f", 128 * KIB,
                        [to_item(ChunkRef(4096, 4096, repo.chunk_id(data), 4096))])
    backup_of(repo, sliced)
    repo.forget([whole])
    assert repo.prune()["chunks_removed"] == 1
    assert repo.has_chunk(repo.chunk_id(data)) and not repo.has_chunk(repo.chunk_id(other))
    assert repo.verify() == []


# Threads


def test_put_chunk_from_many_threads(repo):
    pool = [blob(i, 16 * KIB) for i in range(40)]
    stored = []
    errors = []

    def store(worker: int) -> None:
        try:
            for i in range(120):
                data = pool[(worker * 7 + i) % len(pool)]
                stored.append(repo.put_chunk(data))
        except BaseException as exc:  # reported below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=store, args=(worker,)) for worker in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    files = chunk_files(repo)
    assert len(files) == len(pool)
    assert sum(stored) == sum(path.stat().st_size for path in files)  # each counted once
    assert sorted(stored, reverse=True)[len(pool)] == 0
    for data in pool:
        assert repo.get_chunk(repo.chunk_id(data)) == data
    assert list((repo.path / "tmp").iterdir()) == []


# Progress


def test_progress_bar_is_silent_off_a_terminal(capsys):
    with progress.bar(10 * MIB, "verify") as shown:
        shown.update(MIB)
    assert capsys.readouterr() == ("", "")
