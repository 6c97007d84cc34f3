"""POSIX conformance of a real csvfs mount, driven only through plain system calls.

Each test gets a fresh volume from the `mount` fixture. Checks that need an
unprivileged caller run a short Python child as another uid (see `as_user`).
The allocation unit is 1 MiB, so st_blocks of a file past one unit moves in
2048-block steps; statfs counts 4 KiB blocks (256 to a unit), and smaller
files take 4 KiB blocks (tests/test_small_files.py).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import stat
import time
import warnings

import pytest

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
BLOCKS_PER_MIB = MiB // 4096  # statfs counts 4 KiB blocks
UNIT_BLOCKS = MiB // 512
USER_A = 65534  # nobody
USER_B = 65533
OLD_NS = 1_000_000_000_123_456_789  # 2001-09-09, with every nanosecond digit used

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def _check(result: int) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def renameat2(old, new, flags: int) -> None:
    _check(_libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, offset, length))


def errno_of(function, *args, **kwargs) -> str:
    """'ok', or the errno name the call failed with."""
    try:
        function(*args, **kwargs)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def read_range(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def aged(path):
    """Put atime/mtime far in the past, so that any later update shows; returns the lstat."""
    os.utime(path, ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    return os.lstat(path)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    """FUSE sends release after close() returns, so its effects show a moment later."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def used_inodes(mount) -> int:
    info = os.statvfs(mount.mountpoint)
    return info.f_files - info.f_ffree


# -- running system calls as an unprivileged user ----------------------------------------

AS_USER_TIMEOUT = 20.0


def _read_file(path) -> None:
    with open(path, "rb") as handle:
        handle.read()


