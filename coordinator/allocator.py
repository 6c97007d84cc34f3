"""Free-space accounting for the data area: units, and blocks inside block units.

Each allocation unit is free, used whole (by a unit-mapped file), or a *block
unit*: split into unit/BLOCK blocks of 4 KiB with a bitmap of its own, which
small (block-mapped) files share. A block unit is taken from the free units
when blocks are needed and goes back to them when its last block is freed.
Volume block b lies in unit b // blocks_per_unit.

The allocator is derived from the extent maps at load time and kept beside
them afterwards; nothing of it is on disk. fsck rebuilds it from the maps and
compares.
"""

from __future__ import annotations

from csvfs.volume.extents import BLOCK

FREE, WHOLE, SPLIT = 0, 1, 2
DEFAULT_BLOCKS_PER_UNIT = (1 << 20) // BLOCK


class NoSpace(Exception):
    pass


class Allocator:
    def __init__(self, units: int, blocks_per_unit: int = DEFAULT_BLOCKS_PER_UNIT):
        self.units = units
        self.per_unit = blocks_per_unit
        self._used = bytearray(units)  # FREE, WHOLE or SPLIT per unit
        self.used_count = 0  # units not free: used whole or split into blocks
        self._cursor = 0  # next-fit start, so growing files stay contiguous
        self._bitmaps: dict[int, bytearray] = {}  # block unit -> one byte per block
        self._free_in: dict[int, int] = {}  # block unit -> its free blocks, when any
        self._split_free = 0  # free blocks inside block units
        self._block_cursor = 0  # next-fit start for blocks: small files pack together

    @property
    def free_count(self) -> int:
        return self.units - self.used_count

    @property
    def free_blocks(self) -> int:
        """Blocks that can still be had: in free units and inside block units."""
        return self.free_count * self.per_unit + self._split_free

    @property
    def total_blocks(self) -> int:
        return self.units * self.per_unit

    def is_used(self, unit: int) -> bool:
        return bool(self._used[unit])

    def is_block_unit(self, unit: int) -> bool:
        return self._used[unit] == SPLIT

    def mark_used(self, unit: int) -> None:
        if self._used[unit]:
            what = "split into blocks" if self._used[unit] == SPLIT else "already in use"
            raise ValueError(f"unit {unit} is {what}")
        self._used[unit] = WHOLE
        self.used_count += 1

    def mark_free(self, unit: int) -> None:
        if self._used[unit] != WHOLE:
            what = "split into blocks" if self._used[unit] == SPLIT else "already free"
            raise ValueError(f"unit {unit} is {what}")
        self._used[unit] = FREE
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
        """Units used whole."""
        return {index for index, flag in enumerate(self._used) if flag == WHOLE}

    # -- blocks -------------------------------------------------------------------------

    def block_unit_set(self) -> set[int]:
        return set(self._bitmaps)

    def used_blocks(self) -> set[int]:
        per = self.per_unit
        return {unit * per + index for unit, bitmap in self._bitmaps.items()
                for index, flag in enumerate(bitmap) if flag}

    def is_block_used(self, block: int) -> bool:
        bitmap = self._bitmaps.get(block // self.per_unit)
        return bitmap is not None and bool(bitmap[block % self.per_unit])

    def mark_block_used(self, block: int) -> None:
        unit, index = divmod(block, self.per_unit)
        state = self._used[unit]
        if state == WHOLE:
            raise ValueError(f"block {block} lies in unit {unit}, which is in use whole")
        if state == FREE:
            self._used[unit] = SPLIT
            self.used_count += 1
            self._bitmaps[unit] = bytearray(self.per_unit)
            self._free_in[unit] = self.per_unit
            self._split_free += self.per_unit
        bitmap = self._bitmaps[unit]
        if bitmap[index]:
            raise ValueError(f"block {block} is already in use")
        bitmap[index] = 1
        self._split_free -= 1
        left = self._free_in[unit] - 1
        if left:
            self._free_in[unit] = left
        else:
            del self._free_in[unit]

    def mark_block_free(self, block: int) -> None:
        unit, index = divmod(block, self.per_unit)
        bitmap = self._bitmaps.get(unit)
        if bitmap is None or not bitmap[index]:
            raise ValueError(f"block {block} is already free")
        bitmap[index] = 0
        self._split_free += 1
        left = self._free_in.get(unit, 0) + 1
        if left < self.per_unit:
            self._free_in[unit] = left
            return
        # its last block: the unit goes back to the free units
        del self._free_in[unit], self._bitmaps[unit]
        self._split_free -= self.per_unit
        self._used[unit] = FREE
        self.used_count -= 1

    def find_blocks(self, count: int, near: int | None = None) -> list[int]:
        """Choose `count` free blocks; marks nothing. Next-fit: a run from `near` (the
        block after a file's last one) or from where the last choice ended, so that
        a file's blocks, and files made one after another, lie together; then the
        gaps in other block units; then blocks of free units."""
        if count <= 0:
            return []
        if count > self.free_blocks:
            raise NoSpace(f"need {count} blocks, {self.free_blocks} free")
        per = self.per_unit
        chosen: list[int] = []
        fresh: set[int] = set()  # free units some of the chosen blocks come from
        start = near if near is not None and 0 <= near < self.total_blocks \
            else self._block_cursor % max(1, self.total_blocks)
        unit = start // per
        if self._used[unit] == SPLIT or (self._used[unit] == FREE and not self._free_in):
            bitmap = self._bitmaps.get(unit)
            block, end = start, (unit + 1) * per
            while len(chosen) < count and block < end and not (bitmap and bitmap[block % per]):
                chosen.append(block)
                block += 1
            if bitmap is None and chosen:
                fresh.add(unit)
        if len(chosen) < count:
            taken = set(chosen)
            for unit in list(self._free_in):
                bitmap = self._bitmaps[unit]
                position = 0
                while len(chosen) < count:
                    index = bitmap.find(0, position)
                    if index < 0:
                        break
                    block = unit * per + index
                    if block not in taken:
                        chosen.append(block)
                    position = index + 1
                if len(chosen) == count:
                    break
        position = 0
        while len(chosen) < count:
            unit = self._used.find(0, position)
            if unit < 0:
                raise NoSpace(f"need {count} blocks")  # not reached: counted above
            position = unit + 1
            if unit in fresh:
                continue
            take = min(per, count - len(chosen))
            chosen.extend(range(unit * per, unit * per + take))
        self._block_cursor = chosen[-1] + 1
        return chosen
