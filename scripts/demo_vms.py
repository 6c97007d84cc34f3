#!/usr/bin/env python3
"""Many VMs at once on a local cluster: `make demo-vms`.

    python scripts/demo_vms.py [--nodes 3] [--per-node 2] [--seconds 60] [--dir DIR]

Starts a cluster with scripts/cluster.py, then --per-node `vmload run` VMs (--iodepth
writes in flight each) on every
node for --seconds. The first VM of node 1 migrates to the next node every
--migrate-every seconds; the first VM of node 2 grows its disk. At the end every VM is
verified through every node's mount, a summary table is printed, and the cluster is
stopped (--keep leaves it up). Exit codes:

  0  every VM ran to the end and verified on every node
  1  a mismatch, a VM that failed, or a verification that could not run
  2  bad command-line argument
  3  the cluster did not start (see DIR/*.log)
  130 interrupted (the VMs and the cluster are stopped)
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster_state import Cluster  # scripts/cluster_state.py: this directory is on sys.path
from nodes import NodeError, events_json, mounts_under

from vmload.cli import positive
from vmload.vm import completed_moves

REPO = Path(__file__).resolve().parent.parent
CLUSTER = [sys.executable, str(REPO / "scripts" / "cluster.py")]
VMLOAD = [sys.executable, "-m", "vmload"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CLUSTER = 0, 1, 2, 3
GRACE = 60.0  # seconds past --seconds before a VM counts as hung


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="demo_vms.py", description=__doc__.split("\n\n")[0],
                     epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=positive(int), default=3)
    parser.add_argument("--per-node", type=positive(int), default=2)
    parser.add_argument("--seconds", type=positive(float), default=60.0)
    parser.add_argument("--migrate-every", type=positive(float), default=3.0)
    parser.add_argument("--disk", default="128M", help="each VM's disk size (default 128M)")
    parser.add_argument("--iodepth", type=positive(int), default=4,
                        help="each VM's writes in flight (default 4)")
    parser.add_argument("--volume", default="4G", help="volume size (default 4G, sparse)")
    parser.add_argument("--dir", type=Path, help="cluster directory (default: a new one "
                        "under /var/tmp, removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up")
    return parser


@dataclass
class VM:
    name: str
    mount: str
    extra: list[str]
    role: str
    process: subprocess.Popen | None = None
    summary: dict = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)  # node -> "ok"/"N bad"/error

    @property
    def ok(self) -> bool:
        return (self.process is not None and self.process.returncode == 0
                and bool(self.verdicts) and all(v == "ok" for v in self.verdicts.values()))


def cluster_up(args, directory: Path) -> Cluster:
    result = subprocess.run([*CLUSTER, "up", "-n", str(args.nodes), "--dir", str(directory),
                             "--size", args.volume], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(_fail(EXIT_NO_CLUSTER, result.stderr.strip() or "cluster.py up failed"))
    return Cluster.load(directory)


def cluster_down(directory: Path) -> None:
    result = subprocess.run([*CLUSTER, "down", "--dir", str(directory)],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0:
        print(f"demo_vms.py: warning: {result.stderr.strip()}", file=sys.stderr)


def _fail(code: int, message: str) -> int:
    print(f"demo_vms.py: error: {message}", file=sys.stderr)
    return code


def plan(args, nodes: list[tuple[str, str]]) -> list[VM]:
    mounts = [mount for _, mount in nodes]
    vms = []
    for index, (node, mount) in enumerate(nodes):
        for slot in range(args.per_node):
            name = f"{node}-vm{slot + 1}"
            extra, role = [], "steady"
            if index == 0 and slot == 0:
                peers = [m for m in mounts if m != mount]
                extra = ["--migrate-every", str(args.migrate_every),
                         *sum((["--peer", peer] for peer in peers), [])]
                role = "migrates"
            elif index == 1 % len(nodes) and slot == (0 if len(nodes) > 1 else 1):
                extra = ["--grow", "--grow-every", "2", "--grow-by", "16M"]
                role = "grows"
            vms.append(VM(name, mount, extra, role))
    return vms


def start(vm: VM, args, state: Path) -> None:
    command = [*VMLOAD, "run", "--mount", vm.mount, "--vm", vm.name, "--state", str(state),
               "--size", args.disk, "--seconds", str(args.seconds), "--iodepth",
               str(args.iodepth), "--json", *vm.extra]
    vm.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=REPO)


def finish(vm: VM, deadline: float) -> None:
    try:
        out, err = vm.process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        vm.process.kill()
        out, err = vm.process.communicate()
        vm.summary = {"error": "hung: killed"}
        return
    try:
        vm.summary = json.loads(out)
    except ValueError:
        vm.summary = {"error": (err.strip().splitlines() or ["no summary"])[-1]}


def verify(vm: VM, nodes: list[tuple[str, str]], state: Path) -> None:
    for node, mount in nodes:
        result = subprocess.run([*VMLOAD, "verify", "--mount", mount, "--vm", vm.name,
                                 "--state", str(state), "--json"], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=600, cwd=REPO)
        try:
            report = json.loads(result.stdout)
            vm.verdicts[node] = "ok" if report["ok"] else f"{report['mismatches']} bad"
            if not report["ok"]:
                for line in report["listed"]:
                    print(f"{vm.name} via {node}: sector {line['sector']}: expected "
                          f"{line['expected']}, found {line['found']}", file=sys.stderr)
        except (ValueError, KeyError):
            vm.verdicts[node] = "error: " + (result.stderr.strip() or "no report")


def table(vms: list[VM], nodes: list[tuple[str, str]]) -> str:
    names = [node for node, _ in nodes]
    head = ("| VM | role | writes | ops/s | MiB/s | p50 ms | p99 ms | grows | migrations | "
            + " | ".join(f"verify {n}" for n in names) + " |")
    rows = [head, "|" + "---|" * (9 + len(names))]
    for vm in vms:
        s = vm.summary
        cells = [vm.name, vm.role, s.get("writes", "-"), s.get("ops_s", "-"),
                 s.get("mib_s", "-"), s.get("p50_ms", "-"), s.get("p99_ms", "-"),
                 s.get("grows", "-"), len(completed_moves(s.get("migrations", [])))]
        cells += [vm.verdicts.get(n, "-") for n in names]
        if s.get("error"):
            cells[1] += f" (failed: {s['error']})"
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows)


def handoffs(image: str) -> int:
    try:
        events = events_json(image)
    except NodeError:  # the count is only reported; an unreadable ring counts none
        return 0
    return sum(1 for event in events if event.get("kind") == "handoff")


def run(args, directory: Path) -> int:
    state = directory / "vmstate"
    cluster = cluster_up(args, directory)
    nodes = [(node.name, node.mountpoint) for node in cluster.nodes]
    vms = plan(args, nodes)
    print(f"{len(nodes)} nodes up in {directory}; {len(vms)} VMs for {args.seconds:g} s ...",
          flush=True)
    try:
        for vm in vms:
            start(vm, args, state)
        deadline = time.monotonic() + args.seconds + GRACE
        for vm in vms:
            finish(vm, deadline)
    except KeyboardInterrupt:
        for vm in vms:
            if vm.process is not None and vm.process.poll() is None:
                vm.process.send_signal(signal.SIGTERM)
        for vm in vms:
            if vm.process is not None:
                vm.process.wait(timeout=30)
        raise
    print("verifying every VM on every node ...", flush=True)
    for vm in vms:
        verify(vm, nodes, state)
    print(table(vms, nodes))
    moved = sum(len(completed_moves(vm.summary.get("migrations", []))) for vm in vms)
    print(f"\nmigrations: {moved}, handoffs in the event ring: {handoffs(cluster.image)}")
    failed = [vm.name for vm in vms if not vm.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return EXIT_FAILED
    print(f"all {len(vms)} VMs verified on all {len(nodes)} nodes: zero mismatches")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="csvfs-demo-", dir="/var/tmp"))
    try:
        return run(args, directory)
    except KeyboardInterrupt:
        print("demo_vms.py: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        return exit_.code
    finally:
        if not args.keep:
            cluster_down(directory)
            if args.dir is None:
                remove(directory)


def remove(directory: Path) -> None:
    """Remove our scratch directory, unless a mount is still inside (never delete
    through a mount)."""
    inside = mounts_under(directory)
    if inside:
        print(f"demo_vms.py: warning: still mounted, keeping {directory}", file=sys.stderr)
        return
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