def _write_file(path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _overwrite(path, text: str) -> None:
    """Write at the start without O_TRUNC."""
    with open(path, "r+") as handle:
        handle.write(text)


def _create(path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def _utime_ns(path, atime: int, mtime: int) -> None:
    os.utime(path, ns=(atime, mtime))


_USER_CALLS = {"read": _read_file, "write": _write_file, "overwrite": _overwrite,
               "create": _create, "utime_ns": _utime_ns}


def _child(uid: int, directory, calls, fd: int) -> None:
    """In the forked child: drop to uid, run the calls, report, and never return."""
    code = 1
    try:
        os.chdir(directory)  # before the drop: pytest's tmp directory is root-only
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        results = [errno_of(_USER_CALLS.get(name) or getattr(os, name), *args)
                   for name, *args in calls]
        os.write(fd, json.dumps(results).encode())
        code = 0
    finally:
        os._exit(code)


def as_user(mount, uid: int, *calls) -> list[str]:
    """Run calls like ("unlink", "dir/f") as uid (group uid, no supplementary groups).

    Paths are relative to the mountpoint. Returns 'ok' or the errno name per call.
    A forked child (no exec: the venv's interpreter lives under root-only /root).
    """
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(uid, mount.mountpoint, calls, write_end)
    os.close(write_end)
    output = b""
    deadline = time.monotonic() + AS_USER_TIMEOUT
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"child as uid {uid} hung running {calls}")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            output += chunk
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child as uid {uid} failed on {calls}"
    return json.loads(output)


# -- 1. errno values --------------------------------------------------------------------------


def test_enoent(mount):
    missing = mount.path("missing")
    assert errno_of(open, missing) == "ENOENT"
    assert errno_of(os.stat, missing) == "ENOENT"
    assert errno_of(os.unlink, missing) == "ENOENT"
    assert errno_of(os.rmdir, missing) == "ENOENT"
    assert errno_of(os.rename, missing, mount.path("other")) == "ENOENT"
    assert errno_of(os.mkdir, mount.path("missing", "sub")) == "ENOENT"
    assert errno_of(os.readlink, missing) == "ENOENT"


def test_eexist(mount):
    write_file(mount.path("file"), b"x")
    os.mkdir(mount.path("dir"))
    for existing in ("file", "dir"):
        path = mount.path(existing)
        assert errno_of(os.mkdir, path) == "EEXIST"
        assert errno_of(os.link, mount.path("file"), path) == "EEXIST"
        assert errno_of(os.open, path, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == "EEXIST"
        assert errno_of(os.symlink, "target", path) == "EEXIST"
        assert errno_of(os.mknod, path, stat.S_IFIFO | 0o644) == "EEXIST"


def test_enotdir(mount):
    write_file(mount.path("file"), b"x")
    assert errno_of(os.stat, mount.path("file", "x")) == "ENOTDIR"
    assert errno_of(open, mount.path("file", "x"), "w") == "ENOTDIR"
    assert errno_of(os.mkdir, mount.path("file", "x")) == "ENOTDIR"
    assert errno_of(os.rmdir, mount.path("file")) == "ENOTDIR"
    assert errno_of(os.listdir, mount.path("file")) == "ENOTDIR"
    os.mkdir(mount.path("dir"))
    assert errno_of(os.rename, mount.path("dir"), mount.path("file")) == "ENOTDIR"


def test_eisdir(mount):
    os.mkdir(mount.path("dir"))
    write_file(mount.path("file"), b"x")
    assert errno_of(os.unlink, mount.path("dir")) == "EISDIR"
    assert errno_of(os.open, mount.path("dir"), os.O_WRONLY) == "EISDIR"
    assert errno_of(os.open, mount.path("dir"), os.O_RDWR) == "EISDIR"
    assert errno_of(os.rename, mount.path("file"), mount.path("dir")) == "EISDIR"


def test_enotempty(mount):
    os.makedirs(mount.path("full", "child"))
    os.mkdir(mount.path("other"))
    assert errno_of(os.rmdir, mount.path("full")) == "ENOTEMPTY"
    assert errno_of(os.rename, mount.path("other"), mount.path("full")) == "ENOTEMPTY"
    assert os.path.isdir(mount.path("full", "child"))
    assert os.path.isdir(mount.path("other"))


def test_einval_rename_into_own_subdirectory(mount):
    os.makedirs(mount.path("a", "b", "c"))
    assert errno_of(os.rename, mount.path("a"), mount.path("a", "b", "c", "a")) == "EINVAL"
    assert errno_of(os.rename, mount.path("a"), mount.path("a", "b", "x")) == "EINVAL"
    assert errno_of(renameat2, mount.path("a"), mount.path("a", "b"), RENAME_EXCHANGE) == "EINVAL"
    assert os.path.isdir(mount.path("a", "b", "c"))


def test_enametoolong(mount):
    longest, too_long = "n" * 255, "n" * 256
    write_file(mount.path(longest), b"x")
    assert os.listdir(mount.mountpoint) == [longest]
    write_file(mount.path("file"), b"x")
    path = mount.path(too_long)
    assert errno_of(open, path, "w") == "ENAMETOOLONG"
    assert errno_of(os.mkdir, path) == "ENAMETOOLONG"
    assert errno_of(os.symlink, "target", path) == "ENAMETOOLONG"
    assert errno_of(os.link, mount.path("file"), path) == "ENAMETOOLONG"
    assert errno_of(os.rename, mount.path("file"), path) == "ENAMETOOLONG"
    assert errno_of(os.stat, path) == "ENAMETOOLONG"
    assert errno_of(os.stat, mount.path(too_long, "below")) == "ENAMETOOLONG"
    assert sorted(os.listdir(mount.mountpoint)) == sorted([longest, "file"])


def test_eperm_link_to_directory(mount):
    os.mkdir(mount.path("dir"))
    assert errno_of(os.link, mount.path("dir"), mount.path("alias")) == "EPERM"


def test_eloop(mount):
    os.symlink("b", mount.path("a"))
    os.symlink("a", mount.path("b"))
    assert errno_of(open, mount.path("a")) == "ELOOP"
    assert errno_of(os.stat, mount.path("a")) == "ELOOP"
    write_file(mount.path("file"), b"x")
    os.symlink("file", mount.path("link"))
    assert errno_of(os.open, mount.path("link"), os.O_RDONLY | os.O_NOFOLLOW) == "ELOOP"


# -- 2. permissions, as unprivileged users ------------------------------------------------------


def test_read_and_create_permissions(mount):
    write_file(mount.path("secret"), b"root only")
    os.chmod(mount.path("secret"), 0o600)
    write_file(mount.path("public"), b"everyone")
    os.chmod(mount.path("public"), 0o644)
    os.mkdir(mount.path("shared"))
    os.chmod(mount.path("shared"), 0o777)
    assert as_user(mount, USER_A,
                   ("read", "secret"),
                   ("read", "public"),
                   ("write", "public", "no"),
                   ("create", "new"),
                   ("mkdir", "newdir"),
                   ("create", "shared/mine"),
                   ("mkdir", "shared/mydir"),
                   ("unlink", "public"),
                   ) == ["EACCES", "ok", "EACCES", "EACCES", "EACCES", "ok", "ok", "EACCES"]
    for name in ("mine", "mydir"):
        info = os.stat(mount.path("shared", name))
        assert (info.st_uid, info.st_gid) == (USER_A, USER_A)
    assert mount.path("public").read_bytes() == b"everyone"
    assert not os.path.exists(mount.path("new"))


def test_chmod_chown_by_non_owner(mount):
    os.mkdir(mount.path("shared"))
    os.chmod(mount.path("shared"), 0o777)
    write_file(mount.path("rootfile"), b"x")
    os.chmod(mount.path("rootfile"), 0o644)
    assert as_user(mount, USER_A,
                   ("chmod", "rootfile", 0o666),
                   ("chown", "rootfile", USER_A, USER_A),
                   ("create", "shared/mine"),
                   ("chmod", "shared/mine", 0o600),
                   ("chown", "shared/mine", 0, -1),
                   ("chown", "shared/mine", USER_B, -1),
                   ("chown", "shared/mine", -1, 0),
                   ("chown", "shared/mine", USER_A, USER_A),
                   ) == ["EPERM", "EPERM", "ok", "ok", "EPERM", "EPERM", "EPERM", "ok"]
    assert stat.S_IMODE(os.stat(mount.path("rootfile")).st_mode) == 0o644
    mine = os.stat(mount.path("shared", "mine"))
    assert (stat.S_IMODE(mine.st_mode), mine.st_uid, mine.st_gid) == (0o600, USER_A, USER_A)


def test_chmod_setgid_by_non_member_drops_the_bit(mount):
    os.mkdir(mount.path("shared"))
    os.chmod(mount.path("shared"), 0o777)
    assert as_user(mount, USER_A, ("create", "shared/own"), ("create", "shared/other"),
                   ("chmod", "shared/own", 0o2755)) == ["ok", "ok", "ok"]
    assert os.stat(mount.path("shared", "own")).st_mode & stat.S_ISGID
    os.chown(mount.path("shared", "other"), USER_A, 4321)
    assert as_user(mount, USER_A, ("chmod", "shared/other", 0o2755)) == ["ok"]
    assert stat.S_IMODE(os.stat(mount.path("shared", "other")).st_mode) == 0o755


def test_utime_by_writer_who_is_not_owner(mount):
    write_file(mount.path("writable"), b"x")
    os.chmod(mount.path("writable"), 0o666)
    write_file(mount.path("readonly"), b"x")
    os.chmod(mount.path("readonly"), 0o644)
    before = aged(mount.path("writable"))
    aged(mount.path("readonly"))
    assert as_user(mount, USER_A,
                   ("utime", "writable", None),
                   ("utime_ns", "writable", 5, 6),
                   ("utime", "readonly", None),
                   ("utime_ns", "readonly", 5, 6),
                   ) == ["ok", "EPERM", "EACCES", "EPERM"]
    after = os.stat(mount.path("writable"))
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_atime_ns > before.st_atime_ns
    assert os.stat(mount.path("readonly")).st_mtime_ns == OLD_NS


def test_directory_search_and_read_permission(mount):
    for name, mode in (("private", 0o700), ("search_only", 0o711), ("read_only", 0o744)):
        os.mkdir(mount.path(name))
        write_file(mount.path(name, "file"), b"data")
        os.chmod(mount.path(name, "file"), 0o644)
        os.chmod(mount.path(name), mode)
    assert as_user(mount, USER_A,
                   ("stat", "private/file"),
                   ("listdir", "private"),
                   ("read", "private/file"),
                   ("stat", "search_only/file"),
                   ("read", "search_only/file"),
                   ("listdir", "search_only"),
                   ("listdir", "read_only"),
                   ("stat", "read_only/file"),
                   ) == ["EACCES", "EACCES", "EACCES", "ok", "ok", "EACCES", "ok", "EACCES"]


def test_group_permission(mount):
    write_file(mount.path("group_readable"), b"x")
    os.chown(mount.path("group_readable"), 0, USER_B)
    os.chmod(mount.path("group_readable"), 0o640)
    assert as_user(mount, USER_A, ("read", "group_readable")) == ["EACCES"]
    assert as_user(mount, USER_B, ("read", "group_readable"),
                   ("write", "group_readable", "x")) == ["ok", "EACCES"]


# -- 3. sticky directories ------------------------------------------------------------------------


def test_sticky_directory(mount):
    os.mkdir(mount.path("tmp"))
    os.chmod(mount.path("tmp"), 0o1777)
    assert as_user(mount, USER_A, ("create", "tmp/a"), ("create", "tmp/a2")) == ["ok", "ok"]
    assert as_user(mount, USER_B, ("create", "tmp/b")) == ["ok"]
    assert as_user(mount, USER_A,
                   ("unlink", "tmp/b"),
                   ("rename", "tmp/b", "tmp/stolen"),
                   ("rename", "tmp/a", "tmp/b"),
                   ("unlink", "tmp/a2"),
                   ("rename", "tmp/a", "tmp/a3"),
                   ) == ["EPERM", "EPERM", "EPERM", "ok", "ok"]
    assert sorted(os.listdir(mount.path("tmp"))) == ["a3", "b"]
    assert os.stat(mount.path("tmp", "b")).st_uid == USER_B
    os.unlink(mount.path("tmp", "b"))  # root may remove anything
    os.unlink(mount.path("tmp", "a3"))
    assert os.listdir(mount.path("tmp")) == []


def test_without_sticky_bit_anyone_with_write_access_may_remove(mount):
    os.mkdir(mount.path("open"))
    os.chmod(mount.path("open"), 0o777)
    assert as_user(mount, USER_B, ("create", "open/b")) == ["ok"]
    assert as_user(mount, USER_A, ("unlink", "open/b")) == ["ok"]


# -- 4. times -------------------------------------------------------------------------------------


def assert_dir_changed(path, before) -> None:
    after = os.stat(path)
    assert after.st_mtime_ns > before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns


def test_namespace_changes_update_parent_times(mount):
    os.mkdir(mount.path("d"))
    os.mkdir(mount.path("e"))
    steps = [
        lambda: os.mkdir(mount.path("d", "sub")),
        lambda: write_file(mount.path("d", "file"), b"x"),
        lambda: os.symlink("file", mount.path("d", "link")),
        lambda: os.link(mount.path("d", "file"), mount.path("d", "hard")),
        lambda: os.unlink(mount.path("d", "hard")),
        lambda: os.rmdir(mount.path("d", "sub")),
        lambda: os.rename(mount.path("d", "file"), mount.path("d", "renamed")),
        lambda: os.mkfifo(mount.path("d", "fifo")),
    ]
    for step in steps:
        before = aged(mount.path("d"))
        step()
        assert_dir_changed(mount.path("d"), before)
    old_parent, new_parent = aged(mount.path("d")), aged(mount.path("e"))
    os.rename(mount.path("d", "renamed"), mount.path("e", "moved"))
    assert_dir_changed(mount.path("d"), old_parent)
    assert_dir_changed(mount.path("e"), new_parent)


def test_create_sets_all_three_times(mount):
    start = time.time_ns()
    write_file(mount.path("f"), b"")
    info = os.stat(mount.path("f"))
    assert start <= info.st_mtime_ns == info.st_ctime_ns == info.st_atime_ns <= time.time_ns()


def test_write_updates_mtime_and_ctime(mount):
    write_file(mount.path("f"), b"x" * 10)
    before = aged(mount.path("f"))
    with open(mount.path("f"), "r+b", buffering=0) as handle:
        handle.write(b"y")
        during = os.fstat(handle.fileno())
        assert during.st_mtime_ns > OLD_NS
        assert during.st_ctime_ns > before.st_ctime_ns
    after = os.stat(mount.path("f"))
    assert after.st_mtime_ns > OLD_NS
    assert after.st_ctime_ns > before.st_ctime_ns
    assert after.st_atime_ns == OLD_NS
    # appending (an extend) updates them too
    before = aged(mount.path("f"))
    with open(mount.path("f"), "ab") as handle:
        handle.write(b"z" * 100)
    after = os.stat(mount.path("f"))
    assert after.st_mtime_ns > OLD_NS and after.st_ctime_ns > before.st_ctime_ns
    assert after.st_size == 110


def test_attribute_changes_update_ctime_only(mount):
    write_file(mount.path("f"), b"x")
    os.mkdir(mount.path("dir"))
    changes = [  # (name before, the change, name after)
        ("f", lambda: os.chmod(mount.path("f"), 0o600), "f"),
        ("f", lambda: os.chown(mount.path("f"), 123, 456), "f"),
        ("f", lambda: os.link(mount.path("f"), mount.path("f2")), "f"),
        ("f", lambda: os.unlink(mount.path("f2")), "f"),
        ("f", lambda: os.rename(mount.path("f"), mount.path("g")), "g"),
        ("g", lambda: os.setxattr(mount.path("g"), "user.k", b"v"), "g"),
        ("g", lambda: os.removexattr(mount.path("g"), "user.k"), "g"),
        ("dir", lambda: os.chmod(mount.path("dir"), 0o700), "dir"),
        ("dir", lambda: os.chown(mount.path("dir"), 1, 1), "dir"),
    ]
    for name, change, new_name in changes:
        before = aged(mount.path(name))
        change()
        after = os.stat(mount.path(new_name))
        assert after.st_ctime_ns > before.st_ctime_ns, name
        assert (after.st_mtime_ns, after.st_atime_ns) == (OLD_NS, OLD_NS), name


def test_utime_exact_nanoseconds(mount):
    write_file(mount.path("f"), b"x")
    os.mkdir(mount.path("d"))
    os.symlink("f", mount.path("l"))
    for atime, mtime in ((OLD_NS, OLD_NS + 1), (1, 999_999_999), (0, 0),
                         (4_102_444_800_000_000_001, 2**33 * 10**9 + 7)):
        for name in ("f", "d"):
            os.utime(mount.path(name), ns=(atime, mtime))
            info = os.stat(mount.path(name))
            assert (info.st_atime_ns, info.st_mtime_ns) == (atime, mtime)
    os.utime(mount.path("l"), ns=(11, 22), follow_symlinks=False)
    link = os.lstat(mount.path("l"))
    assert (link.st_atime_ns, link.st_mtime_ns) == (11, 22)
    assert os.stat(mount.path("l")).st_mtime_ns == 2**33 * 10**9 + 7


def test_utime_now_and_omit(mount):
    write_file(mount.path("f"), b"x")
    aged(mount.path("f"))
    os.utime(mount.path("f"))
    info = os.stat(mount.path("f"))
    # the kernel may stamp "now" from its coarse clock, a tick behind time.time_ns()
    assert abs(info.st_atime_ns - time.time_ns()) < 10**9
    assert abs(info.st_mtime_ns - time.time_ns()) < 10**9
    # utimensat with UTIME_OMIT for atime changes only mtime
    os.utime(mount.path("f"), ns=(OLD_NS, OLD_NS))
    utime_omit = (1 << 30) - 2

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    times = (Timespec * 2)(Timespec(0, utime_omit), Timespec(7, 8))
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(mount.path("f")), times, 0))
    info = os.stat(mount.path("f"))
    assert (info.st_atime_ns, info.st_mtime_ns) == (OLD_NS, 7_000_000_008)


