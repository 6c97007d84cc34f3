"""Redirected I/O, the node's side: its data keeps flowing when its own path to the
image fails.

The whole sequence (coordinator/redirect.py is the other side):

1. The data path does every pread, pwrite and fdatasync of file data through this
   module's `StoragePath`. When one fails (a real I/O error, or the fault that
   `csvfs fault IMAGE --node NAME storage-down` injects at that very call), the
   node switches the volume to Redirected, with the reason, and does the same
   request again through the coordinator: IO_READ, IO_WRITE and IO_SYNC carry
   file offsets, and the coordinator finds the units in its own map under its
   metadata lock and does the I/O on the image. The application sees no error.
   A write returns once it is on the image, an fsync once it is durable, as in
   Direct mode.
2. The node tells the coordinator every change of mode (IO_MODE {mode, reason}),
   and again when it joins a new coordinator. The coordinator keeps each node's
   mode for `csvfs status` and writes every transition to the event ring.
3. While Redirected because its path failed, the node probes the path every
   PROBE_INTERVAL (a read of the superblock, through the same call that failed)
   and goes back to Direct once it works.
4. `csvfs redirect IMAGE --node NAME on|off` is a user's request: the node stays
   Redirected until it is lifted, whatever its path does.

The invariant: a request redirected to the coordinator meets the same gates as a
direct one (pauses, snapshot holds, the session's validity), and the coordinator
writes only inside the file's current map, so no unit freed or given to another
file is ever written. Nothing here knows about RPC: the node's `meta` callable
carries the requests.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from functools import partial

log = logging.getLogger(__name__)

DIRECT = "direct"
REDIRECTED = "redirected"
PROBE_INTERVAL = 0.5  # seconds between probes of a lost path

# Why a node is Redirected (the reason text starts with one of these)
PATH_LOST = "storage path lost"
USER_REQUEST = "user request"

# What `csvfs fault` and `csvfs redirect` ask a node to do (the CONTROL request)
STORAGE_DOWN = "storage-down"
STORAGE_UP = "storage-up"
REDIRECT_ON = "redirect-on"
REDIRECT_OFF = "redirect-off"
ACTIONS = (STORAGE_DOWN, STORAGE_UP, REDIRECT_ON, REDIRECT_OFF)


class StoragePath:
    """This node's path to the image: the data I/O calls, an injected fault, and the
    mode (Direct or Redirected) with its reason and since when."""

    def __init__(self, fd: int, pread=None, pwrite=None):
        """pread and pwrite: the image's own calls (Volume.pread and Volume.pwrite,
        which are O_DIRECT's where the image is open so); os.pread and os.pwrite on fd
        by default."""
        self.fd = fd
        self._image_pread = pread or partial(os.pread, fd)
        self._image_pwrite = pwrite or partial(os.pwrite, fd)
        self.mode = DIRECT
        self.redirected = False  # mode == REDIRECTED: asked on every read and write
        self.reason = ""
        self.since_ns = time.time_ns()
        self.fault = False  # `csvfs fault ... storage-down`: every call fails with EIO
        self.by_user = False  # `csvfs redirect ... on`
        self.lost = ""  # why a call failed, while no probe has worked since
        self.on_change: Callable[[], None] = lambda: None  # the node reports the new mode
        # The data path stops its fast lane while calls fail or I/O is redirected.
        self.on_path_change: Callable[[], None] = lambda: None
        self._set_calls()

    # -- the calls -------------------------------------------------------------------------

    def _set_calls(self) -> None:
        """pread(length, position), pwrite(data, position), fdatasync(): the image's
        own calls (the system calls themselves, with no Python frame in the way, unless
        the image is open with O_DIRECT), or, while a fault is injected, calls that fail
        as a lost path does."""
        if self.fault:
            self.pread = self.pwrite = self.fdatasync = _injected_failure
        else:
            self.pread = self._image_pread
            self.pwrite = self._image_pwrite
            self.fdatasync = partial(os.fdatasync, self.fd)
        self.on_path_change()

    def probe(self) -> bool:
        """Does the path work again? A read of the superblock's first sector."""
        try:
            self.pread(512, 0)
        except OSError:
            return False
        return True

    # -- the mode --------------------------------------------------------------------------

    def failed(self, call: str, exc: OSError) -> None:
        """A call on the path failed: Redirected, until a probe works."""
        self.lost = f"{PATH_LOST}: {call} failed: {exc.strerror or exc}"
        self._settle(self.lost)

    def probed(self) -> None:
        """A probe worked: the path is back."""
        if self.lost and not self.fault:
            self.lost = ""
            self._settle("storage path works again")

    def control(self, action: str) -> None:
        """`csvfs fault` and `csvfs redirect` (ACTIONS)."""
        if action in (STORAGE_DOWN, STORAGE_UP):
            self.fault = action == STORAGE_DOWN  # seen at the next call, as a real failure
            self._set_calls()
        elif action in (REDIRECT_ON, REDIRECT_OFF):
            self.by_user = action == REDIRECT_ON
            self._settle(f"{USER_REQUEST}: csvfs redirect {'on' if self.by_user else 'off'}")
        else:
            raise ValueError(f"unknown action {action!r}")

    def _settle(self, why: str) -> None:
        """Set the mode from the causes; report a change."""
        if self.by_user:
            mode, reason = REDIRECTED, f"{USER_REQUEST} (csvfs redirect on)"
        elif self.lost:
            mode, reason = REDIRECTED, self.lost
        else:
            mode, reason = DIRECT, why
        if mode == self.mode and reason == self.reason:
            return
        changed = mode != self.mode
        self.mode, self.reason = mode, reason
        self.redirected = mode == REDIRECTED
        self.on_path_change()
        if changed:
            self.since_ns = time.time_ns()
            log.warning("I/O mode %s: %s", mode, reason)
        self.on_change()

    def state(self) -> dict:
        """What the coordinator and `csvfs status` hear: `path_lost` says whether this
        node could coordinate (a user's redirect leaves its path working)."""
        return {"mode": self.mode, "reason": self.reason, "since_ns": self.since_ns,
                "path_lost": bool(self.lost)}


def _injected_failure(*_args) -> None:
    raise OSError(errno.EIO, "storage path down (injected by csvfs fault)")
