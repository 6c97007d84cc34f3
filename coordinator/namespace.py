"""The namespace: lookups, and the changes that add, move or remove names.

mknod, mkdir, symlink, create, link, unlink, rmdir and rename each commit one
record. Other nodes' kernels cache the attributes of directories and the names
that lead to them, so each change makes them drop what it made stale: at once,
and waited for, where a path walk must see it (a directory renamed or
removed); pushed without waiting for the times and link counts other changes
move. Nodes that hold a directory's listing (coordinator/listings.py) give it
back, waited for, before a change to its names is answered. A file's last name
removed while a node holds it leaves an open-unlinked file, reclaimed at its last
close (coordinator/open_files.py).
"""

from __future__ import annotations

import errno
import logging
import stat

from coordinator.attributes import Attributes
from coordinator.commit import Commits, Request
from coordinator.listings import Listings
from coordinator.model import NAME_MAX, ROOT_INO, Inode
from coordinator.open_files import OpenFiles
from coordinator.quiesce import Sessions
from csvfs.cluster.errors import MetaError

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class Namespace:
    def __init__(self, commits: Commits, open_files: OpenFiles, sessions: Sessions,
                 attributes: Attributes, listings: Listings):
        self.commits = commits
        self.listings = listings
        self.open_files = open_files
        self.holders = open_files.holders
        self.sessions = sessions
        self.attributes = attributes

    # -- reading -------------------------------------------------------------------------

    async def op_lookup(self, request: Request, parent: int, name: bytes,
                        lease: bool = False) -> dict:
        """The attributes of parent/name. No such name is ENOENT, or, if the node asks
        for the `lease`, {"absent": True, "names": the directory's names or None}
        (coordinator/listings.py)."""
        if len(name) > NAME_MAX:  # POSIX: too long a component is ENAMETOOLONG, not ENOENT
            raise MetaError(errno.ENAMETOOLONG)
        commits = self.commits
        await commits.durable()
        names = commits.directory(parent)
        if name == b".":
            return self.attributes.of(commits.inode(parent))
        if name == b"..":
            return self.attributes.of(commits.inode(commits.state.parents[parent]))
        ino = names.get(name)
        if ino is None and lease:
            return {"absent": True, "names": self.listings.lend(parent, request.session, names)}
        if ino is None:
            raise MetaError(errno.ENOENT)
        return self.attributes.of(commits.inode(ino))

    async def op_readdir(self, request: Request, ino: int) -> list:
        await self.commits.durable()
        names = self.commits.directory(ino)
        inodes = self.commits.state.inodes
        return [[name, self.attributes.of(inodes[child])] for name, child in names.items()]

    async def op_readlink(self, request: Request, ino: int) -> bytes:
        await self.commits.durable()
        inode = self.commits.inode(ino)
        if not stat.S_ISLNK(inode.mode):
            raise MetaError(errno.EINVAL)
        return inode.target

    # -- adding names ----------------------------------------------------------------------

    async def op_mknod(self, request: Request, parent: int, name: bytes, mode: int, uid: int,
                       gid: int, rdev: int = 0, target: bytes = b"") -> dict:
        return await self.make(request, parent, name, mode, uid, gid, rdev, target)

    async def op_create(self, request: Request, parent: int, name: bytes, mode: int, uid: int,
                        gid: int) -> dict:
        """Make a regular file and open it for the session, in one round trip. The open
        counts from the moment the file exists, so nobody can reclaim it in between."""
        if not stat.S_ISREG(mode):
            raise MetaError(errno.EINVAL, "create makes regular files only")
        attrs = await self.make(request, parent, name, mode, uid, gid, opened=True)
        return dict(self.open_files.reply(self.commits.inode(attrs["ino"])),
                    parent_attrs=attrs["parent_attrs"])

    async def make(self, request: Request, parent: int, name: bytes, mode: int, uid: int,
                   gid: int, rdev: int = 0, target: bytes = b"", opened: bool = False) -> dict:
        _check_name(name)
        commits = self.commits
        async with commits.mutation():
            names = commits.directory(parent)
            if name in names:
                raise MetaError(errno.EEXIST)
            parent_inode = commits.inode(parent)
            if parent_inode.mode & stat.S_ISGID:
                gid = parent_inode.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            ino = commits.state.next_ino
            op = {"op": "mknod", "ino": ino, "parent": parent, "name": name, "mode": mode,
                  "uid": uid, "gid": gid, "rdev": rdev, "target": target, "t": commits.now()}
            seq = commits.append(op, request)
            attrs = self.attributes.of(commits.state.inodes[ino])
            attrs["parent_attrs"] = [self.attributes.of(parent_inode)]
            if opened:
                self.holders.opened(request.session, ino)
        await commits.durable(seq)
        await self.listings.take_back(request.session, [parent])
        await self.sessions.forget(request.session, wait=False, inos=[parent])
        return attrs

    async def op_link(self, request: Request, ino: int, parent: int, name: bytes) -> dict:
        _check_name(name)
        commits = self.commits
        async with commits.mutation():
            inode = commits.inode(ino)
            if inode.is_dir:
                raise MetaError(errno.EPERM)
            if inode.nlink == 0:
                raise MetaError(errno.ENOENT)
            if name in commits.directory(parent):
                raise MetaError(errno.EEXIST)
            seq = commits.append({"op": "link", "ino": ino, "parent": parent, "name": name,
                                  "t": commits.now()}, request)
            attrs = dict(self.attributes.of(inode),
                         parent_attrs=[self.attributes.of(commits.inode(parent))])
        await commits.durable(seq)
        await self.listings.take_back(request.session, [parent])
        await self.sessions.forget(request.session, wait=False, inos=[parent])
        return attrs

    # -- removing and moving names -------------------------------------------------------------

    async def op_unlink(self, request: Request, parent: int, name: bytes, is_dir: bool) -> dict:
        commits = self.commits
        async with commits.mutation():
            ino = commits.directory(parent).get(name)
            if ino is None:
                raise MetaError(errno.ENOENT)
            inode = commits.inode(ino)
            self._check_removable(inode, want_dir=is_dir)
            seq = commits.append({"op": "unlink", "parent": parent, "name": name,
                                  "t": commits.now(), "reclaim": self._reclaimable(inode)},
                                 request)
            reply = {"parent_attrs": [self.attributes.of(commits.inode(parent))]}
        await commits.durable(seq)
        await self.listings.take_back(request.session, [parent, ino] if inode.is_dir
                                      else [parent])
        if inode.is_dir:
            await self.sessions.forget(request.session, wait=True, inos=[parent],
                                       entries=[(parent, name)])
        else:
            await self.sessions.forget(request.session, wait=False, inos=[parent])
        return reply

    async def op_rename(self, request: Request, old_parent: int, old_name: bytes,
                        new_parent: int, new_name: bytes, flags: int = 0) -> dict | None:
        _check_name(new_name)
        commits = self.commits
        async with commits.mutation():
            op = self._rename_record(old_parent, old_name, new_parent, new_name, flags)
            if op is None:
                return
            names_a_directory = any(self._names_directory(parent, name) for parent, name in
                                    ((old_parent, old_name), (new_parent, new_name)))
            seq = commits.append(op, request)
            parents = sorted({old_parent, new_parent})
            reply = {"parent_attrs": [self.attributes.of(commits.inode(ino))
                                      for ino in parents]}
        await commits.durable(seq)
        await self.listings.take_back(request.session, parents)
        if names_a_directory:
            await self.sessions.forget(request.session, wait=True, inos=parents,
                                       entries=[(old_parent, old_name), (new_parent, new_name)])
        else:
            await self.sessions.forget(request.session, wait=False, inos=parents)
        return reply

    def _names_directory(self, parent: int, name: bytes) -> bool:
        state = self.commits.state
        ino = state.entries.get(parent, {}).get(name)
        return ino is not None and state.inodes[ino].is_dir

    def _rename_record(self, old_parent: int, old_name: bytes, new_parent: int,
                       new_name: bytes, flags: int) -> dict | None:
        commits = self.commits
        moving_ino = commits.directory(old_parent).get(old_name)
        if moving_ino is None:
            raise MetaError(errno.ENOENT)
        target_ino = commits.directory(new_parent).get(new_name)
        if flags & RENAME_NOREPLACE and target_ino is not None:
            raise MetaError(errno.EEXIST)
        exchange = bool(flags & RENAME_EXCHANGE)
        if exchange and target_ino is None:
            raise MetaError(errno.ENOENT)
        moving = commits.inode(moving_ino)
        if moving.is_dir:
            self._check_not_into_itself(moving_ino, new_parent)
        op = {"op": "rename", "old_parent": old_parent, "old_name": old_name,
              "new_parent": new_parent, "new_name": new_name, "t": commits.now()}
        if exchange:
            if commits.inode(target_ino).is_dir:
                self._check_not_into_itself(target_ino, old_parent)
            return dict(op, exchange=True)
        if target_ino == moving_ino:
            return None  # both names are links to one inode: POSIX says do nothing
        if target_ino is not None:
            target = commits.inode(target_ino)
            if moving.is_dir and not target.is_dir:
                raise MetaError(errno.ENOTDIR)
            if not moving.is_dir and target.is_dir:
                raise MetaError(errno.EISDIR)
            self._check_removable(target, want_dir=target.is_dir)
            op["reclaim"] = self._reclaimable(target)
        return op

    def _check_not_into_itself(self, directory: int, new_parent: int) -> None:
        parents = self.commits.state.parents
        cursor = new_parent
        while True:
            if cursor == directory:
                raise MetaError(errno.EINVAL, "cannot move a directory into itself")
            if cursor == ROOT_INO:
                return
            cursor = parents[cursor]

    def _check_removable(self, inode: Inode, want_dir: bool) -> None:
        if want_dir and not inode.is_dir:
            raise MetaError(errno.ENOTDIR)
        if not want_dir and inode.is_dir:
            raise MetaError(errno.EISDIR)
        if inode.is_dir and self.commits.state.entries[inode.ino]:
            raise MetaError(errno.ENOTEMPTY)
        if inode.ino == ROOT_INO:
            raise MetaError(errno.EBUSY)

    def _reclaimable(self, inode: Inode) -> bool:
        """Would dropping one name free the inode now? Not while a node has it open."""
        last_name = inode.is_dir or inode.nlink <= 1
        return last_name and (inode.is_dir or not self.holders.is_open(inode.ino))


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise MetaError(errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise MetaError(errno.EINVAL)
