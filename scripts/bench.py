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
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import metabench  # scripts/metabench.py: run as a script, this directory is on sys.path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PASSTHROUGH = PROJECT_ROOT / "scripts" / "passthrough.py"
RESULTS_DIR = PROJECT_ROOT / "bench-results"
RESULTS_FILE = RESULTS_DIR / "latest.md"  # logs of the mounts are kept next to it
TARGETS = ("raw", "passthrough", "csvfs")
CSVFS_IMAGE_SIZE = "4G"
MOUNT_TIMEOUT = 30.0  # seconds for a mount to appear
COMMAND_TIMEOUT = 120.0  # seconds for csvfs mkfs/mount to return
LAYOUT_TIMEOUT = 600.0  # seconds to write the test file once
STOP_TIMEOUT = 15.0  # seconds for a daemon to exit after unmount or SIGTERM


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


@dataclass
class Target:
    name: str
    file: Path | None = None  # the fio test file, None unless set up
    error: str | None = None  # why the target has no numbers


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


def _unescape_mount_field(text: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes
    for code in ("\\040", "\\011", "\\012", "\\134"):
        text = text.replace(code, chr(int(code[1:], 8)))
    return text


def is_mounted(mountpoint: Path) -> bool:
    wanted = os.path.realpath(mountpoint)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 1 and _unescape_mount_field(fields[1]) == wanted:
                return True
    return False


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text.splitlines()[-lines:])


def lazy_unmount(mountpoint: Path) -> None:
    """fusermount3 -u -z and wait until the mount is gone from /proc/mounts."""
    if not is_mounted(mountpoint):
        return
    subprocess.run(
        ["fusermount3", "-u", "-z", str(mountpoint)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=STOP_TIMEOUT, check=False,
    )
    if not wait_until(lambda: not is_mounted(mountpoint), STOP_TIMEOUT):
        log(f"warning: {mountpoint} is still mounted")


def stop_child(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM a child we started, SIGKILL it if it does not exit, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def daemon_pids(pgid: int, paths: list[Path]) -> set[int]:
    """Processes still in process group *pgid* or naming one of *paths* in their argv.

    `csvfs mount` leaves its node serving in the background; this finds that node by the
    unique scratch paths it was given, whether or not it left our process group.
    """
    wanted = {os.fsencode(p) for p in paths} | {os.fsencode(os.path.realpath(p)) for p in paths}
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            in_group = os.getpgid(pid) == pgid
        except (OSError, ProcessLookupError):
            continue
        if in_group or wanted.intersection(argv):
            found.add(pid)
    return found


def stop_pids(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL, processes we started that are not our children."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = {pid for pid in pids if pid_alive(pid)}
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        wait_until(lambda a=alive: not any(pid_alive(pid) for pid in a), STOP_TIMEOUT)
    if any(pid_alive(pid) for pid in pids):
        log(f"warning: processes {sorted(pids)} did not exit")


# --- targets ----------------------------------------------------------------------------


def setup_raw(scratch: Path, cleanup: contextlib.ExitStack, args) -> Path:
    directory = scratch / "raw"
    directory.mkdir()
    return directory / "bench.dat"


def setup_passthrough(scratch: Path, cleanup: contextlib.ExitStack, args) -> Path:
    source, mountpoint = scratch / "passthrough-src", scratch / "passthrough-mnt"
    source.mkdir()
    mountpoint.mkdir()
    log_path = scratch / "passthrough.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(PASSTHROUGH), str(source), str(mountpoint)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we tear it down in order
        )

    def teardown():
        if proc.poll() is None:
            proc.terminate()  # passthrough unmounts itself on SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
        lazy_unmount(mountpoint)
        stop_child(proc)

    cleanup.callback(teardown)
    if not wait_until(lambda: proc.poll() is not None or is_mounted(mountpoint), MOUNT_TIMEOUT):
        raise BenchError(f"passthrough did not mount within {MOUNT_TIMEOUT:.0f} s")
    if not is_mounted(mountpoint):
        raise BenchError(f"passthrough exited with {proc.returncode}: {tail(log_path)} "
                         "(see bench-results/passthrough.log)")
    return mountpoint / "bench.dat"


def setup_csvfs(scratch: Path, cleanup: contextlib.ExitStack, args) -> Path:
    csvfs = shutil.which(args.csvfs)
    if csvfs is None:
        raise BenchError(f"csvfs command not found: {args.csvfs} (run `make setup`)")
    image, mountpoint = scratch / "csvfs.img", scratch / "csvfs-mnt"
    mountpoint.mkdir()
    log_path = scratch / "csvfs.log"

    def run(*command: str) -> subprocess.Popen:
        """Run a csvfs command in its own process group, output to the log file.

        No pipes: a daemon that inherits them would keep us waiting for EOF forever.
        """
        with open(log_path, "ab") as log_file:
            log_file.write(f"$ csvfs {' '.join(command)}\n".encode())
            log_file.flush()
            proc = subprocess.Popen(
                [csvfs, *command], stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        # Registered before waiting so that a daemon it leaves behind is always stopped.
        cleanup.callback(stop_csvfs, proc, mountpoint, image)
        try:
            proc.wait(COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"`csvfs {command[0]}` did not return within {COMMAND_TIMEOUT:.0f} s"
            ) from None
        if proc.returncode != 0:
            raise BenchError(f"`csvfs {command[0]}` exited with {proc.returncode}: "
                             f"{tail(log_path)} (see bench-results/csvfs*.log)")
        return proc

    run("mkfs", str(image), "--size", CSVFS_IMAGE_SIZE)
    run("mount", str(image), str(mountpoint), "--log", str(scratch / "csvfs-node.log"))
    if not wait_until(lambda: is_mounted(mountpoint), MOUNT_TIMEOUT):
        raise BenchError(f"`csvfs mount` returned but {mountpoint} is not mounted")
    return mountpoint / "bench.dat"


def stop_csvfs(proc: subprocess.Popen, mountpoint: Path, image: Path) -> None:
    """Unmount, give the node time to exit by itself, then stop whatever is left."""
    pids = daemon_pids(proc.pid, [mountpoint, image])
    lazy_unmount(mountpoint)
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), STOP_TIMEOUT)
    stop_child(proc)
    stop_pids(pids | daemon_pids(proc.pid, [mountpoint, image]))


SETUP = {"raw": setup_raw, "passthrough": setup_passthrough, "csvfs": setup_csvfs}


# --- fio --------------------------------------------------------------------------------


def run_fio(path: Path, rw: str, bs: str, size_mib: int, runtime: int | None,
            timeout: float) -> Result:
    """Run one fio job on *path*, time-based unless *runtime* is None; return its numbers."""
    command = [
        "fio", f"--name={rw}-{bs}", "--filename=" + str(path).replace(":", "\\:"),
        f"--rw={rw}", f"--bs={bs}", f"--size={size_mib}M", "--ioengine=psync", "--direct=0",
        "--invalidate=0", "--fallocate=none", "--output-format=json",
    ]
    if runtime is None:
        command.append("--end_fsync=1")
    else:
        command += ["--time_based", f"--runtime={runtime}"]
    proc = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        message = " | ".join(proc.stderr.strip().splitlines()[-2:])
        raise BenchError(f"fio exited with {proc.returncode}" + (f": {message}" if message else ""))
    try:
        # fio may print warnings before the JSON document
        report, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])
        job = report["jobs"][0]
        side = job["read" if "read" in rw else "write"]
    except (ValueError, KeyError, IndexError) as exc:
        raise BenchError(f"cannot parse fio output: {exc}") from None
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}")
    if side["io_bytes"] == 0:
        raise BenchError("fio did no I/O")
    return Result(side["bw_bytes"] / 2**20, side["iops"], side["io_bytes"])


