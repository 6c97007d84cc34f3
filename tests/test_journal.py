"""The metadata journal (group commit, replay, torn and corrupt records) and recovery."""

from __future__ import annotations

import dataclasses
import os
import stat
import time

import pytest
import trio

from coordinator import recovery
from coordinator.journal import Journal, JournalCorrupt, JournalFull, LeaseLost, scan
from coordinator.model import ROOT_INO, MetadataState
from coordinator.service import MetadataService
from csvfs.cluster.events import EventLog
from csvfs.mkfs import make_volume
from csvfs.volume import format as fmt
from csvfs.volume.image import Volume

pytestmark = pytest.mark.timeout(60)

K, M = 1 << 10, 1 << 20
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "vol.img"
    make_volume(path, 64 * M, 64 * K)
    return path


@pytest.fixture
def volume(image):
    volume = Volume.open(image, writable=True)
    yield volume
    volume.close()


def _narrow(volume: Volume, length: int = 64 * K) -> Volume:
    """The same image with a shorter journal region, so that scanning it thousands of
    times stays cheap. Only what scan() reads changes; the bytes are the real ones."""
    region = fmt.Region(volume.sb.journal.offset, length)
    return Volume(volume.path, volume.fd, dataclasses.replace(volume.sb, journal=region), False)


def _op(index: int, size: int = 0) -> dict:
    return {"op": "setxattr", "ino": ROOT_INO, "name": b"user.%d" % index,
            "value": bytes([index % 251]) * size, "t": index}


def _write_records(volume: Volume, records: list[fmt.JournalRecord], offset: int = 0) -> list[int]:
    """Write records back to back from `offset` in the journal; return each one's offset."""
    offsets = []
    for record in records:
        blob = fmt.encode_journal_record(record)
        offsets.append(offset)
        volume.write(volume.sb.journal.offset + offset, blob)
        offset += len(blob)
    return offsets


def _records(first_seq: int, count: int, epoch: int = 1, batch: int = 1,
             size: int = 0) -> list[fmt.JournalRecord]:
    """Records first_seq.. in batches of `batch` records."""
    out = []
    for seq in range(first_seq, first_seq + count):
        batch_first = first_seq + (seq - first_seq) // batch * batch
        out.append(fmt.JournalRecord(epoch, seq, batch_first, _op(seq, size)))
    return out


# -- appending and replay -----------------------------------------------------------------


async def test_replay_after_appends(volume):
    journal = Journal(volume, epoch=1, next_seq=1, offset=0)
    ops = [_op(index, size=(index * 37) % 1500) for index in range(60)]
    for index, op in enumerate(ops):
        assert journal.append(op) == index + 1
        if index % 7 == 3:
            await journal.wait_durable()
    await journal.wait_durable()
    assert journal.durable_seq == 60 and journal.next_seq == 61
    result = scan(volume, after_seq=0, min_epoch=0)
    assert [record.op for record in result.records] == ops
    assert [record.seq for record in result.records] == list(range(1, 61))
    assert all(record.epoch == 1 for record in result.records)
    assert result.end_offset == journal.offset
    assert result.stop_reason == "end of journal"
    assert result.corrupt is None


async def test_records_are_only_written_when_waited_for(volume):
    journal = Journal(volume, epoch=1, next_seq=1, offset=0)
    journal.append(_op(1))
    assert scan(volume, 0, 0).records == []
    await journal.wait_durable(1)
    assert len(scan(volume, 0, 0).records) == 1


async def test_journal_continues_after_replay(volume):
    journal = Journal(volume, epoch=1, next_seq=1, offset=0)
    for index in range(5):
        journal.append(_op(index))
    await journal.wait_durable()
    result = scan(volume, 0, 0)
    again = Journal(volume, epoch=2, next_seq=result.records[-1].seq + 1, offset=result.end_offset)
    for index in range(5, 8):
        again.append(_op(index))
    await again.wait_durable()
    records = scan(volume, 0, 0).records
    assert [record.seq for record in records] == list(range(1, 9))
    assert [record.epoch for record in records] == [1] * 5 + [2] * 3


