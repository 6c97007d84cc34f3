"""bench.py's cluster sections: a volume mounted by nodes A, B and C, and the member
data path, metadata, quiesce, aggregate and VM measurements on it."""

import bisect
import contextlib
import functools
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import metabench  # scripts/metabench.py: run as a script, this directory is on sys.path
from bench_targets import (
    COMMAND_TIMEOUT,
    PROJECT_ROOT,
    STOP_TIMEOUT,
    BenchError,
    Result,
    Target,
    layout,
    log,
    metadata_rounds,
    run_fio_jobs,
    start_until_teardown,
    tail,
)
from nodes import (
    MountProcess,
    NodeError,
    processes_naming,
    status_json,
)

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
    """metabench on each node's mount, in a directory of its own."""
    directories = {name: mountpoints[name] / f"meta-{name}" for name in mountpoints}
    for directory in directories.values():
        directory.mkdir()
    return metadata_rounds(directories, args)


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


