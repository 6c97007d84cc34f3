"""A member's inbox: the coordinator's pushes, in order, to the protocol that
handles each kind, and the acknowledgements the coordinator waits for.

Until the member has applied the maps its registration returned, pushes wait
in order: a pause pushed right after the registration must not be undone by
it. A push whose body carries a token is acknowledged (ACK) once handled.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

PushHandler = Callable[[dict], Awaitable[object]]  # what it returns goes in the ACK


class Inbox:
    def __init__(self, handlers: dict[str, PushHandler], nursery: trio.Nursery,
                 acknowledge: Callable[[int, object], Awaitable[None]]):
        """`handlers` by push kind; `acknowledge(token, result)` tells the coordinator
        a push is done, with what its handler returned."""
        self.handlers = handlers
        self.nursery = nursery
        self.acknowledge = acknowledge
        self._backlog: list | None = []

    async def ready(self) -> None:
        """The registration's maps are in place: handle what waited, then the rest."""
        backlog, self._backlog = self._backlog, None
        for kind, body in backlog:
            await self._handle(kind, body)

    async def notified(self, kind: str, body: dict) -> None:
        """RpcClient's on_notify."""
        if self._backlog is not None:
            self._backlog.append((kind, body))
            return
        await self._handle(kind, body)

    async def _handle(self, kind: str, body: dict) -> None:
        handler = self.handlers.get(kind)
        if handler is None:
            log.warning("ignoring an unknown %r push", kind)
            return
        log.debug("%s push: %s", kind, body)
        result = await handler(body)
        if "token" in body:  # the coordinator waits for this one to be done
            self.nursery.start_soon(self.acknowledge, body["token"], result)
