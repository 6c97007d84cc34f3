"""How the cost of a cluster grows with the number of nodes that mount one volume.

For each N of --nodes (default 1,4,8,16; a volume has 64 node slots, so 64 fills
them all) a fresh volume is mounted by N nodes: n01 first, the coordinator, then
n02..nN, which join it as members, all with the same lease (--lease, 3 s as in
failoverbench.py). With every other node mounted and idle:

1. Metadata latency from a member: p50 and p99 of create and of mkdir on n02's
   mount (on n01's, the coordinator's own, at N = 1, where there is no member).
2. The coordinator's CPU per metadata operation: its CPU seconds (/proc) over the
   creates of 1, divided by their number. The heartbeats of the N nodes and the
   lease renewals are included; the coordinator's CPU while idle, measured just
   before, shows how much of it they are, and the net column takes them out.
3. Quiesce as the holders grow: a helper process on every mount holds one file
   open, so all N nodes hold it, and n02 times shrinking truncates of it. Each
   frees a unit, so it pauses I/O on the file at every holder, commits, and hands
   each holder the new map with the resume.
4. Takeover: SIGKILL the coordinator and time, from the signal, until a mkdir
   returns on a surviving member (the first in name order), and until one has
   returned on every survivor (all started at once). The killed node is started
   again, and joins, before the next round.

A Markdown table on stdout (one row per N), progress on stderr. Every node and
helper is stopped, and every mount detached, on exit, also on failure and Ctrl-C.
Run by `make bench`; alone: `python scripts/scalebench.py [--nodes 1,4,8,16,64]
[--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import metabench  # scripts/: this directory is on sys.path
from bench_targets import PROJECT_ROOT, BenchError, log
from nodes import (
    MountProcess,
    NodeError,
    cpu_seconds,
    csvfs_command,
    mounts_under,
    status_json,
    wait_until,
)

FD_HOLDER = PROJECT_ROOT / "tests" / "fd_holder.py"
VOLUME_SIZE = "1G"
MOUNT_TIMEOUT = 60.0  # a node starting among many busy ones
JOIN_TIMEOUT = 60.0  # for every node to be in session with the coordinator
OP_TIMEOUT = 30.0  # for a mkdir across a takeover
HOLDER_TIMEOUT = 30.0  # for a helper to have its file open
QUIESCE_BIG = 2 << 20  # the truncated file is written back to this size ...
QUIESCE_SMALL = 1 << 20  # ... and cut to this one: one 1 MiB unit freed
SETTINGS = {  # --quick, full
    "ops": (50, 500),
    "truncates": (10, 100),
    "takeovers": (1, 2),
    "idle_seconds": (2.0, 5.0),
}


# -- the cluster --------------------------------------------------------------------------


class ScaleCluster(contextlib.ExitStack):
    """One fresh volume mounted by nodes n01..nNN; every node stopped at exit, the
    members before the coordinator (so that none of them takes the role over)."""

    def __init__(self, csvfs: list[str], directory: Path, count: int, lease: float):
        super().__init__()
        self.csvfs, self.directory, self.lease = csvfs, directory, lease
        self.image = directory / "vol.img"
        subprocess.run([*csvfs, "mkfs", str(self.image), "--size", VOLUME_SIZE],
                       check=True, capture_output=True, timeout=60)
        self.names = [f"n{index:02d}" for index in range(1, count + 1)]
        self.nodes: dict[str, MountProcess] = {}
        self.coordinator = self.names[0]  # the first node mounted
        self.callback(self.stop_all)

    def start(self, name: str) -> None:
        log_path = self.directory / f"{name}.log"  # the node's log and its output
        node = MountProcess.csvfs_node(self.image, self.mountpoint(name), name, log_path,
                                       "--lease", str(self.lease), csvfs=self.csvfs,
                                       output=log_path, new_session=True)
        self.nodes[name] = node  # before it starts: stop_all stops it whatever happens
        node.start(MOUNT_TIMEOUT)

    def start_all(self) -> None:
        for index, name in enumerate(self.names, 1):
            self.start(name)
            if index % 8 == 0 or index == len(self.names):
                log(f"  {index}/{len(self.names)} nodes mounted")

    def mountpoint(self, name: str) -> Path:
        return self.directory / f"{name}-mnt"

    @property
    def member(self) -> str:
        """The node whose mount the measurements use: the first member, or the
        coordinator when it is alone."""
        return next((name for name in self.names if name != self.coordinator),
                    self.coordinator)

    def coordinator_pid(self) -> int:
        return self.nodes[self.coordinator].pid

    def pids(self) -> list[int]:
        return [node.pid for node in self.nodes.values()]

    def wait_joined(self) -> None:
        """Wait until every node is in session with one coordinator; note which."""
        status: dict = {}

        def joined() -> bool:
            status.clear()
            try:
                status.update(status_json(self.image, csvfs=self.csvfs))
            except NodeError as exc:  # the coordinator is busy or changing: ask again
                status["error"] = str(exc)
                return False
            in_session = {node["name"] for node in status.get("nodes", [])
                          if node.get("session")}
            return bool(status.get("coordinator")) and in_session >= set(self.names)

        if not wait_until(joined, JOIN_TIMEOUT, interval=0.5):
            raise BenchError(f"not every node joined within {JOIN_TIMEOUT:g} s: "
                             f"{status.get('error') or status.get('nodes')}")
        self.coordinator = status["coordinator"]["name"]

    def restart(self, name: str) -> None:
        """Stop what is left of a node (its dead mount) and start it again."""
        self.nodes[name].stop()
        self.start(name)

    def stop_all(self) -> None:
        order = [name for name in reversed(self.names) if name != self.coordinator]
        for name in [*order, self.coordinator]:
            node = self.nodes.get(name)
            if node is None:
                continue
            stopped, steps = node.stop()
            if not stopped:
                log(f"warning: {node.label} on {node.mountpoint}: {steps}")


# -- the measurements ---------------------------------------------------------------------


@dataclass
class Cpu:
    """CPU seconds of the coordinator and of all the nodes together (it included)."""

    coordinator: float
    nodes: float

    def per(self, count: int) -> Cpu:
        return Cpu(self.coordinator / count, self.nodes / count)


@dataclass
class Row:
    """What was measured with `nodes` nodes; latencies in ms, takeovers in s."""

    nodes: int
    mount_seconds: float | None = None
    create: list[float] = field(default_factory=list)
    mkdir: list[float] = field(default_factory=list)
    truncate: list[float] = field(default_factory=list)
    takeover_one: list[float | None] = field(default_factory=list)
    takeover_all: list[float | None] = field(default_factory=list)
    idle: Cpu | None = None  # CPU seconds per second, nothing asked
    per_create: Cpu | None = None  # CPU seconds per create, the idle load included
    net_per_create: Cpu | None = None  # the same, less the idle rate
    net_per_truncate: Cpu | None = None  # per truncate and its refill, less the idle rate
    error: str | None = None


class CpuMeter:
    """The CPU of the coordinator and of all the nodes, over the actions we time."""

    def __init__(self, cluster: ScaleCluster):
        self.pids = [[cluster.coordinator_pid()], cluster.pids()]
        self.idle = Cpu(0.0, 0.0)

    def used(self) -> Cpu:
        return Cpu(*(cpu_seconds(*pids) for pids in self.pids))

    def during(self, action) -> tuple[object, Cpu, Cpu]:
        """action(); its result, the CPU used meanwhile, and that less the idle rate."""
        before, started = self.used(), time.monotonic()
        result = action()
        after, elapsed = self.used(), time.monotonic() - started
        gross = Cpu(after.coordinator - before.coordinator, after.nodes - before.nodes)
        net = Cpu(gross.coordinator - self.idle.coordinator * elapsed,
                  gross.nodes - self.idle.nodes * elapsed)
        return result, gross, net

    def measure_idle(self, seconds: float) -> Cpu:
        _, gross, _ = self.during(lambda: time.sleep(seconds))
        self.idle = Cpu(gross.coordinator / seconds, gross.nodes / seconds)
        return self.idle


def timed_creates(directory: Path, count: int) -> list[float]:
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    return [metabench.timed(lambda path=directory / f"f{index}":
                            os.close(os.open(path, flags, 0o644)))
            for index in range(count)]


def timed_mkdirs(directory: Path, count: int) -> list[float]:
    return [metabench.timed(lambda path=directory / f"d{index}": os.mkdir(path))
            for index in range(count)]


def measure_metadata(cluster: ScaleCluster, row: Row, meter: CpuMeter,
                     settings: dict) -> None:
    """The nodes' idle CPU; create and mkdir latency on the member, and the CPU per
    create."""
    row.idle = meter.measure_idle(settings["idle_seconds"])
    directory = cluster.mountpoint(cluster.member) / "meta"
    directory.mkdir()
    count = settings["ops"]
    row.create, gross, net = meter.during(lambda: timed_creates(directory, count))
    row.per_create, row.net_per_create = gross.per(count), net.per(count)
    row.mkdir = timed_mkdirs(directory, count)


@contextlib.contextmanager
def held_everywhere(paths: list[Path]):
    """A tests/fd_holder.py process per path, each with its file open, for the block."""
    holders = []
    try:
        for path in paths:
            holders.append(subprocess.Popen(
                [sys.executable, str(FD_HOLDER), str(path)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, start_new_session=True))
        for holder, path in zip(holders, paths, strict=True):
            _ping(holder, path)
        yield
    finally:
        for holder in holders:
            _stop_holder(holder)


def _ping(holder: subprocess.Popen, path: Path) -> None:
    holder.stdin.write("ping\n")
    holder.stdin.flush()
    ready = select.select([holder.stdout], [], [], HOLDER_TIMEOUT)[0]
    answer = holder.stdout.readline().strip() if ready else "no answer"
    if answer != "ok":
        raise BenchError(f"the holder of {path}: {answer or 'exited'}")


def _stop_holder(holder: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        holder.stdin.close()  # it exits at the end of its input
    try:
        holder.wait(HOLDER_TIMEOUT)
    except subprocess.TimeoutExpired:
        holder.kill()
        holder.wait()
    holder.stdout.close()


def measure_quiesce(cluster: ScaleCluster, row: Row, meter: CpuMeter, count: int) -> None:
    """Shrinking truncates on the member of a file that every node holds open, and the
    CPU per truncate (with the write that extends the file again before it)."""
    path = cluster.mountpoint(cluster.member) / "quiesce.dat"
    path.write_bytes(b"\x42" * QUIESCE_BIG)
    with held_everywhere([cluster.mountpoint(name) / path.name for name in cluster.names]):
        row.truncate, _, net = meter.during(
            lambda: metabench.shrink_loop(path, count, QUIESCE_BIG, QUIESCE_SMALL))
    row.net_per_truncate = net.per(count)


def mkdirs_returned_at(paths: list[Path]) -> list[float | None]:
    """mkdir each path, all at once, a thread each: when each returned (time.monotonic()),
    or None if it failed or had not returned within OP_TIMEOUT (its thread is left,
    as a daemon: a hung mount must not hang us)."""
    returned: list[float | None] = [None] * len(paths)

    def make(index: int) -> None:
        with contextlib.suppress(OSError):
            os.mkdir(paths[index])
            returned[index] = time.monotonic()

    threads = [threading.Thread(target=make, args=(index,), daemon=True)
               for index in range(len(paths))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + OP_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return list(returned)


def one_takeover(cluster: ScaleCluster, round_no: int) -> tuple[float | None, float | None]:
    """Kill the coordinator; seconds until a mkdir returned on one survivor (the first
    in name order), and on every survivor. The killed node is started again and every
    node has rejoined when it returns."""
    for name in cluster.names:  # every node in session: a mkdir went through
        (cluster.mountpoint(name) / f"before-{round_no}-{name}").mkdir()
    victim = cluster.coordinator
    survivors = [name for name in cluster.names if name != victim]
    paths = [cluster.mountpoint(name) / f"after-{round_no}-{name}" for name in survivors]
    started = time.monotonic()
    cluster.nodes[victim].process.send_signal(signal.SIGKILL)
    returned = mkdirs_returned_at(paths)
    first = None if returned[0] is None else returned[0] - started
    every = None if None in returned else max(returned) - started
    cluster.restart(victim)
    cluster.wait_joined()
    log(f"  takeover from {victim}: {_seconds_ms(first)} ms on {survivors[0]}, "
        f"{_seconds_ms(every)} ms on all; now coordinated by {cluster.coordinator}")
    return first, every


def measure_takeovers(cluster: ScaleCluster, row: Row, rounds: int) -> None:
    if len(cluster.names) < 2:
        return  # nobody to take over
    for round_no in range(rounds):
        first, every = one_takeover(cluster, round_no)
        row.takeover_one.append(first)
        row.takeover_all.append(every)


def measure(csvfs: list[str], scratch: Path, count: int, args, settings: dict) -> Row:
    """Every measurement with `count` nodes; a step that fails ends the row with why."""
    row = Row(count)
    directory = scratch / f"nodes-{count}"
    directory.mkdir()
    steps = [
        ("metadata", lambda cluster, meter: measure_metadata(cluster, row, meter, settings)),
        ("quiesce", lambda cluster, meter: measure_quiesce(cluster, row, meter,
                                                           settings["truncates"])),
        ("takeover", lambda cluster, _: measure_takeovers(cluster, row,
                                                          settings["takeovers"])),
    ]
    step = "mount"
    try:
        with ScaleCluster(csvfs, directory, count, args.lease) as cluster:
            started = time.monotonic()
            cluster.start_all()
            cluster.wait_joined()
            row.mount_seconds = time.monotonic() - started
            log(f"{count} nodes: all mounted and joined in {row.mount_seconds:.1f} s")
            meter = CpuMeter(cluster)
            for step, run in steps:
                log(f"{count} nodes: {step} ...")
                run(cluster, meter)
            log(f"{count} nodes: tearing down ...")
    except (BenchError, NodeError, OSError, subprocess.SubprocessError) as exc:
        row.error = f"{step}: {exc}"
        log(f"{count} nodes: {row.error}")
    return row


# -- the report ---------------------------------------------------------------------------

LATENCY_HEADER = (
    "| nodes | create p50 | create p99 | mkdir p50 | mkdir p99 | truncate p50 "
    "| truncate p99 | takeover, one survivor | takeover, every survivor "
    "| coordinator CPU per create | coordinator idle |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
CPU_HEADER = (
    "| nodes | coordinator per create | all nodes per create | coordinator per truncate "
    "| all nodes per truncate | all nodes idle |\n"
    "|---:|---:|---:|---:|---:|---:|")


def _seconds_ms(value: float | None) -> str:
    return "failed" if value is None else f"{value * 1000:.0f}"


def _percentiles(values: list[float]) -> list[str]:
    if len(values) < 2:
        return ["-", "-"]
    return [f"{value:.2f}" for value in metabench.percentiles(values)]


def _takeovers(values: list[float | None]) -> str:
    return ", ".join(map(_seconds_ms, values)) or "-"


def _ms(cpu: Cpu | None, whose: str) -> str:
    return "-" if cpu is None else f"{getattr(cpu, whose) * 1000:.3f}"


def _share(cpu: Cpu | None, whose: str) -> str:
    return "-" if cpu is None else f"{getattr(cpu, whose) * 100:.1f} %"


def latency_row(row: Row) -> str:
    cells = [str(row.nodes), *_percentiles(row.create), *_percentiles(row.mkdir),
             *_percentiles(row.truncate), _takeovers(row.takeover_one),
             _takeovers(row.takeover_all), _ms(row.per_create, "coordinator"),
             _share(row.idle, "coordinator")]
    return "| " + " | ".join(cells) + " |"


def cpu_row(row: Row) -> str:
    cells = [str(row.nodes), _ms(row.net_per_create, "coordinator"),
             _ms(row.net_per_create, "nodes"), _ms(row.net_per_truncate, "coordinator"),
             _ms(row.net_per_truncate, "nodes"), _share(row.idle, "nodes")]
    return "| " + " | ".join(cells) + " |"


def report(rows: list[Row], args, settings: dict, minutes: float) -> str:
    notes = [f"- {row.nodes} nodes: not measured beyond {row.error}" for row in rows
             if row.error]
    mounts = ", ".join(f"{row.nodes}: {row.mount_seconds:.1f} s" for row in rows
                       if row.mount_seconds is not None)
    return "\n".join([
        "\n## Scale: cost against the number of nodes\n", describe(args, settings, minutes),
        LATENCY_HEADER, *map(latency_row, rows), "", describe_cpu(settings),
        CPU_HEADER, *map(cpu_row, rows), "",
        f"Time to mount every node and see it join: {mounts or '-'}.", *notes, ""])


def describe(args, settings: dict, minutes: float) -> str:
    return (
        f"One fresh volume per row (64 node slots), mounted by that many nodes, lease "
        f"{args.lease:g} s; this section took {minutes:.1f} minutes. Latencies in ms, on "
        f"the first member's mount (the coordinator's own at 1 node), with the other "
        f"nodes mounted and idle: {settings['ops']} creates, then {settings['ops']} "
        f"mkdirs; {settings['truncates']} shrinking truncates (2 MiB to 1 MiB) of a file "
        f"that every node holds open. Takeover: ms from SIGKILL of the coordinator until "
        f"a mkdir returned on one survivor (the first by name), and on every survivor "
        f"(all at once), one value per round. Coordinator CPU: ms of its CPU time per create over "
        f"the creates, its heartbeats and lease renewals included (at 1 node, the FUSE "
        f"side of the creates too); idle: its CPU over {settings['idle_seconds']:g} s "
        f"with nothing asked, as a share of one core.\n")


def describe_cpu(settings: dict) -> str:
    return (
        "Where the CPU goes: ms of CPU time per operation, less the idle rate measured "
        "before, of the coordinator and of all the nodes together (the coordinator and "
        "the member that asks included); a truncate counts with the write that extends "
        "the file again before it (a map pushed to every holder). All nodes idle: their "
        "CPU with nothing asked, as a share of one core.\n")


# -- main ---------------------------------------------------------------------------------


def node_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not counts or min(counts) < 1 or max(counts) > 64:
        raise argparse.ArgumentTypeError("node counts go from 1 to 64 (the node slots)")
    return counts


def interrupted(signum, frame):
    """Ctrl-C or SIGTERM: tear down, and let nothing interrupt the teardown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def remove_scratch(scratch: Path) -> None:
    """Remove the scratch directory, unless a mount is left in it (not to descend)."""
    left = mounts_under(scratch)
    if left:
        log(f"warning: still mounted, keeping {scratch}: {', '.join(left)}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=node_counts, default=[1, 4, 8, 16],
                        help="node counts, comma-separated (default 1,4,8,16; at most 64)")
    parser.add_argument("--lease", type=float, default=3.0, help="lease time (default 3)")
    parser.add_argument("--csvfs", help="the csvfs command (default: as scripts/nodes.py finds)")
    parser.add_argument("--dir", default="/var/tmp", help="scratch parent (default /var/tmp)")
    parser.add_argument("--quick", action="store_true", help="small counts, one takeover")
    args = parser.parse_args(argv)
    settings = {name: values[0 if args.quick else 1] for name, values in SETTINGS.items()}
    csvfs = [args.csvfs] if args.csvfs else csvfs_command()
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    scratch = Path(tempfile.mkdtemp(prefix="csvfs-scale-", dir=args.dir))
    started = time.monotonic()
    try:
        rows = [measure(csvfs, scratch, count, args, settings) for count in args.nodes]
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        remove_scratch(scratch)
    if all(row.error for row in rows):
        log("scale bench failed: " + "; ".join(row.error for row in rows))
        return 1
    print(report(rows, args, settings, (time.monotonic() - started) / 60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
