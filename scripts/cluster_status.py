"""What a local cluster looks like (scripts/cluster.py): `csvfs status` of each of its
volumes, as text or one JSON document, and the wait in `up` until the coordinators
have evened their roles out over the volumes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from cluster_state import STATUS_TIMEOUT, Cluster, ClusterError, status_report
from nodes import csvfs_command

SETTLE_WAIT = 10.0  # up, several volumes: for the coordinators to even the roles out
SETTLE_POLL = 0.5


def coordinator_counts(cluster: Cluster) -> dict[str, int] | None:
    """How many volumes each node coordinates, from `csvfs status` of every image; None
    while a volume has no coordinator (an election or a move is under way)."""
    counts = {node.name: 0 for node in cluster.nodes}
    for image in cluster.images:
        coordinator = ((status_report(image) or {}).get("coordinator") or {}).get("name")
        if coordinator is None:
            return None
        counts[coordinator] = counts.get(coordinator, 0) + 1
    return counts


def is_even(counts: dict[str, int] | None) -> bool:
    """No node coordinates more than one volume over another: csvfs moves no more roles."""
    return bool(counts) and max(counts.values()) - min(counts.values()) <= 1


def settle(cluster: Cluster) -> None:
    """Wait until the coordinators have evened the roles out. Node1 started first, so it
    took every volume; they hand roles over by themselves, one a second or so
    (csvfs/balance.py), and the status `up` shows should be the one that lasts."""
    deadline = time.monotonic() + SETTLE_WAIT
    counts = coordinator_counts(cluster)
    while not is_even(counts) and time.monotonic() < deadline:
        time.sleep(SETTLE_POLL)
        counts = coordinator_counts(cluster)
    shares = ", ".join(f"{name} {count}" for name, count in (counts or {}).items())
    if is_even(counts):
        print(f"volumes coordinated: {shares}")
    else:
        print(f"the coordinator roles are not even after {SETTLE_WAIT:.0f} s "
              f"({shares or 'a volume has no coordinator'}); csvfs keeps balancing them")


def show_status(cluster: Cluster, as_json: bool, exit_code: bool = True) -> int:
    """`csvfs status` of every volume; the exit code is the first non-zero one."""
    sys.stdout.flush()
    if as_json and cluster.several:
        code = print_status_json(cluster)
    else:
        codes = []
        for index, image in enumerate(cluster.images):
            if index:  # csvfs status starts with the volume's name: a blank line is enough
                print(flush=True)
            codes.append(run_status(cluster, image, as_json).returncode)
        code = next((code for code in codes if code), 0)
    return code if exit_code else 0


def print_status_json(cluster: Cluster) -> int:
    """One JSON document for several volumes: {"volumes": [each `csvfs status --json`]}."""
    reports, codes = [], []
    for image in cluster.images:
        result = run_status(cluster, image, as_json=True, capture=True)
        codes.append(result.returncode)
        try:
            reports.append(json.loads(result.stdout))
        except ValueError:  # csvfs said why on stderr, which is ours
            reports.append({"image": image, "error": f"csvfs status exited "
                                                     f"{result.returncode} without a report"})
    print(json.dumps({"volumes_file": cluster.volumes_file, "volumes": reports}, indent=2))
    return next((code for code in codes if code), 0)


def run_status(cluster: Cluster, image: str, as_json: bool,
               capture: bool = False) -> subprocess.CompletedProcess:
    command = [*csvfs_command(), "status", image, *(["--json"] if as_json else [])]
    try:
        return subprocess.run(command, stdin=subprocess.DEVNULL, timeout=STATUS_TIMEOUT,
                              stdout=subprocess.PIPE if capture else None, text=True)
    except subprocess.TimeoutExpired:
        what = f"csvfs status {image}" if cluster.several else "csvfs status"
        raise ClusterError(f"{what} did not answer within {STATUS_TIMEOUT:.0f} s") from None
