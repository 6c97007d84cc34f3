"""The metadata service: the coordinator's authority over every metadata change.

Each mutating request follows one path: validate against the current state,
build a journal record that carries every decision, append it, apply it,
and reply only once the record is durable. Readers wait for pending records
to be durable too, so nobody sees a change before it commits.

Nodes talk to the service through `call(session, method, args)`; the
coordinator's own node calls it in-process, the others through the RPC
endpoint (coordinator/endpoint.py). Nothing leaves the service before it is
durable: replies, and the extent maps pushed to other nodes, both wait for
the journal.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import math
import os
import stat
import time
from collections import Counter
from functools import partial
from typing import Protocol

import trio

from coordinator import recovery
from coordinator.allocator import NoSpace
from coordinator.arguments import check_arguments, fits
from coordinator.journal import Journal, JournalFull, LeaseLost
from coordinator.model import ROOT_INO, Inode, MetadataState
from csvfs.cluster.errors import MetaError, NotCoordinator
from csvfs.cluster.events import EventLog
from csvfs.volume.extents import pieces, to_runs
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

NAME_MAX = 255
# Fraction of the journal in use that triggers a checkpoint. Crash tests lower it
# through the environment so that kills also land in the middle of checkpoints.
CHECKPOINT_AT = float(os.environ.get("CSVFS_CHECKPOINT_AT", "0.5"))
ALLOCATE_AHEAD_MAX = 64  # units
PAUSE_TIMEOUT = 2.0  # a node that has not paused by then is evicted

# Requests that must not run twice: a node that lost its coordinator mid-call
# sends them again, with the same request id, to the next one.
ONCE_ONLY = frozenset({"mknod", "create", "link", "unlink", "rename", "removexattr"})
_request_token: contextvars.ContextVar = contextvars.ContextVar("request_token", default=None)
# The inodes the records of the request being served changed, to tell their holders.
_touched: contextvars.ContextVar = contextvars.ContextVar("touched", default=None)

FALLOC_KEEP_SIZE = 0x01
FALLOC_PUNCH_HOLE = 0x02
FALLOC_ZERO_RANGE = 0x10
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class NodeSession(Protocol):
    """What the coordinator needs from a node that has files open."""

    name: str
    # The coordinator's own node: what it is asked is done in this process, so it is
    # waited for however long it takes, and never evicted (nothing would rejoin).
    in_process: bool

    async def pause(self, ino: int) -> None:
        """Stop new I/O on ino and return once in-flight I/O has drained."""

    async def take_map(self, ino: int, reply: dict, resume: bool, forget: bool,
                       wait: bool) -> None:
        """Replace the node's map of ino (a _map_reply), then lift its pause on ino if
        `resume`, and make its kernel drop the attributes it caches of ino if `forget`.
        With `wait`, return once the node has done all that."""

    def resume(self, ino: int) -> None:
        """Let I/O on ino go on."""

    async def invalidate(self, stale: dict, wait: bool) -> None:
        """Make the node's kernel forget what it caches of directories: the attributes
        of stale["inos"] and the names stale["entries"] ([parent, name] pairs). With
        `wait`, return once it has."""

    def evict(self, reason: str) -> float | None:
        """Cut the session off. Returns the trio time until which the node may still be
        doing I/O on what it was last granted, or None if it surely stopped already."""


def attributes(inode: Inode, unit_size: int) -> dict:
    return {
        "ino": inode.ino,
        "mode": inode.mode,
        "nlink": inode.nlink,
        "uid": inode.uid,
        "gid": inode.gid,
        "rdev": inode.rdev,
        "size": inode.size,
        "blocks": len(inode.units) * (unit_size // 512),
        "atime_ns": inode.atime_ns,
        "mtime_ns": inode.mtime_ns,
        "ctime_ns": inode.ctime_ns,
    }


class MetadataService:
    def __init__(self, volume: Volume, recovered: recovery.Recovered, epoch: int,
                 events: EventLog):
        self.volume = volume
        self.unit = volume.sb.unit_size
        self.state: MetadataState = recovered.state
        self.epoch = epoch
        self.events = events
        self.journal = Journal(volume, epoch, recovered.last_seq + 1, recovered.replay.end_offset,
                               recovered.journal_gen)
        self._checkpoint_slot = recovered.next_checkpoint_slot
        self._checkpointed_seq: int | None = None  # seq of the last checkpoint written here
        self._clean_tails: set[int] = set()  # inodes known to hold only zeros past EOF
        self._lock = trio.Lock()
        self.sessions: dict[str, NodeSession] = {}
        self.open_files: dict[int, Counter[str]] = {}
        # Files open on one node that a second node opened too: inode -> the first node
        self._shared_from: dict[int, str] = {}
        # Nodes whose session ended while they may still be doing I/O: name -> the trio
        # time their last grant runs out. Their open files count until then.
        self.lingering: dict[str, float] = {}
        self.pause_timeout = PAUSE_TIMEOUT
        # Inodes whose I/O is being paused for a change, each with an event set when
        # that is over. Opens and registrations of such an inode wait for it.
        self._quiescing: dict[int, trio.Event] = {}
        # When an explicit mtime (utimens) was last set, per inode: a node's writes from
        # before that must not override it when the node flushes their time later.
        # Kept in memory only; after a restart, flushed write times win.
        self._mtime_set: dict[int, int] = {}
        self.fenced = False
        # Trio clock time until which the lease is surely ours; the node moves it on
        # at every renewal. Unbounded until a node says otherwise (in-process tests).
        self.lease_deadline = math.inf
        self.journal.may_write = self._lease_held
        self.on_fenced: list = []  # callbacks, e.g. the node's data path
        self.renew_lease = None  # the node's way to renew at once: () -> bool (still ours)

    # -- dispatch -----------------------------------------------------------------------

    async def call(self, session: str, method: str, args: dict):
        handler = getattr(self, f"op_{method}", None)
        if handler is None:
            raise MetaError(errno.ENOSYS, f"unknown method {method!r}")
        if self.fenced:
            raise NotCoordinator("this node is no longer the coordinator")
        args = dict(args)
        request = args.pop("req", None)
        if not fits(request, int | None):
            raise MetaError(errno.EINVAL, f"bad arguments for {method}: req must be an int")
        check_arguments(method, handler, args)
        if method in ONCE_ONLY and request is not None:
            done = self.state.done.get(session, {}).get(request)
            if done is not None:
                return await self._answer_again(session, method, args, done)
            _request_token.set([session, request])
        touched: set[int] = set()
        _touched.set(touched)
        try:
            reply = await handler(session, **args)
        finally:
            _touched.set(None)
            _request_token.set(None)  # unused if it failed early: not for the next request
        if touched:
            await self._tell_holders(session, touched)
        return reply

    async def _tell_holders(self, requester: str, inos: set[int]) -> None:
        """Nodes that have a file open let their kernel cache its attributes: make every
        holder but the requester drop them, and wait until they have, so that the change
        shows there the moment this request returns. A file open on one node only (a
        VM's disk) costs nothing here."""
        await self._invalidated([
            (name, {"inos": [ino], "entries": []})
            for ino in inos for name in self.open_files.get(ino, ())
            if name != requester and name in self.sessions])

    async def _answer_again(self, session: str, method: str, args: dict, ino: int):
        """The reply to a request that was carried out before its node lost the answer."""
        await self._durable()
        log.info("%s request answered again after a reconnect", method)
        if method == "mknod" or method == "link":
            return self._attrs(self._inode(ino or args.get("ino", 0)))
        if method == "create":  # the open it made was lost with the session: count it again
            async with self._lock:
                inode = self._inode(ino)
                self._count_open(session, ino)
                return self._open_reply(inode)
        return None

    def _lease_held(self) -> bool:
        """May we write a record now? After a stall, renew first: if nobody took the
        lease meanwhile, go on; if another node holds it, we are stale and stop."""
        if self.fenced:
            return False
        if trio.current_time() < self.lease_deadline:
            return True
        if self.renew_lease is not None and self.renew_lease():
            return True
        self.fence("the coordinator lease lapsed and another node may hold it")
        return False

    def fence(self, reason: str) -> None:
        """Stop for good: no more commits, and every node's I/O is cut."""
        if self.fenced:
            return
        self.fenced = True
        # Only the coordinator writes the event ring, and we no longer are one:
        # the node that took over records the takeover there instead.
        log.warning("stepping down as coordinator: %s", reason)
        for callback in self.on_fenced:
            callback()

    def close(self) -> None:
        """Stop serving at a clean shutdown: later requests hear NotCoordinator."""
        self.fenced = True

    async def start(self, reclaim_orphans: bool = True) -> None:
        """Open the epoch. `reclaim_orphans` when no other node can have one open."""
        if reclaim_orphans:
            await self.reclaim_orphans()
        # A new journal generation for this epoch: records a stale coordinator might
        # still write under the old generation can then never be replayed.
        await self.checkpoint_now()

    async def reclaim_orphans(self) -> None:
        """Free inodes with no name that no node has open: a crash left them behind."""
        for ino in self.state.orphans():
            if await self._reclaim_if_unused(ino):
                self.events.emit("reclaim", f"reclaimed orphaned inode {ino} left by a crash")

    # -- sessions: the nodes that have files open ----------------------------------------

    async def join(self, session: NodeSession, opens: list) -> list:
        """A node (re)joins with the files it has open, as [[ino, handles]...].

        Whatever the node had registered before is replaced. The reply gives the
        current map of each of those files, or None for one that no longer exists.
        It waits for any quiesce of those files to finish, so its maps are the new ones.
        """
        await self._lock_outside_quiesces(ino for ino, _ in opens)
        try:
            await self._durable()
            name = session.name
            self.sessions[name] = session
            self.lingering.pop(name, None)
            dropped = set(self._forget_opens(name))
            maps = []
            for ino, handles in opens:
                inode = self.state.inodes.get(ino)
                if inode is None or not inode.is_reg or handles <= 0:
                    maps.append([ino, None])
                    continue
                self.open_files.setdefault(ino, Counter())[name] = handles
                dropped.discard(ino)
                maps.append([ino, self._map_reply(inode)])
        finally:
            self._lock.release()
        for ino in dropped:  # closed while the node was cut off: its release got lost
            await self._reclaim_if_unused(ino)
        return maps

    async def _lock_outside_quiesces(self, inos) -> None:
        """Take the metadata lock at a moment when none of `inos` is being quiesced."""
        inos = list(inos)
        while True:
            await self._lock.acquire()
            busy = next((self._quiescing[ino] for ino in inos if ino in self._quiescing), None)
            if busy is None:
                return
            self._lock.release()
            await busy.wait()

    async def leave(self, name: str, writing_until: float | None = None) -> None:
        """A node's session ended. If it may still be doing I/O until `writing_until`
        (it was cut off rather than gone), its open files count until then."""
        self.sessions.pop(name, None)
        if writing_until is not None and writing_until > trio.current_time():
            self.lingering[name] = writing_until
            await trio.sleep_until(writing_until)
            if self.lingering.get(name) != writing_until:
                return  # it came back meanwhile and registered afresh
        self.lingering.pop(name, None)
        if name in self.sessions:
            return
        for ino in self._forget_opens(name):
            await self._reclaim_if_unused(ino)

    def _forget_opens(self, name: str) -> list[int]:
        forgotten = []
        for ino in list(self.open_files):
            holders = self.open_files[ino]
            if holders.pop(name, 0):
                forgotten.append(ino)
            if not holders:
                del self.open_files[ino]
        return forgotten

    async def _reclaim_if_unused(self, ino: int) -> bool:
        """Free an inode with no name once no node has it open; True if it did."""
        inode = self.state.inodes.get(ino)
        if inode is None or inode.nlink != 0 or self._is_open(ino):
            return False
        await self._commit({"op": "reclaim", "ino": ino})
        return True

    def evict(self, name: str, reason: str) -> float | None:
        """Cut a node off; returns until when it may still do I/O (see NodeSession)."""
        session = self.sessions.get(name)
        if session is None:
            return None
        if session.in_process:  # cut off from itself, it could never rejoin
            log.error("not evicting this node's own session (%s): %s", name, reason)
            return None
        del self.sessions[name]
        log.warning("evicting %s: %s", name, reason)
        self.events.emit("evict", f"evicted {name}: {reason}", level="warning")
        until = session.evict(reason)
        if until is not None:
            self.lingering[name] = max(until, self.lingering.get(name, until))
        return until

    # -- commit machinery ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _mutation(self):
        """Hold the metadata lock; checkpoint first when the journal is filling up.

        Other requests may have appended records that are not durable yet, so
        wait for them before the checkpoint captures the state.
        """
        async with self._lock:
            if self.journal.used_fraction > CHECKPOINT_AT:
                await self._durable()
                await self.checkpoint()
            yield

    def _append(self, op: dict) -> int:
        token = _request_token.get()
        if token is not None:  # the record that carries out a once-only request
            op["req"] = token
            _request_token.set(None)
        try:
            seq = self.journal.append(op)
        except JournalFull:
            raise MetaError(errno.ENOSPC, "metadata journal is full") from None
        except LeaseLost as exc:
            raise NotCoordinator(str(exc)) from None
        touched = _touched.get()
        if touched is not None:
            touched.update(self._files_changed_by(op))
        self.state.apply(op)
        return seq

    def _files_changed_by(self, op: dict) -> list[int]:
        """Inodes (before `op` applies) whose attributes it changes and that some node
        may have open."""
        entries = self.state.entries
        if op["op"] == "unlink":
            changed = [entries[op["parent"]].get(op["name"])]
        elif op["op"] == "rename":
            changed = [entries[op["old_parent"]].get(op["old_name"]),
                       entries[op["new_parent"]].get(op["new_name"])]
        else:
            changed = [op.get("ino")]
        return [ino for ino in changed if ino is not None and ino in self.open_files]

    async def _commit(self, op: dict) -> None:
        async with self._mutation():
            seq = self._append(op)
        await self._durable(seq)

    async def _durable(self, seq: int | None = None) -> None:
        try:
            await self.journal.wait_durable(seq)
        except LeaseLost as exc:  # the node retries with whoever holds the lease now
            raise NotCoordinator(str(exc)) from None
        except OSError as exc:
            raise MetaError(errno.EIO, str(exc)) from None

    async def checkpoint(self) -> None:
        """Write the whole state to the other slot, then restart the journal.

        Called with the lock held and nothing pending, so the image is exactly
        the state after journal record next_seq - 1, and stays so while a worker
        thread writes it (the fdatasync would otherwise stall every request).
        """
        if self.journal.durable_seq != self.journal.next_seq - 1:
            raise AssertionError("checkpoint with records still pending")
        if not self._lease_held():  # a stale coordinator must not overwrite a checkpoint
            raise NotCoordinator("the coordinator lease is gone")
        seq = self.journal.next_seq - 1
        if seq == self._checkpointed_seq:
            # Nothing appended since our last checkpoint: both slots will hold this
            # (seq, epoch), and recovery cannot tell which is newer. Keep the live
            # generation (no record of it exists yet), so either one replays what follows.
            gen = self.journal.gen
        else:
            gen = recovery.new_journal_gen()
        offset, blob = recovery.checkpoint_blob(self.volume, self._checkpoint_slot, self.epoch,
                                                seq, self.state, gen)
        try:
            await trio.to_thread.run_sync(recovery.write_blob, self.volume, offset, blob)
        except OSError as exc:
            raise MetaError(errno.EIO, f"checkpoint failed: {exc}") from None
        self._checkpoint_slot = 1 - self._checkpoint_slot
        self._checkpointed_seq = seq
        self.journal.restart_after_checkpoint(gen)

    async def checkpoint_now(self) -> None:
        async with self._lock:
            await self._durable()
            await self.checkpoint()

    # -- helpers ---------------------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        inode = self.state.inodes.get(ino)
        if inode is None:
            raise MetaError(errno.ENOENT, f"no inode {ino}")
        return inode

    def _dir(self, ino: int) -> dict[bytes, int]:
        inode = self._inode(ino)
        if not inode.is_dir:
            raise MetaError(errno.ENOTDIR)
        names = self.state.entries.get(ino)
        if names is None:
            raise MetaError(errno.ENOENT, "directory was removed")
        return names

    def _attrs(self, inode: Inode) -> dict:
        attrs = attributes(inode, self.unit)
        attrs["mtime_set_ns"] = self._mtime_set.get(inode.ino, 0)
        return attrs

    @staticmethod
    def _now() -> int:
        return time.time_ns()

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise MetaError(errno.ENAMETOOLONG)
        if not name or b"/" in name or name in (b".", b".."):
            raise MetaError(errno.EINVAL)

    def _is_open(self, ino: int) -> bool:
        return bool(self.open_files.get(ino))

    # -- read-only requests -------------------------------------------------------------------

    async def op_lookup(self, session: str, parent: int, name: bytes) -> dict:
        if len(name) > NAME_MAX:  # POSIX: too long a component is ENAMETOOLONG, not ENOENT
            raise MetaError(errno.ENAMETOOLONG)
        await self._durable()
        names = self._dir(parent)
        if name == b".":
            return self._attrs(self._inode(parent))
        if name == b"..":
            return self._attrs(self._inode(self.state.parents[parent]))
        ino = names.get(name)
        if ino is None:
            raise MetaError(errno.ENOENT)
        return self._attrs(self._inode(ino))

    async def op_getattr(self, session: str, ino: int) -> dict:
        await self._durable()
        return self._attrs(self._inode(ino))

    async def op_readdir(self, session: str, ino: int) -> list:
        await self._durable()
        names = self._dir(ino)
        return [[name, self._attrs(self.state.inodes[child])] for name, child in names.items()]

    async def op_readlink(self, session: str, ino: int) -> bytes:
        await self._durable()
        inode = self._inode(ino)
        if not stat.S_ISLNK(inode.mode):
            raise MetaError(errno.EINVAL)
        return inode.target

    async def op_getxattr(self, session: str, ino: int, name: bytes) -> bytes:
        await self._durable()
        value = self._inode(ino).xattrs.get(name)
        if value is None:
            raise MetaError(errno.ENODATA)
        return value

    async def op_listxattr(self, session: str, ino: int) -> list[bytes]:
        await self._durable()
        return list(self._inode(ino).xattrs)

    async def op_statfs(self, session: str) -> dict:
        await self._durable()
        allocator = self.state.allocator
        return {
            "unit_size": self.unit,
            "units": allocator.units,
            "free_units": allocator.free_count,
            "files": len(self.state.inodes),
            "name_max": NAME_MAX,
        }

    async def op_sync(self, session: str) -> None:
        await self._durable()

    # -- namespace changes ---------------------------------------------------------------------

    async def op_mknod(self, session: str, parent: int, name: bytes, mode: int, uid: int,
                       gid: int, rdev: int = 0, target: bytes = b"", *,
                       opened: bool = False) -> dict:
        self._check_name(name)
        async with self._mutation():
            names = self._dir(parent)
            if name in names:
                raise MetaError(errno.EEXIST)
            parent_inode = self._inode(parent)
            if parent_inode.mode & stat.S_ISGID:
                gid = parent_inode.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            ino = self.state.next_ino
            op = {"op": "mknod", "ino": ino, "parent": parent, "name": name, "mode": mode,
                  "uid": uid, "gid": gid, "rdev": rdev, "target": target, "t": self._now()}
            seq = self._append(op)
            attrs = self._attrs(self.state.inodes[ino])
            attrs["parent_attrs"] = [self._attrs(parent_inode)]
            if opened:
                self._count_open(session, ino)
        await self._durable(seq)
        await self._forget(session, wait=False, inos=[parent])
        return attrs

    async def op_create(self, session: str, parent: int, name: bytes, mode: int, uid: int,
                        gid: int) -> dict:
        """Make a regular file and open it for the session, in one round trip. The open
        counts from the moment the file exists, so nobody can reclaim it in between."""
        if not stat.S_ISREG(mode):
            raise MetaError(errno.EINVAL, "create makes regular files only")
        attrs = await self.op_mknod(session, parent, name, mode, uid, gid, opened=True)
        return dict(self._open_reply(self._inode(attrs["ino"])),
                    parent_attrs=attrs["parent_attrs"])

    def _count_open(self, session: str, ino: int) -> None:
        holders = self.open_files.setdefault(ino, Counter())
        if len(holders) == 1 and session not in holders:
            self._shared_from[ino] = next(iter(holders))  # a handoff may be starting
        holders[session] += 1

    def _note_handoff(self, ino: int) -> None:
        """A file open on one node, then on two, is now open on one again: if that is
        the other node, the file was handed off (a VM's live migration, say)."""
        holders = self.open_files.get(ino)
        if holders is not None and len(holders) > 1:
            return
        source = self._shared_from.pop(ino, None)
        target = next(iter(holders), None) if holders else None
        if source is not None and target is not None and target != source:
            path = self.state.paths([ino]).get(ino, f"inode {ino}")
            self.events.emit("handoff", f"{path} (inode {ino}) handed off from {source} "
                             f"to {target}")

    def _open_reply(self, inode: Inode) -> dict:
        return dict(self._map_reply(inode), attrs=self._attrs(inode))

    async def op_link(self, session: str, ino: int, parent: int, name: bytes) -> dict:
        self._check_name(name)
        async with self._mutation():
            inode = self._inode(ino)
            if inode.is_dir:
                raise MetaError(errno.EPERM)
            if inode.nlink == 0:
                raise MetaError(errno.ENOENT)
            if name in self._dir(parent):
                raise MetaError(errno.EEXIST)
            seq = self._append({"op": "link", "ino": ino, "parent": parent, "name": name,
                                "t": self._now()})
            attrs = dict(self._attrs(inode), parent_attrs=[self._attrs(self._inode(parent))])
        await self._durable(seq)
        await self._forget(session, wait=False, inos=[parent])
        return attrs

    async def op_unlink(self, session: str, parent: int, name: bytes, is_dir: bool) -> dict:
        async with self._mutation():
            ino = self._dir(parent).get(name)
            if ino is None:
                raise MetaError(errno.ENOENT)
            inode = self._inode(ino)
            self._check_removable(inode, want_dir=is_dir)
            seq = self._append({"op": "unlink", "parent": parent, "name": name,
                                "t": self._now(), "reclaim": self._reclaimable(inode)})
            reply = {"parent_attrs": [self._attrs(self._inode(parent))]}
        await self._durable(seq)
        if inode.is_dir:
            await self._forget(session, wait=True, inos=[parent], entries=[(parent, name)])
        else:
            await self._forget(session, wait=False, inos=[parent])
        return reply

    def _check_removable(self, inode: Inode, want_dir: bool) -> None:
        if want_dir and not inode.is_dir:
            raise MetaError(errno.ENOTDIR)
        if not want_dir and inode.is_dir:
            raise MetaError(errno.EISDIR)
        if inode.is_dir and self.state.entries[inode.ino]:
            raise MetaError(errno.ENOTEMPTY)
        if inode.ino == ROOT_INO:
            raise MetaError(errno.EBUSY)

    def _reclaimable(self, inode: Inode) -> bool:
        """Would dropping one name free the inode now? Not while a node has it open."""
        last_name = inode.is_dir or inode.nlink <= 1
        return last_name and (inode.is_dir or not self._is_open(inode.ino))

    async def op_rename(self, session: str, old_parent: int, old_name: bytes, new_parent: int,
                        new_name: bytes, flags: int = 0) -> dict | None:
        self._check_name(new_name)
        async with self._mutation():
            op = self._rename_record(old_parent, old_name, new_parent, new_name, flags)
            if op is None:
                return
            names_a_directory = any(self._names_directory(parent, name) for parent, name in
                                    ((old_parent, old_name), (new_parent, new_name)))
            seq = self._append(op)
            parents = sorted({old_parent, new_parent})
            reply = {"parent_attrs": [self._attrs(self._inode(ino)) for ino in parents]}
        await self._durable(seq)
        if names_a_directory:
            await self._forget(session, wait=True, inos=parents,
                               entries=[(old_parent, old_name), (new_parent, new_name)])
        else:
            await self._forget(session, wait=False, inos=parents)
        return reply

    def _names_directory(self, parent: int, name: bytes) -> bool:
        ino = self.state.entries.get(parent, {}).get(name)
        return ino is not None and self.state.inodes[ino].is_dir

    def _rename_record(self, old_parent: int, old_name: bytes, new_parent: int,
                       new_name: bytes, flags: int) -> dict | None:
        moving_ino = self._dir(old_parent).get(old_name)
        if moving_ino is None:
            raise MetaError(errno.ENOENT)
        target_ino = self._dir(new_parent).get(new_name)
        if flags & RENAME_NOREPLACE and target_ino is not None:
            raise MetaError(errno.EEXIST)
        exchange = bool(flags & RENAME_EXCHANGE)
        if exchange and target_ino is None:
            raise MetaError(errno.ENOENT)
        moving = self._inode(moving_ino)
        if moving.is_dir:
            self._check_not_into_itself(moving_ino, new_parent)
        op = {"op": "rename", "old_parent": old_parent, "old_name": old_name,
              "new_parent": new_parent, "new_name": new_name, "t": self._now()}
        if exchange:
            if self._inode(target_ino).is_dir:
                self._check_not_into_itself(target_ino, old_parent)
            return dict(op, exchange=True)
        if target_ino == moving_ino:
            return None  # both names are links to one inode: POSIX says do nothing
        if target_ino is not None:
            target = self._inode(target_ino)
            if moving.is_dir and not target.is_dir:
                raise MetaError(errno.ENOTDIR)
            if not moving.is_dir and target.is_dir:
                raise MetaError(errno.EISDIR)
            self._check_removable(target, want_dir=target.is_dir)
            op["reclaim"] = self._reclaimable(target)
        return op

    def _check_not_into_itself(self, directory: int, new_parent: int) -> None:
        cursor = new_parent
        while True:
            if cursor == directory:
                raise MetaError(errno.EINVAL, "cannot move a directory into itself")
            if cursor == ROOT_INO:
                return
            cursor = self.state.parents[cursor]

    # -- attributes ------------------------------------------------------------------------------

    async def op_setattr(self, session: str, ino: int, changes: dict) -> dict:
        _check_changes(changes)
        if "size" in changes:
            await self._resize(session, ino, changes["size"])
        fields = {key: changes[key] for key in ("mode", "uid", "gid", "atime_ns", "mtime_ns")
                  if key in changes}
        async with self._mutation():
            inode = self._inode(ino)
            seq = None
            written = changes.get("written", False)  # a node's writes, flushed late
            if written and fields.get("mtime_ns", 0) <= self._mtime_set.get(ino, 0):
                pass  # an explicit time set since those writes wins
            elif fields or "size" not in changes:
                if "mtime_ns" in fields and not written:
                    self._mtime_set[ino] = self._now()
                self._drop_setid_on_chown(inode, fields)
                fields.setdefault("ctime_ns", changes.get("ctime_ns", self._now()))
                seq = self._append(dict(fields, op="setattr", ino=ino))
            attrs = self._attrs(inode)
        await self._durable(seq)
        if inode.is_dir and seq is not None:
            await self._forget(session, wait=True, inos=[ino])
        return attrs

    @staticmethod
    def _drop_setid_on_chown(inode: Inode, fields: dict) -> None:
        owner_changes = ("uid" in fields and fields["uid"] != inode.uid) or (
            "gid" in fields and fields["gid"] != inode.gid)
        if not owner_changes or inode.is_dir or "mode" in fields:
            return
        mode = _without_setid(inode.mode, drop_setgid=False)
        if mode != inode.mode:
            fields["mode"] = mode

    async def op_kill_setid(self, session: str, ino: int, groups: list[int]) -> None:
        """A write or O_TRUNC by a caller without CAP_FSETID, whose groups are given.

        Linux drops setuid, and setgid where it marks an executable or the caller is
        not in the file's group. With direct_io the kernel leaves this to us.
        """
        async with self._mutation():
            inode = self._inode(ino)
            mode = _without_setid(inode.mode, drop_setgid=inode.gid not in groups)
            if mode == inode.mode or not inode.is_reg:
                return
            seq = self._append({"op": "setattr", "ino": ino, "mode": mode,
                                "ctime_ns": self._now()})
        await self._durable(seq)

    async def op_setxattr(self, session: str, ino: int, name: bytes, value: bytes) -> None:
        if len(name) > NAME_MAX:
            raise MetaError(errno.ERANGE)
        if len(value) > 64 * 1024:
            raise MetaError(errno.E2BIG)
        async with self._mutation():
            self._inode(ino)
            seq = self._append({"op": "setxattr", "ino": ino, "name": name, "value": value,
                                "t": self._now()})
        await self._durable(seq)

    async def op_removexattr(self, session: str, ino: int, name: bytes) -> None:
        async with self._mutation():
            if name not in self._inode(ino).xattrs:
                raise MetaError(errno.ENODATA)
            seq = self._append({"op": "removexattr", "ino": ino, "name": name,
                                "t": self._now()})
        await self._durable(seq)

    # -- open files ----------------------------------------------------------------------

    async def op_open(self, session: str, ino: int) -> dict:
        # A quiesce of ino counts this node among the holders it pauses, or is over
        # before the map in this reply is taken.
        await self._lock_outside_quiesces([ino])
        try:
            await self._durable()
            inode = self._inode(ino)
            self._count_open(session, ino)
            return self._open_reply(inode)
        finally:
            self._lock.release()

    async def op_release(self, session: str, ino: int) -> None:
        holders = self.open_files.get(ino)
        if holders is None or holders[session] <= 0:
            return
        holders[session] -= 1
        if holders[session] == 0:
            del holders[session]
            self._note_handoff(ino)
        if not holders:
            del self.open_files[ino]
            await self._reclaim_if_unused(ino)

    def open_table(self) -> dict[int, dict[str, int]]:
        return {ino: dict(holders) for ino, holders in self.open_files.items()}

    # -- size and allocation -----------------------------------------------------------

    async def op_extend(self, session: str, ino: int, offset: int, end: int) -> dict:
        """Allocate the units under [offset, end) and grow the size to `end` if needed."""
        async with self._mutation():
            inode = self._regular(ino)
            growing = end > inode.size
            ahead = self._ahead_units(inode) if growing else 0
            op = self._allocation_record(inode, offset, end, ahead)
            if growing:
                op["size"] = end
                op["t"] = self._now()
            seq = await self._commit_map(inode, op)
            reply = self._map_reply(inode)
        await self._publish_map(ino, seq, reply, session)
        return reply

    async def _publish_map(self, ino: int, seq: int | None, reply: dict, requester: str,
                           to_requester: bool = False) -> None:
        """Once the map record `seq` is durable, hand its map to the file's holders."""
        await self._durable(seq)
        if seq is not None:
            holders = self.open_files.get(ino, ())
            await self._hand_out_map(ino, reply, requester, [
                name for name in holders if to_requester or name != requester])

    async def _hand_out_map(self, ino: int, reply: dict, requester: str, names: list[str],
                            resume: bool = False) -> None:
        """Send a durable map (taken when its record was appended) to these nodes, and
        wait until they have it. Every one but the requester also drops the attributes
        its kernel caches of ino; with `resume`, each lifts its pause on ino as well.
        One acknowledged push per node: for a holder that is the whole cost of a change
        to a file it has open. A node drops a map if a newer one got there first."""
        names = [name for name in names if name in self.sessions]
        if requester in names:  # it has nothing to forget, and waits for our reply anyway
            await self.sessions[requester].take_map(ino, reply, resume, forget=False,
                                                    wait=False)
        others = [name for name in names if name != requester]
        if others:  # none for a file open on one node only, like a VM's disk
            async with trio.open_nursery() as nursery:
                for name in others:
                    nursery.start_soon(self._acknowledged, name, f"map of inode {ino}",
                                       partial(_take_map_now, ino, reply, resume))
        touched = _touched.get()
        if touched is not None and not self._untold_holder(ino, requester, names):
            touched.discard(ino)  # every holder has dropped what it cached

    def _untold_holder(self, ino: int, requester: str, told: list[str]) -> bool:
        return any(name in self.sessions and name != requester and name not in told
                   for name in self.open_files.get(ino, ()))

    def _map_reply(self, inode: Inode) -> dict:
        """Size and map with a version, so a node can drop a reply a newer map overtook."""
        return {"size": inode.size, "runs": to_runs(inode.units),
                "version": self.journal.next_seq - 1}

    def _regular(self, ino: int) -> Inode:
        inode = self._inode(ino)
        if inode.is_dir:
            raise MetaError(errno.EISDIR)
        if not inode.is_reg:
            raise MetaError(errno.EINVAL)
        return inode

    def _ahead_units(self, inode: Inode) -> int:
        return min(ALLOCATE_AHEAD_MAX, max(1, len(inode.units) // 4))

    def _allocation_record(self, inode: Inode, offset: int, end: int, ahead: int = 0) -> dict:
        """A map record adding units for [offset, end), plus up to `ahead` units past it."""
        first, last = offset // self.unit, (end - 1) // self.unit
        required = [i for i in range(first, last + 1) if i not in inode.units]
        optional = [i for i in range(last + 1, last + 1 + ahead) if i not in inode.units]
        near = inode.units[max(inode.units)] + 1 if inode.units else None
        allocator = self.state.allocator
        try:
            try:
                chosen = allocator.find(len(required) + len(optional), near)
            except NoSpace:
                chosen = allocator.find(len(required), near)  # allocate-ahead is best effort
        except NoSpace:
            raise MetaError(errno.ENOSPC) from None
        added = dict(zip(required + optional, chosen, strict=False))
        return {"op": "map", "ino": inode.ino, "add": to_runs(added)}

    async def _commit_map(self, inode: Inode, op: dict) -> int | None:
        """Zero what the change exposes, then append and apply a map record. Call with
        the metadata lock held: nothing else may allocate meanwhile.

        The caller sends the new map to the other nodes once the record is durable.
        """
        if not op.get("add") and op.get("size", inode.size) == inode.size and "t" not in op:
            return None  # nothing to change: a node asked with a stale map
        for _file_unit, volume_unit, count in op.get("add", ()):
            await self._zero(self._unit_offset(volume_unit), count * self.unit)
        if op.get("size", 0) > inode.size:
            await self._zero_tail(inode)
        return self._append(op)

    async def _zero(self, offset: int, length: int) -> None:
        """Make a range of the image read as zeros, in a worker thread: a punched hole
        may first wait for the kernel to write out dirty pages there (ext4 does), and
        the event loop must go on renewing the lease and answering nodes meanwhile."""
        await trio.to_thread.run_sync(self.volume.zero, offset, length)

    async def _zero_tail(self, inode: Inode) -> None:
        """Bytes past EOF in the last unit may hold data from before a shrink: clear them.

        Once cleared they stay zero (nothing writes past EOF directly), so a growing
        file pays for this once, not on every extend. After a restart nothing is
        known clean, and each file clears its tail on its first growth.
        """
        if inode.ino in self._clean_tails:
            return
        within = inode.size % self.unit
        volume_unit = inode.units.get(inode.size // self.unit)
        if within and volume_unit is not None:
            await self._zero(self._unit_offset(volume_unit) + within, self.unit - within)
        self._clean_tails.add(inode.ino)

    def _unit_offset(self, volume_unit: int) -> int:
        return self.volume.sb.data.offset + volume_unit * self.unit

    async def _resize(self, session: str, ino: int, size: int) -> None:
        async with self._mutation():
            grows = size >= self._regular(ino).size
            if grows:
                seq, reply = await self._grow(ino, size)
        if grows:  # nothing to free: no quiesce
            await self._publish_map(ino, seq, reply, session, to_requester=True)
            return
        await self._change_quiesced(session, ino, partial(self._shrink, size=size))

    async def _shrink(self, inode: Inode, size: int) -> tuple[int | None, dict]:
        if size >= inode.size:  # it grew meanwhile
            return await self._grow(inode.ino, size)
        keep = -(-size // self.unit)
        drop = [index for index in inode.units if index >= keep]
        self._clean_tails.discard(inode.ino)  # the cut unit keeps old bytes past EOF
        seq = self._append({"op": "map", "ino": inode.ino, "size": size, "t": self._now(),
                            "drop": [[index, 1] for index in sorted(drop)]})
        return seq, self._map_reply(inode)

    async def _change_quiesced(self, session: str, ino: int, change) -> None:
        """A change that may free ino's space: with ino paused at every node that has it
        open, `await change(inode)` under the metadata lock (it appends its record and
        returns (seq, map reply), seq None for no change), commit, then hand the new map
        out with the resume."""
        async with self._quiesced(ino) as holders:
            async with self._mutation():
                seq, reply = await change(self._regular(ino))
            await self._durable(seq)
            if seq is not None:
                await self._resume_with_map(ino, reply, session, holders)

    async def _resume_with_map(self, ino: int, reply: dict, requester: str,
                               paused: list[str]) -> None:
        """End a quiesce: the paused nodes take the new map and go on, in one push."""
        names = list(paused)
        paused.clear()  # nothing left for _paused to resume
        await self._hand_out_map(ino, reply, requester, names, resume=True)

    async def _grow(self, ino: int, size: int) -> tuple[int | None, dict]:
        inode = self._inode(ino)
        seq = await self._commit_map(inode, {"op": "map", "ino": ino, "size": size,
                                             "t": self._now()})
        return seq, self._map_reply(inode)

    @contextlib.asynccontextmanager
    async def _quiesced(self, ino: int):
        """Hold I/O on ino paused at every node that has it open, for a change that frees
        its space. Only this inode waits: the metadata lock is free while the nodes
        answer (or while an evicted one's grant runs out), and one quiesce per inode
        runs at a time. Yields the nodes that paused, to send the new map to."""
        await self._lock_outside_quiesces([ino])
        done = self._quiescing[ino] = trio.Event()
        holders = [name for name in self.open_files.get(ino, ()) if name in self.sessions]
        self._lock.release()
        try:
            async with self._paused(ino, holders) as paused:
                yield paused
        finally:
            del self._quiescing[ino]
            done.set()

    @contextlib.asynccontextmanager
    async def _paused(self, ino: int, holders: list[str]):
        """Pause I/O on ino at these nodes. A node that does not ack in time is evicted,
        and we wait until whatever it was granted has run out."""
        paused = []
        try:
            async with trio.open_nursery() as nursery:
                for name in holders:
                    nursery.start_soon(self._pause_one, name, ino, paused)
            await self._outlast_lingering(ino)
            yield paused
        finally:
            for name in paused:
                if name in self.sessions:
                    self.sessions[name].resume(ino)

    async def _pause_one(self, name: str, ino: int, paused: list) -> None:
        if await self._acknowledged(name, f"pause of inode {ino}",
                                    lambda session: session.pause(ino)):
            paused.append(name)

    async def _acknowledged(self, name: str, what: str, ask) -> bool:
        """`await ask(session)`: a request the node says it has carried out (a pause, an
        invalidation). A node that does not answer in time is evicted; False then."""
        session = self.sessions.get(name)
        if session is None:
            return False
        with trio.move_on_after(math.inf if session.in_process else self.pause_timeout):
            try:
                await ask(session)
                return True
            except Exception as exc:  # its connection broke: it is going anyway
                log.info("%s did not acknowledge %s: %s", name, what, exc)
        self.evict(name, f"did not acknowledge {what} within {self.pause_timeout:g} s")
        return False

    async def _invalidated(self, targets: list[tuple[str, dict]]) -> None:
        """Push each (node, stale) invalidation and wait until every node has done it."""
        if not targets:
            return
        async with trio.open_nursery() as nursery:
            for name, stale in targets:
                nursery.start_soon(self._acknowledged, name, f"invalidation of {stale}",
                                   partial(_invalidate_now, stale))

    async def _forget(self, requester: str, wait: bool, inos=(), entries=()) -> None:
        """Other nodes' kernels cache what there is of directories: their attributes,
        and the names that lead to them (never names of files, nor attributes of
        files). Make them drop what a change made stale. `wait` where the change must
        show at once: a directory renamed, removed, or chmod/chown/utimens'd. Times and
        link counts that other namespace changes move are pushed without waiting."""
        stale = {"inos": list(inos), "entries": [[parent, name] for parent, name in entries]}
        names = [name for name in self.sessions if name != requester]
        if wait:
            await self._invalidated([(name, stale) for name in names])
        else:
            for name in names:
                await self.sessions[name].invalidate(stale, wait=False)

    async def _outlast_lingering(self, ino: int) -> None:
        """Nodes cut off while holding ino may still write to it until their grant ends."""
        for name in list(self.open_files.get(ino, ())):
            until = self.lingering.get(name)
            if until is not None and until > trio.current_time():
                log.info("inode %d: waiting %.2f s for %s's grant to run out", ino,
                         until - trio.current_time(), name)
                await trio.sleep_until(until)

    async def op_fallocate(self, session: str, ino: int, mode: int, offset: int,
                           length: int) -> dict:
        if offset < 0 or length <= 0:
            raise MetaError(errno.EINVAL)
        end = offset + length
        if mode & FALLOC_PUNCH_HOLE:
            if not mode & FALLOC_KEEP_SIZE or mode & ~(FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE):
                raise MetaError(errno.EOPNOTSUPP)
            await self._punch(session, ino, offset, end)
        elif mode & ~(FALLOC_KEEP_SIZE | FALLOC_ZERO_RANGE):
            raise MetaError(errno.EOPNOTSUPP)
        else:
            return await self._allocate(ino, offset, end,
                                        keep_size=bool(mode & FALLOC_KEEP_SIZE),
                                        zero=bool(mode & FALLOC_ZERO_RANGE), session=session)
        await self._durable()
        return self._map_reply(self._inode(ino))

    async def _allocate(self, ino: int, offset: int, end: int, keep_size: bool, zero: bool,
                        session: str) -> dict:
        async with self._mutation():
            inode = self._regular(ino)
            if zero:
                await self._zero_mapped(inode, offset, min(end, inode.size))
            op = self._allocation_record(inode, offset, end)
            if not keep_size and end > inode.size:
                op["size"] = end
            if op["add"] or "size" in op or zero:
                op["t"] = self._now()
            seq = await self._commit_map(inode, op)
            reply = self._map_reply(inode)
        await self._publish_map(ino, seq, reply, session)
        return reply

    async def _punch(self, session: str, ino: int, offset: int, end: int) -> None:
        self._regular(ino)
        await self._change_quiesced(session, ino, partial(self._drop_range, start=offset,
                                                          end=end))

    async def _drop_range(self, inode: Inode, start: int, end: int) -> tuple[int, dict]:
        """Free the whole units in [start, end) and zero the partial ones at its edges."""
        first_whole, end_whole = -(-start // self.unit), end // self.unit
        drop = [index for index in inode.units if first_whole <= index < end_whole]
        await self._zero_mapped(inode, start, min(end, first_whole * self.unit))
        await self._zero_mapped(inode, max(start, end_whole * self.unit), end)
        seq = self._append({"op": "map", "ino": inode.ino, "t": self._now(),
                            "drop": [[index, 1] for index in sorted(drop)]})
        return seq, self._map_reply(inode)

    async def _zero_mapped(self, inode: Inode, start: int, end: int) -> None:
        for piece_start, piece_end, file_unit in pieces(start, end, self.unit):
            mapped = inode.units.get(file_unit)
            if mapped is not None:
                within = piece_start % self.unit
                await self._zero(self._unit_offset(mapped) + within, piece_end - piece_start)


async def _invalidate_now(stale: dict, session: NodeSession) -> None:
    await session.invalidate(stale, wait=True)


async def _take_map_now(ino: int, reply: dict, resume: bool, session: NodeSession) -> None:
    await session.take_map(ino, reply, resume, forget=True, wait=True)


SETATTR_CHANGES = {"size": int, "mode": int, "uid": int, "gid": int, "atime_ns": int,
                   "mtime_ns": int, "ctime_ns": int, "written": bool}


def _check_changes(changes: dict) -> None:
    """setattr's changes reach the journal as they are: refuse what does not belong."""
    for key, value in changes.items():
        expected = SETATTR_CHANGES.get(key)
        if expected is None:
            raise MetaError(errno.EINVAL, f"bad arguments for setattr: unknown change {key!r}")
        if not fits(value, expected) or (expected is int and value < 0):
            raise MetaError(errno.EINVAL, f"bad arguments for setattr: {key} must be a "
                                          f"non-negative {expected.__name__}")


def _without_setid(mode: int, drop_setgid: bool) -> int:
    """Linux's rule: setuid always goes; setgid goes where it marks an executable
    (group-exec set) or when the caller says so."""
    mode &= ~stat.S_ISUID
    if drop_setgid or mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode
