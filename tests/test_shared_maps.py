"""Shared memory maps on real mounts: mmap(MAP_SHARED), sqlite in WAL mode, LMDB.

What a node's map shows of other nodes' writes is defined in the README: the file
as of the open, refreshed by fsync or msync on that node and by every later open;
its own writes reach the volume at msync, fsync and close.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sqlite3

import lmdb
import pytest

pytestmark = pytest.mark.timeout(90)

PAGE = mmap.PAGESIZE


@pytest.fixture
def two(image, nodes):
    return nodes.start(image, "n1"), nodes.start(image, "n2")


def _map(path, size, create=False):
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o644)
    if create:
        os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size, mmap.MAP_SHARED)


def test_a_shared_map_writes_through_to_the_volume(two):
    first, second = two
    fd, view = _map(first.path("shm"), 4 * PAGE, create=True)
    try:
        view[PAGE : PAGE + 5] = b"hello"
        view.flush()  # msync
        assert os.pread(fd, 5, PAGE) == b"hello"
        with open(second.path("shm"), "rb") as other:
            other.seek(PAGE)
            assert other.read(5) == b"hello"
    finally:
        view.close()
        os.close(fd)


def test_a_write_on_the_mapping_node_shows_in_its_map_at_once(two):
    first, _second = two
    fd, view = _map(first.path("shm"), 2 * PAGE, create=True)
    try:
        view[0:4] = b"map!"
        os.pwrite(fd, b"WRITE", 0)
        assert view[0:5] == b"WRITE"
    finally:
        view.close()
        os.close(fd)


def test_a_read_on_the_mapping_node_sees_the_maps_unsynced_writes(two):
    first, _second = two
    fd, view = _map(first.path("shm"), 2 * PAGE, create=True)
    try:
        view[PAGE : PAGE + 5] = b"dirty"  # no msync
        assert os.pread(fd, 5, PAGE) == b"dirty"
    finally:
        view.close()
        os.close(fd)


def test_other_nodes_writes_show_after_msync_fsync_and_open(two):
    first, second = two
    fd, view = _map(first.path("shm"), 2 * PAGE, create=True)
    try:
        assert view[0:3] == bytes(3)  # the page is cached from here on
        with open(second.path("shm"), "r+b") as other:
            other.write(b"one")
        view.flush()  # msync: the map catches up
        assert view[0:3] == b"one"
        with open(second.path("shm"), "r+b") as other:
            other.write(b"two")
        os.fsync(fd)
        assert view[0:3] == b"two"
        with open(second.path("shm"), "r+b") as other:
            other.write(b"six")
        os.close(os.open(first.path("shm"), os.O_RDONLY))  # an open on the mapping node
        assert view[0:3] == b"six"
    finally:
        view.close()
        os.close(fd)


def test_a_mapped_write_reaches_other_nodes_at_close(two):
    first, second = two
    fd, view = _map(first.path("shm"), PAGE, create=True)
    view[10:15] = b"close"
    view.close()
    os.close(fd)
    assert second.path("shm").read_bytes()[10:15] == b"close"


def _fill_sqlite(path, rows):
    db = sqlite3.connect(path)
    try:
        assert db.execute("pragma journal_mode=wal").fetchone() == ("wal",)
        db.execute("create table t(id integer primary key, body text, digest text)")
        for index in range(rows):
            body = f"row {index} " * (index % 40 + 1)
            db.execute("insert into t(body, digest) values (?, ?)",
                       (body, hashlib.sha256(body.encode()).hexdigest()))
            if index % 25 == 0:
                db.commit()
        db.commit()
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


def _check_sqlite(path, rows):
    db = sqlite3.connect(path)
    try:
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
        found = db.execute("select body, digest from t").fetchall()
        assert len(found) == rows
        assert all(hashlib.sha256(body.encode()).hexdigest() == digest for body, digest in found)
    finally:
        db.close()


def test_sqlite_in_wal_mode_on_one_node_then_another(two):
    first, second = two
    _fill_sqlite(first.path("wal.db"), 400)
    _check_sqlite(first.path("wal.db"), 400)
    _check_sqlite(second.path("wal.db"), 400)
    db = sqlite3.connect(second.path("wal.db"))
    db.execute("insert into t(body, digest) values ('x', ?)",
               (hashlib.sha256(b"x").hexdigest(),))
    db.commit()
    db.close()
    _check_sqlite(first.path("wal.db"), 401)


def _value(index):
    return hashlib.sha256(b"%d" % index).digest() * (index % 7 + 1)


def test_lmdb_on_one_node_then_another(two):
    first, second = two
    env = lmdb.open(os.fspath(first.path("env")), map_size=64 << 20)
    try:
        for batch in range(4):
            with env.begin(write=True) as txn:
                for index in range(batch * 500, (batch + 1) * 500):
                    txn.put(b"key%06d" % index, _value(index))
        with env.begin() as txn:
            assert txn.stat()["entries"] == 2000
    finally:
        env.close()
    env = lmdb.open(os.fspath(second.path("env")), map_size=64 << 20)
    try:
        with env.begin() as txn:
            found = dict(txn.cursor())
        assert len(found) == 2000
        assert all(found[b"key%06d" % index] == _value(index) for index in range(2000))
        with env.begin(write=True) as txn:
            txn.delete(b"key000000")
    finally:
        env.close()
    env = lmdb.open(os.fspath(first.path("env")), map_size=64 << 20, readonly=True)
    try:
        with env.begin() as txn:
            assert txn.stat()["entries"] == 1999
    finally:
        env.close()
