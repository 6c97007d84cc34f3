"""How long a coordinator failover takes, as the applications on the other nodes see it.

Each round mounts a fresh 3-node cluster, kills (SIGKILL) or stops (SIGSTOP) the
coordinator, and times one mkdir on a surviving node from the signal to the
moment it returns: the takeover as an application sees it. The same again with
the nodes elected through etcd (`--election etcd://...`, a local 3-member etcd
cluster of scripts/etcd_cluster.py) instead of the volume's lease region. Run by
`make bench`; alone: `python scripts/failoverbench.py [--rounds N]
[--hang-rounds N] [--etcd-rounds N] [--etcd-hang-rounds N]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from etcd_cluster import EtcdCluster  # scripts/: this directory is on sys.path
from nodes import MountProcess, NodeError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 20.0
OP_TIMEOUT = 30.0


def start_node(csvfs: str, image: Path, directory: Path, name: str,
               lease: float, election: str = "") -> MountProcess:
    log = directory / f"{name}.log"
    extra = ["--election", election] if election else []
    node = MountProcess.csvfs_node(image, directory / f"{name}-mnt", name, log,
                                   "--lease", str(lease), *extra, csvfs=[csvfs],
                                   new_session=True)
    return node.start(MOUNT_TIMEOUT)  # a node that does not mount is stopped again


def finished_at(action) -> float | None:
    """When `action` returned (time.monotonic()), or None if it failed or hung: it runs
    in a thread so that a hung mount cannot hang us."""
    outcome: dict = {}

    def run():
        try:
            action()
            outcome["at"] = time.monotonic()
        except OSError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(OP_TIMEOUT)
    return outcome.get("at")


def one_round(csvfs: str, scratch: Path, index: int, how: signal.Signals,
              lease: float, election: str = "") -> float | None:
    directory = scratch / f"{how.name.lower()}-{index}{'-etcd' if election else ''}"
    directory.mkdir()
    image = directory / "vol.img"
    subprocess.run([csvfs, "mkfs", str(image), "--size", "256M"], check=True,
                   capture_output=True)
    nodes: list[MountProcess] = []
    try:
        for name in ("n1", "n2", "n3"):
            nodes.append(start_node(csvfs, image, directory, name, lease, election))
        victim, survivor = nodes[0], nodes[1]
        os.mkdir(survivor.mountpoint / "before")  # connected and registered
        started = time.monotonic()
        victim.process.send_signal(how)
        done = finished_at(lambda: os.mkdir(survivor.mountpoint / "after"))
        return None if done is None else done - started
    finally:
        for node in reversed(nodes):
            node.stop()


def summary(label: str, seconds: list[float | None], target: str) -> str:
    done = [s for s in seconds if s is not None]
    failed = len(seconds) - len(done)
    if not done:
        return f"| {label} | {len(seconds)} | - | - | - | {target} | all failed |"
    cells = " | ".join(f"{value * 1000:.0f}" for value in
                       (min(done), statistics.median(done), max(done)))
    return f"| {label} | {len(seconds)} | {cells} | {target} | {failed} failed |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="SIGKILL rounds (default 5)")
    parser.add_argument("--hang-rounds", type=int, default=3,
                        help="SIGSTOP rounds (default 3)")
    parser.add_argument("--etcd-rounds", type=int, default=3,
                        help="SIGKILL rounds with etcd election (default 3)")
    parser.add_argument("--etcd-hang-rounds", type=int, default=2,
                        help="SIGSTOP rounds with etcd election (default 2)")
    parser.add_argument("--lease", type=float, default=3.0, help="lease time (default 3)")
    parser.add_argument("--csvfs", default=str(PROJECT_ROOT / ".venv" / "bin" / "csvfs"))
    parser.add_argument("--dir", default="/var/tmp", help="scratch parent (default /var/tmp)")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="csvfs-failover-", dir=args.dir))
    try:
        killed = [one_round(args.csvfs, scratch, i, signal.SIGKILL, args.lease)
                  for i in range(args.rounds)]
        hung = [one_round(args.csvfs, scratch, i, signal.SIGSTOP, args.lease)
                for i in range(args.hang_rounds)]
        etcd_killed, etcd_hung = with_etcd(args, scratch)
    except (NodeError, subprocess.CalledProcessError, RuntimeError) as exc:
        print(f"failover bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"Coordinator failover on a 3-node cluster, lease {args.lease:g} s: time from the "
          "signal to the coordinator until one mkdir on a surviving node returns (ms).\n")
    print("| coordinator | rounds | min | median | max | target | |")
    print("|---|---:|---:|---:|---:|---|---|")
    print(summary("SIGKILL", killed, "< 1000"))
    print(summary("SIGSTOP (hung)", hung, f"< {args.lease * 1000:.0f} (the lease)"))
    if etcd_killed or etcd_hung:
        print(summary("SIGKILL, etcd election", etcd_killed, "< 1000"))
        print(summary("SIGSTOP (hung), etcd election", etcd_hung,
                      f"< {args.lease * 1000:.0f} (the lease)"))
    return 0


def with_etcd(args, scratch: Path) -> tuple[list, list]:
    """The rounds with election through a local 3-member etcd cluster, one for all."""
    if not (args.etcd_rounds or args.etcd_hang_rounds):
        return [], []
    with EtcdCluster(scratch / "etcd", members=3) as etcd:
        killed = [one_round(args.csvfs, scratch, i, signal.SIGKILL, args.lease, etcd.url)
                  for i in range(args.etcd_rounds)]
        hung = [one_round(args.csvfs, scratch, i, signal.SIGSTOP, args.lease, etcd.url)
                for i in range(args.etcd_hang_rounds)]
    return killed, hung


if __name__ == "__main__":
    sys.exit(main())
