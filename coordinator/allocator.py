"""Free-space accounting for the data area, one byte per allocation unit.

The allocator is derived from the extent maps at load time and kept beside
them afterwards; fsck rebuilds it from the maps and compares.
"""

from __future__ import annotations


class NoSpace(Exception):
    pass


class Allocator:
    def __init__(self, units: int):
        self.units = units
        self._used = bytearray(units)
        self.used_count = 0
        self._cursor = 0  # next-fit start, so growing files stay contiguous

    @property
    def free_count(self) -> int:
        return self.units - self.used_count

    def is_used(self, unit: int) -> bool:
        return bool(self._used[unit])

    def mark_used(self, unit: int) -> None:
        if self._used[unit]:
            raise ValueError(f"unit {unit} is already in use")
        self._used[unit] = 1
        self.used_count += 1

    def mark_free(self, unit: int) -> None:
        if not self._used[unit]:
            raise ValueError(f"unit {unit} is already free")
        self._used[unit] = 0
        self.used_count -= 1

    def find(self, count: int, near: int | None = None) -> list[int]:
        """Choose `count` free units, preferring a run starting at `near`; marks nothing."""
        if count <= 0:
            return []
        if count > self.free_count:
            raise NoSpace(f"need {count} units, {self.free_count} free")
        chosen: list[int] = []
        start = near if near is not None and 0 <= near < self.units else self._cursor
        for begin, end in ((start, self.units), (0, start)):
            position = begin
            while len(chosen) < count and position < end:
                found = self._used.find(0, position, end)
                if found < 0:
                    break
                chosen.append(found)
                position = found + 1
            if len(chosen) == count:
                break
        self._cursor = (chosen[-1] + 1) % self.units
        return chosen

    def used_units(self) -> set[int]:
        return {index for index, flag in enumerate(self._used) if flag}
