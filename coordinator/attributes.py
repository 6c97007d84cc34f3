"""Attributes: getattr, setattr (mode, owner, times, size), setid rules, and xattrs.

Every node asks here for the attributes of a file, since no kernel caches
them (csvfs/fuse_ops.py). A size change goes to allocation; the rest is one
setattr record. An explicit mtime (utimens) wins over a node's writes from
before it, which the node reports late, when it flushes their time.
"""

from __future__ import annotations

import errno
import logging
import stat

from coordinator.allocation import Allocation
from coordinator.arguments import fits
from coordinator.commit import Commits, Request
from coordinator.model import NAME_MAX, Inode
from coordinator.quiesce import Sessions
from csvfs.cluster.errors import MetaError

log = logging.getLogger(__name__)

XATTR_VALUE_MAX = 64 * 1024
SETATTR_CHANGES = {"size": int, "mode": int, "uid": int, "gid": int, "atime_ns": int,
                   "mtime_ns": int, "ctime_ns": int, "written": bool}


def attributes(inode: Inode, unit_size: int) -> dict:
    return {
        "ino": inode.ino,
        "mode": inode.mode,
        "nlink": inode.nlink,
        "uid": inode.uid,
        "gid": inode.gid,
        "rdev": inode.rdev,
        "size": inode.size,
        "blocks": inode.allocated(unit_size) // 512,  # st_blocks, for du
        "atime_ns": inode.atime_ns,
        "mtime_ns": inode.mtime_ns,
        "ctime_ns": inode.ctime_ns,
    }


class Attributes:
    def __init__(self, commits: Commits, sessions: Sessions, allocation: Allocation):
        self.commits = commits
        self.sessions = sessions
        self.allocation = allocation
        # When an explicit mtime (utimens) was last set, per inode: a node's writes from
        # before that must not override it when the node flushes their time later.
        # Kept in memory only; after a restart, flushed write times win.
        self._mtime_set: dict[int, int] = {}

    def of(self, inode: Inode) -> dict:
        """What a node is told of an inode."""
        attrs = attributes(inode, self.commits.unit)
        attrs["mtime_set_ns"] = self._mtime_set.get(inode.ino, 0)
        return attrs

    async def op_getattr(self, request: Request, ino: int) -> dict:
        await self.commits.durable()
        return self.of(self.commits.inode(ino))

    async def op_setattr(self, request: Request, ino: int, changes: dict) -> dict:
        _check_changes(changes)
        if "size" in changes:
            await self.allocation.resize(request, ino, changes["size"])
        fields = {key: changes[key] for key in ("mode", "uid", "gid", "atime_ns", "mtime_ns")
                  if key in changes}
        commits = self.commits
        async with commits.mutation():
            inode = commits.inode(ino)
            seq = None
            written = changes.get("written", False)  # a node's writes, flushed late
            if written and fields.get("mtime_ns", 0) <= self._mtime_set.get(ino, 0):
                pass  # an explicit time set since those writes wins
            elif fields or "size" not in changes:
                if "mtime_ns" in fields and not written:
                    self._mtime_set[ino] = commits.now()
                _drop_setid_on_chown(inode, fields)
                fields.setdefault("ctime_ns", changes.get("ctime_ns", commits.now()))
                seq = commits.append(dict(fields, op="setattr", ino=ino), request)
            attrs = self.of(inode)
        await commits.durable(seq)
        if inode.is_dir and seq is not None:
            await self.sessions.forget(request.session, wait=True, inos=[ino])
        return attrs

    async def op_kill_setid(self, request: Request, ino: int, groups: list[int]) -> None:
        """A write or O_TRUNC by a caller without CAP_FSETID, whose groups are given.

        Linux drops setuid, and setgid where it marks an executable or the caller is
        not in the file's group. With direct_io the kernel leaves this to us.
        """
        commits = self.commits
        async with commits.mutation():
            inode = commits.inode(ino)
            mode = _without_setid(inode.mode, drop_setgid=inode.gid not in groups)
            if mode == inode.mode or not inode.is_reg:
                return
            seq = commits.append({"op": "setattr", "ino": ino, "mode": mode,
                                  "ctime_ns": commits.now()}, request)
        await commits.durable(seq)

    # -- xattrs ----------------------------------------------------------------------------

    async def op_getxattr(self, request: Request, ino: int, name: bytes) -> bytes:
        await self.commits.durable()
        value = self.commits.inode(ino).xattrs.get(name)
        if value is None:
            raise MetaError(errno.ENODATA)
        return value

    async def op_listxattr(self, request: Request, ino: int) -> list[bytes]:
        await self.commits.durable()
        return list(self.commits.inode(ino).xattrs)

    async def op_setxattr(self, request: Request, ino: int, name: bytes, value: bytes) -> None:
        if len(name) > NAME_MAX:
            raise MetaError(errno.ERANGE)
        if len(value) > XATTR_VALUE_MAX:
            raise MetaError(errno.E2BIG)
        commits = self.commits
        async with commits.mutation():
            commits.inode(ino)
            seq = commits.append({"op": "setxattr", "ino": ino, "name": name, "value": value,
                                  "t": commits.now()}, request)
        await commits.durable(seq)

    async def op_removexattr(self, request: Request, ino: int, name: bytes) -> None:
        commits = self.commits
        async with commits.mutation():
            if name not in commits.inode(ino).xattrs:
                raise MetaError(errno.ENODATA)
            seq = commits.append({"op": "removexattr", "ino": ino, "name": name,
                                  "t": commits.now()}, request)
        await commits.durable(seq)


def _check_changes(changes: dict) -> None:
    """setattr's changes reach the journal as they are: refuse what does not belong."""
    for key, value in changes.items():
        expected = SETATTR_CHANGES.get(key)
        if expected is None:
            raise MetaError(errno.EINVAL, f"bad arguments for setattr: unknown change {key!r}")
        if not fits(value, expected) or (expected is int and value < 0):
            raise MetaError(errno.EINVAL, f"bad arguments for setattr: {key} must be a "
                                          f"non-negative {expected.__name__}")


def _drop_setid_on_chown(inode: Inode, fields: dict) -> None:
    owner_changes = ("uid" in fields and fields["uid"] != inode.uid) or (
        "gid" in fields and fields["gid"] != inode.gid)
    if not owner_changes or inode.is_dir or "mode" in fields:
        return
    mode = _without_setid(inode.mode, drop_setgid=False)
    if mode != inode.mode:
        fields["mode"] = mode


def _without_setid(mode: int, drop_setgid: bool) -> int:
    """Linux's rule: setuid always goes; setgid goes where it marks an executable
    (group-exec set) or when the caller says so."""
    mode &= ~stat.S_ISUID
    if drop_setgid or mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode
