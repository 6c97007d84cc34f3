"""Change tracking finer than the unit, as pure units: the stripes a node reports
writing, how records apply them, and what an incremental makes of them. The real
mounts are in tests/test_backup.py."""

from __future__ import annotations

import stat

import pytest

from coordinator.model import MetadataState
from coordinator.snapshots import StripeReports
from csvfs.backup.engine import _aligned, _coalesced, _gaps, _merged, _on_grid
from csvfs.backup.manifest import ChunkRef
from csvfs.volume.extents import STRIPE, stripe_mask, stripe_runs

M = 1 << 20
INO = 2


def tracked_state() -> MetadataState:
    """A 4-unit file of 1 MiB units, backed up once by snapshot 10 (its base)."""
    state = MetadataState.fresh(64, 0, M)
    state.apply({"op": "mknod", "ino": INO, "parent": 1, "name": b"disk", "t": 1,
                 "mode": stat.S_IFREG | 0o644, "uid": 0, "gid": 0})
    state.apply({"op": "map", "ino": INO, "add": [[0, 0, 4]], "size": 4 * M, "t": 2})
    state.apply({"op": "snapshot", "id": 10, "t": 3})
    state.apply({"op": "release", "id": 10, "failed": False})
    return state


def test_stripe_masks_and_runs():
    assert stripe_mask(0, 1, M) == 0b1
    assert stripe_mask(STRIPE - 1, STRIPE + 1, M) == 0b11
    assert stripe_mask(M + 3 * STRIPE, M + 5 * STRIPE, M) == 0b11000  # offsets in the file
    assert stripe_mask(M - 1, M, M) == 1 << 15
    assert list(stripe_runs(0)) == []
    assert list(stripe_runs(0b1011000110)) == [(1, 2), (6, 2), (9, 1)]
    assert list(stripe_runs(1 << 63)) == [(63, 1)]


def test_a_node_first_write_starts_an_empty_mask_that_reports_fill():
    state = tracked_state()
    inode = state.inodes[INO]
    state.apply({"op": "changed", "ino": INO, "granules": [1], "by_node": True})
    assert inode.tracking == {10: {1}} and inode.partial == {10: {1: 0}}
    state.apply({"op": "snapshot", "id": 20, "t": 4, "written": [[INO, [[1, 0b100], [3, 1]]]]})
    # the report counts for the base before the point (unit 3 was not marked: a stale
    # report, ignored), and the new base starts empty
    assert inode.partial == {10: {1: 0b100}, 20: {}}
    frozen = state.snapshots.by_id[20].tracking[INO]
    assert frozen == [[10, [1], [(1, 0b100)]]]


def test_a_whole_unit_change_overrides_a_mask():
    state = tracked_state()
    inode = state.inodes[INO]
    state.apply({"op": "changed", "ino": INO, "granules": [1, 2], "by_node": True})
    state.apply({"op": "changed", "ino": INO, "granules": [2]})  # the coordinator wrote
    assert inode.partial == {10: {1: 0}}
    state.apply({"op": "changed", "ino": INO, "granules": [2], "by_node": True})
    assert inode.partial == {10: {1: 0}}, "a marked unit does not narrow again"
    state.apply({"op": "map", "ino": INO, "drop": [[1, 1]]})  # punched: a hole now
    assert inode.partial == {10: {}} and inode.tracking == {10: {1, 2}}


def test_lost_reports_make_every_changed_unit_whole():
    state = tracked_state()
    state.apply({"op": "changed", "ino": INO, "granules": [0, 1], "by_node": True})
    state.apply({"op": "snapshot", "id": 20, "t": 4, "stripes_lost": True,
                 "written": [[INO, [[0, 1]]]]})
    assert state.snapshots.by_id[20].tracking[INO] == [[10, [0, 1], []]]


def test_masks_survive_a_checkpoint_row():
    state = tracked_state()
    state.apply({"op": "changed", "ino": INO, "granules": [3], "by_node": True})
    state.apply({"op": "snapshot", "id": 20, "t": 4, "written": [[INO, [[3, 0b1010]]]]})
    row = state.inodes[INO].to_list()
    again = type(state.inodes[INO]).from_list(row)
    assert again.tracking == {10: {3}, 20: set()}
    assert again.partial == {10: {3: 0b1010}, 20: {}}


def test_the_oldest_base_goes_with_its_masks():
    state = tracked_state()
    for snap_id in (20, 30, 40, 50):
        state.apply({"op": "snapshot", "id": snap_id, "t": snap_id})
    inode = state.inodes[INO]
    assert sorted(inode.tracking) == sorted(inode.partial) == [20, 30, 40, 50]
    state.apply({"op": "release", "id": 50, "failed": True})
    assert sorted(inode.partial) == [20, 30, 40]


