"""bench.py's report: the Markdown tables and the text around them."""

import os
import platform
import statistics
import subprocess
from datetime import UTC, datetime

import metabench  # scripts/metabench.py: run as a script, this directory is on sys.path
from bench_cluster import (
    CLUSTER_NODES,
    COORDINATOR,
    MEMBER,
    VM_BLOCKS,
    VM_COUNT,
    VM_DISK,
    WRITER_INTERVAL_MS,
    ClusterResults,
)
from bench_targets import (
    BASELINE,
    PROJECT_ROOT,
    TARGETS,
    VM_WORKLOADS,
    WORKLOADS,
    Result,
    Samples,
    Target,
    Workload,
)

VM_COLUMNS = ("raw", "csvfs", BASELINE, "passthrough")  # the VM-style table's, in order

# --- report -----------------------------------------------------------------------------


def describe_metadata(args) -> str:
    return (f"Metadata latency, one operation at a time from one process, {args.meta_count} "
            f"of each in {args.repeat} rounds with the targets rotated, p50 / p99 in ms. "
            "extend is a 4 KiB append that grows the file; on csvfs every change is "
            "committed to the journal (its record written with RWF_DSYNC) before it "
            "returns, on the other targets nothing is synced. fdatasync is a 4 KiB "
            "overwrite and fdatasync: on raw, the price of making 4 KiB durable.")


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


def baseline_section(args, samples: dict[tuple[str, str], Samples],
                     latencies: dict[str, dict[str, list[float]]], meta_only=False) -> str:
    """csvfs against csvfs at --baseline, measured in the same rounds: before and after
    a change, in one run."""
    if not args.baseline:
        return ""
    rows = [] if meta_only else ["| workload | baseline MiB/s | csvfs MiB/s | "
                                 "**csvfs/baseline** |", "|---|---:|---:|---:|"]
    for workload in () if meta_only else WORKLOADS:
        before, after = (samples.get((name, workload.name)) for name in (BASELINE, "csvfs"))
        cells = [format_cell(cell.median() if cell else None, workload.show_iops)
                 for cell in (before, after)]
        rows.append(f"| {workload.name} | {cells[0]} | {cells[1]} | "
                    f"{format_ratio(paired_ratio(after, before))} |")
    rows += ["", "| operation | baseline | csvfs | csvfs/baseline p50 | csvfs/baseline p99 |",
             "|---|---:|---:|---:|---:|"]
    for operation in metabench.OPERATIONS:
        before = p50_p99(latencies.get(BASELINE, {}).get(operation))
        after = p50_p99(latencies.get("csvfs", {}).get(operation))
        ratios = [format_quotient(after[i] if after else None, before[i] if before else None)
                  for i in (0, 1)]
        cells = [format_p50_p99(latencies.get(name, {}).get(operation))
                 for name in (BASELINE, "csvfs")]
        rows.append(f"| {operation} | {cells[0]} | {cells[1]} | {ratios[0]} | {ratios[1]} |")
    return (f"\n## Against the baseline\n\ncsvfs at {args.baseline_commit} (`--baseline "
            f"{args.baseline}`) as one more single-node target, in the same fio rounds and "
            "metadata rounds as the others: throughput ratios are medians of the per-round "
            "ratios (above 1: faster now), latency ratios are of the p50s and p99s (below 1: "
            "faster now). With more targets than rounds, a target may follow the same one in "
            "every round; `--targets csvfs --no-cluster` measures the pair alone, in a "
            "balanced order.\n\n" + "\n".join(rows) + "\n")


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


def p50_p99(values: list[float] | None) -> tuple[float, float] | None:
    return metabench.percentiles(values) if values and len(values) >= 2 else None


def format_p50_p99(values: list[float] | None) -> str:
    cut = p50_p99(values)
    return "n/a" if cut is None else f"{cut[0]:.3f} / {cut[1]:.3f}"


