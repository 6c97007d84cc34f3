"""What applications see of csvfs beyond the data path: small files, locks, appends.

Mounts one fresh csvfs volume on two nodes (A, the coordinator, and B, a member),
plus the pass-through FUSE filesystem and a loop-mounted ext4 image for reference,
and measures:

  small files   a tree of small files (a fixed, seeded stand-in for a source tree)
                extracted with tar onto ext4 and onto csvfs: space used by statfs
                before and after; then the create+write and read rate of 4 KiB files
                on csvfs against the pass-through, rounds interleaved
  locks         fcntl and flock lock+unlock latency on A and on B, and the hand-over
                of one exclusive lock back and forth between A and B
  appends       O_APPEND records per second from one node and from two at once

Run by `make bench`; alone: `python scripts/appbench.py [--quick]`. Markdown on stdout,
progress on stderr; every mount is torn down on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from nodes import MountProcess, NodeError, force_unmount, is_mounted

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PASSTHROUGH = PROJECT_ROOT / "scripts" / "passthrough.py"
MOUNT_TIMEOUT = 30.0
EXT4_SIZE = 512 << 20
SMALL_FILE = 4096


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- setup ---------------------------------------------------------------------------------


class Mounts:
    """The csvfs nodes A and B, the pass-through, and ext4 (or None if it cannot mount)."""

    def __init__(self, scratch: Path, csvfs: str, cleanup: contextlib.ExitStack):
        image = scratch / "apps.img"
        subprocess.run([csvfs, "mkfs", str(image), "--size", "2G"], check=True,
                       capture_output=True)
        self.a = self._start(cleanup, MountProcess.csvfs_node(
            image, scratch / "A-mnt", "A", scratch / "A.log", csvfs=[csvfs], new_session=True))
        self.b = self._start(cleanup, MountProcess.csvfs_node(
            image, scratch / "B-mnt", "B", scratch / "B.log", csvfs=[csvfs], new_session=True))
        source = scratch / "pass-src"
        source.mkdir()
        self.passthrough = self._start(cleanup, MountProcess(
            [sys.executable, str(PASSTHROUGH), str(source), str(scratch / "pass-mnt")],
            scratch / "pass-mnt", label="passthrough", output=scratch / "pass.log",
            new_session=True))
        self.ext4 = _mount_ext4(scratch, cleanup)

    @staticmethod
    def _start(cleanup: contextlib.ExitStack, server: MountProcess) -> Path:
        cleanup.callback(server.stop)
        server.start(MOUNT_TIMEOUT)
        return server.mountpoint


def _mount_ext4(scratch: Path, cleanup: contextlib.ExitStack) -> Path | None:
    image, mountpoint = scratch / "ext4.img", scratch / "ext4-mnt"
    with open(image, "wb") as out:
        out.truncate(EXT4_SIZE)
    mountpoint.mkdir()
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
    if made.returncode != 0:
        log(f"ext4: mkfs failed: {made.stderr.decode().strip()}")
        return None
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)],
                             capture_output=True)
    if mounted.returncode != 0:
        log(f"ext4: cannot loop-mount: {mounted.stderr.decode().strip()}")
        return None
    cleanup.callback(_unmount_ext4, mountpoint)
    return mountpoint


def _unmount_ext4(mountpoint: Path) -> None:
    if is_mounted(mountpoint):
        subprocess.run(["umount", str(mountpoint)], capture_output=True)
        if is_mounted(mountpoint):
            force_unmount(mountpoint)


# -- small files -----------------------------------------------------------------------------


def small_tree(files: int, seed: int = 7) -> bytes:
    """A tar of `files` files in nested directories, sized like a source tree: most a
    few KiB, a long tail up to a few hundred."""
    rng = random.Random(seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index in range(files):
            size = min(int(rng.lognormvariate(8.6, 1.3)), 900 << 10)
            name = f"tree/d{index % 37}/s{index % 11}/f{index}.src"
            info = tarfile.TarInfo(name)
            info.size = size
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(rng.randbytes(size)))
    return buffer.getvalue()


def used_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def extract(tar: bytes, directory: Path) -> int:
    """Extract and sync; the bytes the filesystem took for it, by statfs."""
    os.sync()
    before = used_bytes(directory)
    target = directory / "extract"
    target.mkdir()
    subprocess.run(["tar", "-x", "-C", str(target)], input=tar, check=True)
    os.sync()
    after = used_bytes(directory)
    shutil.rmtree(target)
    return after - before


def file_rates(directory: Path, count: int) -> tuple[float, float]:
    """(create+write, read) files per second for `count` files of 4 KiB (in the top
    directory: the pass-through makes no directories)."""
    paths = [directory / f"rate-{index}" for index in range(count)]
    payload = os.urandom(SMALL_FILE)
    started = time.perf_counter()
    for path in paths:
        with open(path, "wb") as out:
            out.write(payload)
    written = time.perf_counter() - started
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb") as source:
            if len(source.read()) != SMALL_FILE:
                raise RuntimeError("short read")
    read = time.perf_counter() - started
    for path in paths:
        path.unlink()
    return count / written, count / read


def run_small_files(mounts: Mounts, args) -> str:
    tar = small_tree(args.tree_files)
    with tarfile.open(fileobj=io.BytesIO(tar)) as listing:
        members = listing.getmembers()
    data = sum(member.size for member in members)
    log(f"small files: extracting {len(members)} files ({data / 2**20:.1f} MiB) ...")
    on_csvfs = extract(tar, mounts.a)
    rows = ["| filesystem | space used | × the data | × ext4 |", "|---|---:|---:|---:|"]
    on_ext4 = extract(tar, mounts.ext4) if mounts.ext4 is not None else None
    if on_ext4 is not None:
        rows.append(f"| ext4 (4 KiB blocks, loop device) | {on_ext4 / 2**20:.1f} MiB | "
                    f"{on_ext4 / data:.2f} | 1.00 |")
    ratio = f"{on_csvfs / on_ext4:.2f}" if on_ext4 else "n/a"
    rows.append(f"| csvfs | {on_csvfs / 2**20:.1f} MiB | {on_csvfs / data:.2f} | {ratio} |")
    rates = {"csvfs": [], "passthrough": []}
    for round_no in range(args.repeat):
        order = [("csvfs", mounts.a), ("passthrough", mounts.passthrough)]
        for name, directory in order if round_no % 2 == 0 else order[::-1]:
            rates[name].append(file_rates(directory, args.small_count))
    rate_rows = ["| 4 KiB files per second | create+write | read |", "|---|---:|---:|"]
    for name, samples in rates.items():
        rate_rows.append(f"| {name} | {statistics.median(s[0] for s in samples):.0f} | "
                         f"{statistics.median(s[1] for s in samples):.0f} |")
    quotient = [statistics.median(c[i] / p[i] for c, p in zip(rates["csvfs"],
                                                               rates["passthrough"],
                                                               strict=True))
                for i in (0, 1)]
    rate_rows.append(f"| csvfs / passthrough (paired) | {quotient[0]:.2f} | {quotient[1]:.2f} |")
    return (f"\n## Small files\n\nA seeded tree of {len(members)} files, "
            f"{data / 2**20:.1f} MiB of data, extracted with tar; space by statfs before "
            f"and after (csvfs on its default 1 MiB unit).\n\n" + "\n".join(rows) +
            f"\n\n{args.small_count} files of 4 KiB, median of {args.repeat} rounds:\n\n" +
            "\n".join(rate_rows) + "\n")


# -- locks -----------------------------------------------------------------------------------


def _lock_pairs(path: Path, count: int, kind: str) -> list[float]:
    """Milliseconds per exclusive lock + unlock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter_ns()
            if kind == "flock":
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
                fcntl.lockf(fd, fcntl.LOCK_UN, 100, 0)
            times.append((time.perf_counter_ns() - started) / 1e6)
    finally:
        os.close(fd)
    return times


