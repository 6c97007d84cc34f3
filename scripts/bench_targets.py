"""bench.py's single-node targets (a plain file, a pass-through FUSE mount, csvfs, and
csvfs at a baseline revision), and the fio and metadata rounds run on them."""

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import metabench  # scripts/metabench.py: run as a script, this directory is on sys.path
from nodes import (
    MountProcess,
    NodeError,
    cpu_seconds,
    is_mounted,
    processes_naming,
    stop_daemon,
    wait_until,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PASSTHROUGH = PROJECT_ROOT / "scripts" / "passthrough.py"
TARGETS = ("raw", "passthrough", "csvfs")
BASELINE = "baseline"  # csvfs at another revision (--baseline), beside the targets
SINGLE_NODE = (*TARGETS, BASELINE)
CSVFS_IMAGE_SIZE = "4G"
MOUNT_TIMEOUT = 30.0  # seconds for a mount to appear
COMMAND_TIMEOUT = 120.0  # seconds for csvfs mkfs/mount to return
LAYOUT_TIMEOUT = 600.0  # seconds to write the test file once
STOP_TIMEOUT = 15.0  # seconds for a writer that closed its output to exit
PROBE_TIMEOUT = 60.0  # seconds for one O_DIRECT read of a test file


@dataclass(frozen=True)
class Engine:
    """How fio issues the I/O of a job."""
    ioengine: str = "psync"  # fio --ioengine
    iodepth: int = 1  # fio --iodepth: I/Os in flight (psync has one at a time)
    direct: bool = False  # fio --direct: O_DIRECT, around the page cache

    def options(self) -> list[str]:
        return [f"--ioengine={self.ioengine}", f"--iodepth={self.iodepth}",
                f"--direct={int(self.direct)}"]


BUFFERED = Engine()  # one pread/pwrite at a time through the page cache


def vm_engine(iodepth: int) -> Engine:
    """What a qemu disk with cache=none,aio=native does: native AIO on O_DIRECT."""
    return Engine("libaio", iodepth, direct=True)


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio --rw
    bs: str  # fio --bs
    show_iops: bool
    engine: Engine = BUFFERED


WORKLOADS = (
    Workload("seq write 1 MiB", "write", "1M", False),
    Workload("seq read 1 MiB", "read", "1M", False),
    Workload("rand write 4 KiB", "randwrite", "4k", True),
    Workload("rand read 4 KiB", "randread", "4k", True),
)
VM_WORKLOADS = (  # the VM-style table (--only vm); names differ from the ones above
    Workload("rand read 4 KiB QD16", "randread", "4k", True, vm_engine(16)),
    Workload("rand write 4 KiB QD16", "randwrite", "4k", True, vm_engine(16)),
    Workload("rand read 4 KiB QD1", "randread", "4k", True, vm_engine(1)),
    Workload("rand write 4 KiB QD1", "randwrite", "4k", True, vm_engine(1)),
    Workload("seq write 1 MiB QD4", "write", "1M", False, vm_engine(4)),
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
    return mount_csvfs(scratch, cleanup, "csvfs", [csvfs])


def setup_baseline(scratch: Path, cleanup: contextlib.ExitStack, args) -> Path:
    """csvfs as it was at --baseline: its source exported from git into the scratch
    directory, its FUSE shim built there, and run from there with this interpreter."""
    source = scratch / "baseline-src"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(PROJECT_ROOT), "archive", args.baseline],
                             capture_output=True, timeout=COMMAND_TIMEOUT, check=False)
    if archive.returncode != 0:
        raise BenchError(f"git archive {args.baseline}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True,
                   timeout=COMMAND_TIMEOUT)
    environment = {**os.environ, "PYTHONPATH": str(source)}
    built = subprocess.run([sys.executable, "-m", "csvfs.fuse_shim", "--build"], cwd=source,
                           env=environment, capture_output=True, text=True,
                           timeout=COMMAND_TIMEOUT, check=False)
    if built.returncode != 0:
        log(f"baseline: the FUSE shim did not build ({built.stderr.strip()[-200:]})")
    return mount_csvfs(scratch, cleanup, BASELINE, [sys.executable, "-m", "csvfs.cli"],
                       cwd=source, env=environment)


def mount_csvfs(scratch: Path, cleanup: contextlib.ExitStack, name: str, csvfs: list[str],
                cwd: Path | None = None, env: dict | None = None) -> Path:
    """mkfs and mount (in the background) a single-node volume named `name`."""
    image, mountpoint = scratch / f"{name}.img", scratch / f"{name}-mnt"
    mountpoint.mkdir()
    log_path = scratch / f"{name}.log"

    def run(*command: str) -> None:
        """Run a csvfs command in its own process group, output to the log file.

        No pipes: a daemon that inherits them would keep us waiting for EOF forever.
        """
        with open(log_path, "ab") as log_file:
            log_file.write(f"$ csvfs {' '.join(command)}\n".encode())
            log_file.flush()
            try:
                code = subprocess.run(
                    [*csvfs, *command], stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=subprocess.STDOUT, start_new_session=True, timeout=COMMAND_TIMEOUT,
                    cwd=cwd, env=env,
                ).returncode
            except subprocess.TimeoutExpired:
                raise BenchError(
                    f"`csvfs {command[0]}` did not return within {COMMAND_TIMEOUT:.0f} s"
                ) from None
        if code != 0:
            raise BenchError(f"`csvfs {command[0]}` exited with {code}: "
                             f"{tail(log_path)} (see bench-results/{name}*.log)")

    # Registered before mounting, so that a node the mount leaves behind is always stopped.
    cleanup.callback(stop_background_node, mountpoint)
    run("mkfs", str(image), "--size", CSVFS_IMAGE_SIZE)
    run("mount", str(image), str(mountpoint), "--log", str(scratch / f"{name}-node.log"))
    if not wait_until(lambda: is_mounted(mountpoint), MOUNT_TIMEOUT):
        raise BenchError(f"`csvfs mount` returned but {mountpoint} is not mounted")
    return mountpoint / "bench.dat"


