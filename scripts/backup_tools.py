"""The backup tools that scripts/backupbench.py runs side by side: `csvfs backup`, cp,
restic and borg, each as a timed command with its own environment, and the long-running
ones (a backup racing a writer) as processes that can be waited for or killed."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from bench_targets import BenchError

COMMAND_TIMEOUT = 900.0
PASSWORD = "csvfs-backupbench"  # of the throwaway restic and borg repositories


class Tools:
    """csvfs backup, restic and borg with their settings; each call returns wall-clock
    seconds (the process's start included, the same for every tool)."""

    def __init__(self, csvfs: list[str], scratch: Path, image: Path):
        self.csvfs = csvfs
        self.image = image
        self.env = {**os.environ,
                    "RESTIC_PASSWORD": PASSWORD,
                    "RESTIC_CACHE_DIR": os.fspath(scratch / "restic-cache"),
                    "BORG_PASSPHRASE": PASSWORD,
                    "BORG_BASE_DIR": os.fspath(scratch / "borg-home"),
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
        self.children: set[subprocess.Popen] = set()  # killed by kill_children

    def run(self, command: list, what: str, cwd: Path | None = None) -> tuple[float, str]:
        started = time.perf_counter()
        try:
            result = subprocess.run([os.fspath(arg) for arg in command], cwd=cwd,
                                    env=self.env, capture_output=True, text=True,
                                    stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what} did not finish within {COMMAND_TIMEOUT:.0f} s") from None
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            raise BenchError(f"{what} exited {result.returncode}"
                             + (f": {lines[-1]}" if lines else ""))
        return seconds, result.stdout

    def start(self, command: list) -> subprocess.Popen:
        process = subprocess.Popen([os.fspath(arg) for arg in command], env=self.env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        self.children.add(process)
        return process

    def finish(self, process: subprocess.Popen, what: str) -> str:
        try:
            out, err = process.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what} did not finish within {COMMAND_TIMEOUT:.0f} s") from None
        finally:
            self.children.discard(process)
        if process.returncode != 0:
            lines = err.strip().splitlines()
            raise BenchError(f"{what} exited {process.returncode}"
                             + (f": {lines[-1]}" if lines else ""))
        return out

    def kill_children(self) -> None:
        for process in list(self.children):
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=10)
        self.children.clear()

    # csvfs
    def csvfs_init(self, repo: Path, encrypt: bool = False) -> None:
        self.run([*self.csvfs, "backup", "init", repo, *(["--encrypt"] if encrypt else [])],
                 "csvfs backup init")

    def csvfs_backup_command(self, repo: Path, path: str) -> list:
        return [*self.csvfs, "backup", "vm", self.image, "--repo", repo, path, "--json"]

    def csvfs_backup(self, repo: Path, path: str) -> tuple[float, dict]:
        seconds, out = self.run(self.csvfs_backup_command(repo, path), "csvfs backup vm")
        return seconds, json.loads(out)

    def csvfs_restore(self, repo: Path, backup_id: str, path: str, to: Path) -> float:
        return self.run([*self.csvfs, "backup", "restore", backup_id, "--repo", repo,
                         "--file", path, "--to", to], "csvfs backup restore")[0]

    # restic (0.14 in Debian 12: repository format 1, no compression, always encrypted)
    def restic_init(self, repo: Path) -> None:
        self.run(["restic", "-r", repo, "init"], "restic init")

    def restic_backup(self, repo: Path, path: Path) -> float:
        return self.run(["restic", "-r", repo, "backup", "--host", "bench", "-q", path],
                        "restic backup")[0]

    def restic_restore(self, repo: Path, target: Path) -> float:
        return self.run(["restic", "-r", repo, "restore", "latest", "--target", target, "-q"],
                        "restic restore")[0]

    # borg (repokey: AES-256-CTR + HMAC-SHA256; lz4 compression, its default)
    def borg_init(self, repo: Path) -> None:
        self.run(["borg", "init", "--encryption=repokey", repo], "borg init")

    def borg_create(self, repo: Path, archive: str, directory: Path, name: str) -> float:
        return self.run(["borg", "create", f"{repo}::{archive}", name], "borg create",
                        cwd=directory)[0]

    def borg_extract(self, repo: Path, archive: str, target: Path) -> float:
        return self.run(["borg", "extract", "--sparse", f"{repo}::{archive}"], "borg extract",
                        cwd=target)[0]


# -- writers on the mounts ------------------------------------------------------------------------
