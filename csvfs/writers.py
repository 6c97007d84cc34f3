"""Writers: workloads registered with this node for their files, frozen for an
application-consistent backup (the VSS writer role). The protocol on the socket
is in csvfs/volume/writer_protocol.py; the freeze's place in a backup is told in
coordinator/snapshots.py.

The node listens on its writer socket for as long as it is mounted. A writer
registers files by inode number (the workload stats its files itself: the node
must never stat its own mount from its event loop). `freeze` asks every writer
of the given inodes on this node at once and returns what each inode's writers
said; `thaw` lets them go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import trio

from csvfs.volume import writer_protocol as wp

log = logging.getLogger(__name__)

MAX_LINE = 64 << 10


class _Writer:
    """One workload's connection."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.name = "?"
        self.inos: set[int] = set()
        self.replies: dict[int, tuple[trio.Event, list]] = {}  # freeze id -> answer
        self.send_lock = trio.Lock()

    async def send(self, message: dict) -> None:
        async with self.send_lock:
            await self.stream.send_all(wp.encode(message))

    async def lines(self):
        buffer = b""
        while True:
            data = await self.stream.receive_some(MAX_LINE)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line
            if len(buffer) > MAX_LINE:
                raise ValueError("line too long")

    async def ask(self, message: dict, timeout: float) -> dict | None:
        """Send a freeze or thaw and wait for its answer (None: none in time, or gone)."""
        event, answer = self.replies[message["id"]] = (trio.Event(), [])
        try:
            await self.send(message)
            with trio.move_on_after(timeout):
                await event.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None
        finally:
            self.replies.pop(message["id"], None)
        return answer[0] if answer else None

    def answered(self, message: dict) -> None:
        waiting = self.replies.get(message.get("id"))
        if waiting is not None:
            waiting[1].append(message)
            waiting[0].set()


class Writers:
    def __init__(self, mountpoint: Path):
        self.path = wp.socket_path(mountpoint)
        self.by_ino: dict[int, set[_Writer]] = {}
        self._frozen: dict[int, list[_Writer]] = {}  # freeze id -> writers it froze
        self._nursery: trio.Nursery | None = None

    async def serve(self) -> None:
        """Listen on the writer socket until cancelled; removes it at the end."""
        listener = await self._listen()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await trio.serve_listeners(self._connection, [listener],
                                           handler_nursery=nursery)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _listen(self) -> trio.SocketListener:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a node that died
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        os.chmod(self.path, 0o660)
        sock.listen(16)
        log.info("writers register at %s", self.path)
        return trio.SocketListener(sock)

    async def _connection(self, stream: trio.SocketStream) -> None:
        writer = _Writer(stream)
        try:
            async for line in writer.lines():
                await self._handle(writer, wp.decode(line))
        except (ValueError, trio.BrokenResourceError, OSError) as exc:
            log.info("writer %s dropped: %s", writer.name, exc)
        finally:
            for event, _answer in writer.replies.values():
                event.set()  # a freeze it had not answered has failed: say so now
            for ino in writer.inos:
                self.by_ino.get(ino, set()).discard(writer)
            if writer.inos:
                log.info("writer %s of inodes %s is gone", writer.name, sorted(writer.inos))
            await stream.aclose()

    async def _handle(self, writer: _Writer, message: dict) -> None:
        if message["op"] == wp.REGISTER:
            writer.name = str(message.get("name", "?"))[:64]
            inos = {int(entry["ino"]) for entry in message.get("files", [])}
            writer.inos |= inos
            for ino in inos:
                self.by_ino.setdefault(ino, set()).add(writer)
            log.info("writer %s registered inodes %s", writer.name, sorted(inos))
            await writer.send({"op": wp.REGISTERED, "inos": sorted(writer.inos)})
        elif message["op"] in (wp.FROZEN, wp.FAILED, wp.THAWED):
            writer.answered(message)
        else:
            raise ValueError(f"unknown message {message['op']!r}")

    # -- what a backup asks (through the coordinator) ---------------------------------------

    async def freeze(self, freeze_id: int, inos: list[int], timeout: float) -> dict[int, str]:
        """Freeze the writers of these inodes on this node: {ino: "frozen" or "failed: why"}
        for each inode that has a writer here."""
        # who writes what, as it was when asked: a writer may leave while it is asked
        asked = {ino: set(self.by_ino.get(ino, ())) for ino in inos}
        targets = set().union(*asked.values()) if asked else set()
        said: dict[_Writer, str] = {}

        async def one(writer: _Writer) -> None:
            answer = await writer.ask({"op": wp.FREEZE, "id": freeze_id, "timeout": timeout},
                                      timeout)
            if answer is None:
                said[writer] = f"failed: {writer.name} did not freeze within {timeout:g} s " \
                               f"(or went away first)"
            elif answer["op"] == wp.FROZEN:
                said[writer] = "frozen"
            else:
                said[writer] = f"failed: {writer.name}: {answer.get('error', 'no reason')}"

        async with trio.open_nursery() as nursery:
            for writer in targets:
                nursery.start_soon(one, writer)
        self._frozen[freeze_id] = [w for w, outcome in said.items() if outcome == "frozen"]
        results = {}
        for ino in inos:
            outcomes = [said[w] for w in asked[ino]]
            if outcomes:
                failed = [o for o in outcomes if o != "frozen"]
                results[ino] = failed[0] if failed else "frozen"
        return results

    def thaw(self, freeze_id: int) -> None:
        """Let the writers a freeze held go on (at once, without waiting for them)."""
        for writer in self._frozen.pop(freeze_id, []):
            if self._nursery is not None:
                self._nursery.start_soon(self._thaw_one, writer, freeze_id)

    async def _thaw_one(self, writer: _Writer, freeze_id: int) -> None:
        if await writer.ask({"op": wp.THAW, "id": freeze_id}, wp.FREEZE_TIMEOUT) is None:
            log.warning("writer %s did not confirm its thaw", writer.name)