SETUP = {"raw": setup_raw, "passthrough": setup_passthrough, "csvfs": setup_csvfs,
         BASELINE: setup_baseline}


# --- fio --------------------------------------------------------------------------------


def run_fio(path: Path, rw: str, bs: str, size_mib: int, runtime: int | None,
            timeout: float, engine: Engine = BUFFERED) -> Result:
    """Run one fio job on *path*, time-based unless *runtime* is None; return its numbers."""
    return run_fio_jobs([path], rw, bs, size_mib, runtime, timeout, engine)[0]


def run_fio_jobs(paths: list[Path], rw: str, bs: str, size_mib: int, runtime: int | None,
                 timeout: float, engine: Engine = BUFFERED) -> list[Result]:
    """Run one fio job per path, all started together by one fio; their numbers in order."""
    command = [
        "fio", f"--rw={rw}", f"--bs={bs}", f"--size={size_mib}M", *engine.options(),
        "--invalidate=0", "--fallocate=none", "--output-format=json",
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


def round_order(items: list, round_no: int) -> list:
    """The order of round round_no: rotated each round, so that none always runs first,
    and reversed in every other cycle of rotations, so that none always follows the same
    one (rotating and reversing in alternate rounds would undo each other for two)."""
    if not items:
        return []
    shift = round_no % len(items)
    order = items[shift:] + items[:shift]
    if (round_no // len(items)) % 2:
        order.reverse()
    return order


def run_rounds(targets: list[Target], args, workloads: tuple[Workload, ...] = WORKLOADS
               ) -> dict[tuple[str, str], Samples]:
    """Each workload on each target in --repeat rounds, the targets in round_order; the
    samples by (target, workload) name. A job that fails leaves its cell with the error,
    a job that hangs leaves its target with one."""
    samples = {(t.name, w.name): Samples() for t in targets for w in workloads}
    for round_no in range(args.repeat):
        order = round_order(targets, round_no)
        for workload in workloads:
            for target in order:
                cell = samples[(target.name, workload.name)]
                if target.error or cell.error:
                    continue
                os.sync()  # start from a clean page cache, not someone else's writeback
                try:
                    cpu_before = cpu_seconds(*target.pids)
                    result = run_fio(target.file, workload.rw, workload.bs, args.size_mib,
                                     args.runtime, args.runtime + 60, workload.engine)
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
                log(f"[{round_no + 1}/{args.repeat}] {workload.name:<21} {target.name:<12}"
                    f"{result.mib_s:9.1f} MiB/s {result.iops:10.0f} IOPS")
    return samples


def run_vm_rounds(targets: list[Target], args) -> dict[tuple[str, str], Samples]:
    """run_rounds with VM_WORKLOADS on the single-node targets; on one that does not take
    O_DIRECT, every cell holds why instead."""
    samples, direct = {}, []
    for target in (t for t in targets if t.name in SINGLE_NODE):
        error = None if target.error else direct_io_error(target.file)
        if error is None:
            direct.append(target)
            continue
        log(f"{target.name}: {error}")
        samples.update({(target.name, w.name): Samples(error=error) for w in VM_WORKLOADS})
    return {**samples, **run_rounds(direct, args, VM_WORKLOADS)}


def direct_io_error(path: Path) -> str | None:
    """Why a 4 KiB O_DIRECT read of path fails, or None when it works: a FUSE filesystem
    may refuse O_DIRECT, or pass it on to a file it then reads into unaligned buffers.
    dd aligns its buffer, and, as a child, can be killed if the mount hangs."""
    try:
        proc = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4k", "count=1",
                               "iflag=direct", "status=none"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired:
        return f"a 4 KiB O_DIRECT read did not return within {PROBE_TIMEOUT:.0f} s"
    if proc.returncode == 0:
        return None
    reason = proc.stderr.strip().rsplit(": ", 1)[-1] or f"dd exited with {proc.returncode}"
    return f"a 4 KiB O_DIRECT read fails ({reason})"


def run_metadata(targets: list[Target], args) -> dict[str, dict[str, list[float]]]:
    """Single-operation metadata latencies on every single-node target that is up; a
    target that fails is left out, with a line in the log."""
    up = [t for t in targets if not t.error and t.file is not None and t.name in SINGLE_NODE]

    def failed(name: str, exc: OSError) -> None:
        log(f"{name}: metadata latency failed: {exc}")

    return metadata_rounds({t.name: t.file.parent for t in up}, args, failed)


def metadata_rounds(directories: dict[str, Path], args,
                    failed: Callable[[str, OSError], None] | None = None
                    ) -> dict[str, dict[str, list[float]]]:
    """metabench in each directory, --meta-count of each operation in --repeat rounds
    with the order rotated (round_order). An OSError goes to failed(name, exc), and the
    rounds go on; without failed, it is raised."""
    per_round = max(2, math.ceil(args.meta_count / args.repeat))
    latencies: dict[str, dict[str, list[float]]] = {name: {} for name in directories}
    for round_no in range(args.repeat):
        for name in round_order(list(directories), round_no):
            try:
                samples = metabench.measure(directories[name], per_round)
            except OSError as exc:
                if failed is None:
                    raise
                failed(name, exc)
                continue
            for operation, values in samples.items():
                latencies[name].setdefault(operation, []).extend(values)
        log(f"[{round_no + 1}/{args.repeat}] metadata latency on {', '.join(directories)}: "
            f"{per_round} of each")
    return {name: found for name, found in latencies.items() if found}
