#!/usr/bin/env python3
"""Benchmark csvfs against a plain file and a minimal pass-through FUSE filesystem.

Runs four fio workloads (sequential 1 MiB write/read, random 4 KiB write/read) on up to
three targets:

  raw          a plain file in the scratch directory
  passthrough  scripts/passthrough.py forwarding to a directory in the scratch directory
  csvfs        `csvfs mkfs` + `csvfs mount` of an image in the scratch directory

Each (target, workload) pair is repeated --repeat times, targets interleaved within each
round, and the median is reported as a Markdown table on stdout and in
bench-results/latest.md (the logs of the mounts are copied next to it). Progress and
errors go to stderr. Every mount and child process is torn down on exit, including on
failure and Ctrl-C. A target that cannot be set up is reported as n/a.

Unless --no-cluster is given, a second csvfs volume is mounted by several nodes (A, the
coordinator, then B, a member, later C) and four more sections are measured:

  member data path   the same fio workloads on B's mount, interleaved with the others in
                     the same rounds, as a ratio to single-node csvfs
  member metadata    metabench on B's mount next to A's, rounds interleaved
  quiesce            shrinking truncates on A with and without B holding the file, and
                     B's paced 4 KiB writes to another file with A idle or truncating
  aggregate writes   fio seq write 1 MiB from 1, 2 and 3 nodes at once, one file each
"""