def layout(target: Target, size_mib: int) -> None:
    """Write the whole test file once so reads hit data and writes are overwrites."""
    result = run_fio(target.file, "write", "1M", size_mib, None, LAYOUT_TIMEOUT)
    if result.io_bytes != size_mib * 2**20:
        raise BenchError(f"layout wrote {result.io_bytes} bytes, not {size_mib} MiB")


def run_rounds(targets: list[Target], args) -> dict[tuple[str, str], Samples]:
    samples = {(t.name, w.name): Samples() for t in targets for w in WORKLOADS}
    for round_no in range(args.repeat):
        # rotate the target order each round so no target always runs first
        shift = round_no % len(targets)
        order = targets[shift:] + targets[:shift]
        for workload in WORKLOADS:
            for target in order:
                cell = samples[(target.name, workload.name)]
                if target.error or cell.error:
                    continue
                os.sync()  # start from a clean page cache, not someone else's writeback
                try:
                    result = run_fio(target.file, workload.rw, workload.bs, args.size_mib,
                                     args.runtime, args.runtime + 60)
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
        if target.error or target.file is None:
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
    parser.add_argument("--runtime", type=positive_int, default=4,
                        help="seconds per fio job (default: 4)")
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="runs per target and workload; the median is reported (default: 3)")
    parser.add_argument("--size-mib", type=positive_int, default=256,
                        help="size of the test file in MiB (default: 256)")
    parser.add_argument("--csvfs", default=str(PROJECT_ROOT / ".venv" / "bin" / "csvfs"),
                        help="the csvfs command (default: .venv/bin/csvfs)")
    parser.add_argument("--meta-count", type=positive_int, default=300,
                        help="operations of each kind for metadata latency (default 300)")
    parser.add_argument("--dir", default="/var/tmp",
                        help="directory on the disk to test; a fresh scratch directory is "
                             "created (and removed) inside it (default: /var/tmp)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.dir):
        parser.error(f"--dir: not a directory: {args.dir}")
    if shutil.which("fio") is None:
        parser.error("fio not found (run `make setup`)")
    if set(args.targets) - {"raw"} and shutil.which("fusermount3") is None:
        parser.error("fusermount3 not found (run `make setup`)")
    return args


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
                layout(target, args.size_mib)
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                target.error = f"setup failed: {exc}"
                log(f"{target.name}: {target.error}")
        samples = run_rounds(targets, args)
        latencies = run_metadata(targets, args)
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
    RESULTS_FILE.write_text(report)
    print(report, end="")
    log(f"written to {RESULTS_FILE.relative_to(PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