def test_truncate_updates_mtime_and_ctime(mount):
    write_file(mount.path("f"), b"x" * 5000)
    for size in (100, 3 * MiB, 0):
        before = aged(mount.path("f"))
        os.truncate(mount.path("f"), size)
        after = os.stat(mount.path("f"))
        assert after.st_size == size
        assert after.st_mtime_ns > OLD_NS and after.st_ctime_ns > before.st_ctime_ns
    before = aged(mount.path("f"))
    with open(mount.path("f"), "r+b") as handle:
        os.ftruncate(handle.fileno(), 10)
    after = os.stat(mount.path("f"))
    assert after.st_mtime_ns > OLD_NS and after.st_ctime_ns > before.st_ctime_ns
    before = aged(mount.path("f"))
    os.close(os.open(mount.path("f"), os.O_WRONLY | os.O_TRUNC))
    after = os.stat(mount.path("f"))
    assert after.st_size == 0
    assert after.st_mtime_ns > OLD_NS and after.st_ctime_ns > before.st_ctime_ns


def test_open_with_o_trunc(mount):
    path = mount.path("f")
    write_file(path, b"long old content" * 100_000)
    write_file(path, b"short")  # "wb" is O_CREAT | O_TRUNC on an existing file
    assert path.read_bytes() == b"short"
    assert os.stat(path).st_size == 5
    with open(path, "rb") as reader:
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
        info = os.fstat(reader.fileno())
        assert (info.st_size, info.st_blocks) == (0, 0)
        assert reader.read() == b""
    write_file(path, b"keep me")
    os.chmod(path, 0o644)
    assert as_user(mount, USER_A, ("write", "f", "")) == ["EACCES"]
    assert path.read_bytes() == b"keep me"


