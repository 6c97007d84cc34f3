"""Redirected I/O and coordinator moves, as the applications see them.

1. Redirected against direct: fio on a member's mount (B; A coordinates), each
   workload once in Direct mode and once with `csvfs redirect --node B on`, the
   order alternating over the rounds; medians, and the ratio.
2. Moves: a paced writer on each of three nodes (one 4 KiB pwrite per ms, an fsync
   every 64) while `csvfs move` hands the role round the nodes; the pause a move
   causes is the longest write that overlaps it. p50, p99 and max over the moves;
   a writer that gets an error fails the run.
3. The switch to Redirected: the same writer on B when B's path fails (`csvfs
   fault ... storage-down`): the longest write around each fault.

Run by `make bench`; alone: `python scripts/opsbench.py [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_targets import BenchError, Result, run_fio
from nodes import MountProcess, csvfs_command  # scripts/: this directory is on sys.path
from writer_latency import Writer, overlapping, percentile

MOUNT_TIMEOUT = 20.0
FIO_TIMEOUT = 120.0
WORKLOADS = (("seq write 64 KiB", "write", "64k"), ("rand read 4 KiB", "randread", "4k"),
             ("rand write 4 KiB", "randwrite", "4k"))
DISK = 256 << 20


class Cluster(contextlib.ExitStack):
    """One volume mounted by nodes A, B and C, stopped at exit."""

    def __init__(self, csvfs: list[str], directory: Path, names=("A", "B", "C")):
        super().__init__()
        self.csvfs = csvfs
        self.image = directory / "vol.img"
        subprocess.run([*csvfs, "mkfs", str(self.image), "--size", "2G"], check=True,
                       capture_output=True)
        self.mounts = {}
        for name in names:
            node = MountProcess.csvfs_node(self.image, directory / f"{name}-mnt", name,
                                           directory / f"{name}.log", csvfs=csvfs)
            self.mounts[name] = node.start(MOUNT_TIMEOUT).mountpoint
            self.callback(node.stop)

    def csvfs_run(self, *args: str) -> None:
        result = subprocess.run([*self.csvfs, *args], capture_output=True, text=True,
                                timeout=60)
        if result.returncode != 0:
            raise BenchError(f"csvfs {' '.join(args)}: {result.stderr.strip()}")


# -- 1. redirected against direct ---------------------------------------------------------


def run_redirected(cluster: Cluster, rounds: int, seconds: int) -> str:
    path = cluster.mounts["B"] / "fio.dat"
    run_fio(path, "write", "1M", DISK >> 20, None, FIO_TIMEOUT)  # laid out once
    results: dict[tuple[str, str], list[Result]] = {}
    for round_no in range(rounds):
        modes = ("direct", "redirected") if round_no % 2 == 0 else ("redirected", "direct")
        for mode in modes:
            cluster.csvfs_run("redirect", str(cluster.image), "--node", "B",
                              "on" if mode == "redirected" else "off")
            for label, rw, bs in WORKLOADS:
                log(f"redirected I/O, round {round_no + 1}/{rounds}: {label}, {mode}")
                result = run_fio(path, rw, bs, DISK >> 20, seconds, FIO_TIMEOUT)
                results.setdefault((label, mode), []).append(result)
    cluster.csvfs_run("redirect", str(cluster.image), "--node", "B", "off")
    rows = ["| fio on member B | direct | redirected | redirected / direct |",
            "|---|---:|---:|---:|"]
    for label, _rw, bs in WORKLOADS:
        direct, redirected = (statistics.median(_figure(r, bs) for r in results[label, mode])
                              for mode in ("direct", "redirected"))
        unit = "MiB/s" if bs == "64k" else "IOPS"
        rows.append(f"| {label} ({unit}) | {direct:,.0f} | {redirected:,.0f} | "
                    f"{redirected / direct:.2f} |")
    return (f"Redirected against direct I/O: fio (psync, {seconds} s each) on a member's "
            f"mount, {rounds} rounds, the order alternating; medians.\n\n"
            + "\n".join(rows) + "\n")


def _figure(result: Result, bs: str) -> float:
    return result.mib_s if bs == "64k" else result.iops


# -- 2. moves, and 3. the switch to redirected ---------------------------------------------


def run_moves(cluster: Cluster, moves: int, gap: float) -> str:
    names = list(cluster.mounts)
    windows = []
    with contextlib.ExitStack() as writers:
        running = [writers.enter_context(_writer(cluster, name, index))
                   for index, name in enumerate(names)]
        time.sleep(1.0)
        for index in range(moves):
            heir = names[(index + 1) % len(names)]
            log(f"moves: {index + 1}/{moves}, to {heir}")
            begin = time.perf_counter_ns()
            cluster.csvfs_run("move", str(cluster.image), "--to", heir)
            windows.append((begin, time.perf_counter_ns()))
            time.sleep(gap)
        samples = [writer.finish() for writer in running]
    pauses = [max(overlapping([s for each in samples for s in each], [window]), default=0.0)
              for window in windows]
    writes = sum(map(len, samples))
    return (f"\nCoordinator moves: {moves} moves round three nodes, {gap:g} s apart, while a "
            "paced writer on each node (one 4 KiB pwrite per ms, an fsync every 64) timed "
            f"every write ({writes} writes, not one error). The pause a move causes is the "
            "longest write overlapping it.\n\n"
            "| a move, as a writer sees it | moves | p50 ms | p99 ms | max ms | target |\n"
            "|---|---:|---:|---:|---:|---|\n"
            f"| longest write across a move | {moves} | {percentile(pauses, 0.5):.1f} | "
            f"{percentile(pauses, 0.99):.1f} | {max(pauses):.1f} | p99 < 200 ms |\n")


def run_switch(cluster: Cluster, faults: int) -> str:
    image = str(cluster.image)
    windows = []
    with _writer(cluster, "B", 9) as writer:
        time.sleep(1.0)
        for index in range(faults):
            log(f"storage faults: {index + 1}/{faults}")
            begin = time.perf_counter_ns()
            cluster.csvfs_run("fault", image, "--node", "B", "storage-down")
            time.sleep(1.0)  # the next writes fail over to the coordinator
            windows.append((begin, time.perf_counter_ns()))
            cluster.csvfs_run("fault", image, "--node", "B", "storage-up")
            time.sleep(1.5)  # B's probe finds its path again: direct once more
        samples = writer.finish()
    pauses = [max(overlapping(samples, [window]), default=0.0) for window in windows]
    return ("\nThe switch to Redirected: B's path fails (`csvfs fault`) while B's paced "
            f"writer runs, {faults} times; the longest write in the second after each "
            "fault (no write failed).\n\n"
            "| B's path fails | faults | p50 ms | max ms | target |\n|---|---:|---:|---:|---|\n"
            f"| longest write | {faults} | {percentile(pauses, 0.5):.1f} | "
            f"{max(pauses):.1f} | < 1000 ms, no error |\n")


def _writer(cluster: Cluster, name: str, seed: int) -> Writer:
    path = cluster.mounts[name] / f"writer-{name}.img"
    with open(path, "wb") as disk:
        disk.truncate(64 << 20)
        disk.write(b"\1" * (64 << 20))  # allocated: writes go straight to the image
    return Writer(path, 64 << 20, False, 64, seed, path.with_suffix(".lat"))


# -- main -----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csvfs", help="the csvfs command (default: as scripts/nodes.py finds)")
    parser.add_argument("--dir", default="/var/tmp", help="scratch parent (default /var/tmp)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    csvfs = [args.csvfs] if args.csvfs else csvfs_command()
    scratch = Path(tempfile.mkdtemp(prefix="csvfs-ops-", dir=args.dir))
    started = time.monotonic()
    try:
        with Cluster(csvfs, scratch) as cluster:
            report = run_redirected(cluster, 1 if args.quick else 3, 2 if args.quick else 5)
            report += run_moves(cluster, 6 if args.quick else 30, 1.0)
            report += run_switch(cluster, 2 if args.quick else 5)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"operations bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n## Redirected I/O and coordinator moves\n\nOn a 3-node csvfs cluster; this "
          f"section took {(time.monotonic() - started) / 60:.1f} minutes.\n\n{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
