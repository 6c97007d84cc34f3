"""Extent maps: file granule -> volume granule.

A regular file is *unit-mapped* (granule = the allocation unit: file unit ->
volume unit) or, while everything it has allocated lies in its first unit,
*block-mapped* (granule = BLOCK: file block -> volume block, where volume block
b is at data offset b * BLOCK, inside volume unit b // (unit / BLOCK)).

In memory a map is a dict, so the data path pays one dict lookup per request.
On disk and on the wire it travels as runs [file_granule, volume_granule, count].
"""

from __future__ import annotations

from collections.abc import Iterator

UnitMap = dict[int, int]

BLOCK = 4096  # the granule of block-mapped (small) files


def pieces(start: int, end: int, unit: int) -> Iterator[tuple[int, int, int]]:
    """Split the byte range [start, end) at unit boundaries: (start, end, file unit)."""
    while start < end:
        file_unit = start // unit
        piece_end = min(end, (file_unit + 1) * unit)
        yield start, piece_end, file_unit
        start = piece_end


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


# Change tracking is finer than the unit: a unit is cut into stripes, and the nodes
# report which stripes of a tracked file's units they wrote (coordinator/model.py).
STRIPE = 64 * 1024


def stripe_mask(start: int, end: int, unit: int) -> int:
    """The stripes of one unit that the byte range [start, end) of it touches (offsets
    within the file; the range must lie inside one unit)."""
    first = (start % unit) // STRIPE
    last = ((end - 1) % unit) // STRIPE
    return (1 << (last + 1)) - (1 << first)


def stripe_runs(mask: int) -> Iterator[tuple[int, int]]:
    """(first stripe, count) of each run of set bits in mask."""
    index = 0
    while mask:
        if mask & 1:
            count = 0
            while mask & 1:
                mask >>= 1
                count += 1
            yield index, count
            index += count
        else:
            skip = (mask & -mask).bit_length() - 1
            mask >>= skip
            index += skip
