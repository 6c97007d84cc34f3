"""Backups of a VM disk on csvfs, side by side with cp, restic and borg, and what a
snapshot costs the writers.

Mounts one fresh csvfs volume on two nodes (A, the coordinator, and B, a member) and
puts a VM disk on it whose first half is random data and whose second half was never
written (a hole): 4 GiB by default, 256 MiB with --quick. Then it measures:

  full          `csvfs backup vm` of the disk, against `cp --sparse=always` of it to a
                plain directory, `restic backup` and `borg create` of it through B's mount
  incremental   1 % of the disk rewritten (seeded 64 KiB spots), then a second backup
                with each tool into the same repository
  restore       `csvfs backup restore --file`, `restic restore`, `borg extract`
  pause         a paced 4 KiB pwrite loop at one spot on B while the coordinator sets
                snapshot points one after another (driven like tests/snapshot_taker.py),
                against the same writer without snapshots
  VM writes     random 4 KiB pwrites with an fsync every 64 (like vmload) on a second
                disk, alone and while a full `csvfs backup vm` of that disk runs
  tracked       fio random 4 KiB writes (libaio, O_DIRECT, QD16 and QD1) on B, on a disk
                that was backed up (its writes note the stripes they touch, for the
                next incremental) and on one that never was, rounds interleaved

Run by `make bench`; alone: `python scripts/backupbench.py [--quick] [--only SECTION]`. Markdown on
stdout, progress on stderr; every mount, node, helper process and temporary file is
removed on exit, also on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backup_setup import (
    SPOT,
    GiB,
    MiB,
    Setup,
    allocated,
    fill_random,
    fsync_path,
    helper_python,
    only_file_under,
    remove,
    rewrite_spots,
    rounds,
    same_spots,
    size_text,
)
from bench_targets import BenchError, log
from nodes import NodeError, csvfs_command, mounts_under
from writer_latency import Writer, first_after, overlapping, percentile

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WRITER_LATENCY = os.fspath(Path(__file__).resolve().parent / "writer_latency.py")
VM_FSYNC_EVERY = 64


def raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt


# -- 1-3: full, incremental, restore ---------------------------------------------------------------


def run_backups(setup: Setup, args) -> str:
    tools, scratch, plain = setup.tools, setup.scratch, setup.plain
    disk_a, disk_b = setup.a / "disk", setup.b / "disk"
    size = args.disk_size
    log(f"writing the disk: {size_text(size // 2)} random, then a hole to "
        f"{size_text(size)} ...")
    fill_random(disk_a, size // 2, size)

    # 1. full backups: cp and csvfs in paired rounds, the order alternating
    cp_times, csvfs_times, summaries = [], [], []
    repo = None
    for round_no in range(args.repeat):
        if repo is not None:
            remove(repo)
            remove(repo.with_name(repo.name + ".key"))
        repo = scratch / f"csvfs-repo-{round_no}"
        tools.csvfs_init(repo)
        copy = plain / "cp-disk"
        for tool in (("cp", "csvfs") if round_no % 2 == 0 else ("csvfs", "cp")):
            log(f"full backup, round {round_no + 1}/{args.repeat}: {tool} ...")
            if tool == "cp":
                # Until the copy is on disk, as a backup is when csvfs returns.
                seconds = tools.run(["cp", "--sparse=always", disk_b, copy], "cp")[0]
                started = time.perf_counter()
                fsync_path(copy)
                cp_times.append(seconds + time.perf_counter() - started)
            else:
                seconds, summary = tools.csvfs_backup(repo, "/disk")
                csvfs_times.append(seconds)
                summaries.append(summary)
        copy_size = allocated(copy)
        remove(copy)
    full_summary = summaries[-1]
    csvfs_repo_size = allocated(repo)

    log("full backup: csvfs into an encrypted repository ...")
    encrypted = scratch / "csvfs-repo-encrypted"
    tools.csvfs_init(encrypted, encrypt=True)
    encrypted_time, _summary = tools.csvfs_backup(encrypted, "/disk")
    encrypted_size = allocated(encrypted)
    remove(encrypted)
    remove(encrypted.with_name(encrypted.name + ".key"))

    restic_repo, borg_repo = scratch / "restic-repo", scratch / "borg-repo"
    log("full backup: restic ...")
    tools.restic_init(restic_repo)
    restic_full = tools.restic_backup(restic_repo, disk_b)
    restic_size = allocated(restic_repo)
    log("full backup: borg ...")
    tools.borg_init(borg_repo)
    borg_full = tools.borg_create(borg_repo, "full", setup.b, "disk")
    borg_size = allocated(borg_repo)

    # 2. incremental
    log(f"rewriting {args.incremental_fraction:.0%} of the disk in 64 KiB spots ...")
    spots = rewrite_spots(disk_a, size, args.incremental_fraction, seed=1)
    log("incremental: csvfs ...")
    csvfs_incr, incr_summary = tools.csvfs_backup(repo, "/disk")
    log(f"incremental: csvfs took {csvfs_incr:.2f} s, {incr_summary['duration_s']:.2f} s "
        f"of it copying, {incr_summary['pause_s'] * 1000:.1f} ms paused")
    log("incremental: restic ...")
    restic_incr = tools.restic_backup(restic_repo, disk_b)
    log("incremental: borg ...")
    borg_incr = tools.borg_create(borg_repo, "incr", setup.b, "disk")

    # 3. restores of the incremental backups, checked at the rewritten spots and others
    rng = random.Random(2)
    checked = spots[:: max(1, len(spots) // 32)] + [rng.randrange(size // SPOT) * SPOT
                                                    for _ in range(32)]
    restores = {}
    target = plain / "restored"
    log("restore: csvfs ...")
    restores["csvfs"] = tools.csvfs_restore(repo, incr_summary["id"], "/disk", target)
    same_spots(disk_b, target, checked)
    restored_sizes = {"csvfs": allocated(target)}
    remove(target)
    for tool in ("restic", "borg"):
        log(f"restore: {tool} ...")
        target = plain / f"{tool}-restore"
        target.mkdir()
        if tool == "restic":
            seconds = tools.restic_restore(restic_repo, target)
        else:
            seconds = tools.borg_extract(borg_repo, "incr", target)
        restored = only_file_under(target)
        started = time.perf_counter()
        fsync_path(restored)  # csvfs restore fsyncs its file before it returns
        restores[tool] = seconds + time.perf_counter() - started
        same_spots(disk_b, restored, checked)
        restored_sizes[tool] = allocated(restored)
        remove(target)
    for path in (repo, repo.with_name(repo.name + ".key"), restic_repo, borg_repo):
        remove(path)
    remove(disk_a)

    # the report
    csvfs_full = statistics.median(csvfs_times)
    cp_full = statistics.median(cp_times)
    ratio = statistics.median(cp / cs for cp, cs in zip(cp_times, csvfs_times, strict=True))

    def rate(seconds: float) -> str:
        return f"{size / MiB / seconds:.0f}"

    paired = f"median of {args.repeat} rounds" if args.repeat > 1 else "one run"
    full_rows = [
        "| full backup | seconds | MiB/s (logical) | stored | |",
        "|---|---:|---:|---:|---|",
        f"| `cp --sparse=always` to a plain directory | {cp_full:.1f} | {rate(cp_full)} | "
        f"{size_text(copy_size)} | {paired}; no hashing, no compression |",
        f"| **`csvfs backup vm`** | {csvfs_full:.1f} | {rate(csvfs_full)} | "
        f"{size_text(csvfs_repo_size)} | {paired}; unencrypted, zstd; read "
        f"{size_text(full_summary['read'])} of the image, paused "
        f"{full_summary['pause_s'] * 1000:.1f} ms |",
        f"| `csvfs backup vm`, encrypted repository | {encrypted_time:.1f} | "
        f"{rate(encrypted_time)} | {size_text(encrypted_size)} | one run; ChaCha20-Poly1305, "
        "zstd |",
        f"| `restic backup` | {restic_full:.1f} | {rate(restic_full)} | "
        f"{size_text(restic_size)} | one run; always encrypted (AES-256 + Poly1305), "
        "no compression (restic 0.14) |",
        f"| `borg create` | {borg_full:.1f} | {rate(borg_full)} | {size_text(borg_size)} | "
        "one run; repokey (AES-256-CTR + HMAC-SHA256), lz4 |",
    ]
    incr_rows = [
        "| incremental backup | seconds | × its own full | × csvfs incremental |",
        "|---|---:|---:|---:|",
        f"| **`csvfs backup vm`** | {csvfs_incr:.1f} | {csvfs_incr / csvfs_full:.2f} | 1.00 |",
        f"| `restic backup` | {restic_incr:.1f} | {restic_incr / restic_full:.2f} | "
        f"{restic_incr / csvfs_incr:.2f} |",
        f"| `borg create` | {borg_incr:.1f} | {borg_incr / borg_full:.2f} | "
        f"{borg_incr / csvfs_incr:.2f} |",
    ]
    restore_rows = [
        "| restore of the incremental backup | seconds | MiB/s (logical) | the file takes |",
        "|---|---:|---:|---:|",
        f"| **`csvfs backup restore --file`** | {restores['csvfs']:.1f} | "
        f"{rate(restores['csvfs'])} | {size_text(restored_sizes['csvfs'])} |",
        f"| `restic restore` | {restores['restic']:.1f} | {rate(restores['restic'])} | "
        f"{size_text(restored_sizes['restic'])} |",
        f"| `borg extract --sparse` | {restores['borg']:.1f} | {rate(restores['borg'])} | "
        f"{size_text(restored_sizes['borg'])} |",
    ]
    incr_share = csvfs_incr / csvfs_full
    return (
        f"A VM disk of {size_text(size)} on the volume: the first half random data, the "
        "second half never written (a hole). Times are wall-clock, the start of each "
        "command included. cp, restic and borg read the disk through node B's mount, "
        "`csvfs backup` reads the volume image itself (through a snapshot point set by the "
        "coordinator, node A). Nothing is dropped from the page cache (it cannot be done "
        "reliably here): the disk was just written through A, csvfs mounts are direct_io, "
        "so every tool reads the image's pages from the host's page cache; the restores "
        "read repositories that were just written, also from the cache. cp's copy and "
        "restored files are fsynced before the clock stops (csvfs backup and restore "
        "make what they write durable before they return). csvfs and cp "
        "run in paired rounds, the order alternating; the others run once, after them.\n\n"
        "### Full backup\n\n" + "\n".join(full_rows) +
        f"\n\ncsvfs / cp throughput: **{ratio:.2f}** (target >= 0.8; median of the "
        "per-round ratios). The csvfs repository is unencrypted, as by default; restic "
        "cannot be, and borg runs with repokey, so the encrypted csvfs row is the one to "
        "hold against them.\n\n"
        f"### Incremental: {args.incremental_fraction:.0%} rewritten\n\n"
        f"{len(spots)} seeded random 64 KiB spots ({size_text(len(spots) * SPOT)}) "
        "rewritten through A, then a second backup into the same repository with each "
        "tool (one run each). csvfs read "
        f"{size_text(incr_summary['read'])} of the image and stored "
        f"{size_text(incr_summary['new'])} anew.\n\n" + "\n".join(incr_rows) +
        f"\n\ncsvfs incremental / csvfs full: **{incr_share:.0%}** (target <= 5 %); "
        f"restic / csvfs: **{restic_incr / csvfs_incr:.1f}x**, borg / csvfs: "
        f"**{borg_incr / csvfs_incr:.1f}x** (target >= 10x). csvfs reads only the "
        "64 KiB stripes the nodes reported writing since the last backup; of its "
        f"{csvfs_incr:.2f} s, {incr_summary['duration_s']:.2f} s went to planning and "
        "copying, the rest to starting the command, the snapshot point, and making the "
        "chunks and the manifest durable. restic and borg see a changed mtime and read "
        "the whole file.\n\n"
        "### Restore\n\n"
        "The whole disk to a new file in a plain directory, one run each; every restored "
        f"file was checked against the disk at {len(checked)} spots (the rewritten ones "
        "among them). restic 0.14 has no sparse restore: it writes the hole as zeros.\n\n"
        + "\n".join(restore_rows) + "\n")


# -- 4: the snapshot pause -----------------------------------------------------------------------


def run_pause(setup: Setup, args) -> str:
    python = helper_python(setup.tools.csvfs)
    path = setup.b / "pause-file"
    with open(path, "wb") as out:  # allocated up front: the loop only overwrites
        out.write(os.urandom(MiB))
        os.fsync(out.fileno())
    baseline, takes, releases, firsts, pauses, calls = [], [], [], [], [], []
    all_with = []
    for round_no in range(args.pause_rounds):
        order = ("snapshots", "none") if round_no % 2 == 0 else ("none", "snapshots")
        for condition in order:
            log(f"snapshot pause, round {round_no + 1}/{args.pause_rounds}: {condition} ...")
            out = setup.scratch / "pause-writer.bin"
            with Writer(path, MiB, True, 0, round_no, out) as writer:
                time.sleep(0.5)
                begin = time.perf_counter_ns()
                if condition == "none":
                    time.sleep(args.pause_window)
                else:
                    driver = setup.tools.start([python, WRITER_LATENCY, "take-snapshots",
                                                setup.image, str(args.snapshots), "0.1"])
                    points = [json.loads(line) for line in
                              setup.tools.finish(driver, "the snapshot driver").splitlines()]
                    if len(points) != args.snapshots:
                        raise BenchError(f"the snapshot driver set {len(points)} points")
                    args.pause_window = (time.perf_counter_ns() - begin) / 1e9
                end = time.perf_counter_ns()
                samples = [s for s in writer.finish() if begin <= s[0] <= end]
            if condition == "none":
                baseline += [latency for _s, latency in samples]
                continue
            all_with += [latency for _s, latency in samples]
            take_windows = [(p["take"], p["taken"]) for p in points]
            takes += overlapping(samples, take_windows)
            releases += overlapping(samples, [(p["taken"], p["released"]) for p in points])
            firsts += first_after(samples, [p["taken"] for p in points])
            pauses += [p["pause_s"] * 1000 for p in points]
            calls += [(p["taken"] - p["take"]) / 1e6 for p in points]
    remove(path)

    def row(label: str, values: list[float]) -> str:
        if not values:
            return f"| {label} | 0 | | | |"
        return (f"| {label} | {len(values)} | {percentile(values, 0.5):.3f} | "
                f"{percentile(values, 0.99):.3f} | {max(values):.3f} |")

    rows = ["| B's 4 KiB pwrites (one spot, one per ms) | writes | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|",
            row("no snapshots (control)", baseline),
            row("while snapshots are taken: every write", all_with),
            row("**overlapping a SNAPSHOT_TAKE call** (the point being set)", takes),
            row("the first write after each point (its granule preserved first)", firsts),
            row("overlapping a SNAPSHOT_RELEASE call", releases)]
    total = args.snapshots * args.pause_rounds
    p99 = percentile(takes, 0.99) if takes else float("nan")
    return (
        "\n### Snapshot pause seen by a writer on the other node\n\n"
        f"A writer on B (a member) does one 4 KiB pwrite per millisecond at one spot of an "
        f"allocated file, timing each, while a requester on the side sets {args.snapshots} "
        "snapshot points one after another through the coordinator (A), each released "
        "at once, 100 ms apart (SNAPSHOT_TAKE / SNAPSHOT_RELEASE, as a backup does), and "
        "as a control without them for as long; "
        f"{rounds(args.pause_rounds)} with the order alternating, {total} points in all, "
        "write latencies pooled.\n\n" + "\n".join(rows) +
        f"\n\nThe coordinator's pause (pause_s of the SNAPSHOT_TAKE reply): p50 "
        f"{percentile(pauses, 0.5):.1f} ms, p99 {percentile(pauses, 0.99):.1f} ms, max "
        f"{max(pauses):.1f} ms; the whole take call as the requester saw it: p50 "
        f"{percentile(calls, 0.5):.1f} ms, p99 {percentile(calls, 0.99):.1f} ms. Writes on B "
        f"overlapping a point: p99 **{p99:.1f} ms** (target < 50 ms).\n")


# -- 5: a VM's writes during a backup ------------------------------------------------------------


def run_vm_writes(setup: Setup, args) -> str:
    size = args.vm_disk_size
    log(f"VM writes: writing a {size_text(size)} VM disk ...")
    fill_random(setup.a / "vm.img", size, size)
    path = setup.b / "vm.img"
    results = {"none": [], "backup": []}
    seconds_of = {"none": 0.0, "backup": 0.0}
    backups = []
    window = None
    for round_no in range(args.vm_rounds):
        order = ("backup", "none") if round_no % 2 == 0 else ("none", "backup")
        for condition in order:
            log(f"VM writes, round {round_no + 1}/{args.vm_rounds}: "
                f"{'during a backup' if condition == 'backup' else 'alone'} ...")
            repo = setup.scratch / "vm-repo"
            if condition == "backup":
                setup.tools.csvfs_init(repo)
            out = setup.scratch / "vm-writer.bin"
            with Writer(path, size, False, VM_FSYNC_EVERY, 100 + round_no, out) as writer:
                time.sleep(0.5)
                begin = time.perf_counter_ns()
                if condition == "none":
                    time.sleep(window or args.vm_window)
                else:
                    backup = setup.tools.start(setup.tools.csvfs_backup_command(repo,
                                                                                "/vm.img"))
                    summary = json.loads(setup.tools.finish(backup, "csvfs backup vm"))
                end = time.perf_counter_ns()
                samples = [latency for started, latency in writer.finish()
                           if begin <= started <= end]
            if condition == "backup":
                window = (end - begin) / 1e9
                backups.append((window, summary))
                remove(repo)
                remove(repo.with_name(repo.name + ".key"))
            results[condition].append(samples)
            seconds_of[condition] += (end - begin) / 1e9
    remove(setup.a / "vm.img")

    def cells(condition: str) -> str:
        runs = results[condition]
        count = sum(map(len, runs))
        return (f"{count} | {count / seconds_of[condition]:.0f} | "
                f"{statistics.median(percentile(r, 0.5) for r in runs):.3f} | "
                f"{statistics.median(percentile(r, 0.99) for r in runs):.3f}")

    ratio = statistics.median(percentile(b, 0.99) / percentile(n, 0.99)
                              for b, n in zip(results["backup"], results["none"], strict=True))
    seconds = statistics.median(window for window, _summary in backups)
    rereads = sum(summary["reread_chunks"] for _window, summary in backups)
    rows = ["| the VM's 4 KiB writes on B | writes | writes/s (paced at 1000) | p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|",
            f"| alone (control) | {cells('none')} |",
            f"| during a full `csvfs backup vm` of its disk | {cells('backup')} |"]
    return (
        "\n### A VM's writes during a backup\n\n"
        f"A VM-like writer on B: random 4 KiB pwrites on a {size_text(size)} disk full of "
        f"random data, one per millisecond, an fsync every {VM_FSYNC_EVERY} (the fsync not "
        "counted as a write), alone and while a full `csvfs backup vm` of that same disk "
        "runs (into a new repository each time; the writer's own first write to each "
        "1 MiB granule after the snapshot point waits for its preservation). "
        f"{rounds(args.vm_rounds)}, the order alternating, each control as long as the "
        f"backup before it; medians of the per-round p50 and p99. The backup took "
        f"{seconds:.1f} s ({size / MiB / seconds:.0f} MiB/s), and read {rereads} chunks "
        "again because their granule was preserved meanwhile.\n\n" + "\n".join(rows) +
        f"\n\np99 during a backup / p99 alone: **{ratio:.2f}** (target <= 2; median of the "
        "per-round ratios).\n")


# -- 6: the writes of a disk with change tracking -------------------------------------------------

TRACKED_JOBS = (("rand write 4 KiB QD16", 16), ("rand write 4 KiB QD1", 1))


def run_tracked_writes(setup: Setup, args) -> str:
    size = args.tracked_disk_size
    log(f"tracked: writing two {size_text(size)} disks, backing one up ...")
    disks = {"never backed up": "untracked.img", "backed up (tracked)": "tracked.img"}
    for name in disks.values():
        fill_random(setup.a / name, size, size)
    repo = setup.scratch / "tracked-repo"
    setup.tools.csvfs_init(repo)
    setup.tools.csvfs_backup(repo, "/tracked.img")
    iops: dict[tuple[str, str], list[float]] = {}
    for round_no in range(args.tracked_rounds):
        order = list(disks.items()) if round_no % 2 == 0 else list(disks.items())[::-1]
        for job, depth in TRACKED_JOBS:
            for condition, name in order:
                iops.setdefault((condition, job), []).append(
                    _fio_randwrite(setup.b / name, size, depth, args.tracked_seconds))
        log(f"tracked, round {round_no + 1}/{args.tracked_rounds} done")
    for name in disks.values():
        remove(setup.a / name)
    remove(repo)
    remove(repo.with_name(repo.name + ".key"))
    rows = ["| workload on B | never backed up | backed up (tracked) | tracked / untracked |",
            "|---|---:|---:|---:|"]
    for job, _depth in TRACKED_JOBS:
        plain, tracked = (statistics.median(iops[(condition, job)]) for condition in disks)
        rows.append(f"| {job} | {plain:,.0f} | {tracked:,.0f} | {tracked / plain:.2f} |")
    return (
        "\n### A VM disk's writes once it is backed up\n\n"
        f"fio on B, the member: random 4 KiB writes (ioengine=libaio, direct=1) for "
        f"{args.tracked_seconds} s per job on a {size_text(size)} disk full of data that a "
        "`csvfs backup vm` took once (so its writes note the 64 KiB stripes they touch, "
        "for the next incremental), and on one that was never backed up; "
        f"{rounds(args.tracked_rounds)}, the disks' order alternating; medians, in IOPS.\n\n"
        + "\n".join(rows) + "\n")


def _fio_randwrite(path: Path, size: int, depth: int, seconds: int) -> float:
    result = subprocess.run(
        ["fio", "--name=tracked", f"--filename={path}", f"--size={size}", "--rw=randwrite",
         "--bs=4k", "--ioengine=libaio", "--direct=1", f"--iodepth={depth}",
         "--time_based", f"--runtime={seconds}", "--output-format=json"],
        capture_output=True, text=True, timeout=seconds + 120, check=False)
    if result.returncode != 0:
        raise BenchError(f"fio on {path.name}: {result.stderr.strip()[-300:]}")
    return json.loads(result.stdout)["jobs"][0]["write"]["iops"]


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csvfs", help="the csvfs command (default: this Python's csvfs, "
                        "else .venv/bin/python -m csvfs.cli, else csvfs on PATH)")
    parser.add_argument("--dir", default="/var/tmp",
                        help="a fresh scratch directory is created (and removed) in it")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--disk-mib", type=int,
                        help="the VM disk's size in MiB (default 4096; --quick: 256)")
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS),
                        help="run this section only (may be given again)")
    args = parser.parse_args(argv)
    args.csvfs = [args.csvfs] if args.csvfs else csvfs_command()
    quick = args.quick
    args.disk_size = (args.disk_mib or (256 if quick else 4096)) * MiB
    if args.disk_size < 2 * SPOT * 100:
        parser.error("--disk-mib: at least 13")
    args.vm_disk_size = (128 if quick else 1024) * MiB
    # room for the disk's data, the incremental's spots in the hole (each allocates a
    # unit), the VM disk and a preserved copy of each of its units
    needed = (args.disk_size // 2 + args.disk_size // 100 * 16 + 2 * args.vm_disk_size
              + 3 * (64 if quick else 256) * MiB)  # the tracked section's two disks
    args.volume_size = f"{max(1, math.ceil(needed * 1.5 / GiB))}G"
    args.repeat = 1 if quick else 3
    args.incremental_fraction = 0.01
    args.snapshots = 20
    args.pause_rounds = 1 if quick else 2
    args.pause_window = 3.0  # the first control's length, if it comes first
    args.vm_rounds = 1 if quick else 3
    args.vm_window = 3.0
    args.tracked_disk_size = (64 if quick else 256) * MiB
    args.tracked_rounds = 1 if quick else 3
    args.tracked_seconds = 2 if quick else 4
    for tool in ("cp", "restic", "borg", "fusermount3"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (run `make setup`)")
    return args


SECTIONS = {"backups": run_backups, "pause": run_pause, "vm-writes": run_vm_writes,
            "tracked": run_tracked_writes}


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_on_sigterm)  # the same teardown as Ctrl-C
    scratch = Path(tempfile.mkdtemp(prefix="csvfs-backupbench-", dir=args.dir))
    report = ""
    status = 0
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as cleanup:
            try:
                setup = Setup(args, scratch, cleanup)
                for name in args.only or SECTIONS:
                    section = SECTIONS[name]
                    # What the last section wrote and removed (gigabytes of repositories)
                    # is written back first, so that its writeback stalls nothing here.
                    os.sync()
                    try:
                        report += section(setup, args)
                    except (BenchError, NodeError, OSError, subprocess.SubprocessError,
                            ValueError, KeyError) as exc:
                        name = name.replace("-", " ")
                        log(f"{name}: {exc}")
                        report += f"\n### {name.capitalize()}\n\nNot measured: {exc}\n"
                        setup.tools.kill_children()
            finally:
                # teardown must finish: no more Ctrl-C or SIGTERM (every step has a timeout)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                log("tearing down ...")
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    except (BenchError, NodeError, OSError, subprocess.SubprocessError) as exc:
        log(f"cannot set up: {exc}")
        status = 1
    finally:
        leftover = mounts_under(scratch)
        if leftover:
            log(f"warning: still mounted, keeping {scratch}: {', '.join(leftover)}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    if status:
        return status
    minutes = (time.monotonic() - started) / 60
    print(f"## Backup\n\nOn a 2-node csvfs cluster, {os.cpu_count()} CPUs, "
          f"{_memory_gib():.0f} GiB of RAM; this section took {minutes:.1f} minutes.\n\n"
          + report, end="")
    return 0


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


if __name__ == "__main__":
    sys.exit(main())