async def test_group_commit(volume, monkeypatch):
    syncs = []  # each batch is written with RWF_DSYNC, or written and fdatasync'ed
    real_fdatasync, real_write_durable = os.fdatasync, volume.write_durable

    def counting_fdatasync(fd):
        syncs.append(fd)
        real_fdatasync(fd)

    def counting_write_durable(offset, data):
        syncs.append(offset)
        real_write_durable(offset, data)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    monkeypatch.setattr(volume, "write_durable", counting_write_durable)
    journal = Journal(volume, epoch=1, next_seq=1, offset=0)
    returned: dict[int, int] = {}

    async def writer(index: int) -> None:
        await trio.sleep(0)
        seq = journal.append(_op(index, size=index % 700))
        await journal.wait_durable(seq)
        assert journal.durable_seq >= seq
        returned[index] = seq

    async with trio.open_nursery() as nursery:
        for index in range(300):
            nursery.start_soon(writer, index)
    assert sorted(returned.values()) == list(range(1, 301))
    assert len(syncs) < 300 / 10
    records = scan(volume, 0, 0).records
    assert [record.seq for record in records] == list(range(1, 301))
    batches = sorted({record.batch_first for record in records})
    assert len(batches) == len(syncs)
    assert len(batches) < len(records)
    for record in records:  # a batch is a run of consecutive seqs starting at batch_first
        assert record.batch_first <= record.seq
        assert all(other.batch_first == record.batch_first
                   for other in records[record.batch_first - 1 : record.seq])


async def test_journal_full(volume):
    small = _narrow(volume, 4 * K)
    journal = Journal(small, epoch=1, next_seq=1, offset=0)
    for index in range(8):
        journal.append(_op(index))
    assert journal.used_fraction == 1.0
    assert not journal.fits(1)
    with pytest.raises(JournalFull):
        journal.append(_op(9))
    assert journal.next_seq == 9
    await journal.wait_durable()
    assert [record.seq for record in scan(small, 0, 0).records] == list(range(1, 9))


async def test_write_error_breaks_the_journal(volume, monkeypatch):
    journal = Journal(volume, epoch=1, next_seq=1, offset=0)

    def failing(offset, data):  # the batch's durable write (RWF_DSYNC)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(volume, "write_durable", failing)
    journal.append(_op(1))
    with pytest.raises(OSError, match="journal write failed"):
        await journal.wait_durable()
    with pytest.raises(OSError, match="unusable"):
        journal.append(_op(2))
    assert journal.durable_seq == 0


async def test_a_batch_whose_lease_ran_out_after_the_check_is_never_written(volume):
    """A coordinator stopped (SIGSTOP) between the lease check and its thread's write
    wakes after another node took over: the thread checks the lease again and writes
    nothing; the journal refuses everything after, as a lost lease."""
    journal = Journal(volume, epoch=1, next_seq=1, offset=0)
    journal.append(_op(1))
    await journal.wait_durable()
    journal.write_deadline = lambda: time.monotonic() - 1  # ran out during the stop
    journal.append(_op(2))
    with pytest.raises(LeaseLost):
        await journal.wait_durable()
    assert journal.durable_seq == 1
    assert [record.seq for record in scan(volume, 0, 0).records] == [1]
    with pytest.raises(LeaseLost):
        journal.append(_op(3))


# -- torn and corrupt records -------------------------------------------------------------------


