"""The local writer protocol's shared definitions: where a node's writer socket is, and
the messages on it. A workload (vmload, say) speaks it without any other part of
csvfs, so it lives at the bottom layer; csvfs/writers.py is the node's side.

A workload that owns files on a mount connects to the Unix socket of the node
that serves the mount and registers as their writer. The connection stays
open: closing it unregisters. On it, one JSON object per line:

    workload -> node  {"op": "register", "name": str, "files": [{"path": str, "ino": int}]}
    node -> workload  {"op": "registered", "inos": [int...]}
    node -> workload  {"op": "freeze", "id": int, "timeout": float}
    workload -> node  {"op": "frozen", "id": int}  or  {"op": "failed", "id": int, "error": str}
    node -> workload  {"op": "thaw", "id": int}
    workload -> node  {"op": "thawed", "id": int}

Freeze means: flush (every write acknowledged so far is durable) and hold new
writes, then answer; thaw means go on. A freeze not answered within its timeout
has failed. The node finds the socket's path from its mountpoint, and so does
the workload, from the mount its file is on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

RUN_DIR = Path(os.environ.get("CSVFS_RUN_DIR", "/run/csvfs"))
FREEZE_TIMEOUT = 10.0  # seconds a writer has to flush and hold

REGISTER, REGISTERED = "register", "registered"
FREEZE, FROZEN, FAILED = "freeze", "frozen", "failed"
THAW, THAWED = "thaw", "thawed"


def socket_path(mountpoint: str | os.PathLike) -> Path:
    """The writer socket of the node that serves this mountpoint."""
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return RUN_DIR / f"writers-{digest}.sock"


def mount_of(path: str | os.PathLike) -> Path:
    """The mountpoint a file is on."""
    current = Path(os.path.realpath(path))
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return current


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    """One message; ValueError if the line is not one."""
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError("not a writer protocol message")
    return message
