#!/usr/bin/env python3
"""Benchmark csvfs against a plain file and a minimal pass-through FUSE filesystem.

Runs four fio workloads (sequential 1 MiB write/read, random 4 KiB write/read) on up to
three targets:

  raw          a plain file in the scratch directory
  passthrough  scripts/passthrough.py forwarding to a directory in the scratch directory
  csvfs        `csvfs mkfs` + `csvfs mount` of an image in the scratch directory
  baseline     with --baseline REV: the same, with csvfs as it was at git revision REV,
               so that one run compares a change with what came before it

Each (target, workload) pair is repeated --repeat times, targets interleaved within each
round, and the median is reported as a Markdown table on stdout and in
bench-results/latest.md (the logs of the mounts are copied next to it). Progress and
errors go to stderr. Every mount and child process is torn down on exit, including on
failure and Ctrl-C. A target that cannot be set up is reported as n/a.

Next to it, a second table, VM-style I/O, measures the same files the way qemu runs a
disk with cache=none,aio=native (fio ioengine=libaio direct=1): random 4 KiB reads and
writes at iodepth 16 and 1, and sequential 1 MiB writes at iodepth 4, in IOPS (MiB/s
for the 1 MiB row), on raw, csvfs, the baseline and passthrough, each as a ratio to raw
(a target that does not take O_DIRECT is n/a there, with the reason below the table).
`--only vm` runs this table alone, e.g. before and after a change to the data path:

  scripts/bench.py --only vm --targets raw,csvfs --baseline REV

and `--only meta` the metadata latencies alone, the same way.

Unless --no-cluster is given, a second csvfs volume is mounted by several nodes (A, the
coordinator, then B, a member, later C) and four more sections are measured:

  member data path   the same fio workloads on B's mount, interleaved with the others in
                     the same rounds, as a ratio to single-node csvfs
  member metadata    metabench on B's mount next to A's, rounds interleaved
  quiesce            shrinking truncates on A with and without B holding the file, and
                     B's paced 4 KiB writes to another file with A idle or truncating
  aggregate writes   fio seq write 1 MiB from 1, 2 and 3 nodes at once, one file each

and then, each in a process of its own, the failover time with the disk lease and with
election through etcd (failoverbench.py), what applications see beyond the data path
(appbench.py: small files, locks, appends), redirected I/O and coordinator moves
(opsbench.py), O_DIRECT on a loop device (devicebench.py), how metadata latency,
quiesce, takeover and the coordinator's CPU grow from 1 to 16 nodes (scalebench.py),
and backups against cp, restic and borg (backupbench.py).

The code: bench_targets.py (the single-node targets, fio and metadata rounds),
bench_cluster.py (the cluster sections), bench_report.py (the tables).
"""

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_cluster import (
    ClusterResults,
    run_cluster,
    setup_cluster,
)
from bench_report import (
    baseline_section,
    build_latency_table,
    build_table,
    cluster_report,
    describe_machine,
    describe_metadata,
    describe_run,
    target_notes,
    vm_section,
)
from bench_targets import (
    BASELINE,
    PROJECT_ROOT,
    SETUP,
    TARGETS,
    BenchError,
    Samples,
    Target,
    layout,
    log,
    run_metadata,
    run_rounds,
    run_vm_rounds,
)
from nodes import (
    is_mounted,
    processes_naming,
)

RESULTS_DIR = PROJECT_ROOT / "bench-results"
RESULTS_FILE = RESULTS_DIR / "latest.md"  # logs of the mounts are kept next to it


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
    parser.add_argument("--only", choices=["vm", "meta"],
                        help="run one table alone on the --targets and the --baseline: "
                             "vm, the VM-style I/O table (libaio, O_DIRECT), or meta, "
                             "the metadata latencies; no other table, no cluster section")
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run: small defaults for everything not given")
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure csvfs as it was at git revision REV, in the same "
                             "rounds, and report csvfs against it (make bench BASELINE=REV)")
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
    if args.only:
        args.cluster = False
    if not os.path.isdir(args.dir):
        parser.error(f"--dir: not a directory: {args.dir}")
    args.baseline_commit = _commit_of(parser, args.baseline) if args.baseline else None
    if shutil.which("fio") is None:
        parser.error("fio not found (run `make setup`)")
    if (args.cluster or set(args.targets) - {"raw"}) and shutil.which("fusermount3") is None:
        parser.error("fusermount3 not found (run `make setup`)")
    return args


def _commit_of(parser, revision: str) -> str:
    found = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short",
                            "--verify", "--quiet", f"{revision}^{{commit}}"],
                           capture_output=True, text=True, check=False)
    if found.returncode != 0:
        parser.error(f"--baseline: not a commit of this repository: {revision}")
    return found.stdout.strip()