@pytest.mark.parametrize("last_batch_shared", [False, True])
def test_torn_last_record_over_zeros(volume, last_batch_shared):
    view = _narrow(volume)
    good = _records(1, 6, batch=2 if last_batch_shared else 1, size=300)
    last = fmt.JournalRecord(1, 7, 5 if last_batch_shared else 7, _op(7, size=1300))
    offsets = _write_records(view, good)
    where = offsets[-1] + len(fmt.encode_journal_record(good[-1]))
    blob = fmt.encode_journal_record(last)
    complete = fmt.block_length(blob, fmt.JOURNAL_MAGIC)
    assert len(blob) > 2 * fmt.SECTOR
    for cut in range(len(blob)):
        view.write(view.sb.journal.offset + where, blob[:cut])
        result = scan(view, 0, 0)
        assert result.corrupt is None, cut
        if cut < complete:
            assert result.records == good, cut
            assert result.end_offset == where
            expected_reason = "end of journal" if cut == 0 else "torn record"
            assert result.stop_reason.startswith(expected_reason), (cut, result.stop_reason)
        else:  # every byte that matters is there; only padding is missing
            assert result.records == good + [last], cut
            assert result.end_offset == where + len(blob)


def test_torn_last_record_over_a_stale_generation(volume):
    """The journal restarted after a checkpoint: every byte past the new records
    still holds an older generation of records, with lower seqs."""
    view = _narrow(volume)
    stale = [fmt.JournalRecord(1, seq, seq, _op(1000 + seq, size=(seq * 211) % 1800))
             for seq in range(1, 40)]
    stale_offsets = _write_records(view, stale)
    stale_end = stale_offsets[-1] + len(fmt.encode_journal_record(stale[-1]))
    assert stale_end < view.sb.journal.length
    checkpoint_seq = stale[-1].seq
    good = _records(checkpoint_seq + 1, 5, epoch=2, batch=2, size=100)
    offsets = _write_records(view, good)
    where = offsets[-1] + len(fmt.encode_journal_record(good[-1]))
    last = fmt.JournalRecord(2, checkpoint_seq + 6, checkpoint_seq + 5, _op(99, size=1100))
    blob = fmt.encode_journal_record(last)
    complete = fmt.block_length(blob, fmt.JOURNAL_MAGIC)
    before = view.read(view.sb.journal.offset + where, len(blob))
    assert before.count(fmt.JOURNAL_MAGIC) >= 1  # the region really holds stale records
    for cut in range(len(blob)):
        view.write(view.sb.journal.offset + where, blob[:cut] + before[cut:])
        result = scan(view, after_seq=checkpoint_seq, min_epoch=1)
        assert result.corrupt is None, cut
        if cut < complete:
            assert result.records == good, cut
            assert result.end_offset == where
        else:
            assert result.records == good + [last], cut


def test_torn_last_record_over_a_different_record_with_a_lower_seq(volume):
    """The bytes under the torn record are exactly one stale record, as long as the new one."""
    view = _narrow(volume)
    good = _records(11, 4, size=50)
    offsets = _write_records(view, good)
    where = offsets[-1] + len(fmt.encode_journal_record(good[-1]))
    last = fmt.JournalRecord(1, 15, 15, _op(15, size=900))
    blob = fmt.encode_journal_record(last)
    stale = fmt.encode_journal_record(fmt.JournalRecord(1, 3, 2, _op(3, size=900)))
    assert len(stale) == len(blob) and stale != blob
    complete = fmt.block_length(blob, fmt.JOURNAL_MAGIC)
    for cut in range(len(blob)):
        view.write(view.sb.journal.offset + where, blob[:cut] + stale[cut:])
        result = scan(view, after_seq=10, min_epoch=0)
        assert result.corrupt is None, cut
        assert result.records == (good if cut < complete else good + [last]), cut


