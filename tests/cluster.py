"""Test helpers: make volumes and run csvfs nodes as real subprocesses.

What the scripts need too (mounts, /proc, csvfs status and events, starting and
stopping a node) is in scripts/nodes.py; this is the tests' own layer on top of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from csvfs.volume.image import KEY_ENVIRONMENT
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


# CSVFS_TEST_VOLUME=loop: the volumes the tests make are loop devices (over a sparse
# file, with `losetup --direct-io=on`), which the nodes open with O_DIRECT, as they
# would a LUN shared by several hosts; their key files are named by CSVFS_KEY.
ON_LOOP_DEVICES = os.environ.get("CSVFS_TEST_VOLUME") == "loop"
LOOP_DEVICES: list[tuple[str, str | None]] = []  # (device, CSVFS_KEY before it)


def make_volume(directory: Path, size: str = "256M", unit: str | None = None) -> Path:
    image = directory / "vol.img"
    unit_args = ["--unit", unit] if unit else []
    if ON_LOOP_DEVICES:
        return make_loop_volume(directory, size, unit_args)
    csvfs("mkfs", image, "--size", size, *unit_args)
    return image


def make_loop_volume(directory: Path, size: str, unit_args: list[str]) -> Path:
    """A volume on a loop device over directory/vol.backing (see ON_LOOP_DEVICES);
    detach_loop_devices() undoes it."""
    backing = directory / "vol.backing"
    # The volumes of one test share a key, as the volumes of one cluster may.
    key = Path(os.environ[KEY_ENVIRONMENT]) if LOOP_DEVICES else directory / "vol.key"
    subprocess.run(["truncate", "-s", size, backing], check=True)
    device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", backing],
                            check=True, capture_output=True, text=True).stdout.strip()
    LOOP_DEVICES.append((device, os.environ.get(KEY_ENVIRONMENT)))
    os.environ[KEY_ENVIRONMENT] = os.fspath(key)  # for the nodes and every csvfs command
    csvfs("mkfs", device, *unit_args)
    return Path(device)


def detach_loop_devices() -> None:
    """Detach the tests' loop devices (after their nodes stopped) and restore CSVFS_KEY."""
    while LOOP_DEVICES:
        device, key_before = LOOP_DEVICES.pop()
        subprocess.run(["losetup", "--detach", device], capture_output=True)
        if key_before is None:
            os.environ.pop(KEY_ENVIRONMENT, None)
        else:
            os.environ[KEY_ENVIRONMENT] = key_before


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
