"""`csvfs fsck`: check a volume offline and, with --repair, fix what can be fixed.

Checks, in order: both superblocks, the checkpoint slots, the journal, then
the metadata they produce: the directory tree, link counts, orphans, and
the extent maps against free space: no unit or 4 KiB block mapped twice, no
unit both used whole and split into blocks, and a small (block-mapped) file's
blocks only in its first unit of file. Repairs end in a fresh checkpoint with
an empty journal, written so that a crash mid-repair leaves the old state.
"""

from __future__ import annotations

import logging
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from coordinator import recovery
from coordinator.model import ROOT_INO, MetadataState
from csvfs.cluster import elections
from csvfs.cluster.election import read_lease, slot_alive
from csvfs.volume import format as fmt
from csvfs.volume.errors import ElectionUnavailable, ExitCode, VolumeBusyError
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)


def _live_in_etcd(volume: Volume, repair: bool) -> bool:
    """Do nodes that elect through etcd mount it (their slots are not on the volume)?
    An etcd that does not answer cannot say: a repair then refuses."""
    try:
        return elections.etcd_nodes_live(volume)
    except ElectionUnavailable as exc:
        if repair:
            raise VolumeBusyError(f"{volume.path}: cannot tell whether nodes mount it "
                                  f"({exc})") from None
        print(f"warning: cannot tell whether nodes mount {volume.path} ({exc})")
        return False


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)

    def info(self, message: str) -> None:
        self.lines.append(f"  {message}")

    def problem(self, message: str) -> None:
        self.problems.append(message)
        self.lines.append(f"  PROBLEM: {message}")

    def section(self, title: str) -> None:
        self.lines.append(title)


def run_fsck(image: str | Path, repair: bool = False) -> int:
    volume = Volume.open(image, writable=repair)
    try:
        _refuse_live_volume(volume, repair)
        report = Report()
        outcome = check(volume, report)
        if repair and report.problems:
            fix(volume, outcome, report)
    finally:
        volume.close()
    print("\n".join(report.lines))
    return _summarise(report, repair)


def _summarise(report: Report, repair: bool) -> int:
    if not report.problems:
        print("volume is clean")
        return ExitCode.OK
    print(f"{len(report.problems)} problem(s) found")
    if repair:
        for line in report.repairs:
            print(f"  repaired: {line}")
        return ExitCode.FSCK_REPAIRED
    print("run 'csvfs fsck --repair' to fix them")
    return ExitCode.FSCK_UNREPAIRED


def _refuse_live_volume(volume: Volume, repair: bool) -> None:
    live = [slot for slot in range(fmt.MAX_NODES) if slot_alive(volume, slot)]
    if not live and not _live_in_etcd(volume, repair):
        return
    if repair:
        raise VolumeBusyError(f"{volume.path} is mounted by a live node; unmount it first")
    print(f"warning: {volume.path} is mounted; results may be out of date")


@dataclass
class Outcome:
    recovered: recovery.Recovered | None
    state: MetadataState | None
    superblock_bad: bool


def check(volume: Volume, report: Report) -> Outcome:
    superblock_bad = _check_superblocks(volume, report)
    _check_lease(volume, report)
    recovered = _check_metadata_sources(volume, report)
    state = None
    if recovered is not None:
        state = recovered.state
        _check_tree(state, report)
        _check_space(state, report)
    return Outcome(recovered, state, superblock_bad)


def _check_superblocks(volume: Volume, report: Report) -> bool:
    sb = volume.sb
    report.section(f"superblock: volume {sb.uuid}, {sb.size} bytes, unit {sb.unit_size}, "
                   f"{sb.data_units} data units")
    expected = fmt.encode_superblock(sb)
    bad = False
    for where, offset in (("primary", 0), ("copy", sb.copy_offset)):
        if volume.read(offset, fmt.SUPERBLOCK_SIZE) != expected:
            report.problem(f"{where} superblock is missing or differs")
            bad = True
    if not bad:
        report.info("primary and copy agree")
    return bad