@pytest.mark.parametrize("underneath", ["zeros", "stale"])
def test_torn_batch_cut_at_every_byte(volume, underneath):
    """One group commit is one pwrite: a crash can leave any prefix of it on disk."""
    view = _narrow(volume)
    if underneath == "stale":
        _write_records(view, _records(1, 20, size=700))
    good = _records(21, 3, batch=3, size=200)
    offsets = _write_records(view, good)
    where = offsets[-1] + fmt.SECTOR
    batch = [fmt.JournalRecord(1, seq, 24, _op(seq, size=size))
             for seq, size in ((24, 100), (25, 900), (26, 10), (27, 1200))]
    blob = b"".join(fmt.encode_journal_record(record) for record in batch)
    ends, position = [], 0
    for record in batch:
        encoded = fmt.encode_journal_record(record)
        ends.append(position + fmt.block_length(encoded, fmt.JOURNAL_MAGIC))
        position += len(encoded)
    before = view.read(view.sb.journal.offset + where, len(blob))
    for cut in range(len(blob) + 1):
        view.write(view.sb.journal.offset + where, blob[:cut] + before[cut:])
        result = scan(view, after_seq=20, min_epoch=1)
        complete = sum(1 for end in ends if end <= cut)
        assert result.records == good + batch[:complete], cut
        assert result.corrupt is None, cut


def _damage(volume: Volume, offset: int, at: int = 40) -> None:
    position = volume.sb.journal.offset + offset + at
    byte = volume.read(position, 1)[0]
    volume.write(position, bytes([byte ^ 0x5A]))


def test_corrupt_record_before_a_later_batch_is_reported(volume):
    records = _records(1, 10, batch=3)  # batches 1-3, 4-6, 7-9, 10
    offsets = _write_records(volume, records)
    _damage(volume, offsets[4])  # seq 5, in batch 4-6; batch 7-9 follows intact
    result = scan(volume, 0, 0)
    assert result.records == records[:4]
    assert result.end_offset == offsets[4]
    assert isinstance(result.corrupt, JournalCorrupt)
    assert (result.corrupt.seq, result.corrupt.offset) == (5, offsets[4])
    assert "torn record" in result.stop_reason


def test_missing_record_before_a_later_batch_is_reported(volume):
    records = _records(1, 6, batch=2)
    offsets = _write_records(volume, records)
    volume.write(volume.sb.journal.offset + offsets[2], bytes(offsets[3] - offsets[2]))
    result = scan(volume, 0, 0)
    assert result.records == records[:2]
    assert result.corrupt is not None and result.corrupt.seq == 3


def test_corrupt_first_record_of_a_batch_before_a_later_batch(volume):
    records = _records(1, 9, batch=3)
    offsets = _write_records(volume, records)
    _damage(volume, offsets[3])  # seq 4 starts batch 4-6
    result = scan(volume, 0, 0)
    assert result.records == records[:3]
    assert result.corrupt is not None and result.corrupt.seq == 4


def test_torn_batch_is_not_corruption(volume):
    records = _records(1, 10, batch=3)  # last batch: 10 alone
    records = records[:6] + [dataclasses.replace(r, batch_first=7) for r in records[6:]]
    offsets = _write_records(volume, records)
    _damage(volume, offsets[7])  # seq 8; 9 and 10 are intact but share batch_first 7
    result = scan(volume, 0, 0)
    assert result.records == records[:7]
    assert result.corrupt is None
    assert "torn record" in result.stop_reason


def test_torn_batch_with_a_hole_is_not_corruption(volume):
    records = _records(1, 8, batch=4)
    offsets = _write_records(volume, records)
    volume.write(volume.sb.journal.offset + offsets[5], bytes(offsets[6] - offsets[5]))
    result = scan(volume, 0, 0)
    assert result.records == records[:5]
    assert result.corrupt is None


def test_stale_records_after_a_checkpoint_end_replay(volume):
    old = _records(1, 30, size=200)
    _write_records(volume, old)
    new = _records(31, 4, epoch=2)
    offsets = _write_records(volume, new)
    result = scan(volume, after_seq=30, min_epoch=1)
    assert result.records == new
    assert result.end_offset == offsets[-1] + fmt.SECTOR
    assert result.corrupt is None
    # right after the checkpoint nothing new is in the journal: all of it is stale
    volume.write(volume.sb.journal.offset, fmt.encode_journal_record(old[0]))
    result = scan(volume, after_seq=30, min_epoch=1)
    assert result.records == [] and result.end_offset == 0 and result.corrupt is None


