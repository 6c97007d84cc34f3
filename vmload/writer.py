"""The VM as the writer of its disk (csvfs/volume/writer_protocol.py has the protocol).

A thread keeps one connection to the writer socket of the node whose mount the
disk is on, and registers the disk there. A freeze asked on it is carried out by
the VM's own loop between two writes (`VM._step`): drain the queue, fsync, put
a FROZEN entry with the freeze's id in the record, answer, and hold until the
thaw (or until twice the freeze's time limit, if none comes). So the record says
exactly which writes a backup taken at that freeze must hold.

A mount without a writer socket (not csvfs, or a node too old to have one) just
has no writer: the VM runs as before.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

from csvfs.volume import writer_protocol as wp

FROZEN_REPLY = wp.FROZEN

log = logging.getLogger(__name__)


class WriterLink:
    def __init__(self, name: str):
        self.name = name
        self.sock: socket.socket | None = None
        self.freeze_asked: dict | None = None  # the freeze message the loop must carry out
        self.thawed = threading.Event()
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def connect(self, disk: Path) -> bool:
        """Register as the writer of disk with the node serving its mount (any earlier
        registration ends). False if that mount has no writer socket."""
        self.close()
        path = wp.socket_path(wp.mount_of(disk))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            sock.sendall(wp.encode({"op": wp.REGISTER, "name": self.name,
                                    "files": [{"path": str(disk),
                                               "ino": os.stat(disk).st_ino}]}))
        except OSError as exc:
            sock.close()
            log.info("%s: no writer socket for %s (%s): no application-consistent backups",
                     self.name, disk, exc.strerror or exc)
            return False
        self.sock = sock
        self._reader = threading.Thread(target=self._read, args=(sock,), daemon=True)
        self._reader.start()
        return True

    def _read(self, sock: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                self._handle(wp.decode(line))

    def _handle(self, message: dict) -> None:
        if message["op"] == wp.FREEZE:
            self.thawed.clear()
            self.freeze_asked = message
        elif message["op"] == wp.THAW:
            self.thawed.set()
            self.send({"op": wp.THAWED, "id": message["id"]})

    def send(self, message: dict) -> None:
        with self._lock:
            if self.sock is not None:
                try:
                    self.sock.sendall(wp.encode(message))
                except OSError as exc:
                    log.info("%s: writer socket: %s", self.name, exc)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