def _ping_pong(path: str, rounds: int, first: bool, ready) -> None:
    """Take the lock in turns with the other side: a byte in the file says whose turn."""
    fd = os.open(path, os.O_RDWR)
    me, other = (b"A", b"B") if first else (b"B", b"A")
    ready.wait()
    done = 0
    try:
        while done < rounds:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            if os.pread(fd, 1, 0) == me:
                os.pwrite(fd, other, 0)
                done += 1
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def hand_over(a: Path, b: Path, rounds: int) -> float:
    """Milliseconds per hand-over of one exclusive lock between a process on A and one
    on B, each waiting (F_SETLKW) for the other to let go."""
    path = a / "pingpong"
    path.write_bytes(b"A")
    ready = multiprocessing.Event()
    sides = [multiprocessing.Process(target=_ping_pong, args=(str(a / "pingpong"), rounds,
                                                              True, ready)),
             multiprocessing.Process(target=_ping_pong, args=(str(b / "pingpong"), rounds,
                                                              False, ready))]
    for side in sides:
        side.start()
    started = time.perf_counter()
    ready.set()
    for side in sides:
        side.join(120)
        if side.exitcode != 0:
            side.kill()
            raise RuntimeError("a ping-pong side failed")
    return (time.perf_counter() - started) * 1000 / (2 * rounds)