def test_a_gap_in_seqs_ends_replay(volume):
    records = _records(1, 3) + _records(5, 3)
    offsets = _write_records(volume, records)
    result = scan(volume, 0, 0)
    assert result.records == records[:3]
    # record 5 began its batch after 4 was durable: 4 is lost, not stale
    assert result.corrupt is not None
    assert (result.corrupt.seq, result.corrupt.offset) == (4, offsets[3])
    # a lower seq than expected is simply stale
    result = scan(volume, 1, 0)
    assert result.records == [] and result.corrupt is None


def test_epoch_going_backwards_ends_replay(volume):
    records = (_records(1, 2, epoch=1) + _records(3, 3, epoch=3) + _records(6, 1, epoch=2)
               + _records(7, 1, epoch=3))
    offsets = _write_records(volume, records)
    result = scan(volume, 0, 0)
    assert result.records == records[:5]
    assert result.end_offset == offsets[5]
    assert "stale epoch 2" in result.stop_reason
    # records older than the checkpoint's epoch are refused from the start
    assert scan(volume, 0, min_epoch=2).records == []
    assert scan(volume, 0, min_epoch=1).records == records[:5]


def test_full_journal_replays_to_the_end(volume):
    view = _narrow(volume, 8 * fmt.SECTOR)
    records = _records(1, 8)
    _write_records(view, records)
    result = scan(view, 0, 0)
    assert result.records == records
    assert result.end_offset == view.sb.journal.length
    assert result.corrupt is None


# -- recovery -------------------------------------------------------------------------------


def _open_service(image, epoch: int = 1):
    volume = Volume.open(image, writable=True)
    recovered = recovery.load(volume)
    service = MetadataService(volume, recovered, epoch=epoch, events=EventLog(volume, "t"))
    return volume, recovered, service


def _recording(service: MetadataService) -> list[dict]:
    """Collect every op the service appends to its journal."""
    ops: list[dict] = []
    append = service.journal.append

    def recording_append(op: dict) -> int:
        seq = append(op)
        ops.append(op)
        return seq

    service.journal.append = recording_append
    return ops


async def _workload(service: MetadataService, tag: str, count: int = 20) -> None:
    unit = service.commits.unit
    top = await service.call("n", "mknod", {"parent": ROOT_INO, "name": tag.encode(),
                                            "mode": DIR, "uid": 1, "gid": 2})
    for index in range(count):
        name = f"{tag}-{index}".encode()
        attrs = await service.call("n", "mknod", {"parent": top["ino"], "name": name,
                                                  "mode": FILE, "uid": 1, "gid": 2})
        await service.call("n", "extend", {"ino": attrs["ino"], "offset": 0,
                                           "end": (index % 4 + 1) * unit})
        if index % 3 == 0:
            await service.call("n", "setxattr", {"ino": attrs["ino"], "name": b"user.i",
                                                 "value": b"%d" % index})
        if index % 5 == 1:
            await service.call("n", "setattr", {"ino": attrs["ino"], "changes": {"size": 10}})
        if index % 4 == 2:
            await service.call("n", "rename", {"old_parent": top["ino"], "old_name": name,
                                               "new_parent": ROOT_INO,
                                               "new_name": name + b".moved"})
        if index % 6 == 5:
            await service.call("n", "unlink", {"parent": top["ino"], "name": name,
                                               "is_dir": False})


def _flip_byte(volume: Volume, offset: int) -> None:
    """Corrupt one byte for sure: writing a fixed value finds it there one time in 256."""
    volume.write(offset, bytes([volume.read(offset, 1)[0] ^ 0xFF]))


def _reload(image) -> recovery.Recovered:
    volume = Volume.open(image)
    try:
        return recovery.load(volume)
    finally:
        volume.close()


