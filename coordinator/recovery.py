"""Loading metadata: the newest valid checkpoint, then the journal after it."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field

from coordinator import journal
from coordinator.model import MetadataState
from csvfs.volume import format as fmt
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

JOURNAL_GEN = "journal_gen"  # key in the checkpoint image


@dataclass
class Checkpoint:
    slot: int
    epoch: int
    seq: int
    image: dict


@dataclass
class Recovered:
    state: MetadataState
    checkpoint: Checkpoint | None
    replay: journal.ReplayResult
    checkpoint_problems: list[str] = field(default_factory=list)

    @property
    def last_seq(self) -> int:
        if self.replay.records:
            return self.replay.records[-1].seq
        return self.checkpoint.seq if self.checkpoint else 0

    @property
    def last_epoch(self) -> int:
        if self.replay.records:
            return self.replay.records[-1].epoch
        return self.checkpoint.epoch if self.checkpoint else 0

    @property
    def journal_gen(self) -> int:
        return self.checkpoint.image.get(JOURNAL_GEN, 0) if self.checkpoint else 0

    @property
    def next_checkpoint_slot(self) -> int:
        return 1 - self.checkpoint.slot if self.checkpoint else 0


def _read_checkpoint_blob(volume: Volume, region) -> bytes:
    """The bytes of the checkpoint in a slot: its header says how many, so a takeover
    reads the metadata, not the whole slot. A header that does not parse gets the whole
    slot, and decode_checkpoint says what is wrong with it."""
    head = volume.read(region.offset, min(region.length, fmt.SECTOR))
    try:
        length = fmt.block_length(head, fmt.CHECKPOINT_MAGIC)
    except fmt.FormatError:
        return volume.read(region.offset, region.length)
    if length <= len(head):
        return head
    return volume.read(region.offset, min(region.length, length))


def read_checkpoints(volume: Volume) -> tuple[list[Checkpoint], list[str]]:
    found, problems = [], []
    for slot, region in enumerate(volume.sb.checkpoint_slots()):
        raw = _read_checkpoint_blob(volume, region)
        if raw[:4] == b"\0\0\0\0":
            continue
        try:
            epoch, seq, image = fmt.decode_checkpoint(raw)
        except fmt.FormatError as exc:
            problems.append(f"checkpoint slot {'AB'[slot]} is unusable: {exc}")
            continue
        found.append(Checkpoint(slot, epoch, seq, image))
    return found, problems


def load(volume: Volume) -> Recovered:
    """Rebuild the metadata state; never writes."""
    checkpoints, problems = read_checkpoints(volume)
    newest = max(checkpoints, key=lambda c: (c.seq, c.epoch), default=None)
    units = volume.sb.data_units
    if newest is None:
        state = MetadataState.fresh(units, volume.sb.created_ns, volume.sb.unit_size)
        after_seq, epoch = 0, 0
    else:
        state = MetadataState.from_image(newest.image, units, volume.sb.unit_size)
        after_seq, epoch = newest.seq, newest.epoch
    gen = newest.image.get(JOURNAL_GEN, 0) if newest else 0
    replay = journal.scan(volume, after_seq, epoch, gen, checkpoint_lost=bool(problems))
    for record in replay.records:
        state.apply(record.op)
    log.debug("recovered: checkpoint seq %s, %d records replayed (%s)",
              after_seq, len(replay.records), replay.stop_reason)
    return Recovered(state, newest, replay, problems)


def new_journal_gen() -> int:
    return secrets.randbits(63)


def write_checkpoint(volume: Volume, slot: int, epoch: int, seq: int, state: MetadataState,
                     gen: int = 0) -> None:
    """Write a full metadata image to `slot`, opening journal generation `gen`; make it durable."""
    write_blob(volume, *checkpoint_blob(volume, slot, epoch, seq, state, gen))


def checkpoint_blob(volume: Volume, slot: int, epoch: int, seq: int, state: MetadataState,
                    gen: int = 0) -> tuple[int, bytes]:
    """Where a checkpoint of `state` goes, and its bytes; raises OSError if it does not fit."""
    image = state.to_image()
    image[JOURNAL_GEN] = gen
    blob = fmt.encode_checkpoint(epoch, seq, image)
    region = volume.sb.checkpoint_slots()[slot]
    if len(blob) > region.length:
        raise OSError(f"metadata ({len(blob)} bytes) no longer fits a checkpoint slot")
    return region.offset, blob


def write_blob(volume: Volume, offset: int, blob: bytes) -> None:
    """Write and make durable; blocking, so the coordinator runs it in a worker thread."""
    started = time.monotonic()
    volume.write(offset, blob)
    volume.sync()
    log.debug("checkpoint of %d bytes at %d: %.1f ms", len(blob), offset,
              (time.monotonic() - started) * 1000)