# -- 5. rename ------------------------------------------------------------------------------------


def test_rename_plain(mount):
    write_file(mount.path("a"), b"content")
    ino = os.stat(mount.path("a")).st_ino
    os.rename(mount.path("a"), mount.path("b"))
    assert os.listdir(mount.mountpoint) == ["b"]
    assert os.stat(mount.path("b")).st_ino == ino
    assert mount.path("b").read_bytes() == b"content"
    os.mkdir(mount.path("d"))
    os.rename(mount.path("b"), mount.path("d", "c"))
    assert mount.path("d", "c").read_bytes() == b"content"
    os.rename(mount.path("d"), mount.path("d2"))
    assert mount.path("d2", "c").read_bytes() == b"content"
    assert os.stat(mount.path("d2", "c")).st_ino == ino


def test_rename_over_existing_file(mount):
    write_file(mount.path("a"), b"new")
    write_file(mount.path("b"), b"old" * MiB)  # 3 MiB that must be freed
    inodes, free = used_inodes(mount), os.statvfs(mount.mountpoint).f_bfree
    ino = os.stat(mount.path("a")).st_ino
    os.rename(mount.path("a"), mount.path("b"))
    assert os.listdir(mount.mountpoint) == ["b"]
    assert mount.path("b").read_bytes() == b"new"
    assert os.stat(mount.path("b")).st_ino == ino
    # b's last close may still be in flight (FUSE sends release in the background)
    assert wait_for(lambda: used_inodes(mount) == inodes - 1)
    assert wait_for(lambda: os.statvfs(mount.mountpoint).f_bfree >= free + 3 * BLOCKS_PER_MIB)


def test_rename_over_open_file_keeps_its_data_until_close(mount):
    write_file(mount.path("a"), b"new")
    write_file(mount.path("b"), b"old")
    with open(mount.path("b"), "rb") as handle:
        os.rename(mount.path("a"), mount.path("b"))
        assert os.fstat(handle.fileno()).st_nlink == 0
        assert handle.read() == b"old"
    assert mount.path("b").read_bytes() == b"new"


def test_rename_directory_over_empty_directory(mount):
    os.makedirs(mount.path("src", "child"))
    os.mkdir(mount.path("empty"))
    root_links = os.stat(mount.mountpoint).st_nlink
    os.rename(mount.path("src"), mount.path("empty"))
    assert os.listdir(mount.mountpoint) == ["empty"]
    assert os.listdir(mount.path("empty")) == ["child"]
    assert os.stat(mount.mountpoint).st_nlink == root_links - 1
    assert os.stat(mount.path("empty")).st_nlink == 3


def test_rename_noreplace(mount):
    write_file(mount.path("a"), b"a")
    write_file(mount.path("b"), b"b")
    assert errno_of(renameat2, mount.path("a"), mount.path("b"), RENAME_NOREPLACE) == "EEXIST"
    assert mount.path("a").read_bytes() == b"a" and mount.path("b").read_bytes() == b"b"
    renameat2(mount.path("a"), mount.path("c"), RENAME_NOREPLACE)
    assert sorted(os.listdir(mount.mountpoint)) == ["b", "c"]
    assert mount.path("c").read_bytes() == b"a"


def test_rename_exchange_files(mount):
    write_file(mount.path("a"), b"first")
    write_file(mount.path("b"), b"second")
    ino_a, ino_b = os.stat(mount.path("a")).st_ino, os.stat(mount.path("b")).st_ino
    renameat2(mount.path("a"), mount.path("b"), RENAME_EXCHANGE)
    assert mount.path("a").read_bytes() == b"second"
    assert mount.path("b").read_bytes() == b"first"
    assert (os.stat(mount.path("a")).st_ino, os.stat(mount.path("b")).st_ino) == (ino_b, ino_a)
    assert errno_of(renameat2, mount.path("a"), mount.path("missing"),
                    RENAME_EXCHANGE) == "ENOENT"
    assert errno_of(renameat2, mount.path("a"), mount.path("b"),
                    RENAME_EXCHANGE | RENAME_NOREPLACE) == "EINVAL"


def test_rename_exchange_file_and_directory(mount):
    write_file(mount.path("file"), b"data")
    os.makedirs(mount.path("sub", "dir", "inner"))
    sub_links, root_links = os.stat(mount.path("sub")).st_nlink, os.stat(
        mount.mountpoint).st_nlink
    renameat2(mount.path("file"), mount.path("sub", "dir"), RENAME_EXCHANGE)
    assert os.path.isdir(mount.path("file", "inner"))
    assert mount.path("sub", "dir").read_bytes() == b"data"
    assert os.stat(mount.path("sub")).st_nlink == sub_links - 1
    assert os.stat(mount.mountpoint).st_nlink == root_links + 1
    assert os.stat(mount.path("file", "inner", "..")).st_ino == os.stat(
        mount.path("file")).st_ino
    os.rmdir(mount.path("file", "inner"))
    os.rmdir(mount.path("file"))  # the moved directory is fully functional
    assert os.stat(mount.mountpoint).st_nlink == root_links