async def test_load_empty_volume(image):
    """mkfs leaves checkpoint A at seq 0, epoch 0, generation 0, holding just the root."""
    recovered = _reload(image)
    checkpoint = recovered.checkpoint
    assert (checkpoint.slot, checkpoint.seq, checkpoint.epoch) == (0, 0, 0)
    assert recovered.journal_gen == 0 and recovered.checkpoint_problems == []
    assert recovered.replay.records == [] and recovered.replay.corrupt is None
    assert recovered.last_seq == 0 and recovered.last_epoch == 0
    assert recovered.next_checkpoint_slot == 1
    assert list(recovered.state.inodes) == [ROOT_INO]
    assert recovered.state.entries == {ROOT_INO: {}}
    volume = Volume.open(image)
    volume.close()
    fresh = MetadataState.fresh(volume.sb.data_units, volume.sb.created_ns, volume.sb.unit_size)
    assert recovered.state.to_image() == fresh.to_image()


async def test_checkpoint_plus_replay_equals_applying_every_record(image):
    volume, _recovered, service = _open_service(image)
    ops = _recording(service)
    await _workload(service, "a")
    await service.checkpoint_now()
    await _workload(service, "b")
    volume.close()

    recovered = _reload(image)
    assert (recovered.checkpoint.slot, recovered.checkpoint.epoch) == (1, 1)  # A holds mkfs's
    assert recovered.replay.records  # some state came from the journal
    assert recovered.checkpoint.seq + len(recovered.replay.records) == len(ops)
    state = MetadataState.fresh(volume.sb.data_units, volume.sb.created_ns, volume.sb.unit_size)
    for op in ops:
        state.apply(op)
    assert recovered.state.to_image() == state.to_image() == service.state.to_image()
    assert recovered.state.allocator.used_units() == state.allocator.used_units()