def run_locks(mounts: Mounts, args) -> str:
    log("locks ...")
    rows = ["| lock + unlock (ms) | p50 | p99 |", "|---|---:|---:|"]
    for kind in ("fcntl", "flock"):
        for label, directory in (("A, the coordinator's node", mounts.a),
                                 ("B, a member", mounts.b)):
            times = sorted(_lock_pairs(directory / f"lock-{kind}", args.lock_count, kind))
            rows.append(f"| {kind} on {label} | {statistics.median(times):.3f} | "
                        f"{times[int(len(times) * 0.99) - 1]:.3f} |")
        times = sorted(_lock_pairs(mounts.passthrough / f"lock-{kind}", args.lock_count, kind))
        rows.append(f"| {kind} on the pass-through (kernel-local locks) | "
                    f"{statistics.median(times):.3f} | {times[int(len(times) * 0.99) - 1]:.3f} |")
    handover = hand_over(mounts.a, mounts.b, args.handover_rounds)
    return ("\n## Locks\n\n" + "\n".join(rows) +
            f"\n\nOne exclusive lock handed back and forth between a process on A and one "
            f"on B, each waiting for it: **{handover:.2f} ms** per hand-over "
            f"({args.handover_rounds * 2} hand-overs).\n")


# -- appends ----------------------------------------------------------------------------------


def _appender(path: str, count: int, tag: bytes, ready, results) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    record = tag * 63 + b"\n"
    ready.wait()
    started = time.perf_counter()
    for _ in range(count):
        os.write(fd, record)
    results.put(time.perf_counter() - started)
    os.close(fd)


def appends_per_second(paths: list[Path], count: int) -> float:
    paths[0].write_bytes(b"")
    ready, results = multiprocessing.Event(), multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_appender, args=(str(path), count,
                                                               b"%d" % index, ready, results))
               for index, path in enumerate(paths)]
    for worker in workers:
        worker.start()
    ready.set()
    seconds = max(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(30)
    if os.stat(paths[0]).st_size != 64 * count * len(paths):
        raise RuntimeError("appends were lost")
    return count * len(paths) / seconds


def run_appends(mounts: Mounts, args) -> str:
    log("appends ...")
    results = {"one node (B)": [], "two nodes (A and B)": [], "pass-through, one process": []}
    for _ in range(args.repeat):
        results["one node (B)"].append(appends_per_second([mounts.b / "log"], args.appends))
        results["two nodes (A and B)"].append(
            appends_per_second([mounts.a / "log", mounts.b / "log"], args.appends))
        results["pass-through, one process"].append(
            appends_per_second([mounts.passthrough / "log"], args.appends))
    rows = ["| O_APPEND writers (64-byte records) | appends per second |", "|---|---:|"]
    rows += [f"| {label} | {statistics.median(values):.0f} |" for label, values in
             results.items()]
    return (f"\n## Appends\n\n{args.appends} records per writer, median of {args.repeat} "
            "runs; every record is checked to be in the file.\n\n" + "\n".join(rows) + "\n")


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csvfs", default=str(PROJECT_ROOT / ".venv" / "bin" / "csvfs"))
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeat = 1 if quick else 3
    args.tree_files = 600 if quick else 3000
    args.small_count = 200 if quick else 1000
    args.lock_count = 100 if quick else 500
    args.handover_rounds = 50 if quick else 200
    args.appends = 300 if quick else 2000
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="csvfs-appbench-", dir=args.dir))
    report = ""
    try:
        with contextlib.ExitStack() as cleanup:
            mounts = Mounts(scratch, args.csvfs, cleanup)
            for section in (run_small_files, run_locks, run_appends):
                try:
                    report += section(mounts, args)
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    name = section.__name__.removeprefix("run_").replace("_", " ")
                    report += f"\n## {name.capitalize()}\n\nNot measured: {exc}\n"
    except (NodeError, OSError, subprocess.SubprocessError) as exc:
        print(f"cannot set up: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