def test_rename_exchange_directories_in_different_parents(mount):
    os.makedirs(mount.path("p1", "x", "deep1"))
    os.makedirs(mount.path("p2", "y"))
    write_file(mount.path("p1", "x", "in_x"), b"x")
    write_file(mount.path("p2", "y", "in_y"), b"y")
    renameat2(mount.path("p1", "x"), mount.path("p2", "y"), RENAME_EXCHANGE)
    assert sorted(os.listdir(mount.path("p1", "x"))) == ["in_y"]
    assert sorted(os.listdir(mount.path("p2", "y"))) == ["deep1", "in_x"]
    assert os.stat(mount.path("p1", "x", "..")).st_ino == os.stat(mount.path("p1")).st_ino
    assert os.stat(mount.path("p2", "y", "..")).st_ino == os.stat(mount.path("p2")).st_ino
    assert os.stat(mount.path("p1")).st_nlink == 3
    assert os.stat(mount.path("p2")).st_nlink == 3
    assert os.stat(mount.path("p2", "y")).st_nlink == 3
    # moving p1 under what used to be its own subtree is still refused
    assert errno_of(os.rename, mount.path("p2"), mount.path("p2", "y", "deep1", "p2")) == "EINVAL"


def test_rename_hard_link_onto_sibling_is_a_no_op(mount):
    write_file(mount.path("a"), b"shared")
    os.link(mount.path("a"), mount.path("b"))
    os.rename(mount.path("a"), mount.path("b"))
    assert sorted(os.listdir(mount.mountpoint)) == ["a", "b"]
    assert os.stat(mount.path("a")).st_nlink == 2
    assert mount.path("b").read_bytes() == b"shared"


def test_directory_nlink_after_moving_subdirectories(mount):
    os.mkdir(mount.path("from"))
    os.mkdir(mount.path("to"))
    for index in range(3):
        os.mkdir(mount.path("from", f"d{index}"))
    write_file(mount.path("from", "file"), b"x")
    assert os.stat(mount.path("from")).st_nlink == 5
    os.rename(mount.path("from", "d0"), mount.path("to", "d0"))
    os.rename(mount.path("from", "d1"), mount.path("to", "renamed"))
    os.rename(mount.path("from", "file"), mount.path("to", "file"))
    assert os.stat(mount.path("from")).st_nlink == 3
    assert os.stat(mount.path("to")).st_nlink == 4
    os.rename(mount.path("from", "d2"), mount.path("from", "d2b"))  # same parent
    assert os.stat(mount.path("from")).st_nlink == 3
    os.rename(mount.path("to"), mount.path("from", "to"))
    assert os.stat(mount.path("from")).st_nlink == 4
    assert os.stat(mount.mountpoint).st_nlink == 3


# -- 6. hard links and nlink -----------------------------------------------------------------------


def test_hard_links(mount):
    write_file(mount.path("a"), b"one")
    os.mkdir(mount.path("d"))
    os.link(mount.path("a"), mount.path("b"))
    os.link(mount.path("a"), mount.path("d", "c"))
    info = os.stat(mount.path("a"))
    assert info.st_nlink == 3
    assert os.stat(mount.path("d", "c")).st_ino == info.st_ino
    with open(mount.path("b"), "ab") as handle:
        handle.write(b" two")
    assert mount.path("d", "c").read_bytes() == b"one two"
    os.unlink(mount.path("a"))
    assert os.stat(mount.path("b")).st_nlink == 2
    os.unlink(mount.path("d", "c"))
    assert os.stat(mount.path("b")).st_nlink == 1
    assert mount.path("b").read_bytes() == b"one two"


def test_directory_nlink(mount):
    assert os.stat(mount.mountpoint).st_nlink == 2
    os.mkdir(mount.path("d"))
    assert os.stat(mount.path("d")).st_nlink == 2
    assert os.stat(mount.mountpoint).st_nlink == 3
    for name in ("s1", "s2"):
        os.mkdir(mount.path("d", name))
    write_file(mount.path("d", "file"), b"")
    os.symlink("s1", mount.path("d", "link"))
    assert os.stat(mount.path("d")).st_nlink == 4
    os.rmdir(mount.path("d", "s1"))
    assert os.stat(mount.path("d")).st_nlink == 3
    assert os.stat(mount.mountpoint).st_nlink == 3


# -- 7. symlinks ----------------------------------------------------------------------------------


def test_symlinks(mount):
    write_file(mount.path("file"), b"target data")
    os.mkdir(mount.path("dir"))
    targets = {"rel": "file", "abs": os.fspath(mount.path("file")), "dirlink": "dir",
               "dangling": "no/such/thing", "long": "x" * 1000, "utf8": "späť/目標"}
    for name, target in targets.items():
        os.symlink(target, mount.path(name))
    for name, target in targets.items():
        assert os.readlink(mount.path(name)) == target
        info = os.lstat(mount.path(name))
        assert stat.S_ISLNK(info.st_mode)
        assert info.st_size == len(os.fsencode(target))
    assert mount.path("rel").read_bytes() == b"target data"
    assert mount.path("abs").read_bytes() == b"target data"
    assert os.path.isdir(mount.path("dirlink"))
    assert errno_of(os.stat, mount.path("dangling")) == "ENOENT"
    assert not os.path.exists(mount.path("dangling"))
    assert errno_of(os.readlink, mount.path("file")) == "EINVAL"
    os.unlink(mount.path("rel"))  # removes the link, not its target
    assert mount.path("file").read_bytes() == b"target data"
    # a dangling link comes alive when its target appears
    os.symlink("later", mount.path("waiting"))
    write_file(mount.path("later"), b"here")
    assert mount.path("waiting").read_bytes() == b"here"


# -- 8. unlink of an open file ---------------------------------------------------------------------


