"""Extent maps: file allocation unit -> volume allocation unit.

In memory a map is a dict, so the data path pays one dict lookup per request.
On disk and on the wire it travels as runs [file_unit, volume_unit, count].
"""

from __future__ import annotations

UnitMap = dict[int, int]


def to_runs(units: UnitMap) -> list[list[int]]:
    runs: list[list[int]] = []
    for file_unit in sorted(units):
        volume_unit = units[file_unit]
        if runs:
            last = runs[-1]
            if last[0] + last[2] == file_unit and last[1] + last[2] == volume_unit:
                last[2] += 1
                continue
        runs.append([file_unit, volume_unit, 1])
    return runs


def from_runs(runs: list[list[int]]) -> UnitMap:
    units: UnitMap = {}
    for file_unit, volume_unit, count in runs:
        for step in range(count):
            units[file_unit + step] = volume_unit + step
    return units