def _check_lease(volume: Volume, report: Report) -> None:
    lease = read_lease(volume)
    owner = lease.owner_name or "nobody"
    report.section(f"lease: epoch {lease.epoch}, held by {owner}")


def _check_metadata_sources(volume: Volume, report: Report) -> recovery.Recovered | None:
    report.section("checkpoints and journal")
    try:
        recovered = recovery.load(volume)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        report.problem(f"metadata does not load: {exc!r}")
        return None
    for problem in recovered.checkpoint_problems:
        report.problem(problem)
    checkpoint = recovered.checkpoint
    if checkpoint is None:
        report.info("no checkpoint found: replaying the journal from an empty volume")
    else:
        report.info(f"checkpoint slot {'AB'[checkpoint.slot]}: seq {checkpoint.seq}, "
                    f"epoch {checkpoint.epoch}")
    replay = recovered.replay
    report.info(f"journal: {len(replay.records)} record(s) replayed, ended: {replay.stop_reason}")
    if replay.corrupt is not None:
        report.problem(str(replay.corrupt))
    for damage in recovered.state.damage:
        report.problem(damage)
    return recovered


def _check_tree(state: MetadataState, report: Report) -> None:
    report.section(f"namespace: {len(state.inodes)} inodes")
    names = Counter()
    subdirs = Counter()
    for directory, entries in state.entries.items():
        if directory not in state.inodes:
            report.problem(f"directory table for missing inode {directory}")
        for name, child in entries.items():
            inode = state.inodes.get(child)
            if inode is None:
                report.problem(f"entry {name!r} in directory {directory} points at missing "
                               f"inode {child}")
                continue
            names[child] += 1
            if inode.is_dir:
                subdirs[directory] += 1
    _check_link_counts(state, names, subdirs, report)
    _check_reachable(state, report)


def _check_link_counts(state: MetadataState, names: Counter, subdirs: Counter,
                       report: Report) -> None:
    for ino, inode in state.inodes.items():
        if inode.is_dir:
            expected = 2 + subdirs[ino]
            if ino != ROOT_INO and names[ino] != 1:
                report.problem(f"directory {ino} has {names[ino]} names")
        else:
            expected = names[ino]
        if expected == 0:
            report.problem(f"orphan inode {ino} has no name ({_held(inode)} held)")
        elif inode.nlink != expected:
            report.problem(f"inode {ino} has link count {inode.nlink}, expected {expected}")
        if stat.S_ISLNK(inode.mode) and inode.size != len(inode.target):
            report.problem(f"symlink {ino} size {inode.size} != target length")


def _check_reachable(state: MetadataState, report: Report) -> None:
    seen, stack = {ROOT_INO}, [ROOT_INO]
    while stack:
        for child in state.entries.get(stack.pop(), {}).values():
            if child not in seen and child in state.inodes:
                seen.add(child)
                if state.inodes[child].is_dir:
                    stack.append(child)
    unreachable = [ino for ino in state.inodes if ino not in seen]
    for ino in unreachable:
        if state.inodes[ino].nlink != 0:  # nlink 0 is already reported as an orphan
            report.problem(f"inode {ino} is not reachable from the root")


def _held(inode) -> str:
    return f"{len(inode.units)} {'blocks' if inode.blocks else 'units'}"


