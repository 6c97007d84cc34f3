"""Test helpers: make volumes and run csvfs nodes as real subprocesses.

What the scripts need too (mounts, /proc, csvfs status and events, starting and
stopping a node) is in scripts/nodes.py; this is the tests' own layer on top of it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scripts.nodes import MountProcess, csvfs_command, csvfs_mount_command, status_json

CSVFS = csvfs_command()
LOG_PROBLEMS = ("Traceback", " ERROR ", " CRITICAL ")


def csvfs(*args, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([*CSVFS, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"csvfs {args} failed ({result.returncode}): {result.stderr}")
    return result


def status(image: Path) -> dict:
    """`csvfs status --json`; the coordinator must have answered."""
    report = status_json(image)
    assert "error" not in report, report["error"]
    return report


def make_volume(directory: Path, size: str = "256M", unit: str | None = None) -> Path:
    image = directory / "vol.img"
    args = ["mkfs", image, "--size", size]
    if unit:
        args += ["--unit", unit]
    csvfs(*args)
    return image


class Node(MountProcess):
    """One `csvfs mount --foreground` process with its own mountpoint and log
    (scripts/nodes.py starts and stops it)."""

    def __init__(self, image: Path, mountpoint: Path, name: str = "node1", *extra: str,
                 env: dict | None = None):
        self.image = image
        self.name = name
        self.log = mountpoint.parent / f"{name}.log"
        super().__init__(csvfs_mount_command(image, mountpoint, "--name", name,
                                             "--log", self.log, *extra),
                         mountpoint, label=f"node {name}", log=self.log, env=env)

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def slot(self) -> dict:
        """This node's record in the volume's lease region."""
        from csvfs.cluster.election import read_slot
        from csvfs.volume import format as fmt
        from csvfs.volume.image import Volume

        volume = Volume.open(self.image)
        try:
            for slot in range(fmt.MAX_NODES):
                record = read_slot(volume, slot)
                if record and record["name"] == self.name and record["pid"] == self.process.pid:
                    return record
        finally:
            volume.close()
        raise AssertionError(f"node {self.name} has no slot")

    def rpc_address(self) -> str:
        return self.slot()["address"]

    def log_problems(self) -> list[str]:
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines()
                if any(marker in line for marker in LOG_PROBLEMS)]


class FdHolder:
    """tests/fd_holder.py: a file held open on a mount by a process of its own.

    Use it as a context manager; it is killed on the way out. See fd_holder.py for
    why the test process must not hold the file itself.
    """

    def __init__(self, path: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "tests.fd_holder", str(path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def answer(self) -> str:
        return self.process.stdout.readline().strip()

    def ask(self, command: str) -> str:
        self.send(command)
        return self.answer()

    def __enter__(self) -> FdHolder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self.process.stdin.close()
        self.process.stdout.close()


class LockHolder(FdHolder):
    """tests/lock_holder.py: a process of its own that takes and holds locks on
    mounts; `ask` one command, or `send` a blocking one and read its `answer` later."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-m", "tests.lock_holder"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def pid(self) -> int:
        return int(self.ask("pid").split()[1])

    def ready(self) -> bool:
        """An answer is waiting (a blocking command returned)."""
        import select

        return bool(select.select([self.process.stdout], [], [], 0)[0])