def test_unlinked_open_file(mount):
    free_before = os.statvfs(mount.mountpoint).f_bfree
    fd = os.open(mount.path("f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"a" * (4 * MiB))
        os.unlink(mount.path("f"))
        assert not os.path.exists(mount.path("f"))
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 4, 0) == b"aaaa"
        os.pwrite(fd, b"after", 4 * MiB)  # an extend of a nameless file
        os.pwrite(fd, b"BB", 10)
        assert os.pread(fd, 6, 8) == b"aaBBaa"
        assert os.pread(fd, 10, 4 * MiB) == b"after"
        assert os.fstat(fd).st_size == 4 * MiB + 5
        assert os.statvfs(mount.mountpoint).f_bfree <= free_before - 5 * BLOCKS_PER_MIB
    finally:
        os.close(fd)
    assert wait_for(lambda: os.statvfs(mount.mountpoint).f_bfree == free_before)


def test_last_link_of_open_file_removed_by_rename_keeps_space_until_close(mount):
    write_file(mount.path("other"), b"")
    free_before = os.statvfs(mount.mountpoint).f_bfree
    with open(mount.path("big"), "wb+") as handle:
        handle.write(b"b" * (2 * MiB))
        handle.flush()
        os.rename(mount.path("other"), mount.path("big"))
        handle.seek(0)
        assert handle.read(3) == b"bbb"
    assert wait_for(lambda: os.statvfs(mount.mountpoint).f_bfree == free_before)


# -- 9. chmod, chown, setgid, setuid ---------------------------------------------------------------


def test_chmod(mount):
    write_file(mount.path("f"), b"")
    os.mkdir(mount.path("d"))
    for mode in (0o000, 0o777, 0o4755, 0o2755, 0o1777, 0o7777, 0o640):
        for name in ("f", "d"):
            os.chmod(mount.path(name), mode)
            info = os.stat(mount.path(name))
            assert stat.S_IMODE(info.st_mode) == mode
            assert stat.S_IFMT(info.st_mode) == (stat.S_IFDIR if name == "d" else stat.S_IFREG)


def test_chown_as_root(mount):
    write_file(mount.path("f"), b"")
    os.symlink("f", mount.path("l"))
    os.chown(mount.path("f"), 1234, 5678)
    info = os.stat(mount.path("f"))
    assert (info.st_uid, info.st_gid) == (1234, 5678)
    os.chown(mount.path("f"), -1, 42)
    info = os.stat(mount.path("f"))
    assert (info.st_uid, info.st_gid) == (1234, 42)
    os.chown(mount.path("f"), 4_000_000_000, -1)
    assert os.stat(mount.path("f")).st_uid == 4_000_000_000
    os.chown(mount.path("l"), 7, 8, follow_symlinks=False)
    link = os.lstat(mount.path("l"))
    assert (link.st_uid, link.st_gid) == (7, 8)
    assert os.stat(mount.path("f")).st_uid == 4_000_000_000


def test_create_owner_is_caller(mount):
    os.mkdir(mount.path("open"))
    os.chmod(mount.path("open"), 0o777)
    assert as_user(mount, USER_A, ("create", "open/f"), ("mkdir", "open/d"),
                   ("symlink", "f", "open/l"), ("mkfifo", "open/p")) == ["ok"] * 4
    for name in ("f", "d", "l", "p"):
        info = os.lstat(mount.path("open", name))
        assert (info.st_uid, info.st_gid) == (USER_A, USER_A), name


def test_setgid_directory_inheritance(mount):
    os.mkdir(mount.path("sgid"))
    os.chown(mount.path("sgid"), 0, 4321)
    os.chmod(mount.path("sgid"), 0o2777)
    write_file(mount.path("sgid", "file"), b"")
    os.mkdir(mount.path("sgid", "sub"), 0o755)
    os.symlink("file", mount.path("sgid", "link"))
    assert as_user(mount, USER_A, ("create", "sgid/userfile"), ("mkdir", "sgid/userdir"),
                   ("create", "sgid/sub/deep")) == ["ok", "ok", "EACCES"]
    for name in ("file", "sub", "link", "userfile", "userdir"):
        assert os.lstat(mount.path("sgid", name)).st_gid == 4321, name
    assert os.stat(mount.path("sgid", "userfile")).st_uid == USER_A
    for name in ("sub", "userdir"):
        assert os.stat(mount.path("sgid", name)).st_mode & stat.S_ISGID, name
    assert not os.stat(mount.path("sgid", "file")).st_mode & stat.S_ISGID
    os.mkdir(mount.path("sgid", "sub", "deeper"))
    assert os.stat(mount.path("sgid", "sub", "deeper")).st_gid == 4321
    # without the bit, the creator's group applies
    os.mkdir(mount.path("plain"))
    os.chown(mount.path("plain"), 0, 4321)
    write_file(mount.path("plain", "file"), b"")
    assert os.stat(mount.path("plain", "file")).st_gid == 0


def test_chown_clears_setuid(mount):
    write_file(mount.path("suid"), b"#!/bin/sh\n")
    os.chmod(mount.path("suid"), 0o4755)
    os.chown(mount.path("suid"), 1000, -1)
    info = os.stat(mount.path("suid"))
    assert info.st_uid == 1000
    assert stat.S_IMODE(info.st_mode) == 0o755
    write_file(mount.path("sgid"), b"")
    os.chmod(mount.path("sgid"), 0o6755)
    os.chown(mount.path("sgid"), -1, 1000)
    assert stat.S_IMODE(os.stat(mount.path("sgid")).st_mode) == 0o755
    # a directory keeps its setgid bit across chown
    os.mkdir(mount.path("dir"))
    os.chmod(mount.path("dir"), 0o2755)
    os.chown(mount.path("dir"), 1000, 1000)
    assert stat.S_IMODE(os.stat(mount.path("dir")).st_mode) == 0o2755


def test_write_without_cap_fsetid_drops_setid_bits(mount):
    """Linux drops setuid, and setgid with group exec or from a non-member, on write
    or O_TRUNC by a caller without CAP_FSETID. With direct_io that is the fs's job."""
    files = {  # name: (mode, gid, mode after USER_A writes)
        "suid": (0o4777, 0, 0o777),
        "sgid": (0o2777, 0, 0o777),
        "both": (0o6777, 0, 0o777),
        "sgid_member": (0o2666, USER_A, 0o2666),  # no group exec, and USER_A is in it
        "sgid_other": (0o2666, 0, 0o666),
        "truncated": (0o6777, 0, 0o777),
        "only_read": (0o6777, 0, 0o6777),
        "by_root": (0o6777, 0, 0o6777),
    }
    for name, (mode, gid, _) in files.items():
        write_file(mount.path(name), b"old")
        os.chown(mount.path(name), 0, gid)
        os.chmod(mount.path(name), mode)
    assert as_user(mount, USER_A,
                   *[("overwrite", name, "new") for name in ("suid", "sgid", "both",
                                                              "sgid_member", "sgid_other")],
                   ("write", "truncated", ""),  # O_TRUNC and no write
                   ("read", "only_read"),
                   ) == ["ok"] * 7
    write_file(mount.path("by_root"), b"new")
    for name, (_, _, after) in files.items():
        assert stat.S_IMODE(os.stat(mount.path(name)).st_mode) == after, name
    assert mount.path("suid").read_bytes() == b"new"
    assert mount.path("truncated").read_bytes() == b""


# -- 10. xattrs ------------------------------------------------------------------------------------


def test_xattrs(mount):
    path = mount.path("f")
    write_file(path, b"")
    assert os.listxattr(path) == []
    assert errno_of(os.getxattr, path, "user.missing") == "ENODATA"
    assert errno_of(os.removexattr, path, "user.missing") == "ENODATA"
    os.setxattr(path, "user.one", b"1")
    os.setxattr(path, "user.two", b"\x00binary\xff" * 100)
    assert sorted(os.listxattr(path)) == ["user.one", "user.two"]
    assert os.getxattr(path, "user.one") == b"1"
    assert os.getxattr(path, "user.two") == b"\x00binary\xff" * 100
    os.setxattr(path, "user.one", b"replaced")
    assert os.getxattr(path, "user.one") == b"replaced"
    os.setxattr(path, "user.empty", b"")
    assert os.getxattr(path, "user.empty") == b""
    assert errno_of(os.setxattr, path, "user.one", b"x", os.XATTR_CREATE) == "EEXIST"
    assert errno_of(os.setxattr, path, "user.new", b"x", os.XATTR_REPLACE) == "ENODATA"
    os.setxattr(path, "user.one", b"again", os.XATTR_REPLACE)
    os.setxattr(path, "user.new", b"x", os.XATTR_CREATE)
    os.removexattr(path, "user.one")
    assert errno_of(os.getxattr, path, "user.one") == "ENODATA"
    assert sorted(os.listxattr(path)) == ["user.empty", "user.new", "user.two"]
    os.mkdir(mount.path("d"))
    os.setxattr(mount.path("d"), "user.dir", b"yes")
    assert os.getxattr(mount.path("d"), "user.dir") == b"yes"


def test_xattr_permissions(mount):
    write_file(mount.path("f"), b"")
    os.chmod(mount.path("f"), 0o644)
    os.setxattr(mount.path("f"), "user.k", b"v")
    assert as_user(mount, USER_A, ("getxattr", "f", "user.k"),
                   ("setxattr", "f", "user.k", b"w")) == ["ok", "EACCES"]
    assert os.getxattr(mount.path("f"), "user.k") == b"v"


# -- 11. fallocate --------------------------------------------------------------------------------


def test_posix_fallocate_grows_with_zeros(mount):
    with open(mount.path("f"), "wb+") as handle:
        handle.write(b"head")
        handle.flush()
        os.posix_fallocate(handle.fileno(), 0, 3 * MiB + 5)
        info = os.fstat(handle.fileno())
        assert info.st_size == 3 * MiB + 5
        assert info.st_blocks >= 4 * UNIT_BLOCKS
    assert read_range(mount.path("f"), 0, 4) == b"head"
    assert read_range(mount.path("f"), 4, 3 * MiB + 10) == bytes(3 * MiB + 1)
    # fallocate inside the size changes nothing visible
    with open(mount.path("f"), "rb+") as handle:
        os.posix_fallocate(handle.fileno(), 0, MiB)
    assert os.stat(mount.path("f")).st_size == 3 * MiB + 5


def test_fallocate_keep_size(mount):
    write_file(mount.path("f"), b"abc")
    before = os.stat(mount.path("f"))
    with open(mount.path("f"), "rb+") as handle:
        fallocate(handle.fileno(), FALLOC_FL_KEEP_SIZE, 0, 4 * MiB)
        info = os.fstat(handle.fileno())
    assert info.st_size == 3
    assert info.st_blocks >= 4 * UNIT_BLOCKS > before.st_blocks
    assert mount.path("f").read_bytes() == b"abc"
    with open(mount.path("f"), "ab") as handle:  # writes into the preallocated space
        handle.write(b"d" * MiB)
    assert read_range(mount.path("f"), 0, 5) == b"abcdd"
    assert os.stat(mount.path("f")).st_blocks == info.st_blocks


def test_fallocate_punch_hole(mount):
    write_file(mount.path("f"), b"\xff" * (3 * MiB))
    before = os.stat(mount.path("f"))
    start, end = MiB // 2, 5 * MiB // 2
    with open(mount.path("f"), "rb+") as handle:
        fallocate(handle.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start,
                  end - start)
    info = os.stat(mount.path("f"))
    assert info.st_size == 3 * MiB
    assert info.st_blocks == before.st_blocks - UNIT_BLOCKS  # only unit 1 was wholly inside
    data = mount.path("f").read_bytes()
    assert data[:start] == b"\xff" * start
    assert data[start:end] == bytes(end - start)
    assert data[end:] == b"\xff" * (3 * MiB - end)
    with open(mount.path("f"), "rb+") as handle:
        assert errno_of(fallocate, handle.fileno(), FALLOC_FL_PUNCH_HOLE, 0, 10) == (
            errno.errorcode[errno.EOPNOTSUPP])
        handle.seek(MiB + 100)
        handle.write(b"new data")
    assert read_range(mount.path("f"), MiB + 96, 16) == bytes(4) + b"new data" + bytes(4)
    assert os.stat(mount.path("f")).st_blocks == before.st_blocks


# -- 12. sparse files -----------------------------------------------------------------------------


def test_sparse_write_far_out(mount):
    with open(mount.path("f"), "wb") as handle:
        handle.seek(100 * MiB)
        handle.write(b"tail")
    info = os.stat(mount.path("f"))
    assert info.st_size == 100 * MiB + 4
    assert 0 < info.st_blocks <= 4 * UNIT_BLOCKS
    assert read_range(mount.path("f"), 0, MiB) == bytes(MiB)
    assert read_range(mount.path("f"), 100 * MiB - 3, 10) == bytes(3) + b"tail"
    assert read_range(mount.path("f"), 50 * MiB - 1, 2 * MiB + 2) == bytes(2 * MiB + 2)


@pytest.mark.parametrize("cut", [0, MiB, MiB + MiB // 2, 2 * MiB - 1, 12345])
def test_truncate_down_then_up_reads_zeros(mount, cut):
    path = mount.path("f")
    write_file(path, b"\xab" * (3 * MiB))
    os.truncate(path, cut)
    os.truncate(path, 3 * MiB)
    data = path.read_bytes()
    assert data[:cut] == b"\xab" * cut
    assert data[cut:] == bytes(3 * MiB - cut)


def test_shrink_then_grow_by_writing_reads_zeros(mount):
    path = mount.path("f")
    write_file(path, b"\xcd" * (2 * MiB))
    with open(path, "rb+", buffering=0) as handle:
        handle.truncate(MiB // 2)
        handle.seek(MiB + MiB // 2)
        handle.write(b"end")
    data = path.read_bytes()
    assert len(data) == MiB + MiB // 2 + 3
    assert data[: MiB // 2] == b"\xcd" * (MiB // 2)
    assert data[MiB // 2 : -3] == bytes(MiB)
    assert data[-3:] == b"end"


def test_shrink_then_grow_by_fallocate_reads_zeros(mount):
    path = mount.path("f")
    write_file(path, b"\xee" * MiB)
    with open(path, "rb+") as handle:
        handle.truncate(1000)
        os.posix_fallocate(handle.fileno(), 0, MiB)
    data = path.read_bytes()
    assert data == b"\xee" * 1000 + bytes(MiB - 1000)


def test_shrink_with_other_descriptor_open(mount):
    path = mount.path("f")
    write_file(path, b"\x11" * (2 * MiB))
    with open(path, "rb+", buffering=0) as writer:
        os.truncate(path, 100)
        assert os.fstat(writer.fileno()).st_size == 100
        writer.seek(2 * MiB - 10)
        writer.write(b"x" * 10)
    data = path.read_bytes()
    assert data == b"\x11" * 100 + bytes(2 * MiB - 110) + b"x" * 10


# -- 13. statfs -----------------------------------------------------------------------------------


def test_statfs(mount):
    info = os.statvfs(mount.mountpoint)
    assert info.f_bsize == 4096 and info.f_frsize == 4096
    assert 200 * BLOCKS_PER_MIB <= info.f_blocks <= 256 * BLOCKS_PER_MIB
    assert info.f_blocks - 2 * BLOCKS_PER_MIB <= info.f_bfree <= info.f_blocks
    assert info.f_bavail == info.f_bfree
    assert info.f_namemax == 255
    assert info.f_ffree > 0
    write_file(mount.path("f"), b"z" * (5 * MiB))
    after = os.statvfs(mount.mountpoint)
    assert after.f_blocks == info.f_blocks
    assert after.f_bfree <= info.f_bfree - 5 * BLOCKS_PER_MIB
    os.unlink(mount.path("f"))
    assert wait_for(lambda: os.statvfs(mount.mountpoint).f_bfree == info.f_bfree)


def test_enospc_when_full(mount):
    free = os.statvfs(mount.mountpoint).f_bfree // BLOCKS_PER_MIB  # in units
    with open(mount.path("big"), "wb") as handle:
        handle.truncate((free + 1) * MiB)
        assert errno_of(os.posix_fallocate, handle.fileno(), 0, (free + 1) * MiB) == "ENOSPC"
    assert os.statvfs(mount.mountpoint).f_bfree // BLOCKS_PER_MIB == free
    os.unlink(mount.path("big"))


# -- 14. persistence ------------------------------------------------------------------------------


def snapshot(root) -> dict:
    """Everything observable about a tree, by relative path."""
    paths = [os.fspath(root)]
    for directory, dirs, files in os.walk(root):
        paths += [os.path.join(directory, name) for name in dirs + files]
    result = {}
    for path in paths:
        info = os.lstat(path)
        entry = {field: getattr(info, field) for field in (
            "st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
            "st_rdev", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")}
        entry["xattrs"] = {key: os.getxattr(path, key, follow_symlinks=False)
                           for key in os.listxattr(path, follow_symlinks=False)}
        if stat.S_ISLNK(info.st_mode):
            entry["target"] = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            with open(path, "rb") as handle:
                entry["data"] = handle.read()
        elif stat.S_ISDIR(info.st_mode):
            entry["names"] = sorted(os.listdir(path))
        result[os.path.relpath(path, root)] = entry
    return result


def test_everything_survives_remount(mount, nodes):
    path = mount.path
    os.makedirs(path("a", "b", "c"))
    write_file(path("a", "file"), b"hello" * 1000)
    with open(path("a", "sparse"), "wb") as handle:
        handle.seek(5 * MiB + 7)
        handle.write(b"end")
    os.link(path("a", "file"), path("a", "b", "hardlink"))
    os.symlink("../file", path("a", "b", "symlink"))
    os.symlink("nowhere", path("dangling"))
    os.mkfifo(path("fifo"), 0o640)
    os.mknod(path("null"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    write_file(path("suid"), b"#!/bin/sh\n")
    os.chmod(path("suid"), 0o4755)
    os.mkdir(path("tmp"))
    os.chmod(path("tmp"), 0o1777)
    os.mkdir(path("group"))
    os.chown(path("group"), 0, 777)
    os.chmod(path("group"), 0o2775)
    write_file(path("group", "inherits"), b"")
    os.chown(path("a", "file"), 1001, 2002)
    os.chown(path("dangling"), 3, 4, follow_symlinks=False)
    os.setxattr(path("a", "file"), "user.color", b"blue")
    os.setxattr(path("a"), "user.empty", b"")
    os.setxattr(path("a", "b", "c"), "user.bin", bytes(range(256)))
    with open(path("alloc"), "wb") as handle:
        fallocate(handle.fileno(), FALLOC_FL_KEEP_SIZE, 0, 2 * MiB)
    os.utime(path("a", "file"), ns=(OLD_NS, OLD_NS + 1))
    os.utime(path("a", "b"), ns=(123_456_789, 987_654_321))
    os.utime(path("dangling"), ns=(5, 6), follow_symlinks=False)
    os.rename(path("a", "b", "c"), path("c_moved"))
    before = snapshot(mount.mountpoint)
    free = os.statvfs(mount.mountpoint).f_bfree
    assert mount.unmount() == 0
    again = nodes.start(mount.image, "again")
    after = snapshot(again.mountpoint)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name] == before[name], name
    assert os.statvfs(again.mountpoint).f_bfree == free
    # and the remounted tree still works
    os.unlink(again.path("a", "file"))
    assert os.stat(again.path("a", "b", "hardlink")).st_nlink == 1
    os.rmdir(again.path("c_moved"))


@pytest.mark.parametrize("mode, uid, gid, flags, allowed", [
    (0o600, 1000, 1000, os.O_RDWR, True),
    (0o600, 1001, 1000, os.O_RDONLY, False),
    (0o640, 1001, 1000, os.O_RDONLY, True),
    (0o640, 1001, 1000, os.O_WRONLY, False),
    (0o644, 1001, 1001, os.O_RDONLY, True),
    (0o444, 1000, 1000, os.O_RDONLY | os.O_TRUNC, False),
    (0o000, 0, 0, os.O_RDWR, None),  # root may open anything
])
def test_the_permission_check_of_an_open_that_lost_a_create_race(mode, uid, gid, flags,
                                                                  allowed):
    from types import SimpleNamespace

    from csvfs.callers import may_open
    attrs = {"mode": 0o100000 | mode, "uid": 1000, "gid": 1000}
    ctx = SimpleNamespace(uid=uid, gid=gid, pid=0)
    assert may_open(attrs, flags, ctx) is (True if allowed is None else allowed)