def _check_space(state: MetadataState, report: Report) -> None:
    """Rebuild the free-space map from the extent maps and compare. Loading already
    dropped (as damage, reported above) what a map may not hold; this checks again,
    on the maps as they are now."""
    allocator = state.allocator
    per = allocator.per_unit
    owners: dict[int, int] = {}  # unit used whole -> inode
    block_owners: dict[int, int] = {}  # block -> inode
    for ino, inode in state.inodes.items():
        if inode.blocks:
            _check_blocks(ino, inode, allocator, block_owners, report)
            continue
        for unit in inode.units.values():
            if not 0 <= unit < allocator.units:
                report.problem(f"inode {ino} maps unit {unit} outside the data area")
            elif unit in owners:
                report.problem(f"unit {unit} is mapped by inodes {owners[unit]} and {ino}")
            owners[unit] = ino
    block_units = {block // per for block in block_owners}
    for unit in sorted(block_units & set(owners)):
        report.problem(f"unit {unit} is used whole by inode {owners[unit]} and split into "
                       f"blocks of small files")
    kept = state.snapshots.kept()  # parked granules and copies of snapshots in progress
    used_units, used_blocks = set(owners) | kept["u"], set(block_owners) | kept["b"]
    if allocator.used_units() != used_units or allocator.used_blocks() != used_blocks \
            or allocator.block_unit_set() != {block // per for block in used_blocks}:
        report.problem("free-space map disagrees with the extent maps")
    if state.snapshots:
        report.info(f"{len(state.snapshots.by_id)} snapshots in progress keep "
                    f"{len(kept['u'])} units and {len(kept['b'])} blocks besides the files")
    report.section(f"space: {len(owners)} of {allocator.units} units in use whole, "
                   f"{len(block_owners)} blocks of small files in {len(block_units)} units, "
                   f"{allocator.free_count} units free")


def _check_blocks(ino: int, inode, allocator, owners: dict[int, int], report: Report) -> None:
    per = allocator.per_unit
    for file_block, block in inode.units.items():
        if not 0 <= block < allocator.total_blocks:
            report.problem(f"inode {ino} maps block {block} outside the data area")
        elif block in owners:
            report.problem(f"block {block} is mapped by inodes {owners[block]} and {ino}")
        if file_block >= per:
            report.problem(f"block-mapped inode {ino} maps file block {file_block}, beyond "
                           f"its first unit")
        owners[block] = ino


# -- repair ------------------------------------------------------------------------------


def fix(volume: Volume, outcome: Outcome, report: Report) -> None:
    if outcome.state is None:
        report.repairs.append("nothing: the metadata could not be loaded")
        return
    state = outcome.state
    _repair_tree(state, report)
    _write_repaired(volume, outcome, report)


def _repair_tree(state: MetadataState, report: Report) -> None:
    for entries in state.entries.values():
        for name in [name for name, child in entries.items() if child not in state.inodes]:
            del entries[name]
            report.repairs.append(f"dropped dangling entry {name!r}")
    names, subdirs = Counter(), Counter()
    for directory, entries in state.entries.items():
        for child in entries.values():
            names[child] += 1
            subdirs[directory] += state.inodes[child].is_dir
    for ino, inode in list(state.inodes.items()):
        expected = 2 + subdirs[ino] if inode.is_dir else names[ino]
        if ino != ROOT_INO and names[ino] == 0:
            held = _held(inode)
            state.free_map(inode)
            del state.inodes[ino]
            state.entries.pop(ino, None)
            report.repairs.append(f"reclaimed orphan inode {ino} ({held})")
        elif inode.nlink != expected:
            inode.nlink = expected
            report.repairs.append(f"set link count of inode {ino} to {expected}")


def _write_repaired(volume: Volume, outcome: Outcome, report: Report) -> None:
    """New checkpoint (newer than both slots), then an empty journal, then superblocks."""
    recovered = outcome.recovered
    checkpoints, _ = recovery.read_checkpoints(volume)
    newest_seq = max([c.seq for c in checkpoints] + [recovered.last_seq])
    slot = recovered.next_checkpoint_slot
    epoch = max(recovered.last_epoch, read_lease(volume).epoch)
    recovery.write_checkpoint(volume, slot, epoch, newest_seq + 1, outcome.state,
                              recovery.new_journal_gen())
    volume.zero(volume.sb.journal.offset, volume.sb.journal.length)
    volume.sync()
    report.repairs.append(f"wrote checkpoint seq {newest_seq + 1} and emptied the journal")
    if outcome.superblock_bad:
        volume.write_superblocks()
        report.repairs.append("rewrote both superblocks")

