"""The metadata service: the coordinator's authority over every metadata change.

Nodes reach it through `call(session, method, args)`: the coordinator's own
node in process, the others through the RPC endpoint (coordinator/endpoint.py).
A call finds the request's handler, checks its arguments against the handler's
signature (bad input never reaches the journal), and runs it with a `Request`
that travels explicitly down to the record that carries the request out. A
request that must not run twice and already ran (its node lost the answer in a
failover) gets the first answer again. Before the reply goes out, the other
holders of every file the request changed drop what their kernels cache of it.
Nothing leaves the service before it is durable: replies, and the extent maps
pushed to other nodes, both wait for the journal.

The parts, one concern each, from the bottom up:

- coordinator/commit.py: the state, the journal, checkpoints and the lease;
- coordinator/holders.py: the open-file table;
- coordinator/quiesce.py: the sessions of nodes, every acknowledged push to
  them, eviction, and the quiesce of one inode;
- coordinator/allocation.py: extend, fallocate, truncate, punch, append;
- coordinator/attributes.py: getattr, setattr, xattrs;
- coordinator/open_files.py: open, release, join and leave, reclaim;
- coordinator/namespace.py: lookups, and adding, moving and removing names;
- coordinator/locks.py: cluster-wide flock, POSIX and OFD locks;
- coordinator/snapshots.py: snapshot points, copy-on-write, and the requests
  of a backup (which come from outside any node's session: `backup_call`);
- coordinator/redirect.py: the data I/O of nodes whose path to the image
  failed, and each node's I/O mode.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from coordinator import recovery
from coordinator.allocation import Allocation
from coordinator.arguments import check_arguments, fits
from coordinator.attributes import Attributes
from coordinator.commit import Commits, Request
from coordinator.holders import Holders
from coordinator.journal import Journal
from coordinator.listings import Listings
from coordinator.locks import Locks
from coordinator.model import NAME_MAX, MetadataState
from coordinator.namespace import Namespace
from coordinator.open_files import OpenFiles
from coordinator.quiesce import NodeSession, Quiesce, Sessions
from coordinator.redirect import Redirect
from coordinator.snapshots import Snapshots
from csvfs.cluster.errors import MetaError, NotCoordinator
from csvfs.cluster.events import EventLog
from csvfs.cluster.messages import brief
from csvfs.volume.extents import BLOCK
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

# Requests that must not run twice: a node that lost its coordinator mid-call
# sends them again, with the same request id, to the next one.
ONCE_ONLY = frozenset({"mknod", "create", "link", "unlink", "rename", "removexattr", "append"})


class MetadataService:
    def __init__(self, volume: Volume, recovered: recovery.Recovered, epoch: int,
                 events: EventLog, renew_lease: Callable[[], bool] | None = None,
                 on_fenced: Callable[[], None] | None = None):
        """`renew_lease()` renews the coordinator lease at once (False: it is gone);
        `on_fenced()` hears that the service stepped down for good."""
        self.events = events
        self.commits = Commits(volume, recovered, epoch, renew_lease, on_fenced)
        self.holders = Holders(self.commits.state, events)
        self.sessions = Sessions(self.holders, events)
        self.quiesce = Quiesce(self.commits, self.sessions)
        self.snapshots = Snapshots(self.commits, self.sessions, events)
        self.allocation = Allocation(self.commits, self.sessions, self.quiesce, self.snapshots)
        self.attributes = Attributes(self.commits, self.sessions, self.allocation)
        self.open_files = OpenFiles(self.commits, self.holders, self.sessions, self.quiesce,
                                    self.attributes, events)
        self.listings = Listings(self.sessions)
        self.namespace = Namespace(self.commits, self.open_files, self.sessions,
                                   self.attributes, self.listings)
        self.locks = Locks(self.sessions)
        self.redirect = Redirect(self.commits, self.snapshots, events)
        self._homes = _homes(self, self.namespace, self.attributes, self.open_files,
                             self.allocation, self.locks, self.snapshots, self.redirect)

    @property
    def state(self) -> MetadataState:
        return self.commits.state

    @property
    def journal(self) -> Journal:
        return self.commits.journal

    @property
    def epoch(self) -> int:
        return self.commits.epoch

    @property
    def fenced(self) -> bool:
        return self.commits.fenced

    # -- dispatch ---------------------------------------------------------------------------

    async def call(self, session: str, method: str, args: dict):
        home = self._homes.get(method)
        if home is None:
            raise MetaError(errno.ENOSYS, f"unknown method {method!r}")
        handler = getattr(home, f"op_{method}")
        if self.commits.fenced:
            raise NotCoordinator("this node is no longer the coordinator")
        args = dict(args)
        request_id = args.pop("req", None)
        if not fits(request_id, int | None):
            raise MetaError(errno.EINVAL, f"bad arguments for {method}: req must be an int")
        check_arguments(method, handler, args)
        request = Request(session)
        if method in ONCE_ONLY and request_id is not None:
            done = self.state.done.get(session, {}).get(request_id)
            if done is not None:
                return await self._answer_again(request, method, args, done)
            request.once_only = [session, request_id]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s from %s: %s", method, session, brief(args))
        reply = await handler(request, **args)
        if request.touched:
            await self.sessions.tell_holders(request)
        return reply

    async def backup_call(self, requester: str, method: str, args: dict):
        """A request of a backup (messages.BACKUP_REQUESTS), from a process that holds
        the cluster key but is no node: coordinator/snapshots.py serves it."""
        if self.commits.fenced:
            raise NotCoordinator("this node is no longer the coordinator")
        handler = getattr(self.snapshots, "request_" + method.removeprefix("snapshot_"))
        check_arguments(method, handler, args)
        log.debug("%s from %s: %s", method, requester, brief(args))
        return await handler(requester, **args)

    async def _answer_again(self, request: Request, method: str, args: dict, ino: int):
        """The reply to a request that was carried out before its node lost the answer."""
        await self.commits.durable()
        log.info("%s request answered again after a reconnect", method)
        if method == "mknod" or method == "link":
            return self.attributes.of(self.commits.inode(ino or args.get("ino", 0)))
        if method == "append":  # the data is in the file: the node needs the map only
            return self.commits.map_of(self.commits.inode(ino))
        if method == "create":  # the open it made was lost with the session: count it again
            async with self.commits.lock:
                inode = self.commits.inode(ino)
                self.holders.opened(request.session, ino)
                return self.open_files.reply(inode)
        return None

    # -- the volume --------------------------------------------------------------------------

    async def op_statfs(self, request: Request) -> dict:
        await self.commits.durable()
        allocator = self.state.allocator
        return {
            "unit_size": self.commits.unit,
            "units": allocator.units,
            "free_units": allocator.free_count,
            "block_size": BLOCK,
            "blocks": allocator.total_blocks,
            "free_blocks": allocator.free_blocks,
            "files": len(self.state.inodes),
            "name_max": NAME_MAX,
        }

    async def op_sync(self, request: Request, ino: int | None = None,
                      written_ns: int | None = None) -> None:
        """A node's fsync: the time of its writes to `ino`, if given, is recorded first;
        then the data the coordinator wrote (appends) and every record are durable."""
        if ino is not None and written_ns:
            await self.attributes.op_setattr(request, ino, {
                "mtime_ns": written_ns, "ctime_ns": written_ns, "written": True})
        await self.allocation.sync_data()
        await self.commits.durable()

    # -- the coordinator's epoch --------------------------------------------------------------

    async def start(self, reclaim_orphans: bool = True) -> None:
        """Open the epoch. `reclaim_orphans` when no other node can have one open."""
        if reclaim_orphans:
            await self.open_files.reclaim_orphans()
        self.snapshots.adopt()
        # A new journal generation for this epoch: records a stale coordinator might
        # still write under the old generation can then never be replayed.
        await self.commits.checkpoint_now()

    def lease_renewed(self, deadline: float) -> None:
        """The lease is surely ours until this trio time: commit until then."""
        self.commits.lease_deadline = deadline

    def close(self) -> None:
        """Stop serving at a clean shutdown: later requests hear NotCoordinator."""
        self.commits.fenced = True

    async def checkpoint_now(self) -> None:
        await self.commits.checkpoint_now()

    # -- sessions -------------------------------------------------------------------------------

    async def join(self, session: NodeSession, opens: list) -> list:
        return await self.open_files.join(session, opens)

    async def leave(self, name: str, writing_until: float | None = None) -> None:
        await self.open_files.leave(name, writing_until)
        if name not in self.sessions:  # gone for good, not back with a new registration
            self.locks.node_gone(name)
            self.redirect.forget(name)

    async def reclaim_orphans(self) -> None:
        await self.open_files.reclaim_orphans()

    def open_table(self) -> dict[int, dict[str, int]]:
        return self.holders.table()


def _homes(*parts) -> dict:
    """The part whose op_NAME method serves each request NAME; a name has one home."""
    homes = {}
    for part in parts:
        for attribute in dir(part):
            if attribute.startswith("op_"):
                name = attribute.removeprefix("op_")
                if name in homes:
                    raise AssertionError(f"two handlers for {name}")
                homes[name] = part
    return homes