async def test_corrupt_newest_checkpoint_falls_back_to_the_older_one(image):
    """A crash while writing checkpoint A: B plus the journal still hold everything."""
    volume, _recovered, service = _open_service(image)
    await _workload(service, "a")
    await service.checkpoint_now()  # slot B (mkfs wrote A)
    first_seq = service.journal.next_seq - 1
    await _workload(service, "b")
    expected = service.state.to_image()
    last_seq = service.journal.next_seq - 1
    # what service.checkpoint() does first, torn half way through
    blob = fmt.encode_checkpoint(1, last_seq, service.state.to_image())
    volume.write(volume.sb.checkpoint_a.offset, blob[: len(blob) // 2])
    volume.sync()
    volume.close()

    recovered = _reload(image)
    assert recovered.checkpoint.slot == 1 and recovered.checkpoint.seq == first_seq
    assert len(recovered.checkpoint_problems) == 1
    assert "checkpoint slot A is unusable" in recovered.checkpoint_problems[0]
    assert [r.seq for r in recovered.replay.records] == list(range(first_seq + 1, last_seq + 1))
    assert recovered.state.to_image() == expected
    assert recovered.next_checkpoint_slot == 0  # the bad slot is the one to overwrite


async def test_corrupt_checkpoint_byte_is_reported(image):
    volume, _recovered, service = _open_service(image)
    await _workload(service, "a", count=5)
    await service.checkpoint_now()  # B
    await service.checkpoint_now()  # A, same seq
    _flip_byte(volume, volume.sb.checkpoint_a.offset + 100)
    volume.close()
    recovered = _reload(image)
    assert recovered.checkpoint.slot == 1
    assert any("slot A" in problem for problem in recovered.checkpoint_problems)
    assert recovered.state.to_image() == service.state.to_image()


@pytest.mark.parametrize("earlier", [0, 1])
async def test_back_to_back_checkpoints_then_more_records(image, earlier):
    """Two checkpoints with no record between them hold the same (seq, epoch) in both
    slots; whichever one recovery takes, it must replay the records that follow. With
    `earlier` checkpoints before the pair, the later one of it lands in A, then in B."""
    volume, _recovered, service = _open_service(image)
    for index in range(earlier):
        await _workload(service, f"x{index}", count=3)
        await service.checkpoint_now()
    await _workload(service, "a", count=5)
    await service.checkpoint_now()
    await service.checkpoint_now()
    pair_seq = service.journal.next_seq - 1
    await _workload(service, "b", count=5)
    expected = service.state.to_image()
    last_seq = service.journal.next_seq - 1
    checkpoints, problems = recovery.read_checkpoints(volume)
    volume.close()
    assert problems == [] and [(c.seq, c.epoch) for c in checkpoints] == [(pair_seq, 1)] * 2
    recovered = _reload(image)
    assert recovered.replay.corrupt is None
    assert [r.seq for r in recovered.replay.records] == list(range(pair_seq + 1, last_seq + 1))
    assert recovered.state.to_image() == expected


async def test_newest_checkpoint_wins(image):
    volume = Volume.open(image, writable=True)
    state = MetadataState.fresh(volume.sb.data_units, 0, volume.sb.unit_size)
    recovery.write_checkpoint(volume, 1, 1, 5, state)
    state.apply({"op": "mknod", "ino": 2, "parent": ROOT_INO, "name": b"x", "mode": FILE,
                 "uid": 0, "gid": 0, "t": 9})
    recovery.write_checkpoint(volume, 0, 1, 9, state)
    volume.close()
    recovered = _reload(image)
    assert (recovered.checkpoint.slot, recovered.checkpoint.seq) == (0, 9)
    assert recovered.last_seq == 9 and recovered.last_epoch == 1
    assert b"x" in recovered.state.entries[ROOT_INO]
    assert recovered.next_checkpoint_slot == 1


async def test_checkpoint_then_more_ops_then_reload(image):
    volume, _recovered, service = _open_service(image)
    await _workload(service, "a")
    await service.checkpoint_now()  # the first one goes to slot B: mkfs wrote A
    await _workload(service, "b")
    await service.checkpoint_now()  # the second one goes to slot A
    await _workload(service, "c")
    expected = service.state.to_image()
    volume.close()

    volume, recovered, service = _open_service(image, epoch=2)
    assert recovered.checkpoint.slot == 0
    assert recovered.state.to_image() == expected
    # the next coordinator goes on from where replay stopped, and the result reloads too
    await _workload(service, "d", count=5)
    await service.checkpoint_now()
    assert service.commits.checkpoint_slot == 0  # B was used, A is next
    await _workload(service, "e", count=5)
    expected = service.state.to_image()
    volume.close()
    recovered = _reload(image)
    assert recovered.checkpoint.slot == 1
    assert recovered.state.to_image() == expected
    assert {record.epoch for record in recovered.replay.records} == {2}


async def test_reload_after_a_torn_record_then_continue(image):
    volume, _recovered, service = _open_service(image)
    await _workload(service, "a", count=6)
    expected = service.state.to_image()
    torn = fmt.encode_journal_record(
        fmt.JournalRecord(1, service.journal.next_seq, service.journal.next_seq,
                          {"op": "setattr", "ino": ROOT_INO, "mode": 0}))
    volume.write(volume.sb.journal.offset + service.journal.offset, torn[:30])
    volume.close()

    volume, recovered, service = _open_service(image, epoch=2)
    assert recovered.state.to_image() == expected
    assert "torn record" in recovered.replay.stop_reason
    await _workload(service, "b", count=6)
    expected = service.state.to_image()
    volume.close()
    recovered = _reload(image)
    assert recovered.replay.corrupt is None
    assert recovered.state.to_image() == expected


async def test_journal_corruption_reaches_recovery(image):
    volume, _recovered, service = _open_service(image)
    await _workload(service, "a", count=6)
    volume.close()
    records = _reload(image).replay.records
    volume = Volume.open(image, writable=True)
    offsets, offset = [], 0
    for record in records:
        offsets.append(offset)
        offset += len(fmt.encode_journal_record(record))
    _damage(volume, offsets[3])
    volume.close()
    recovered = _reload(image)
    assert isinstance(recovered.replay.corrupt, JournalCorrupt)
    assert len(recovered.replay.records) == 3


async def test_lost_newest_checkpoint_after_the_journal_restarted_is_reported(image):
    """Checkpoint A went bad after the journal restarted behind it: the records
    between B and A are gone, so replay must not quietly hand back B's state."""
    volume, _recovered, service = _open_service(image)
    await _workload(service, "a", count=5)
    await service.checkpoint_now()  # B (mkfs wrote A)
    first_seq = service.journal.next_seq - 1
    await _workload(service, "b", count=5)
    await service.checkpoint_now()  # A; the journal starts again at its head
    await _workload(service, "c", count=5)
    _flip_byte(volume, volume.sb.checkpoint_a.offset + 100)
    volume.close()
    recovered = _reload(image)
    assert recovered.checkpoint.slot == 1 and recovered.checkpoint.seq == first_seq
    assert recovered.checkpoint_problems
    assert recovered.replay.records == []
    assert isinstance(recovered.replay.corrupt, JournalCorrupt)
    assert recovered.replay.corrupt.seq == first_seq + 1


async def test_both_checkpoints_lost_is_reported(image):
    volume, _recovered, service = _open_service(image)
    await _workload(service, "a", count=5)
    await service.checkpoint_now()
    await _workload(service, "b", count=2)
    await service.checkpoint_now()
    await _workload(service, "c", count=2)
    for region in volume.sb.checkpoint_slots():
        _flip_byte(volume, region.offset + 100)
    volume.close()
    recovered = _reload(image)
    assert recovered.checkpoint is None and len(recovered.checkpoint_problems) == 2
    assert recovered.replay.corrupt is not None  # not an empty filesystem


def test_remnant_of_a_torn_batch_with_a_higher_seq_is_not_corruption(volume):
    """A new coordinator rewrote a torn record with a different length, so the next
    record position holds a leftover from the torn batch with a higher seq."""
    old = [fmt.JournalRecord(1, seq, 3, _op(seq, size=600)) for seq in (3, 4, 5, 6)]
    head = _records(1, 2, size=10)
    offsets = _write_records(volume, head + old)
    _damage(volume, offsets[3])  # seq 4 torn
    assert scan(volume, 0, 0).records == head + old[:1]
    rewritten = fmt.JournalRecord(2, 4, 4, _op(4, size=1700))  # four sectors: lands on old 6
    assert len(fmt.encode_journal_record(rewritten)) == offsets[5] - offsets[3]
    _write_records(volume, [rewritten], offsets[3])
    result = scan(volume, 0, 0)
    assert result.records == head + old[:1] + [rewritten]
    assert result.corrupt is None


async def test_a_batch_syncs_the_whole_image_only_after_data_the_coordinator_wrote(
        volume, monkeypatch):
    """A batch alone is written with RWF_DSYNC; after data written by the coordinator
    (whole_image_sync), the next batch is written and the whole image fdatasync'ed, so
    that data is durable before the record that depends on it."""
    calls = []
    real_fdatasync, real_write_durable = os.fdatasync, volume.write_durable
    monkeypatch.setattr(os, "fdatasync",
                        lambda fd: (calls.append("fdatasync"), real_fdatasync(fd)))
    monkeypatch.setattr(volume, "write_durable", lambda offset, data: (
        calls.append("dsync"), real_write_durable(offset, data)))
    journal = Journal(volume, epoch=1, next_seq=1, offset=0)
    await journal.wait_durable(journal.append(_op(1)))
    journal.whole_image_sync = True  # Commits.data_written
    await journal.wait_durable(journal.append(_op(2)))
    await journal.wait_durable(journal.append(_op(3)))
    assert calls == ["dsync", "fdatasync", "dsync"]
    assert [record.seq for record in scan(volume, 0, 0).records] == [1, 2, 3]
