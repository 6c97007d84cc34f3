"""A local etcd cluster of real `etcd` processes on loopback ports, for the tests and
the benchmarks of election through etcd (`csvfs mount --election etcd://...`).

    with EtcdCluster(directory, members=3) as etcd:
        etcd.url            # etcd://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3
        etcd.kill(0)        # SIGKILL one member (the others keep a quorum)
        etcd.pause(1); etcd.resume(1)   # SIGSTOP / SIGCONT
        etcd.restart(0)     # the same member again, from its data directory

Every member runs in a process group of its own, with fast heartbeats and
elections (50 ms, 500 ms); leaving the context kills them all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

HEARTBEAT_MS = 50
ELECTION_MS = 500
START_TIMEOUT = 20.0


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if not found:
        raise RuntimeError("etcd is not installed: run `make setup` (Debian's etcd-server)")
    return found


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class EtcdCluster:
    """client_host: the address clients use (the URL); other than loopback, every
    member listens for clients on all addresses, so that nodes in network namespaces
    reach it through a bridge that may not exist yet when it starts."""

    def __init__(self, directory: Path, members: int = 3, client_host: str = "127.0.0.1"):
        self.directory = Path(directory)
        self.client_host = client_host
        ports = free_ports(2 * members)
        self.client_ports = ports[:members]
        self.peer_ports = ports[members:]
        self.processes: list[subprocess.Popen | None] = [None] * members

    @property
    def endpoints(self) -> list[str]:
        return [f"{self.client_host}:{port}" for port in self.client_ports]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    def _command(self, index: int) -> list[str]:
        peers = ",".join(f"m{i}=http://127.0.0.1:{port}" for i, port in enumerate(self.peer_ports))
        port = self.client_ports[index]
        listen = f"http://{'127.0.0.1' if self.client_host == '127.0.0.1' else '0.0.0.0'}:{port}"
        peer = f"http://127.0.0.1:{self.peer_ports[index]}"
        return [etcd_binary(), "--name", f"m{index}",
                "--data-dir", str(self.directory / f"m{index}"),
                "--listen-client-urls", listen,
                "--advertise-client-urls", f"http://{self.client_host}:{port}",
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", peers, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"csvfs-{os.getpid()}-{self.client_ports[0]}",
                "--heartbeat-interval", str(HEARTBEAT_MS),
                "--election-timeout", str(ELECTION_MS),
                "--logger", "zap", "--log-level", "warn"]

    def _spawn(self, index: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / f"m{index}.log", "ab")
        try:
            self.processes[index] = subprocess.Popen(
                self._command(index), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        finally:
            log.close()

    def start(self) -> EtcdCluster:
        for index in range(len(self.processes)):
            self._spawn(index)
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Until every running member says it is healthy (it has a leader)."""
        deadline = time.monotonic() + timeout
        for index, process in enumerate(self.processes):
            while process is not None and not self.healthy(index):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member m{index} did not start: see "
                                       f"{self.directory / f'm{index}.log'}")
                time.sleep(0.05)

    def healthy(self, index: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.client_ports[index]}/health",
                                        timeout=1) as reply:
                return json.load(reply).get("health") == "true"
        except (OSError, ValueError):
            return False

    def _signal(self, index: int, signum: int) -> None:
        process = self.processes[index]
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signum)

    def kill(self, index: int) -> None:
        self._signal(index, signal.SIGKILL)
        if self.processes[index] is not None:
            self.processes[index].wait(timeout=10)
        self.processes[index] = None

    def restart(self, index: int) -> None:
        self._spawn(index)

    def pause(self, index: int) -> None:
        self._signal(index, signal.SIGSTOP)

    def resume(self, index: int) -> None:
        self._signal(index, signal.SIGCONT)

    def stop(self) -> None:
        for index in range(len(self.processes)):
            self._signal(index, signal.SIGCONT)
            self.kill(index)

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()