def format_quotient(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"


def build_member_table(samples: dict[tuple[str, str], Samples]) -> str:
    rows = [
        "| workload | csvfs single-node MiB/s | member node B MiB/s "
        "| **member/single-node** (target >= 0.9) | coordinator node A MiB/s "
        "| coordinator/single-node (control) | node CPU s per GiB: single / B / A |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for workload in WORKLOADS:
        single, member, control = (samples.get((name, workload.name))
                                   for name in ("csvfs", MEMBER, COORDINATOR))
        cells = [format_cell(cell.median() if cell else None, workload.show_iops)
                 for cell in (single, member, control)]
        costs = [cpu_per_gib(cell) for cell in (single, member, control)]
        rows.append(f"| {workload.name} | {cells[0]} | {cells[1]} | "
                    f"{format_ratio(paired_ratio(member, single))} | {cells[2]} | "
                    f"{format_ratio(paired_ratio(control, single))} | "
                    + " / ".join("n/a" if c is None else f"{c:.3f}" for c in costs) + " |")
    return "\n".join(rows)


def cpu_per_gib(cell: Samples | None) -> float | None:
    """Median CPU seconds of the serving node per GiB moved: the cost of the data path,
    which the page cache's noise in the throughput does not move."""
    if cell is None or cell.error:
        values = []
    else:
        values = [r.cpu_s / (r.io_bytes / 2**30) for r in cell.results
                  if r.cpu_s is not None and r.io_bytes]
    return statistics.median(values) if values else None


def build_cluster_meta_table(meta: dict[str, dict[str, list[float]]]) -> str:
    rows = ["| operation | coordinator A | member B | B/A p50 | B/A p99 |",
            "|---|---:|---:|---:|---:|"]
    for operation in metabench.OPERATIONS:
        a, b = (meta.get(name, {}).get(operation) for name in CLUSTER_NODES[:2])
        cut_a, cut_b = p50_p99(a), p50_p99(b)
        ratios = [format_quotient(cut_b and cut_b[i], cut_a and cut_a[i]) for i in (0, 1)]
        rows.append(f"| {operation} | {format_p50_p99(a)} | {format_p50_p99(b)} | "
                    + " | ".join(ratios) + " |")
    return "\n".join(rows)


TRUNCATE_CONDITIONS = (
    ("idle", "no other node has the file open, B idle"),
    ("other", "B writes another file meanwhile (not a holder)"),
    ("held", "B has the file open and writes to it"),
)
WRITE_CONDITIONS = (
    ("idle", "the other file (allocated, inside its size)", "idle"),
    ("busy", "the other file (allocated, inside its size)", "truncate loop"),
    ("rewrite", "the other file (allocated, inside its size)",
     "rewriting + fsync, no truncate (control)"),
    ("held", "the truncated file (its first MiB)", "truncate loop"),
    ("paused", "the other file, while B also writes the truncated one",
     "truncate loop (B paused for each)"),
    ("unpaused", "the other file, while B also writes the truncated one",
     "truncate loop on a third file (control: B never paused)"),
    ("during", "the other file (the `paused` run): writes that overlapped a truncate",
     "in a truncate call (B paused for it)"),
    ("between", "the other file (the `paused` run): the other writes",
     "between truncates (refilling)"),
)


def build_truncate_table(truncate: dict[str, list[float]]) -> str:
    rows = ["| truncate 4 MiB -> 1 MiB on A | count | p50 ms | p99 ms | p50 ratio | p99 ratio |",
            "|---|---:|---:|---:|---:|---:|"]
    base = p50_p99(truncate.get("idle"))
    for key, label in TRUNCATE_CONDITIONS:
        values = truncate.get(key) or []
        cut = p50_p99(values)
        if cut is None:
            rows.append(f"| {label} | {len(values)} | n/a | n/a | n/a | n/a |")
            continue
        ratios = [format_quotient(cut[i], base and base[i]) for i in (0, 1)]
        rows.append(f"| {label} | {len(values)} | {cut[0]:.3f} | {cut[1]:.3f} | "
                    + " | ".join(ratios) + " |")
    return "\n".join(rows)


def build_write_table(writes: dict[str, list[float]]) -> str:
    rows = ["| B's 4 KiB pwrites to | while A is | writes | p50 ms | p99 ms | max ms |",
            "|---|---|---:|---:|---:|---:|"]
    for key, target, node_a in WRITE_CONDITIONS:
        values = writes.get(key) or []
        cut = p50_p99(values)
        cells = ("n/a", "n/a", "n/a") if cut is None else (
            f"{cut[0]:.3f}", f"{cut[1]:.3f}", f"{max(values):.3f}")
        rows.append(f"| {target} | {node_a} | {len(values)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def stall_summary(writes: dict[str, list[float]], truncate: dict[str, list[float]]) -> str:
    during, between = p50_p99(writes.get("during")), p50_p99(writes.get("between"))
    if during is None or between is None:
        return "Stall on another file: n/a."
    text = (f"Stall on another file: B's writes to the other file that overlapped a truncate "
            f"of a file B holds, against B's other writes in the same run (the same load, "
            f"only not paused): p50 ratio **{during[0] / between[0]:.2f}**, p99 ratio "
            f"**{during[1] / between[1]:.2f}** (target: no measurable stall, a ratio "
            f"near 1).")
    paused, unpaused = p50_p99(writes.get("paused")), p50_p99(writes.get("unpaused"))
    if paused is not None and unpaused is not None:
        text += (f" The whole `paused` run against its control, where B is never paused "
                 f"(it also counts what B does for the refills, which extend a file it "
                 f"holds): p50 ratio {paused[0] / unpaused[0]:.2f}, p99 ratio "
                 f"{paused[1] / unpaused[1]:.2f}.")
    idle, busy = p50_p99(writes.get("idle")), p50_p99(writes.get("busy"))
    control = p50_p99(writes.get("rewrite"))
    if idle is not None and busy is not None and control is not None:
        text += (f" B not holding the truncated file: A's truncate loop against A idle, "
                 f"p99 ratio {busy[1] / idle[1]:.2f}; against A rewriting with fsyncs, "
                 f"{busy[1] / control[1]:.2f}.")
    return text


def build_aggregate_table(aggregate: dict[int, list[list[Result]]]) -> str:
    rows = ["| writers at once | nodes | aggregate MiB/s | per node MiB/s | aggregate / 1 node |",
            "|---:|---|---:|---:|---:|"]
    totals = {k: [sum(r.mib_s for r in results) for results in rounds]
              for k, rounds in aggregate.items() if rounds}
    for k, values in sorted(totals.items()):
        base = totals.get(1)
        if base and len(base) == len(values):
            ratio = format_ratio(statistics.median(v / b for v, b in zip(values, base,
                                                                           strict=True)))
        else:
            ratio = format_quotient(statistics.median(values), base and statistics.median(base))
        total = statistics.median(values)
        rows.append(f"| {k} | {', '.join(CLUSTER_NODES[:k])} | {total:.1f} | {total / k:.1f} | "
                    f"{ratio} |")
    return "\n".join(rows)


def build_vm_table(vms: dict[str, list[list[dict]]]) -> str:
    rows = ["| where the VMs run | VMs | aggregate MiB/s | aggregate ops/s | write p50 ms "
            "| write p99 ms | aggregate / raw |", "|---|---:|---:|---:|---:|---:|---:|"]
    totals = {config: [sum(vm["mib_s"] for vm in vms_) for vms_ in rounds]
              for config, rounds in vms.items() if rounds}
    raw = totals.get("raw")
    for config, rounds in vms.items():
        if not rounds:
            continue
        mib = totals[config]
        ops = [sum(vm["ops_s"] for vm in vms_) for vms_ in rounds]
        p50 = statistics.median(vm["p50_ms"] for vms_ in rounds for vm in vms_)
        p99 = statistics.median(vm["p99_ms"] for vms_ in rounds for vm in vms_)
        ratio = format_ratio(statistics.median(m / r for m, r in zip(mib, raw, strict=True))
                             if raw and len(raw) == len(mib) else None)
        label = {"raw": "a plain directory (raw image files)", "1 node": "node A",
                 "3 nodes": "nodes A, B, C (one each)"}[config]
        rows.append(f"| {label} | {len(rounds[0])} | {statistics.median(mib):.1f} | "
                    f"{statistics.median(ops):.0f} | {p50:.3f} | {p99:.3f} | {ratio} |")
    return "\n".join(rows)


def cluster_report(args, samples: dict[tuple[str, str], Samples],
                   results: ClusterResults | None) -> str:
    if results is None:
        return ""
    if results.error:
        return f"\n## Cluster\n\nNot measured: {results.error}\n"
    return (
        "\n## Cluster\n\n"
        "A second volume, mounted by node A first (the coordinator) and node B second (a "
        "member that reaches the coordinator over RPC); node C joins for the aggregate "
        "only. Roles are checked with `csvfs status`.\n\n"
        "### Data path on a member node\n\n"
        "The fio workloads above on B's mount, in the same rounds as the single-node "
        "targets (interleaved; the ratio is the median of the per-round ratios). As a "
        "control, the same workloads also run on A's mount: the coordinator runs the "
        "single node's data path, only on the cluster's image, so A/single-node shows how "
        "far two images alone move these numbers on this machine. The last column is the "
        "CPU time of the node serving the mount per GiB moved, median of the rounds (most "
        "of it is the pwrite or pread into the page cache).\n\n"
        f"{build_member_table(samples)}\n\n"
        "### Metadata latency on a member node\n\n"
        f"metabench on B's mount and on A's, {args.meta_count} of each operation per node "
        f"in {args.repeat} rounds with the node order rotated, p50 / p99 in ms.\n\n"
        f"{build_cluster_meta_table(results.meta)}\n\n"
        "### Quiesce\n\n"
        "(a) Pause time: the latency of a shrinking truncate (4 MiB -> 1 MiB, then written "
        "back to 4 MiB, not timed) on A, "
        f"{args.quiesce_count} per condition in {args.repeat} rounds. Ratios are to the "
        "first row. B's writers are separate processes doing one 4 KiB pwrite every "
        f"{WRITER_INTERVAL_MS:g} ms.\n\n"
        f"{build_truncate_table(results.truncate)}\n\n"
        "(b) Stall on a different file: B's paced 4 KiB pwrites, with A idle, with A "
        "running the truncate loop, and, as a control, with A running only the loop's "
        "writes, each 1 MiB followed by an fsync (overwrites: no metadata change, no "
        "quiesce, but a flush of the image like a journal commit), each for as long as "
        "the idle truncate loop took; the conditions are rotated each round. On a "
        "machine with few CPUs, A's loop takes CPU from B, so compare with the control "
        "too. The last row is the writes to the truncated file itself, paused by every "
        "quiesce.\n\n"
        f"{build_write_table(results.writes)}\n\n"
        f"{stall_summary(results.writes, results.truncate)}\n\n"
        "### Aggregate write throughput\n\n"
        "fio seq write 1 MiB (psync, direct=0), each node writing its own "
        f"{args.size_mib} MiB file (written once up front, so these are overwrites) on its "
        f"own mount, all started together by one fio, {args.runtime} s, median of "
        f"{args.repeat} rounds with the configurations rotated; all three nodes stay "
        "mounted throughout, the idle ones only listen.\n\n"
        f"{build_aggregate_table(results.aggregate)}\n\n"
        "### VM workloads\n\n"
        f"`vmload run`, {VM_COUNT} VMs at once, each with its own {VM_DISK} sparse disk "
        f"(new every round, so first writes allocate), random writes of {VM_BLOCKS} "
        f"(powers of two) with an fsync every 64, one write at a time per VM, {args.runtime} "
        f"s, median of {args.repeat} rounds with the configurations rotated. Raw is the "
        "same VMs on a plain directory next to the images: the ceiling of this tool on "
        "this machine (vmload builds and checksums every 4 KiB sector in Python). Every "
        "VM was verified afterwards (`vmload verify`), with zero mismatches, or the run "
        "would have stopped here. Latencies are the median over the VMs of each VM's p50 and "
        "p99.\n\n"
        f"{build_vm_table(results.vms)}\n"
        + ("\n" + "\n".join(results.notes) + "\n" if results.notes else "")
    )


def describe_machine() -> str:
    fio_version = subprocess.run(["fio", "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip()
    commit = subprocess.run(["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{when}, commit {commit or 'unknown'}, Linux {platform.release()}, "
            f"{os.cpu_count()} CPUs, {fio_version}")


def describe_run(args, scratch_parent: str) -> str:
    return (
        f"{describe_machine()}\n\n"
        f"fio ioengine=psync direct=0 invalidate=0, one {args.size_mib} MiB file per target "
        f"written once up front, {args.runtime} s per job, median of {args.repeat} "
        f"(targets interleaved; ratios are medians of the per-round ratios), "
        f"scratch in {scratch_parent}. "
        f"4 KiB cells show MiB/s (IOPS)."
    )


def target_notes(targets: list[Target], samples: dict[tuple[str, str], Samples]) -> str:
    chosen = {t.name for t in targets}
    notes = [f"- {name}: not selected (--targets)" for name in TARGETS if name not in chosen]
    return "\n".join(notes + failure_notes(targets, samples, WORKLOADS))


def failure_notes(targets: list[Target], samples: dict[tuple[str, str], Samples],
                  workloads: tuple[Workload, ...]) -> list[str]:
    """Why cells are n/a: a target's own error, and each failed workload's error (once
    for a target whose workloads all failed with the same one)."""
    notes = []
    for target in targets:
        if target.error:
            notes.append(f"- {target.name}: {target.error}")
        errors = {}
        for workload in workloads:
            cell = samples.get((target.name, workload.name))
            if cell and cell.error:
                errors[workload.name] = cell.error
        if len(errors) == len(workloads) > 1 and len(set(errors.values())) == 1:
            notes.append(f"- {target.name}, every workload: {next(iter(errors.values()))}")
        else:
            notes += [f"- {target.name}, {name}: {error}" for name, error in errors.items()]
    return notes


# --- the VM-style table -----------------------------------------------------------------


def vm_section(args, targets: list[Target], samples: dict[tuple[str, str], Samples]) -> str:
    """The VM-style fio table with what it measures and why a cell is n/a."""
    measured = [t for name in VM_COLUMNS for t in targets if t.name == name]
    notes = failure_notes(measured, samples, VM_WORKLOADS)
    files = ("the same file per target as above" if args.only is None else
             f"one {args.size_mib} MiB file per target written once up front, scratch in "
             f"{args.dir}")
    return (
        "\n## VM-style I/O\n\n"
        "fio the way qemu drives a disk with cache=none,aio=native: ioengine=libaio "
        f"direct=1, QD is the iodepth; {files}, {args.runtime} s per job, median of "
        f"{args.repeat} (targets interleaved; ratios are medians of the per-round ratios). "
        "The 4 KiB rows are in IOPS, the 1 MiB row in MiB/s."
        + ("" if args.baseline is None else
           f" baseline is csvfs at {args.baseline_commit} (`--baseline {args.baseline}`); "
           "csvfs/baseline above 1: faster now.")
        + f"\n\n{build_vm_io_table([t.name for t in measured], samples)}\n"
        + ("\n" + "\n".join(notes) + "\n" if notes else "")
    )


def build_vm_io_table(names: list[str], samples: dict[tuple[str, str], Samples]) -> str:
    """One column per target in names, then each one's ratio to raw and, with both,
    csvfs's to the baseline."""
    pairs = [(name, "raw") for name in names if name != "raw" and "raw" in names]
    if "csvfs" in names and BASELINE in names:
        pairs.append(("csvfs", BASELINE))
    headers = names + [f"{a}/{b}" if b == "raw" else f"**{a}/{b}**" for a, b in pairs]
    rows = ["| workload | " + " | ".join(headers) + " |",
            "|---|" + "---:|" * len(headers)]
    for workload in VM_WORKLOADS:
        cell = {name: samples.get((name, workload.name)) for name in names}
        values = [format_rate(cell[name].median() if cell[name] else None, workload.show_iops)
                  for name in names]
        ratios = [format_ratio(paired_ratio(cell[a], cell[b])) for a, b in pairs]
        unit = "IOPS" if workload.show_iops else "MiB/s"
        rows.append(f"| {workload.name}, {unit} | " + " | ".join(values + ratios) + " |")
    return "\n".join(rows)


def format_rate(result: Result | None, in_iops: bool) -> str:
    if result is None:
        return "n/a"
    return f"{result.iops:.0f}" if in_iops else f"{result.mib_s:.1f}"


