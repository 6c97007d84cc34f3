"""The O_DIRECT data path against the page-cache data path, on a loop device.

A volume on a loop device (`losetup --direct-io=on` over a sparse file, as a LUN
would be) is mounted by one node at a time, once with `--direct-io` and once with
`--no-direct-io`, the order alternating over the rounds. Each mount runs fio (psync,
1 MiB) on its mount: a sequential write of a new file, flushed at its end
(end_fsync), then a sequential read of that file after `blockdev --flushbufs` and
/proc/sys/vm/drop_caches have dropped the page cache, so that both modes read from
the device. Medians
and the ratio O_DIRECT / page cache.

A second table runs VM-style I/O (fio libaio, O_DIRECT, 4 KiB random reads and
writes at queue depth 16 and 1) on a file of an O_DIRECT mount, once with the fast
lane doing one request at a time (`--io-threads 0`) and once with its workers
(`--io-threads 4`), next to the same jobs on a raw loop device of its own: what
requests in flight at once buy where each one waits for a device.

Run by `make bench`; alone: `python scripts/devicebench.py [--quick]` (as root).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_targets import VM_WORKLOADS, BenchError, round_order, run_fio
from nodes import MountProcess, csvfs_command  # scripts/: this directory is on sys.path

MOUNT_TIMEOUT = 20.0
FIO_TIMEOUT = 300.0
MODES = (("page cache", "--no-direct-io"), ("O_DIRECT", "--direct-io"))
WORKLOADS = (("seq write 1 MiB", "write"), ("seq read 1 MiB", "read"))


class LoopVolume(contextlib.ExitStack):
    """A csvfs volume on a loop device over a sparse file, detached at exit."""

    def __init__(self, csvfs: list[str] | None, directory: Path, size: str):
        super().__init__()
        directory.mkdir(exist_ok=True)
        backing = directory / "device.backing"
        subprocess.run(["truncate", "-s", size, str(backing)], check=True)
        self.device = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", str(backing)],
            check=True, capture_output=True, text=True).stdout.strip()
        self.callback(subprocess.run, ["losetup", "--detach", self.device],
                      capture_output=True)
        if csvfs is None:  # a raw device, no volume
            return
        self.key = directory / "device.key"
        subprocess.run([*csvfs, "mkfs", self.device, "--key", str(self.key)], check=True,
                       capture_output=True)

    def drop_page_cache(self) -> None:
        """The device's pages, and any other cached copy on this host (BLKFLSBUF alone
        leaves the pages a mount just wrote in place)."""
        subprocess.run(["blockdev", "--flushbufs", self.device], check=True)
        os.sync()
        with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as knob:
            knob.write("3\n")


def measure(csvfs: list[str], volume: LoopVolume, directory: Path, option: str,
            size_mib: int, round_number: int) -> dict[str, float]:
    """One mount in one mode: MiB/s of each workload."""
    node = MountProcess.csvfs_node(volume.device, directory / "mnt", "bench",
                                   directory / "node.log", "--key", str(volume.key), option,
                                   csvfs=csvfs)
    node.start(MOUNT_TIMEOUT)
    try:
        path = node.mountpoint / f"seq-{round_number}{option}"
        speeds = {}
        for label, rw in WORKLOADS:
            if rw == "read":
                volume.drop_page_cache()
            result = run_fio(path, rw, "1M", size_mib, None, FIO_TIMEOUT)
            speeds[label] = result.mib_s
        os.unlink(path)
        return speeds
    finally:
        node.stop()


def run(csvfs: list[str], directory: Path, rounds: int, size_mib: int) -> dict:
    samples = {(mode, label): [] for mode, _ in MODES for label, _ in WORKLOADS}
    with LoopVolume(csvfs, directory, "4G") as volume:
        for round_number in range(rounds):
            order = MODES if round_number % 2 == 0 else MODES[::-1]
            for mode, option in order:
                speeds = measure(csvfs, volume, directory, option, size_mib, round_number)
                for label, speed in speeds.items():
                    samples[(mode, label)].append(speed)
    return {key: statistics.median(values) for key, values in samples.items()}


VM_ROWS = [w for w in VM_WORKLOADS if w.bs == "4k"]
LANES = (("csvfs, one at a time", "0"), ("csvfs, 4 workers", "4"))


def run_vm(csvfs: list[str], directory: Path, rounds: int, size_mib: int,
           runtime: int) -> dict:
    """IOPS of each VM-style 4 KiB workload on the raw device and on each lane."""
    targets = ["raw device", *(label for label, _ in LANES)]
    samples = {(target, w.name): [] for target in targets for w in VM_ROWS}
    with LoopVolume(csvfs, directory / "vm", "2G") as volume, \
            LoopVolume(None, directory / "raw", f"{size_mib}M") as raw:
        run_fio(Path(raw.device), "write", "1M", size_mib, None, FIO_TIMEOUT)  # not holes
        laid_out = False
        for round_number in range(rounds):
            for target in round_order(targets, round_number):
                if target == "raw device":
                    results = vm_jobs(Path(raw.device), size_mib, runtime)
                else:
                    threads = dict(LANES)[target]
                    results = vm_on_mount(csvfs, volume, directory / "vm", threads,
                                          size_mib, runtime, layout=not laid_out)
                    laid_out = True
                for name, iops in results.items():
                    samples[(target, name)].append(iops)
    return {key: statistics.median(values) for key, values in samples.items()}


def vm_on_mount(csvfs: list[str], volume: LoopVolume, directory: Path, threads: str,
                size_mib: int, runtime: int, layout: bool) -> dict[str, float]:
    node = MountProcess.csvfs_node(volume.device, directory / "mnt", "bench",
                                   directory / "node.log", "--key", str(volume.key),
                                   "--io-threads", threads, csvfs=csvfs)
    node.start(MOUNT_TIMEOUT)
    try:
        path = node.mountpoint / "vm.img"
        if layout:
            run_fio(path, "write", "1M", size_mib, None, FIO_TIMEOUT)
        return vm_jobs(path, size_mib, runtime)
    finally:
        node.stop()


def vm_jobs(path: Path, size_mib: int, runtime: int) -> dict[str, float]:
    return {w.name: run_fio(path, w.rw, w.bs, size_mib, runtime, FIO_TIMEOUT, w.engine).iops
            for w in VM_ROWS}


def vm_report(medians: dict, rounds: int, size_mib: int, runtime: int) -> str:
    labels = [label for label, _ in LANES]
    lines = [
        "\n## VM-style I/O on a loop device: requests in flight at once\n",
        f"fio libaio, O_DIRECT, {runtime} s per job on a {size_mib} MiB file: on a raw loop "
        "device, and on an O_DIRECT csvfs mount (another loop device) with the fast lane "
        f"doing one request at a time or with 4 workers. {rounds} rounds, the order "
        "rotating; medians, IOPS.\n",
        "| workload | raw device | " + " | ".join(labels) + " | 4 workers / one at a time "
        "| 4 workers / raw |",
        "|---|---:|" + "---:|" * len(labels) + "---:|---:|",
    ]
    for w in VM_ROWS:
        raw = medians[("raw device", w.name)]
        one, four = (medians[(label, w.name)] for label in labels)
        lines.append(f"| {w.name} | {raw:,.0f} | {one:,.0f} | {four:,.0f} | "
                     f"{four / one:.2f} | {four / raw:.2f} |")
    return "\n".join(lines) + "\n"


def report(medians: dict, rounds: int, size_mib: int) -> str:
    lines = [
        "\n## The O_DIRECT data path on a loop device\n",
        f"One node on a loop device (`losetup --direct-io=on`), fio psync with 1 MiB "
        f"requests over a {size_mib} MiB file: the write flushed at its end, the read "
        f"after the page cache was dropped (`blockdev --flushbufs`, drop_caches). {rounds} rounds, "
        "the order of the modes alternating; medians.\n",
        "| workload | page cache (MiB/s) | O_DIRECT (MiB/s) | O_DIRECT / page cache "
        "| target |",
        "|---|---:|---:|---:|---|",
    ]
    for label, _ in WORKLOADS:
        cached, direct = medians[("page cache", label)], medians[("O_DIRECT", label)]
        lines.append(f"| {label} | {cached:,.0f} | {direct:,.0f} | {direct / cached:.2f} "
                     "| ≥ 0.9 |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--quick", action="store_true", help="one round, a small file")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("losetup"):
        print("devicebench: needs root and losetup", file=sys.stderr)
        return 1
    rounds, size_mib = (1, 128) if args.quick else (3, 1024)
    vm_size_mib, runtime = (64, 1) if args.quick else (256, 4)
    directory = Path(tempfile.mkdtemp(prefix="csvfs-devicebench-", dir=args.dir))
    try:
        medians = run(csvfs_command(), directory, rounds, size_mib)
        vm_medians = run_vm(csvfs_command(), directory, rounds, vm_size_mib, runtime)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"devicebench: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(report(medians, rounds, size_mib), end="")
    print(vm_report(vm_medians, rounds, vm_size_mib, runtime), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
