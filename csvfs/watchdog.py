"""Report a stalled event loop, with the stack it is stuck in.

Every request, heartbeat and lease renewal of a node runs on one trio loop. A
synchronous call that blocks it (a slow disk, a kernel lock) silently costs a
coordinator its lease, so a thread watches the loop tick and logs where the
loop is stuck once it has been quiet for longer than `threshold` seconds.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback

import trio

log = logging.getLogger(__name__)

TICK = 0.1


class LoopWatchdog:
    def __init__(self, threshold: float = 1.0):
        self.threshold = threshold
        self._last_tick = time.monotonic()
        self._loop_thread = 0  # set by run(), on the loop's thread
        self._stop = threading.Event()

    async def run(self) -> None:
        """Tick on the loop, with the watching thread beside it until cancelled."""
        self._loop_thread = threading.get_ident()
        watcher = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        watcher.start()
        try:
            while True:
                self._last_tick = time.monotonic()
                await trio.sleep(TICK)
        finally:
            self._stop.set()

    def _watch(self) -> None:
        stalled = 0.0
        while not self._stop.wait(TICK / 2):
            quiet = time.monotonic() - self._last_tick
            if quiet >= self.threshold and not stalled:
                log.warning("event loop stalled for %.1f s so far, in:\n%s", quiet,
                            self._loop_stack())
            elif quiet < 2 * TICK and stalled:
                log.warning("event loop ran again after a stall of about %.1f s", stalled)
            stalled = quiet if quiet >= self.threshold else 0.0

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return "  (no frame)"
        return "".join(traceback.format_stack(frame)[-12:]).rstrip()
