"""A thread of its own for blocking calls that come one after another.

`trio.to_thread.run_sync` hands each call to a thread of its cache and the
result back through trio's `run_sync_soon`: about 60 us a round trip on a
2-CPU machine, which a journal commit or a node's fdatasync pays on every call.
A thread that waits on a condition, and reports through an eventfd that the
trio task waits on, takes less than half of that (measured side by side).

One call at a time: callers queue on a trio lock. As with to_thread's
default, a call is never abandoned: a cancelled caller still waits for its
call to finish, so that the next one never sees its result.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import trio


class BlockingCalls:
    """`await calls.run(fn, *args)`: fn(*args) on this object's thread."""

    def __init__(self, name: str):
        self.name = name
        self._lock = trio.Lock()
        self._ready = threading.Condition()
        self._call: tuple[Callable[..., Any], tuple] | None = None
        self._outcome: tuple[bool, Any] | None = None
        self._done_fd = -1
        self._pid = 0  # the process that started the thread (a fork has none)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            self._lock.acquire_nowait()  # no trip through the scheduler when free
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            self._start()
            with self._ready:
                self._call = (fn, args)
                self._ready.notify()
            with trio.CancelScope(shield=True):
                await self._wait_done()
            succeeded, value = self._outcome
            self._outcome = None
        finally:
            self._lock.release()
        if succeeded:
            return value
        raise value

    def _start(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._done_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            threading.Thread(target=self._serve, name=self.name, daemon=True).start()

    async def _wait_done(self) -> None:
        while True:
            try:
                os.eventfd_read(self._done_fd)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._done_fd)

    def _serve(self) -> None:
        while True:
            with self._ready:
                while self._call is None:
                    self._ready.wait()
                (fn, args), self._call = self._call, None
            try:
                self._outcome = (True, fn(*args))
            except BaseException as exc:  # the caller raises it
                self._outcome = (False, exc)
            os.eventfd_write(self._done_fd, 1)
