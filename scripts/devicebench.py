"""The O_DIRECT data path against the page-cache data path, on a loop device.

A volume on a loop device (`losetup --direct-io=on` over a sparse file, as a LUN
would be) is mounted by one node at a time, once with `--direct-io` and once with
`--no-direct-io`, the order alternating over the rounds. Each mount runs fio (psync,
1 MiB) on its mount: a sequential write of a new file, flushed at its end
(end_fsync), then a sequential read of that file after `blockdev --flushbufs` and
/proc/sys/vm/drop_caches have dropped the page cache, so that both modes read from
the device. Medians
and the ratio O_DIRECT / page cache.

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

from bench_targets import BenchError, run_fio
from nodes import MountProcess, csvfs_command  # scripts/: this directory is on sys.path

MOUNT_TIMEOUT = 20.0
FIO_TIMEOUT = 300.0
MODES = (("page cache", "--no-direct-io"), ("O_DIRECT", "--direct-io"))
WORKLOADS = (("seq write 1 MiB", "write"), ("seq read 1 MiB", "read"))


class LoopVolume(contextlib.ExitStack):
    """A csvfs volume on a loop device over a sparse file, detached at exit."""

    def __init__(self, csvfs: list[str], directory: Path, size: str):
        super().__init__()
        backing = directory / "device.backing"
        subprocess.run(["truncate", "-s", size, str(backing)], check=True)
        self.device = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", str(backing)],
            check=True, capture_output=True, text=True).stdout.strip()
        self.callback(subprocess.run, ["losetup", "--detach", self.device],
                      capture_output=True)
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
    directory = Path(tempfile.mkdtemp(prefix="csvfs-devicebench-", dir=args.dir))
    try:
        medians = run(csvfs_command(), directory, rounds, size_mib)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"devicebench: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(report(medians, rounds, size_mib), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
