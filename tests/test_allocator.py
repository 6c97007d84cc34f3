"""The data-area allocator and extent-map run encoding."""

from __future__ import annotations

import random

import pytest

from coordinator.allocator import Allocator, NoSpace
from csvfs.volume.extents import from_runs, to_runs

pytestmark = pytest.mark.timeout(60)


def _take(allocator: Allocator, count: int, near: int | None = None) -> list[int]:
    chosen = allocator.find(count, near)
    for unit in chosen:
        allocator.mark_used(unit)
    return chosen


def test_fresh_allocator():
    allocator = Allocator(16)
    assert allocator.units == 16
    assert allocator.free_count == 16 and allocator.used_count == 0
    assert allocator.used_units() == set()
    assert not any(allocator.is_used(unit) for unit in range(16))


def test_find_marks_nothing():
    allocator = Allocator(8)
    assert allocator.find(3) == [0, 1, 2]
    assert allocator.free_count == 8
    assert allocator.used_units() == set()


def test_mark_used_and_free():
    allocator = Allocator(8)
    allocator.mark_used(3)
    allocator.mark_used(7)
    assert allocator.is_used(3) and allocator.is_used(7) and not allocator.is_used(4)
    assert allocator.used_count == 2 and allocator.free_count == 6
    assert allocator.used_units() == {3, 7}
    allocator.mark_free(3)
    assert not allocator.is_used(3)
    assert allocator.used_units() == {7}
    assert allocator.free_count == 7


def test_double_mark_raises():
    allocator = Allocator(4)
    allocator.mark_used(1)
    with pytest.raises(ValueError, match="already in use"):
        allocator.mark_used(1)
    allocator.mark_free(1)
    with pytest.raises(ValueError, match="already free"):
        allocator.mark_free(1)
    with pytest.raises(ValueError, match="already free"):
        allocator.mark_free(2)
    assert allocator.used_count == 0 and allocator.free_count == 4


def test_find_skips_used_units():
    allocator = Allocator(10)
    for unit in (0, 2, 3, 6):
        allocator.mark_used(unit)
    assert allocator.find(4, near=0) == [1, 4, 5, 7]


def test_next_fit_keeps_growing_files_contiguous():
    allocator = Allocator(100)
    first = _take(allocator, 3)
    second = _take(allocator, 3)
    assert first == [0, 1, 2] and second == [3, 4, 5]
    # freeing space behind the cursor does not pull the next allocation back
    for unit in first:
        allocator.mark_free(unit)
    assert _take(allocator, 2) == [6, 7]
    # near= continues a file's last run
    assert _take(allocator, 2, near=20) == [20, 21]
    assert _take(allocator, 2, near=22) == [22, 23]
    # without near, the cursor carries on after the last choice
    assert _take(allocator, 1) == [24]


def test_near_out_of_range_uses_cursor():
    allocator = Allocator(8)
    _take(allocator, 2)
    assert allocator.find(1, near=8) == [2]
    assert allocator.find(1, near=-1) == [3]


def test_wrap_around():
    allocator = Allocator(8)
    _take(allocator, 6)  # 0..5, cursor at 6
    allocator.mark_free(1)
    allocator.mark_free(2)
    assert allocator.find(4) == [6, 7, 1, 2]
    # the cursor follows the last choice
    assert allocator.find(1) == [6]


def test_wrap_around_from_near():
    allocator = Allocator(8)
    for unit in (1, 6):
        allocator.mark_used(unit)
    assert allocator.find(6, near=5) == [5, 7, 0, 2, 3, 4]


def test_fill_completely_then_no_space():
    allocator = Allocator(32)
    rng = random.Random(7)
    taken: list[int] = []
    while allocator.free_count:
        taken += _take(allocator, min(allocator.free_count, rng.randint(1, 5)),
                       rng.choice([None, rng.randrange(32)]))
    assert sorted(taken) == list(range(32))
    with pytest.raises(NoSpace):
        allocator.find(1)


def test_no_space():
    allocator = Allocator(4)
    _take(allocator, 3)
    with pytest.raises(NoSpace, match="need 2 units, 1 free"):
        allocator.find(2)
    assert allocator.find(1) == [3]
    with pytest.raises(NoSpace):
        Allocator(0).find(1)


def test_find_nothing():
    allocator = Allocator(4)
    assert allocator.find(0) == []
    assert allocator.find(0, near=2) == []
    _take(allocator, 4)
    assert allocator.find(0) == []


def test_random_operations_match_a_model():
    rng = random.Random(20240611)
    allocator = Allocator(200)
    used: set[int] = set()
    for _ in range(3000):
        if used and rng.random() < 0.45:
            unit = rng.choice(sorted(used))
            allocator.mark_free(unit)
            used.discard(unit)
        else:
            count = rng.randint(0, 8)
            near = rng.choice([None, rng.randrange(-5, 210)])
            if count > 200 - len(used):
                with pytest.raises(NoSpace):
                    allocator.find(count, near)
                continue
            chosen = allocator.find(count, near)
            assert len(chosen) == len(set(chosen)) == count
            assert not used & set(chosen)
            for unit in chosen:
                allocator.mark_used(unit)
            used |= set(chosen)
        assert allocator.used_count == len(used)
        assert allocator.free_count == 200 - len(used)
    assert allocator.used_units() == used


# -- extents ---------------------------------------------------------------------------------------


def test_runs_examples():
    assert to_runs({}) == []
    assert from_runs([]) == {}
    assert to_runs({0: 10, 1: 11, 2: 12}) == [[0, 10, 3]]
    assert to_runs({2: 12, 0: 10, 1: 11}) == [[0, 10, 3]]  # insertion order does not matter
    assert to_runs({0: 10, 1: 12}) == [[0, 10, 1], [1, 12, 1]]  # volume gap
    assert to_runs({0: 10, 2: 12}) == [[0, 10, 1], [2, 12, 1]]  # file hole
    assert to_runs({0: 5, 1: 4}) == [[0, 5, 1], [1, 4, 1]]  # backwards on the volume
    assert from_runs([[4, 100, 2], [10, 0, 1]]) == {4: 100, 5: 101, 10: 0}


def test_runs_round_trip_random():
    rng = random.Random(1234)
    for _ in range(500):
        units: dict[int, int] = {}
        file_unit, volume_unit = rng.randrange(5), rng.randrange(1000)
        for _ in range(rng.randint(0, 40)):
            units[file_unit] = volume_unit
            file_unit += rng.choice([1, 1, 1, 2, 7])
            volume_unit += rng.choice([1, 1, 1, -3, 50])
            volume_unit = abs(volume_unit)
        runs = to_runs(units)
        assert from_runs(runs) == units
        # runs are sorted, positive, and maximal: neighbours never continue each other
        assert all(count >= 1 for _, _, count in runs)
        assert [run[0] for run in runs] == sorted(run[0] for run in runs)
        for before, after in zip(runs, runs[1:], strict=False):
            assert before[0] + before[2] <= after[0]
            assert not (before[0] + before[2] == after[0] and before[1] + before[2] == after[1])
        assert sum(count for _, _, count in runs) == len(units)
        assert to_runs(from_runs(runs)) == runs


def test_runs_of_a_contiguous_file_stay_small():
    units = {index: 1000 + index for index in range(10_000)}
    assert to_runs(units) == [[0, 1000, 10_000]]
    assert from_runs([[0, 1000, 10_000]]) == units