def run_failover(args) -> str:
    """scripts/failoverbench.py, in a process of its own (it has its own teardown)."""
    log("measuring failover ...")
    rounds = ["--rounds", "2", "--hang-rounds", "1", "--etcd-rounds", "1",
              "--etcd-hang-rounds", "1"] if args.quick else []
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "failoverbench.py"),
                           "--csvfs", args.csvfs, "--dir", args.dir, *rounds],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        return f"\n## Failover\n\nNot measured: {proc.stderr.strip()}\n"
    return f"\n## Failover\n\n{proc.stdout}"


def _run_section(args, script: str, title: str, *options: str, timeout: float = 1200) -> str:
    """scripts/SCRIPT in a process of its own (each has its own teardown): its report,
    or the section's title with why it was not measured."""
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / script),
                           "--dir", args.dir, *options, *(["--quick"] if args.quick else [])],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        return f"\n## {title}\n\nNot measured: {proc.stderr.strip()}\n"
    return proc.stdout


def run_applications(args) -> str:
    """scripts/appbench.py (small files, locks, appends)."""
    log("measuring small files, locks and appends ...")
    return _run_section(args, "appbench.py", "Small files, locks, appends", "--csvfs", args.csvfs)


def run_operations(args) -> str:
    """scripts/opsbench.py (redirected I/O, coordinator moves)."""
    log("measuring redirected I/O and coordinator moves ...")
    return _run_section(args, "opsbench.py", "Redirected I/O and coordinator moves")


def run_device(args) -> str:
    """scripts/devicebench.py (O_DIRECT against the page cache on a loop device)."""
    log("measuring the O_DIRECT data path on a loop device ...")
    return _run_section(args, "devicebench.py", "The O_DIRECT data path on a loop device",
                        timeout=1800)


def run_scale(args) -> str:
    """scripts/scalebench.py (1, 4, 8 and 16 nodes on one volume)."""
    log("measuring how the costs grow with the number of nodes ...")
    return _run_section(args, "scalebench.py", "Scale: cost against the number of nodes",
                        "--csvfs", args.csvfs, timeout=1800)


def run_backups(args) -> str:
    """scripts/backupbench.py (backups, snapshot pauses), in a process of its own."""
    log("measuring backups ...")
    proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "scripts" / "backupbench.py"),
                             "--csvfs", args.csvfs, "--dir", args.dir,
                             *(["--quick"] if args.quick else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=1200)
    except BaseException as exc:
        # SIGTERM, not subprocess.run's SIGKILL: it tears its mounts down first
        proc.terminate()
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            return "\n## Backup\n\nNot measured: it did not finish within 1200 s\n"
        raise
    if proc.returncode != 0:
        last = err.strip().splitlines()[-3:]
        return f"\n## Backup\n\nNot measured: {' / '.join(last)}\n"
    return out


def single_node_report(args, targets: list[Target], samples: dict[tuple[str, str], Samples],
                       vm_samples: dict[tuple[str, str], Samples],
                       latencies: dict[str, dict[str, list[float]]]) -> str:
    """The report's title and the single-node tables (only the VM-style one with --only
    vm)."""
    if args.only == "vm":
        return f"# csvfs benchmark\n\n{describe_machine()}\n{vm_section(args, targets, vm_samples)}"
    if args.only == "meta":
        return (f"# csvfs benchmark\n\n{describe_machine()}\n\n## Metadata latency\n\n"
                f"{describe_metadata(args)}\n\n{build_latency_table(latencies)}\n"
                f"{baseline_section(args, {}, latencies, meta_only=True)}")
    report = (f"# csvfs benchmark\n\n{describe_run(args, args.dir)}\n\n"
              f"{build_table(samples)}\n{vm_section(args, targets, vm_samples)}\n"
              f"## Metadata latency\n\n{describe_metadata(args)}\n\n"
              f"{build_latency_table(latencies)}\n"
              f"{baseline_section(args, samples, latencies)}")
    notes = target_notes(targets, samples)
    return report + (f"\n{notes}\n" if notes else "")


def raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    RESULTS_DIR.mkdir(exist_ok=True)
    for old_log in RESULTS_DIR.glob("*.log"):
        old_log.unlink()  # from an earlier run
    targets = [Target(name) for name in args.targets]
    if args.baseline:
        targets.append(Target(BASELINE))
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
        everything = args.only is None
        samples = run_rounds(targets, args) if everything else {}
        vm_samples = run_vm_rounds(targets, args) if args.only in (None, "vm") else {}
        latencies = run_metadata(targets, args) if args.only in (None, "meta") else {}
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

    report = single_node_report(args, targets, samples, vm_samples, latencies)
    report += cluster_report(args, samples, cluster_results)
    if args.cluster:
        report += run_failover(args)
        report += run_applications(args)
        report += run_operations(args)
        report += run_device(args)
        report += run_scale(args)
        report += run_backups(args)
    RESULTS_FILE.write_text(report)
    print(report, end="")
    log(f"written to {RESULTS_FILE.relative_to(PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

