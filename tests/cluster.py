"""Test helpers: make volumes and run csvfs nodes as real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CSVFS = [sys.executable, "-m", "csvfs.cli"]
LOG_PROBLEMS = ("Traceback", " ERROR ", " CRITICAL ")


def csvfs(*args, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([*CSVFS, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"csvfs {args} failed ({result.returncode}): {result.stderr}")
    return result


def is_mounted(path: Path) -> bool:
    target = os.fspath(path)
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def mounts_under(directory: Path) -> list[str]:
    """Mountpoints at or below directory (a prefix match on /proc/mounts)."""
    prefix = os.fspath(directory) + "/"
    with open("/proc/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]


def force_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", os.fspath(path)], capture_output=True)


def make_volume(directory: Path, size: str = "256M", unit: str | None = None) -> Path:
    image = directory / "vol.img"
    args = ["mkfs", image, "--size", size]
    if unit:
        args += ["--unit", unit]
    csvfs(*args)
    return image


class Node:
    """One `csvfs mount --foreground` process with its own mountpoint and log."""

    def __init__(self, image: Path, mountpoint: Path, name: str = "node1", *extra: str,
                 env: dict | None = None):
        self.env = {**os.environ, **(env or {})}
        self.image = image
        self.mountpoint = mountpoint
        self.name = name
        self.log = mountpoint.parent / f"{name}.log"
        self.extra = extra
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> Node:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        command = [*CSVFS, "mount", self.image, self.mountpoint, "--foreground",
                   "--name", self.name, "--log", self.log, *self.extra]
        self.process = subprocess.Popen(list(map(str, command)), env=self.env,
                                        stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            if self.process.poll() is not None:
                raise AssertionError(f"node {self.name} exited {self.process.returncode}: "
                                     f"{self.process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"node {self.name} did not mount within {timeout}s")
            time.sleep(0.02)
        return self

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def unmount(self, timeout: float = 20) -> int:
        """Clean unmount, as a user would do it; returns the node's exit code."""
        subprocess.run(["fusermount3", "-u", os.fspath(self.mountpoint)], check=True,
                       capture_output=True)
        return self.process.wait(timeout=timeout)

    def kill(self, sig: int = signal.SIGKILL, unmount: bool = True) -> None:
        """Kill the node. With unmount=False the dead mount stays (ENOTCONN) until
        stop(), so a workload cannot fall through into the bare mountpoint directory."""
        self.process.send_signal(sig)
        self.process.wait(timeout=20)
        if unmount:
            force_unmount(self.mountpoint)

    def stop(self) -> None:
        """Teardown: always leaves no mount and no process behind."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a test may have left it stopped
        if is_mounted(self.mountpoint):
            force_unmount(self.mountpoint)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()

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