def test_stripe_reports_merge_and_refuse_malformed_ones():
    reports = StripeReports()
    assert reports.record([]) == {"stripes_lost": True}  # a new coordinator knows nothing
    reports.recorded()
    reports.goodbye([[INO, [[1, 0b01]]]], "n2")
    fields = reports.record([[[INO, [[1, 0b10], [2, 1]]]], [[7, [[0, 4]]]]])
    assert fields == {"written": [[INO, [(1, 0b11), (2, 1)]], [7, [(0, 4)]]]}
    reports.recorded()
    assert reports.record([]) == {}
    for bad in ([[INO, [[1, -1]]]], [["x", []]], [[INO, [[1]]]], 5, [[INO, [[True, 1]]]]):
        assert not reports.well_formed(bad, "n3")
        assert reports.record([]) == {"stripes_lost": True}
        reports.recorded()


@pytest.mark.parametrize("ranges, limit, expected", [
    ([(5, 7), (0, 2), (2, 3)], 100, [(0, 3), (5, 7)]),
    ([(0, 50), (10, 20), (90, 120)], 100, [(0, 50), (90, 100)]),
    ([(100, 200)], 100, []),
])
def test_merged_ranges(ranges, limit, expected):
    assert _merged(ranges, limit) == expected


def test_the_pieces_of_an_incremental_plan():
    assert _aligned([(100, 200), (STRIPE, STRIPE + 1)], STRIPE) == [(0, STRIPE),
                                                                    (STRIPE, 2 * STRIPE)]
    assert _gaps([(10, 20), (30, 40)], 50) == [(0, 10), (20, 30), (40, 50)]
    assert _gaps([(0, 50)], 50) == []
    assert _gaps([(10, 60)], 50) == [(0, 10)]
    assert _on_grid([(M - 10, M + 10), (3 * M, 3 * M + 5)], M) == [
        (M - 10, 10), (M, 10), (3 * M, 5)]
    a, b = b"a" * 32, b"b" * 32
    refs = [ChunkRef(0, 10, a), ChunkRef(10, 5, a, 10), ChunkRef(15, 5, b), ChunkRef(20, 4, a, 20)]
    assert _coalesced(refs) == [ChunkRef(0, 15, a), ChunkRef(15, 5, b), ChunkRef(20, 4, a, 20)]


def test_a_unit_added_in_a_hole_counts_only_what_is_written_to_it():
    state = tracked_state()
    inode = state.inodes[INO]
    state.apply({"op": "map", "ino": INO, "add": [[6, 8, 1]], "size": 7 * M, "t": 5})
    assert inode.partial == {10: {6: 0}}, "zeros, as the hole was: nothing changed yet"
    state.apply({"op": "map", "ino": INO, "drop": [[0, 1]]})
    state.apply({"op": "map", "ino": INO, "add": [[0, 9, 1]]})
    assert 0 not in inode.partial[10], "its data at the base is gone: the whole unit"
    small = MetadataState.fresh(64, 0, 64 << 10)  # one stripe per unit: no masks
    small.apply({"op": "mknod", "ino": INO, "parent": 1, "name": b"f", "t": 1,
                 "mode": stat.S_IFREG | 0o644, "uid": 0, "gid": 0})
    small.apply({"op": "snapshot", "id": 10, "t": 3})
    small.apply({"op": "map", "ino": INO, "add": [[0, 0, 2]], "size": 128 << 10, "t": 4})
    assert small.inodes[INO].partial == {10: {}} and small.inodes[INO].tracking == {10: {0, 1}}


def test_an_incremental_builds_on_the_newest_base_whatever_the_ids_order(tmp_path, monkeypatch):
    """Backup ids sort by the second they were saved in: two in one second may sort
    either way. The newest base is what counts, wherever its manifest sorts."""
    from types import SimpleNamespace

    from csvfs.backup.engine import _bases
    from csvfs.backup.repository import Repository

    repo = Repository.create(tmp_path / "repo")
    ids = iter(["20261202T000000Z-bbbbbb", "20261202T000000Z-aaaaaa"])  # newer sorts first
    monkeypatch.setattr(repo, "_new_backup_id", lambda: next(ids))
    for snapshot in (10, 20):
        repo.save_manifest({"format": 1, "kind": "vm", "time_ns": snapshot, "snapshot": snapshot,
                            "source": {"volume": "v", "image": "", "unit_size": M},
                            "chunk_size": repo.chunk_size, "tree": [], "warnings": [],
                            "files": [{"ino": INO, "path": "/disk", "size": 0, "chunks": [],
                                       "from": snapshot}]})
    view = SimpleNamespace(volume="v", tracking={INO: {10: ([], {}), 20: ([], {})}})
    bases = _bases(repo, view, {INO})
    assert (20, INO) in bases and bases[20, INO]["from"] == 20
