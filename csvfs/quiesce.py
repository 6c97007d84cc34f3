"""The quiesce protocol, node side (coordinator/quiesce.py is the coordinator's side).

It protects the hard rule: no node ever writes to an allocation unit that the
coordinator has freed or given to another file. The coordinator frees units
of a file only while every node that holds the file has closed the file's
I/O gate, and it hands out new maps before anyone goes on.

For each file the node has open, the data path keeps a map and a gate
(csvfs/datapath.py): a read or write passes only while the gate is open and
the node's grant runs. FileGates works the gates and maps on the
coordinator's word, in this order for one change:

1. PAUSE(ino): close ino's gate. I/O runs inline in the node's event loop (a
   request that passed the gate completes without yielding), so once the
   push is handled nothing is in flight on ino: the pause is drained, and the
   member acknowledges it (ACK with the push's token).
2. The coordinator commits the change; the node waits at the gate.
3. MAP(ino, size, runs, version, resume, forget): take the new map, unless a
   newer one is here already (a higher version); open the gate if `resume`;
   make the kernel drop the attributes it caches of ino if `forget`; then ACK.
   RESUME(ino) opens the gate of a quiesce that changed nothing.
4. Eviction: a node that did not acknowledge in time has its session cut.
   It finds its connection gone (csvfs/member_role.py), its grant void, so
   its data path does no direct I/O at all, and it rejoins: REGISTER lists its
   open files, and `rejoined(maps)` takes the current map of each and opens
   every gate. A file removed meanwhile is closed for good (ESTALE).

MAP without a pause first brings the map of a change that freed nothing (an
extend on another node); INVALIDATE makes the kernel drop cached attributes
and names of directories. Both are acknowledged when the coordinator asks.

Pushes race opens: the coordinator counts a node as a holder from the moment
it serves the open, so a pause or a map of the file may arrive before the
open's reply does. `opening(ino)` around the open request keeps what comes
meanwhile, and `opened` applies it to the new file.

On the coordinator's own node the coordinator calls FileGates in process (it
is that node's NodeSession, never evicted); on a member the same requests
arrive as pushes, which csvfs/inbox.py routes here through `push_handlers`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from csvfs.cluster import messages
from csvfs.datapath import DataPath, OpenFile, map_fields
from csvfs.snapshot import SnapshotHold

log = logging.getLogger(__name__)

ForgetInKernel = Callable[[dict], Awaitable[None]]


class FileGates:
    in_process = True  # as the coordinator's session of its own node

    def __init__(self, name: str, datapath: DataPath, forget_in_kernel: ForgetInKernel):
        self.name = name
        self.datapath = datapath
        # Makes this node's kernel forget what it caches (the node plugs FUSE in here).
        self.forget_in_kernel = forget_in_kernel
        # Files being opened, and what the coordinator said of them before the reply.
        self._opening: Counter[int] = Counter()
        self._early: dict[int, dict] = {}
        # Where the coordinator's word that locks were released goes (csvfs/locks.py).
        self.on_locks_changed: Callable[[int], None] = lambda ino: None
        self.snapshot = SnapshotHold(datapath)  # the snapshot hold (csvfs/snapshot.py)

    def push_handlers(self) -> dict[str, Callable[[dict], Awaitable[None]]]:
        """What a member does with each push of this protocol."""
        return {messages.PAUSE: self._on_pause, messages.MAP: self._on_map,
                messages.RESUME: self._on_resume, messages.INVALIDATE: self.forget_in_kernel,
                **self.snapshot.push_handlers()}

    # -- opens -----------------------------------------------------------------------------

    def opening(self, ino: int) -> _Opening:
        """Wrap the open request: `async with gates.opening(ino): ... gates.opened(...)`."""
        return _Opening(self, ino)

    def opened(self, ino: int, size: int, runs: list, version: int,
               granule: int | None = None, ask: list | None = None,
               stripes: bool = False) -> OpenFile:
        handle = self.datapath.opened(ino, size, runs, version, granule, ask, stripes)
        early = self._early.pop(ino, None)
        if early is not None:
            if "map" in early:
                self.datapath.update_map(ino, *early["map"])
            if early.get("paused"):
                handle.close_gate()
        return handle

    def open_counts(self) -> list[list[int]]:
        """[[ino, handles]...]: what this node registers when it (re)joins."""
        return [[ino, handle.refs] for ino, handle in self.datapath.files.items()]

    def rejoined(self, maps: list) -> None:
        """A new session: take the coordinator's current maps and open every gate."""
        self.snapshot.rejoined()
        for ino, reply in maps:
            handle = self.datapath.files.get(ino)
            if handle is None:
                continue
            if reply is None:
                log.warning("inode %d was removed while this node was cut off", ino)
                handle.gone = True  # for good: its units may be reused
                handle.close_for_good()
                continue
            self.datapath.reset_map(handle, reply)
            handle.open_gate()
        log.debug("rejoined with %d open files", len(maps))

    # -- what the coordinator asks (NodeSession) ---------------------------------------------

    async def pause(self, ino: int) -> None:
        handle = self.datapath.files.get(ino)
        log.debug("inode %d: pause%s", ino, "" if handle else " (not open here)")
        if handle is None:
            self._note_early(ino, paused=True)
        else:
            handle.close_gate()

    def resume(self, ino: int) -> None:
        handle = self.datapath.files.get(ino)
        log.debug("inode %d: resume", ino)
        if handle is None:
            self._note_early(ino, paused=False)
        elif not self.datapath.fenced:
            handle.open_gate()

    async def take_map(self, ino: int, reply: dict, resume: bool, forget: bool,
                       wait: bool = True) -> None:
        """A new map (in this process it is always in place once this returns, `wait`
        or not)."""
        log.debug("inode %d: map version %d, size %d%s", ino, reply["version"], reply["size"],
                  ", resume" if resume else "")
        map_ = map_fields(reply)
        if not self.datapath.update_map(ino, *map_):
            early = self._early.get(ino, {}).get("map")
            if early is None or map_[2] >= early[2]:
                self._note_early(ino, map=map_)
        if resume:
            self.resume(ino)
        if forget:
            await self.forget_in_kernel({"inos": [ino], "entries": []})

    async def invalidate(self, stale: dict, wait: bool) -> None:
        await self.forget_in_kernel(stale)

    def locks_changed(self, ino: int) -> None:
        self.on_locks_changed(ino)

    async def hold(self) -> list:
        return await self.snapshot.hold()

    def snapshot_set(self, version: int) -> None:
        self.snapshot.snapshot_set(version)

    async def freeze_writers(self, freeze_id: int, inos: list[int],
                             timeout: float) -> dict[int, str]:
        return await self.snapshot.freeze_writers(freeze_id, inos, timeout)

    def thaw_writers(self, freeze_id: int) -> None:
        self.snapshot.thaw_writers(freeze_id)

    def _note_early(self, ino: int, **change) -> None:
        if self._opening[ino]:
            self._early.setdefault(ino, {}).update(change)

    # -- the same, pushed to a member ----------------------------------------------------------

    async def _on_pause(self, body: dict) -> None:
        await self.pause(body["ino"])

    async def _on_map(self, body: dict) -> None:
        await self.take_map(body["ino"], body, body.get("resume", False),
                            body.get("forget", False))

    async def _on_resume(self, body: dict) -> None:
        self.resume(body["ino"])


class _Opening:
    def __init__(self, gates: FileGates, ino: int):
        self.gates, self.ino = gates, ino

    async def __aenter__(self) -> None:
        self.gates._opening[self.ino] += 1

    async def __aexit__(self, *exc_info) -> None:
        opening = self.gates._opening
        opening[self.ino] -= 1
        if opening[self.ino] <= 0:
            del opening[self.ino]
            self.gates._early.pop(self.ino, None)