import argparse
import bisect
import contextlib
import functools
import json
import math
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import metabench  # scripts/metabench.py: run as a script, this directory is on sys.path
from nodes import (
    MountProcess,
    NodeError,
    cpu_seconds,
    is_mounted,
    processes_naming,
    status_json,
    stop_daemon,
    wait_until,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PASSTHROUGH = PROJECT_ROOT / "scripts" / "passthrough.py"
RESULTS_DIR = PROJECT_ROOT / "bench-results"
RESULTS_FILE = RESULTS_DIR / "latest.md"  # logs of the mounts are kept next to it
TARGETS = ("raw", "passthrough", "csvfs")
CSVFS_IMAGE_SIZE = "4G"
MOUNT_TIMEOUT = 30.0  # seconds for a mount to appear
COMMAND_TIMEOUT = 120.0  # seconds for csvfs mkfs/mount to return
LAYOUT_TIMEOUT = 600.0  # seconds to write the test file once
STOP_TIMEOUT = 15.0  # seconds for a writer that closed its output to exit

# The cluster sections (--no-cluster skips them)
METABENCH = Path(metabench.__file__).resolve()
MEMBER = "member"  # the data-path target on member node B of the cluster
COORDINATOR = "coordinator"  # a control: the same workloads on node A of the cluster
CLUSTER_NODES = ("A", "B", "C")  # mounted in this order: A is the coordinator
QUIESCE_BIG = 4 * 2**20  # the truncate loop cuts the file from this size ...
QUIESCE_SMALL = 2**20  # ... to this one, then writes it back
WRITER_INTERVAL_MS = 1.0  # B's paced writer: one 4 KiB pwrite per this many ms
WRITER_TIMEOUT = 30.0  # seconds for a writer to start, or to report after it is stopped
VM_COUNT = 3  # vmload VMs at once in each configuration of the VM section
VM_DISK = "128M"  # each VM's (sparse) disk
VM_BLOCKS = "4k..64k"  # vmload's block mix: random writes of 4, 8, 16, 32 or 64 KiB
VM_CONFIGS = ("raw", "1 node", "3 nodes")


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio --rw
    bs: str  # fio --bs
    show_iops: bool


WORKLOADS = (
    Workload("seq write 1 MiB", "write", "1M", False),
    Workload("seq read 1 MiB", "read", "1M", False),
    Workload("rand write 4 KiB", "randwrite", "4k", True),
    Workload("rand read 4 KiB", "randread", "4k", True),
)


@dataclass(frozen=True)
class Result:
    mib_s: float
    iops: float
    io_bytes: int = 0
    cpu_s: float | None = None  # CPU time of the target's FUSE process during the job


@dataclass
class Target:
    name: str
    file: Path | None = None  # the fio test file, None unless set up
    error: str | None = None  # why the target has no numbers
    pids: set[int] = field(default_factory=set)  # its FUSE process(es), for CPU time


@dataclass
class Samples:
    results: list[Result] = field(default_factory=list)
    error: str | None = None

    def median(self) -> Result | None:
        if self.error or not self.results:
            return None
        return Result(
            statistics.median(r.mib_s for r in self.results),
            statistics.median(r.iops for r in self.results),
        )


class BenchError(Exception):
    """A step failed; the message is meant for the user, without a traceback."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- processes and mounts ---------------------------------------------------------------


def tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text.splitlines()[-lines:])


def start_until_teardown(cleanup: contextlib.ExitStack, server: MountProcess,
                         log_name: str) -> None:
    """Start server; it is stopped, and its mount detached, when the bench tears down
    (with a warning if it would not stop). Its error names the log to look at."""

    def stop() -> None:
        stopped, steps = server.stop()
        if not stopped:
            log(f"warning: {server.label} on {server.mountpoint}: {steps}")

    cleanup.callback(stop)
    try:
        server.start(MOUNT_TIMEOUT)
    except NodeError as exc:
        raise BenchError(f"{exc} (see bench-results/{log_name})") from None


def stop_background_node(mountpoint: Path) -> None:
    """Stop the node that `csvfs mount` (without --foreground) left serving mountpoint.
    It is not our child: it is found by the mountpoint in its argv."""
    for pid in sorted(processes_naming([mountpoint])) or [0]:  # 0: at most a mount is left
        stopped, steps = stop_daemon(pid, mountpoint)
        if not stopped:
            log(f"warning: the csvfs node on {mountpoint} (pid {pid}): {steps}")


# --- targets ----------------------------------------------------------------------------


def setup_raw(scratch: Path, cleanup: contextlib.ExitStack, args) -> Path:
    directory = scratch / "raw"
    directory.mkdir()
    return directory / "bench.dat"


def setup_passthrough(scratch: Path, cleanup: contextlib.ExitStack, args) -> Path:
    source, mountpoint = scratch / "passthrough-src", scratch / "passthrough-mnt"
    source.mkdir()
    server = MountProcess([sys.executable, PASSTHROUGH, source, mountpoint], mountpoint,
                          label="passthrough", output=scratch / "passthrough.log",
                          new_session=True)  # Ctrl-C reaches us, and we tear it down in order
    start_until_teardown(cleanup, server, "passthrough.log")
    return mountpoint / "bench.dat"


def setup_csvfs(scratch: Path, cleanup: contextlib.ExitStack, args) -> Path:
    csvfs = shutil.which(args.csvfs)
    if csvfs is None:
        raise BenchError(f"csvfs command not found: {args.csvfs} (run `make setup`)")
    image, mountpoint = scratch / "csvfs.img", scratch / "csvfs-mnt"
    mountpoint.mkdir()
    log_path = scratch / "csvfs.log"

    def run(*command: str) -> None:
        """Run a csvfs command in its own process group, output to the log file.

        No pipes: a daemon that inherits them would keep us waiting for EOF forever.
        """
        with open(log_path, "ab") as log_file:
            log_file.write(f"$ csvfs {' '.join(command)}\n".encode())
            log_file.flush()
            try:
                code = subprocess.run(
                    [csvfs, *command], stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=subprocess.STDOUT, start_new_session=True, timeout=COMMAND_TIMEOUT,
                ).returncode
            except subprocess.TimeoutExpired:
                raise BenchError(
                    f"`csvfs {command[0]}` did not return within {COMMAND_TIMEOUT:.0f} s"
                ) from None
        if code != 0:
            raise BenchError(f"`csvfs {command[0]}` exited with {code}: "
                             f"{tail(log_path)} (see bench-results/csvfs*.log)")

    # Registered before mounting, so that a node the mount leaves behind is always stopped.
    cleanup.callback(stop_background_node, mountpoint)
    run("mkfs", str(image), "--size", CSVFS_IMAGE_SIZE)
    run("mount", str(image), str(mountpoint), "--log", str(scratch / "csvfs-node.log"))
    if not wait_until(lambda: is_mounted(mountpoint), MOUNT_TIMEOUT):
        raise BenchError(f"`csvfs mount` returned but {mountpoint} is not mounted")
    return mountpoint / "bench.dat"


SETUP = {"raw": setup_raw, "passthrough": setup_passthrough, "csvfs": setup_csvfs}


# --- cluster ----------------------------------------------------------------------------


class Cluster:
    """One csvfs volume mounted by several nodes, each a `csvfs mount --foreground` child.

    The first node mounted becomes the coordinator and the later ones join it as members.
    Each node's teardown goes on the ExitStack when it starts, so the members are
    unmounted before the coordinator and none of them takes over the role meanwhile.
    """

    def __init__(self, scratch: Path, cleanup: contextlib.ExitStack, args):
        csvfs = shutil.which(args.csvfs)
        if csvfs is None:
            raise BenchError(f"csvfs command not found: {args.csvfs} (run `make setup`)")
        self.csvfs, self.scratch, self.cleanup = csvfs, scratch, cleanup
        self.image = scratch / "cluster.img"
        self.mountpoints: dict[str, Path] = {}
        # the member's fio file, one file per node for the aggregate, the VMs' disks, and
        # room to spare (the image is sparse)
        size_mib = max(4096, 4 * args.size_mib + 2048)
        log_path = scratch / "cluster-mkfs.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.run(
                [csvfs, "mkfs", str(self.image), "--size", f"{size_mib}M"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                timeout=COMMAND_TIMEOUT, check=False,
            )
        if proc.returncode != 0:
            raise BenchError(f"`csvfs mkfs` exited with {proc.returncode}: {tail(log_path)}")

    def mount(self, name: str) -> Path:
        mountpoint = self.scratch / f"cluster-{name}-mnt"
        log_path = self.scratch / f"cluster-{name}.log"  # the node's log and its stderr
        node = MountProcess.csvfs_node(
            self.image, mountpoint, name, log_path, csvfs=[self.csvfs], output=log_path,
            new_session=True)  # Ctrl-C reaches us, and we tear it down in order
        start_until_teardown(self.cleanup, node, log_path.name)
        self.mountpoints[name] = mountpoint
        return mountpoint

    def check_roles(self) -> None:
        """The first node mounted must be the coordinator, every other one a member."""
        try:
            status = status_json(self.image, csvfs=[self.csvfs], timeout=COMMAND_TIMEOUT)
            coordinator = status["coordinator"]["name"]
            sessions = {n["name"] for n in status["nodes"] if n.get("alive")}
        except (NodeError, KeyError, TypeError) as exc:
            log(f"warning: cannot read `csvfs status` ({exc!r}); roles not checked")
            return
        first = next(iter(self.mountpoints))
        if coordinator != first:
            raise BenchError(f"the coordinator is {coordinator}, not {first}")
        missing = set(self.mountpoints) - sessions
        if missing:
            raise BenchError(f"not in the cluster: {', '.join(sorted(missing))}")


@dataclass
class ClusterResults:
    error: str | None = None  # why there are no cluster numbers at all
    meta: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # node -> op
    truncate: dict[str, list[float]] = field(default_factory=dict)  # condition -> ms
    writes: dict[str, list[float]] = field(default_factory=dict)  # condition -> ms
    aggregate: dict[int, list[list[Result]]] = field(default_factory=dict)  # writers -> rounds
    vms: dict[str, list[list[dict]]] = field(default_factory=dict)  # config -> rounds -> VMs
    notes: list[str] = field(default_factory=list)


def run_cluster_metadata(mountpoints: dict[str, Path], args) -> dict[str, dict[str, list]]:
    """metabench on each node's mount, in --repeat rounds with the node order rotated."""
    names = list(mountpoints)
    latencies: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    per_round = max(2, math.ceil(args.meta_count / args.repeat))
    for name in names:
        (mountpoints[name] / f"meta-{name}").mkdir()
    for round_no in range(args.repeat):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            samples = metabench.measure(mountpoints[name] / f"meta-{name}", per_round)
            for operation, values in samples.items():
                latencies[name].setdefault(operation, []).extend(values)
            log(f"[{round_no + 1}/{args.repeat}] metadata on node {name}: "
                f"{per_round} of each")
    return latencies


class Paced(list):
    """Write latencies in ms; start_ns holds when each began (time.monotonic_ns())."""

    start_ns: list[int]


@contextlib.contextmanager
def paced_writer(path: Path, span: int):
    """Run `metabench.py writer` on *path* in its own process for the body of the block.

    Yields a Paced list that holds the write latencies (ms) once the block has ended.
    """
    proc = subprocess.Popen(
        [sys.executable, str(METABENCH), "writer", str(path), "--span", str(span),
         "--interval-ms", str(WRITER_INTERVAL_MS)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    latencies = Paced()
    latencies.start_ns = []
    try:
        line = b""
        deadline = time.monotonic() + WRITER_TIMEOUT
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                raise BenchError(f"the writer on {path.name} did not start")
            chunk = os.read(proc.stdout.fileno(), 64)
            if not chunk:
                proc.wait(STOP_TIMEOUT)
                raise BenchError(f"the writer on {path.name} exited with {proc.returncode}: "
                                 + " | ".join(proc.stderr.read().decode().splitlines()[-1:]))
            line += chunk
        yield latencies
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=WRITER_TIMEOUT)
        if proc.returncode != 0:
            raise BenchError(f"the writer on {path.name} exited with {proc.returncode}: "
                             + " | ".join(err.decode().splitlines()[-1:]))
        try:
            report = json.loads(out)
            latencies.extend(report["ms"])
            latencies.start_ns.extend(report["start_ns"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"cannot parse the writer's output: {exc}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def run_quiesce(node_a: Path, node_b: Path, args) -> tuple[dict, dict]:
    """Shrinking truncates on A, and B's paced writes, under the conditions of the report.

    truncate latencies, per condition:
      idle   nobody but A has the file open, B is idle
      other  B writes another file meanwhile (B is no holder of the truncated file)
      held   B has the truncated file open and writes to it (inside what stays)
    B's write latencies, per condition:
      idle     to the other file, A idle (as long as the `idle` truncate loop took)
      busy     to the other file, while A runs the truncate loop
      rewrite  to the other file, while A runs the loop's writes, each with an fsync,
               without the truncates (as long; a control: a similar load on A and on
               the image, but no metadata change and no quiesce)
      held     to the truncated file, while A runs the truncate loop
      paused   to the other file, while B also writes the truncated file (so B holds it
               and is paused for every truncate) and A runs the truncate loop: against
               `busy`, the same load on A, this is what a quiesce costs I/O on another file
      unpaused the same two writers on B, while A runs the loop on a third file that B
               does not have open: the same load everywhere, but B is never paused
      during   the `paused` writes that overlapped a truncate on A, which is when B was
               paused for it (its pause and resume lie within the truncate call)
      between  the other `paused` writes, in the same run: against `during`, this is the
               stall a quiesce causes on another file, with every other load the same
    """
    (node_a / "quiesce").mkdir()
    shrink_a, shrink_b = (n / "quiesce" / "shrink.dat" for n in (node_a, node_b))
    other_a, other_b = (n / "quiesce" / "other.dat" for n in (node_a, node_b))
    spare_a = node_a / "quiesce" / "spare.dat"  # A's truncates in the `unpaused` control
    for path in (shrink_a, other_a, spare_a):  # allocated: B's writes are all overwrites
        with open(path, "wb") as f:
            f.write(b"\x42" * QUIESCE_BIG)
    truncate = {"idle": [], "other": [], "held": []}
    writes = {"idle": [], "busy": [], "rewrite": [], "held": [], "paused": [],
              "unpaused": [], "during": [], "between": []}
    per_round = max(2, math.ceil(args.quiesce_count / args.repeat))

    def shrink() -> list[float]:
        return metabench.shrink_loop(shrink_a, per_round, QUIESCE_BIG, QUIESCE_SMALL)

    def busy() -> None:
        with paced_writer(other_b, QUIESCE_BIG) as latencies:
            truncate["other"].extend(shrink())
        writes["busy"].extend(latencies)

    def quiet(seconds: float) -> None:
        with paced_writer(other_b, QUIESCE_BIG) as latencies:
            time.sleep(seconds)
        writes["idle"].extend(latencies)

    def rewrite(seconds: float) -> None:
        with paced_writer(other_b, QUIESCE_BIG) as latencies:
            metabench.rewrite_loop(shrink_a, seconds, QUIESCE_BIG, QUIESCE_SMALL)
        writes["rewrite"].extend(latencies)

    def paused() -> None:
        windows: list[tuple[int, int]] = []
        with paced_writer(shrink_b, QUIESCE_SMALL), \
                paced_writer(other_b, QUIESCE_BIG) as latencies:
            metabench.shrink_loop(shrink_a, per_round, QUIESCE_BIG, QUIESCE_SMALL, windows)
        writes["paused"] += latencies
        during, between = split_by_windows(latencies, windows)
        writes["during"] += during
        writes["between"] += between

    def unpaused() -> None:
        with paced_writer(shrink_b, QUIESCE_SMALL), \
                paced_writer(other_b, QUIESCE_BIG) as latencies:
            metabench.shrink_loop(spare_a, per_round, QUIESCE_BIG, QUIESCE_SMALL)
        writes["unpaused"] += latencies

    for round_no in range(args.repeat):
        started = time.monotonic()
        truncate["idle"] += shrink()
        seconds = time.monotonic() - started
        steps = [busy, functools.partial(quiet, seconds), functools.partial(rewrite, seconds)]
        shift = round_no % len(steps)  # rotate which goes first
        for step in steps[shift:] + steps[:shift]:
            step()
        with paced_writer(shrink_b, QUIESCE_SMALL) as latencies:
            truncate["held"] += shrink()
        writes["held"] += latencies
        pairs = [paused, unpaused] if round_no % 2 == 0 else [unpaused, paused]
        for step in pairs:
            step()
        log(f"[{round_no + 1}/{args.repeat}] quiesce: {per_round} truncates per condition")
    return truncate, writes


def run_vm_configs(cluster: Cluster, args) -> dict[str, list[list[dict]]]:
    """vmload with VM_COUNT VMs at once: on a plain directory (raw), all on node A, and
    one per node A, B, C; rounds rotated. Every VM is verified, then its disk removed."""
    mounts = cluster.mountpoints
    raw = cluster.scratch / "vm-raw"
    raw.mkdir()
    placements = {"raw": [raw] * VM_COUNT, "1 node": [mounts["A"]] * VM_COUNT,
                  "3 nodes": [mounts[name] for name in CLUSTER_NODES][:VM_COUNT]}
    rounds: dict[str, list[list[dict]]] = {config: [] for config in VM_CONFIGS}
    for round_no in range(args.repeat):
        shift = round_no % len(VM_CONFIGS)
        for config in VM_CONFIGS[shift:] + VM_CONFIGS[:shift]:
            tag = f"r{round_no}-{config.replace(' ', '')}"
            summaries = run_vms(placements[config], tag, cluster.scratch / "vmstate", args)
            rounds[config].append(summaries)
            log(f"[{round_no + 1}/{args.repeat}] VMs, {config}: "
                f"{sum(s['mib_s'] for s in summaries):8.1f} MiB/s "
                f"{sum(s['ops_s'] for s in summaries):8.0f} ops/s")
    return rounds


def vmload(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmload", *args]


def run_vms(mounts: list[Path], tag: str, state: Path, args) -> list[dict]:
    """One `vmload run` per mount, all at once; their summaries, each VM verified."""
    names = [f"{tag}-{index}" for index in range(len(mounts))]
    procs = []
    try:
        for index, (name, mount) in enumerate(zip(names, mounts, strict=True)):
            procs.append(subprocess.Popen(
                vmload("run", "--mount", str(mount), "--vm", name, "--state", str(state),
                       "--size", VM_DISK, "--block", VM_BLOCKS, "--seconds",
                       str(args.runtime), "--seed", str(index), "--json"),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, cwd=PROJECT_ROOT))
        summaries = []
        for name, proc in zip(names, procs, strict=True):
            out, err = proc.communicate(timeout=args.runtime + 60)
            if proc.returncode != 0:
                raise BenchError(f"vmload run {name} exited with {proc.returncode}: "
                                 + " | ".join(err.strip().splitlines()[-1:]))
            summaries.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for name, mount in zip(names, mounts, strict=True):
        check = subprocess.run(vmload("verify", "--mount", str(mount), "--vm", name,
                                      "--state", str(state)), capture_output=True, text=True,
                               timeout=300, stdin=subprocess.DEVNULL, cwd=PROJECT_ROOT)
        if check.returncode != 0:
            raise BenchError(f"vmload verify {name}: {check.stdout.strip()} {check.stderr}")
        (mount / f"{name}.img").unlink()
    return summaries


def split_by_windows(writes: Paced, windows: list[tuple[int, int]]
                     ) -> tuple[list[float], list[float]]:
    """Split write latencies into those that overlapped one of the (start, end) windows
    (sorted, in time.monotonic_ns()) and the rest."""
    starts = [start for start, _ in windows]
    during, between = [], []
    for began, ms in zip(writes.start_ns, writes, strict=True):
        ended = began + int(ms * 1e6)
        last = bisect.bisect_right(starts, ended) - 1  # the last window begun by then
        overlaps = last >= 0 and windows[last][1] >= began
        (during if overlaps else between).append(ms)
    return during, between


def run_aggregate(files: list[Path], args) -> dict[int, list[list[Result]]]:
    """fio seq write 1 MiB on files[:k] at once, for every k, in rotated rounds."""
    counts = list(range(1, len(files) + 1))
    rounds: dict[int, list[list[Result]]] = {k: [] for k in counts}
    for round_no in range(args.repeat):
        shift = round_no % len(counts)
        for k in counts[shift:] + counts[:shift]:
            os.sync()
            results = run_fio_jobs(files[:k], "write", "1M", args.size_mib, args.runtime,
                                   args.runtime + 60)
            rounds[k].append(results)
            log(f"[{round_no + 1}/{args.repeat}] aggregate seq write, {k} node(s): "
                f"{sum(r.mib_s for r in results):9.1f} MiB/s")
    return rounds


def run_cluster(cluster: Cluster, args) -> ClusterResults:
    """The cluster sections after the data-path rounds; a failed one becomes a note."""
    results = ClusterResults()
    mounts = cluster.mountpoints
    steps = [
        ("member metadata", lambda: results.meta.update(
            run_cluster_metadata({n: mounts[n] for n in CLUSTER_NODES[:2]}, args))),
        ("quiesce", lambda: _store_quiesce(results, run_quiesce(mounts["A"], mounts["B"],
                                                                args))),
        ("aggregate writes", lambda: results.aggregate.update(_aggregate(cluster, args))),
        ("VM workloads", lambda: results.vms.update(run_vm_configs(cluster, args))),
    ]
    for what, step in steps:
        log(f"cluster: {what} ...")
        try:
            step()
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            results.notes.append(f"- cluster, {what}: {exc}")
            log(f"cluster: {what} failed: {exc}")
    return results


def _store_quiesce(results: ClusterResults, measured: tuple[dict, dict]) -> None:
    results.truncate, results.writes = measured


def _aggregate(cluster: Cluster, args) -> dict[int, list[list[Result]]]:
    for name in CLUSTER_NODES:
        if name not in cluster.mountpoints:
            cluster.mount(name)
    cluster.check_roles()
    files = []
    for name in CLUSTER_NODES:
        target = Target(f"node {name}", cluster.mountpoints[name] / f"agg-{name}.dat")
        layout(target, args.size_mib)
        files.append(target.file)
    return run_aggregate(files, args)


# --- fio --------------------------------------------------------------------------------


def run_fio(path: Path, rw: str, bs: str, size_mib: int, runtime: int | None,
            timeout: float) -> Result:
    """Run one fio job on *path*, time-based unless *runtime* is None; return its numbers."""
    return run_fio_jobs([path], rw, bs, size_mib, runtime, timeout)[0]


def run_fio_jobs(paths: list[Path], rw: str, bs: str, size_mib: int, runtime: int | None,
                 timeout: float) -> list[Result]:
    """Run one fio job per path, all started together by one fio; their numbers in order."""
    command = [
        "fio", f"--rw={rw}", f"--bs={bs}", f"--size={size_mib}M", "--ioengine=psync",
        "--direct=0", "--invalidate=0", "--fallocate=none", "--output-format=json",
    ]
    if runtime is None:
        command.append("--end_fsync=1")
    else:
        command += ["--time_based", f"--runtime={runtime}"]
    for index, path in enumerate(paths):  # options before the first --name are global
        command += [f"--name={rw}-{bs}-{index}", "--filename=" + str(path).replace(":", "\\:")]
    # fio forks a process per job: give them a group of their own, and kill the whole
    # group if anything (a timeout, Ctrl-C) cuts the run short, or none would be left
    # holding a file open on a mount we are about to take down.
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # fio is not reaped yet: the group is ours
        proc.communicate()
        raise
    if proc.returncode != 0:
        message = " | ".join(stderr.strip().splitlines()[-2:])
        raise BenchError(f"fio exited with {proc.returncode}" + (f": {message}" if message else ""))
    try:
        # fio may print warnings before the JSON document
        report, _ = json.JSONDecoder().raw_decode(stdout[stdout.index("{"):])
        jobs = report["jobs"]
        sides = [job["read" if "read" in rw else "write"] for job in jobs]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BenchError(f"cannot parse fio output: {exc}") from None
    if len(jobs) != len(paths):
        raise BenchError(f"fio reported {len(jobs)} jobs, not {len(paths)}")
    results = []
    for job, side in zip(jobs, sides, strict=True):
        if job.get("error"):
            raise BenchError(f"fio job error {job['error']}")
        if side["io_bytes"] == 0:
            raise BenchError("fio did no I/O")
        results.append(Result(side["bw_bytes"] / 2**20, side["iops"], side["io_bytes"]))
    return results


def layout(target: Target, size_mib: int) -> None:
    """Write the whole test file once so reads hit data and writes are overwrites."""
    result = run_fio(target.file, "write", "1M", size_mib, None, LAYOUT_TIMEOUT)
    if result.io_bytes != size_mib * 2**20:
        raise BenchError(f"layout wrote {result.io_bytes} bytes, not {size_mib} MiB")


def setup_cluster(scratch: Path, cleanup: contextlib.ExitStack, args,
                  targets: list[Target]) -> Cluster | None:
    """Mount nodes A and B of a new volume; B's mount becomes the `member` fio target,
    and A's the `coordinator` one (a control: the single-node code on another image)."""
    control, member = Target(COORDINATOR), Target(MEMBER)
    targets += [control, member]  # the member last: its error stands for the cluster's
    log("setting up the cluster (nodes A and B) ...")
    try:
        cluster = Cluster(scratch, cleanup, args)
        for name in CLUSTER_NODES[:2]:
            cluster.mount(name)
        cluster.check_roles()
        for target, node in ((control, "A"), (member, "B")):
            target.file = cluster.mountpoints[node] / f"bench-{node}.dat"
            target.pids = processes_naming([cluster.mountpoints[node]])
            layout(target, args.size_mib)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        for target in (control, member):
            target.error = f"cluster setup failed: {exc}"
        log(f"{member.name}: {member.error}")
        return None
    return cluster


def run_rounds(targets: list[Target], args) -> dict[tuple[str, str], Samples]:
    samples = {(t.name, w.name): Samples() for t in targets for w in WORKLOADS}
    for round_no in range(args.repeat):
        # rotate the target order each round so no target always runs first, and
        # reverse it every other round so no target always follows the same one
        shift = round_no % len(targets)
        order = targets[shift:] + targets[:shift]
        if round_no % 2:
            order.reverse()
        for workload in WORKLOADS:
            for target in order:
                cell = samples[(target.name, workload.name)]
                if target.error or cell.error:
                    continue
                os.sync()  # start from a clean page cache, not someone else's writeback
                try:
                    cpu_before = cpu_seconds(*target.pids)
                    result = run_fio(target.file, workload.rw, workload.bs, args.size_mib,
                                     args.runtime, args.runtime + 60)
                    if target.pids:
                        result = replace(result, cpu_s=cpu_seconds(*target.pids) - cpu_before)
                except subprocess.TimeoutExpired:
                    target.error = f"fio timed out on {workload.name}; mount hung?"
                    log(f"{target.name}: {target.error}")
                    continue
                except BenchError as exc:
                    cell.error = str(exc)
                    log(f"{target.name}: {workload.name}: {exc}")
                    continue
                cell.results.append(result)
                log(f"[{round_no + 1}/{args.repeat}] {workload.name:<17} {target.name:<12}"
                    f"{result.mib_s:9.1f} MiB/s {result.iops:10.0f} IOPS")
    return samples


def run_metadata(targets: list[Target], args) -> dict[str, dict[str, list[float]]]:
    """Single-operation metadata latencies on every target that is up."""
    latencies = {}
    for target in targets:
        if target.error or target.file is None or target.name not in TARGETS:
            continue
        try:
            latencies[target.name] = metabench.measure(target.file.parent, args.meta_count)
        except OSError as exc:
            log(f"{target.name}: metadata latency failed: {exc}")
    return latencies


# --- report -----------------------------------------------------------------------------


def describe_metadata(args) -> str:
    return (f"Metadata latency, one operation at a time from one process, {args.meta_count} "
            "of each, p50 / p99 in ms. extend is a 4 KiB append that grows the file; on "
            "csvfs every change is committed to the journal (fdatasync) before it returns, "
            "on the other targets nothing is synced.")


def build_latency_table(latencies: dict[str, dict[str, list[float]]]) -> str:
    rows = ["| operation | raw | passthrough | csvfs |", "|---|---:|---:|---:|"]
    for operation in metabench.OPERATIONS:
        cells = []
        for name in TARGETS:
            values = latencies.get(name, {}).get(operation)
            if not values or len(values) < 2:
                cells.append("n/a")
                continue
            p50, p99 = metabench.percentiles(values)
            cells.append(f"{p50:.3f} / {p99:.3f}")
        rows.append(f"| {operation} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_cell(result: Result | None, show_iops: bool) -> str:
    if result is None:
        return "n/a"
    if not show_iops:
        return f"{result.mib_s:.1f}"
    iops = f"{result.iops / 1000:.1f}k" if result.iops >= 1000 else f"{result.iops:.0f}"
    return f"{result.mib_s:.1f} ({iops} IOPS)"


def paired_ratio(a: Samples | None, b: Samples | None) -> float | None:
    """Median of the per-round ratios a/b.

    Each round runs both targets back to back, so pairing them cancels the slow
    drift of a noisy machine better than a ratio of two medians would.
    """
    if a is None or b is None or not a.results or not b.results:
        return None
    if len(a.results) != len(b.results):  # a round failed: fall back to the medians
        a_med, b_med = a.median(), b.median()
        return a_med.mib_s / b_med.mib_s if b_med.mib_s else None
    ratios = [x.mib_s / y.mib_s for x, y in zip(a.results, b.results, strict=True) if y.mib_s]
    return statistics.median(ratios) if ratios else None


def format_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"


def build_table(samples: dict[tuple[str, str], Samples]) -> str:
    rows = [
        "| workload | raw MiB/s | passthrough MiB/s | csvfs MiB/s "
        "| csvfs/passthrough | csvfs/raw | passthrough/raw |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for workload in WORKLOADS:
        cell = {name: samples.get((name, workload.name)) for name in TARGETS}
        cells = [format_cell(cell[name].median() if cell[name] else None, workload.show_iops)
                 for name in TARGETS]
        ratios = [
            format_ratio(paired_ratio(cell["csvfs"], cell["passthrough"])),
            format_ratio(paired_ratio(cell["csvfs"], cell["raw"])),
            format_ratio(paired_ratio(cell["passthrough"], cell["raw"])),
        ]
        rows.append(f"| {workload.name} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(rows)


def p50_p99(values: list[float] | None) -> tuple[float, float] | None:
    return metabench.percentiles(values) if values and len(values) >= 2 else None


def format_p50_p99(values: list[float] | None) -> str:
    cut = p50_p99(values)
    return "n/a" if cut is None else f"{cut[0]:.3f} / {cut[1]:.3f}"


def format_quotient(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"


def build_member_table(samples: dict[tuple[str, str], Samples]) -> str:
    rows = [
        "| workload | csvfs single-node MiB/s | member node B MiB/s "
        "| **member/single-node** (target >= 0.9) | coordinator node A MiB/s "
        "| coordinator/single-node (control) | node CPU s per GiB: single / B / A |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for workload in WORKLOADS:
        single, member, control = (samples.get((name, workload.name))
                                   for name in ("csvfs", MEMBER, COORDINATOR))
        cells = [format_cell(cell.median() if cell else None, workload.show_iops)
                 for cell in (single, member, control)]
        costs = [cpu_per_gib(cell) for cell in (single, member, control)]
        rows.append(f"| {workload.name} | {cells[0]} | {cells[1]} | "
                    f"{format_ratio(paired_ratio(member, single))} | {cells[2]} | "
                    f"{format_ratio(paired_ratio(control, single))} | "
                    + " / ".join("n/a" if c is None else f"{c:.3f}" for c in costs) + " |")
    return "\n".join(rows)


def cpu_per_gib(cell: Samples | None) -> float | None:
    """Median CPU seconds of the serving node per GiB moved: the cost of the data path,
    which the page cache's noise in the throughput does not move."""
    if cell is None or cell.error:
        values = []
    else:
        values = [r.cpu_s / (r.io_bytes / 2**30) for r in cell.results
                  if r.cpu_s is not None and r.io_bytes]
    return statistics.median(values) if values else None


def build_cluster_meta_table(meta: dict[str, dict[str, list[float]]]) -> str:
    rows = ["| operation | coordinator A | member B | B/A p50 | B/A p99 |",
            "|---|---:|---:|---:|---:|"]
    for operation in metabench.OPERATIONS:
        a, b = (meta.get(name, {}).get(operation) for name in CLUSTER_NODES[:2])
        cut_a, cut_b = p50_p99(a), p50_p99(b)
        ratios = [format_quotient(cut_b and cut_b[i], cut_a and cut_a[i]) for i in (0, 1)]
        rows.append(f"| {operation} | {format_p50_p99(a)} | {format_p50_p99(b)} | "
                    + " | ".join(ratios) + " |")
    return "\n".join(rows)


TRUNCATE_CONDITIONS = (
    ("idle", "no other node has the file open, B idle"),
    ("other", "B writes another file meanwhile (not a holder)"),
    ("held", "B has the file open and writes to it"),
)
WRITE_CONDITIONS = (
    ("idle", "the other file (allocated, inside its size)", "idle"),
    ("busy", "the other file (allocated, inside its size)", "truncate loop"),
    ("rewrite", "the other file (allocated, inside its size)",
     "rewriting + fsync, no truncate (control)"),
    ("held", "the truncated file (its first MiB)", "truncate loop"),
    ("paused", "the other file, while B also writes the truncated one",
     "truncate loop (B paused for each)"),
    ("unpaused", "the other file, while B also writes the truncated one",
     "truncate loop on a third file (control: B never paused)"),
    ("during", "the other file (the `paused` run): writes that overlapped a truncate",
     "in a truncate call (B paused for it)"),
    ("between", "the other file (the `paused` run): the other writes",
     "between truncates (refilling)"),
)


def build_truncate_table(truncate: dict[str, list[float]]) -> str:
    rows = ["| truncate 4 MiB -> 1 MiB on A | count | p50 ms | p99 ms | p50 ratio | p99 ratio |",
            "|---|---:|---:|---:|---:|---:|"]
    base = p50_p99(truncate.get("idle"))
    for key, label in TRUNCATE_CONDITIONS:
        values = truncate.get(key) or []
        cut = p50_p99(values)
        if cut is None:
            rows.append(f"| {label} | {len(values)} | n/a | n/a | n/a | n/a |")
            continue
        ratios = [format_quotient(cut[i], base and base[i]) for i in (0, 1)]
        rows.append(f"| {label} | {len(values)} | {cut[0]:.3f} | {cut[1]:.3f} | "
                    + " | ".join(ratios) + " |")
    return "\n".join(rows)


def build_write_table(writes: dict[str, list[float]]) -> str:
    rows = ["| B's 4 KiB pwrites to | while A is | writes | p50 ms | p99 ms | max ms |",
            "|---|---|---:|---:|---:|---:|"]
    for key, target, node_a in WRITE_CONDITIONS:
        values = writes.get(key) or []
        cut = p50_p99(values)
        cells = ("n/a", "n/a", "n/a") if cut is None else (
            f"{cut[0]:.3f}", f"{cut[1]:.3f}", f"{max(values):.3f}")
        rows.append(f"| {target} | {node_a} | {len(values)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def stall_summary(writes: dict[str, list[float]], truncate: dict[str, list[float]]) -> str:
    during, between = p50_p99(writes.get("during")), p50_p99(writes.get("between"))
    if during is None or between is None:
        return "Stall on another file: n/a."
    text = (f"Stall on another file: B's writes to the other file that overlapped a truncate "
            f"of a file B holds, against B's other writes in the same run (the same load, "
            f"only not paused): p50 ratio **{during[0] / between[0]:.2f}**, p99 ratio "
            f"**{during[1] / between[1]:.2f}** (target: no measurable stall, a ratio "
            f"near 1).")
    paused, unpaused = p50_p99(writes.get("paused")), p50_p99(writes.get("unpaused"))
    if paused is not None and unpaused is not None:
        text += (f" The whole `paused` run against its control, where B is never paused "
                 f"(it also counts what B does for the refills, which extend a file it "
                 f"holds): p50 ratio {paused[0] / unpaused[0]:.2f}, p99 ratio "
                 f"{paused[1] / unpaused[1]:.2f}.")
    idle, busy = p50_p99(writes.get("idle")), p50_p99(writes.get("busy"))
    control = p50_p99(writes.get("rewrite"))
    if idle is not None and busy is not None and control is not None:
        text += (f" B not holding the truncated file: A's truncate loop against A idle, "
                 f"p99 ratio {busy[1] / idle[1]:.2f}; against A rewriting with fsyncs, "
                 f"{busy[1] / control[1]:.2f}.")
    return text


def build_aggregate_table(aggregate: dict[int, list[list[Result]]]) -> str:
    rows = ["| writers at once | nodes | aggregate MiB/s | per node MiB/s | aggregate / 1 node |",
            "|---:|---|---:|---:|---:|"]
    totals = {k: [sum(r.mib_s for r in results) for results in rounds]
              for k, rounds in aggregate.items() if rounds}
    for k, values in sorted(totals.items()):
        base = totals.get(1)
        if base and len(base) == len(values):
            ratio = format_ratio(statistics.median(v / b for v, b in zip(values, base,
                                                                           strict=True)))
        else:
            ratio = format_quotient(statistics.median(values), base and statistics.median(base))
        total = statistics.median(values)
        rows.append(f"| {k} | {', '.join(CLUSTER_NODES[:k])} | {total:.1f} | {total / k:.1f} | "
                    f"{ratio} |")
    return "\n".join(rows)


def build_vm_table(vms: dict[str, list[list[dict]]]) -> str:
    rows = ["| where the VMs run | VMs | aggregate MiB/s | aggregate ops/s | write p50 ms "
            "| write p99 ms | aggregate / raw |", "|---|---:|---:|---:|---:|---:|---:|"]
    totals = {config: [sum(vm["mib_s"] for vm in vms_) for vms_ in rounds]
              for config, rounds in vms.items() if rounds}
    raw = totals.get("raw")
    for config, rounds in vms.items():
        if not rounds:
            continue
        mib = totals[config]
        ops = [sum(vm["ops_s"] for vm in vms_) for vms_ in rounds]
        p50 = statistics.median(vm["p50_ms"] for vms_ in rounds for vm in vms_)
        p99 = statistics.median(vm["p99_ms"] for vms_ in rounds for vm in vms_)
        ratio = format_ratio(statistics.median(m / r for m, r in zip(mib, raw, strict=True))
                             if raw and len(raw) == len(mib) else None)
        label = {"raw": "a plain directory (raw image files)", "1 node": "node A",
                 "3 nodes": "nodes A, B, C (one each)"}[config]
        rows.append(f"| {label} | {len(rounds[0])} | {statistics.median(mib):.1f} | "
                    f"{statistics.median(ops):.0f} | {p50:.3f} | {p99:.3f} | {ratio} |")
    return "\n".join(rows)


def cluster_report(args, samples: dict[tuple[str, str], Samples],
                   results: ClusterResults | None) -> str:
    if results is None:
        return ""
    if results.error:
        return f"\n## Cluster\n\nNot measured: {results.error}\n"
    return (
        "\n## Cluster\n\n"
        "A second volume, mounted by node A first (the coordinator) and node B second (a "
        "member that reaches the coordinator over RPC); node C joins for the aggregate "
        "only. Roles are checked with `csvfs status`.\n\n"
        "### Data path on a member node\n\n"
        "The fio workloads above on B's mount, in the same rounds as the single-node "
        "targets (interleaved; the ratio is the median of the per-round ratios). As a "
        "control, the same workloads also run on A's mount: the coordinator runs the "
        "single node's data path, only on the cluster's image, so A/single-node shows how "
        "far two images alone move these numbers on this machine. The last column is the "
        "CPU time of the node serving the mount per GiB moved, median of the rounds (most "
        "of it is the pwrite or pread into the page cache).\n\n"
        f"{build_member_table(samples)}\n\n"
        "### Metadata latency on a member node\n\n"
        f"metabench on B's mount and on A's, {args.meta_count} of each operation per node "
        f"in {args.repeat} rounds with the node order rotated, p50 / p99 in ms.\n\n"
        f"{build_cluster_meta_table(results.meta)}\n\n"
        "### Quiesce\n\n"
        "(a) Pause time: the latency of a shrinking truncate (4 MiB -> 1 MiB, then written "
        "back to 4 MiB, not timed) on A, "
        f"{args.quiesce_count} per condition in {args.repeat} rounds. Ratios are to the "
        "first row. B's writers are separate processes doing one 4 KiB pwrite every "
        f"{WRITER_INTERVAL_MS:g} ms.\n\n"
        f"{build_truncate_table(results.truncate)}\n\n"
        "(b) Stall on a different file: B's paced 4 KiB pwrites, with A idle, with A "
        "running the truncate loop, and, as a control, with A running only the loop's "
        "writes, each 1 MiB followed by an fsync (overwrites: no metadata change, no "
        "quiesce, but a flush of the image like a journal commit), each for as long as "
        "the idle truncate loop took; the conditions are rotated each round. On a "
        "machine with few CPUs, A's loop takes CPU from B, so compare with the control "
        "too. The last row is the writes to the truncated file itself, paused by every "
        "quiesce.\n\n"
        f"{build_write_table(results.writes)}\n\n"
        f"{stall_summary(results.writes, results.truncate)}\n\n"
        "### Aggregate write throughput\n\n"
        "fio seq write 1 MiB (psync, direct=0), each node writing its own "
        f"{args.size_mib} MiB file (written once up front, so these are overwrites) on its "
        f"own mount, all started together by one fio, {args.runtime} s, median of "
        f"{args.repeat} rounds with the configurations rotated; all three nodes stay "
        "mounted throughout, the idle ones only listen.\n\n"
        f"{build_aggregate_table(results.aggregate)}\n\n"
        "### VM workloads\n\n"
        f"`vmload run`, {VM_COUNT} VMs at once, each with its own {VM_DISK} sparse disk "
        f"(new every round, so first writes allocate), random writes of {VM_BLOCKS} "
        f"(powers of two) with an fsync every 64, one write at a time per VM, {args.runtime} "
        f"s, median of {args.repeat} rounds with the configurations rotated. Raw is the "
        "same VMs on a plain directory next to the images: the ceiling of this tool on "
        "this machine (vmload builds and checksums every 4 KiB sector in Python). Every "
        "VM was verified afterwards (`vmload verify`), with zero mismatches, or the run "
        "would have stopped here. Latencies are the median over the VMs of each VM's p50 and "
        "p99.\n\n"
        f"{build_vm_table(results.vms)}\n"
        + ("\n" + "\n".join(results.notes) + "\n" if results.notes else "")
    )


def describe_run(args, scratch_parent: str) -> str:
    fio_version = subprocess.run(["fio", "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip()
    commit = subprocess.run(["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{when}, commit {commit or 'unknown'}, Linux {platform.release()}, "
        f"{os.cpu_count()} CPUs, {fio_version}\n\n"
        f"fio ioengine=psync direct=0 invalidate=0, one {args.size_mib} MiB file per target "
        f"written once up front, {args.runtime} s per job, median of {args.repeat} "
        f"(targets interleaved; ratios are medians of the per-round ratios), "
        f"scratch in {scratch_parent}. "
        f"4 KiB cells show MiB/s (IOPS)."
    )


def target_notes(targets: list[Target], samples: dict[tuple[str, str], Samples]) -> str:
    notes = []
    chosen = {t.name for t in targets}
    for name in TARGETS:
        if name not in chosen:
            notes.append(f"- {name}: not selected (--targets)")
    for target in targets:
        if target.error:
            notes.append(f"- {target.name}: {target.error}")
        for workload in WORKLOADS:
            cell = samples.get((target.name, workload.name))
            if cell and cell.error:
                notes.append(f"- {target.name}, {workload.name}: {cell.error}")
    return "\n".join(notes)


# --- main -------------------------------------------------------------------------------


def parse_args(argv=None):
    def positive_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
        return value

    def target_list(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in TARGETS]
        if unknown or not names:
            what = f"unknown target {', '.join(unknown)}" if unknown else "no target given"
            raise argparse.ArgumentTypeError(f"{what}; choose from {','.join(TARGETS)}")
        return [n for n in TARGETS if n in names]

    parser = argparse.ArgumentParser(
        description="Compare csvfs with a plain file and a pass-through FUSE mount using fio."
    )
    parser.add_argument("--targets", type=target_list, default=list(TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)} (default: all)")
    parser.add_argument("--runtime", type=positive_int,
                        help="seconds per fio job (default: 4; --quick: 1)")
    parser.add_argument("--repeat", type=positive_int,
                        help="runs per target and workload; the median is reported "
                             "(default: 3; --quick: 1)")
    parser.add_argument("--size-mib", type=positive_int,
                        help="size of the test file in MiB (default: 256; --quick: 64)")
    parser.add_argument("--csvfs", default=str(PROJECT_ROOT / ".venv" / "bin" / "csvfs"),
                        help="the csvfs command (default: .venv/bin/csvfs)")
    parser.add_argument("--meta-count", type=positive_int,
                        help="operations of each kind for metadata latency "
                             "(default: 300; --quick: 50)")
    parser.add_argument("--quiesce-count", type=positive_int,
                        help="shrinking truncates per quiesce condition (default: 200; "
                             "--quick: 40)")
    parser.add_argument("--no-cluster", dest="cluster", action="store_false",
                        help="skip the cluster sections (member data path and metadata, "
                             "quiesce, aggregate writes)")
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run: small defaults for everything not given")
    parser.add_argument("--dir", default="/var/tmp",
                        help="directory on the disk to test; a fresh scratch directory is "
                             "created (and removed) inside it (default: /var/tmp)")
    args = parser.parse_args(argv)
    defaults = (dict(runtime=1, repeat=1, size_mib=64, meta_count=50, quiesce_count=40)
                if args.quick else
                dict(runtime=4, repeat=3, size_mib=256, meta_count=300, quiesce_count=200))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not os.path.isdir(args.dir):
        parser.error(f"--dir: not a directory: {args.dir}")
    if shutil.which("fio") is None:
        parser.error("fio not found (run `make setup`)")
    if (args.cluster or set(args.targets) - {"raw"}) and shutil.which("fusermount3") is None:
        parser.error("fusermount3 not found (run `make setup`)")
    return args


def run_failover(args) -> str:
    """scripts/failoverbench.py, in a process of its own (it has its own teardown)."""
    log("measuring failover ...")
    rounds = ["--rounds", "2", "--hang-rounds", "1"] if args.quick else []
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "failoverbench.py"),
                           "--csvfs", args.csvfs, "--dir", args.dir, *rounds],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        return f"\n## Failover\n\nNot measured: {proc.stderr.strip()}\n"
    return f"\n## Failover\n\n{proc.stdout}"


def raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    RESULTS_DIR.mkdir(exist_ok=True)
    for old_log in RESULTS_DIR.glob("*.log"):
        old_log.unlink()  # from an earlier run
    targets = [Target(name) for name in args.targets]
    cleanup = contextlib.ExitStack()
    interrupted = False
    signal.signal(signal.SIGTERM, raise_on_sigterm)  # run the same teardown as Ctrl-C
    try:
        scratch = Path(tempfile.mkdtemp(prefix="csvfs-bench-", dir=args.dir))
    except OSError as exc:
        log(f"error: cannot create a scratch directory in {args.dir}: {exc.strerror}")
        return 1
    try:
        for target in targets:
            log(f"setting up {target.name} ...")
            try:
                target.file = SETUP[target.name](scratch, cleanup, args)
                if target.name != "raw":
                    target.pids = processes_naming([target.file.parent])
                layout(target, args.size_mib)
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                target.error = f"setup failed: {exc}"
                log(f"{target.name}: {target.error}")
        cluster = setup_cluster(scratch, cleanup, args, targets) if args.cluster else None
        samples = run_rounds(targets, args)
        latencies = run_metadata(targets, args)
        cluster_results = None
        if args.cluster:
            cluster_results = (run_cluster(cluster, args) if cluster is not None else
                               ClusterResults(error=targets[-1].error))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # Teardown must finish: ignore further Ctrl-C (every step has a timeout).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("tearing down ...")
        cleanup.close()
        for log_path in scratch.glob("*.log"):
            shutil.copy(log_path, RESULTS_DIR / log_path.name)
        leftover = [m for m in scratch.glob("*-mnt") if is_mounted(m)]
        if leftover:
            log(f"warning: still mounted, keeping {scratch}: {', '.join(map(str, leftover))}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    if interrupted:
        log("interrupted")
        return 130

    report = (f"# csvfs benchmark\n\n{describe_run(args, args.dir)}\n\n"
              f"{build_table(samples)}\n\n{describe_metadata(args)}\n\n"
              f"{build_latency_table(latencies)}\n")
    notes = target_notes(targets, samples)
    if notes:
        report += f"\n{notes}\n"
    report += cluster_report(args, samples, cluster_results)
    if args.cluster:
        report += run_failover(args)
    RESULTS_FILE.write_text(report)
    print(report, end="")
    log(f"written to {RESULTS_FILE.relative_to(PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
