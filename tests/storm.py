"""A metadata storm for crash tests: random namespace changes, each logged once acknowledged.

Run as `python -m tests.storm MOUNTPOINT ACKLOG SEED`. Before each operation
it logs the intent ("begin"), after it returns it logs "ack"; both lines are
flushed to a file outside the mount, so a verifier knows which changes were
acknowledged and which single one was in flight when the node died.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path


class Model:
    """What the tree must look like: relative path -> ('dir', mode) or ('file', mode, data)."""

    def __init__(self):
        self.tree: dict[str, tuple] = {}

    def apply(self, op: dict) -> None:
        kind, path = op["op"], op["path"]
        if kind == "mkdir":
            self.tree[path] = ("dir", 0o755)
        elif kind == "rmdir" or kind == "unlink":
            del self.tree[path]
        elif kind == "create":
            self.tree[path] = ("file", 0o644, op["data"])
        elif kind == "append":
            _, mode, data = self.tree[path]
            self.tree[path] = ("file", mode, data + op["data"])
        elif kind == "truncate":
            _, mode, data = self.tree[path]
            self.tree[path] = ("file", mode, data[: op["size"]])
        elif kind == "chmod":
            entry = self.tree[path]
            self.tree[path] = (entry[0], op["mode"], *entry[2:])
        elif kind == "rename":
            self.tree[op["to"]] = self.tree.pop(path)

    def files(self) -> list[str]:
        return [p for p, e in self.tree.items() if e[0] == "file"]

    def dirs(self) -> list[str]:
        return [p for p, e in self.tree.items() if e[0] == "dir"]


def choose(model: Model, rng: random.Random, counter: int) -> dict:
    files, dirs = model.files(), model.dirs()
    parents = [""] + dirs
    roll = rng.random()
    if roll < 0.3 or not files:
        parent = rng.choice(parents)
        data = rng.randbytes(rng.choice([0, 100, 5000, 70000, 1 << 20]))
        return {"op": "create", "path": os.path.join(parent, f"f{counter}"), "data": data}
    if roll < 0.4:
        return {"op": "mkdir", "path": os.path.join(rng.choice(parents), f"d{counter}")}
    if roll < 0.5:
        empty = [d for d in dirs if not any(p.startswith(d + "/") for p in model.tree)]
        if empty:
            return {"op": "rmdir", "path": rng.choice(empty)}
    path = rng.choice(files)
    if roll < 0.6:
        return {"op": "unlink", "path": path}
    if roll < 0.7:
        return {"op": "append", "path": path, "data": rng.randbytes(rng.choice([10, 4096, 300000]))}
    if roll < 0.8:
        size = len(model.tree[path][2])
        return {"op": "truncate", "path": path, "size": rng.randint(0, size)}
    if roll < 0.9:
        return {"op": "chmod", "path": path, "mode": rng.choice([0o600, 0o640, 0o755, 0o4755])}
    target = rng.choice(files)
    if target == path:
        target = os.path.join(rng.choice(parents), f"r{counter}")
    return {"op": "rename", "path": path, "to": target}


def perform(root: Path, op: dict) -> None:
    path = root / op["path"]
    kind = op["op"]
    if kind == "mkdir":
        os.mkdir(path)
    elif kind == "rmdir":
        os.rmdir(path)
    elif kind == "unlink":
        os.unlink(path)
    elif kind in ("create", "append"):
        flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if kind == "create" else os.O_APPEND)
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, op["data"])
            os.fsync(fd)
        finally:
            os.close(fd)
    elif kind == "truncate":
        os.truncate(path, op["size"])
    elif kind == "chmod":
        os.chmod(path, op["mode"])
    elif kind == "rename":
        os.rename(path, root / op["to"])


def encode(op: dict) -> str:
    clean = dict(op)
    if "data" in clean:
        clean["data"] = clean["data"].hex()
    return json.dumps(clean)


def decode(line: str) -> dict:
    op = json.loads(line)
    if "data" in op:
        op["data"] = bytes.fromhex(op["data"])
    return op


def storm(root: Path, log_path: Path, seed: int, limit: int = 100000) -> None:
    rng = random.Random(seed)
    model = Model()
    with open(log_path, "w") as log:
        for counter in range(limit):
            op = choose(model, rng, counter)
            log.write("begin " + encode(op) + "\n")
            log.flush()
            perform(root, op)
            log.write("ack\n")
            log.flush()
            model.apply(op)


def expected_states(log_path: Path) -> tuple[Model, set[str]]:
    """The tree after all acknowledged ops, and the paths of the op in flight (if any)."""
    model, pending = Model(), None
    lines = log_path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("begin "):
            try:
                pending = decode(line[6:])
            except ValueError:
                if number < len(lines):
                    raise
                # the storm was killed while writing this line, before the op began
                pending = None
        elif line == "ack" and pending is not None:
            model.apply(pending)
            pending = None
    if pending is None:
        return model, set()
    return model, {path for path in (pending["path"], pending.get("to")) if path}


def actual_tree(root: Path) -> dict[str, tuple]:
    tree = {}
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            full = Path(directory, name)
            tree[str(full.relative_to(root))] = ("dir", os.lstat(full).st_mode & 0o7777)
        for name in files:
            full = Path(directory, name)
            mode = os.lstat(full).st_mode & 0o7777
            tree[str(full.relative_to(root))] = ("file", mode, full.read_bytes())
    return tree


if __name__ == "__main__":
    try:
        storm(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
    except OSError as exc:  # the node was killed under us: that is the point
        print(f"storm stopped: {exc}", file=sys.stderr)
        sys.exit(3)
