"""vmload without a mount: stamps, the record, verification, and the command line.

These run on a plain directory. The point is that verification can fail: every kind of
lost or wrong write must show as a mismatch at the right sector.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vmload import stamp
from vmload.record import ENTRY_SIZE, Facts, Log, Paths, RecordError, read_log
from vmload.verify import Expected, verify
from vmload.vm import VM, Settings

pytestmark = pytest.mark.timeout(60)

VM_NAME = "vm1"


def vmload(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmload", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# -- stamps ----------------------------------------------------------------------------------


def test_a_sector_reads_back_as_what_was_written():
    vm = stamp.vm_id(VM_NAME)
    found = stamp.parse(stamp.sector(vm, 42, 7))
    assert (found.kind, found.vm, found.number, found.generation) == ("stamp", vm, 42, 7)
    assert stamp.parse(bytes(stamp.SECTOR)).kind == "zero"


def test_damaged_and_mixed_sectors_have_no_valid_stamp():
    vm = stamp.vm_id(VM_NAME)
    good = stamp.sector(vm, 42, 7)
    flipped = bytearray(good)
    flipped[3000] ^= 1
    torn = stamp.sector(vm, 42, 8)[:2048] + good[2048:]  # half of a newer write
    for data in (bytes(flipped), torn, b"\x01" * stamp.SECTOR, good[:100]):
        assert stamp.parse(data).kind == "garbage"


# -- the record ------------------------------------------------------------------------------


def test_a_torn_last_entry_is_ignored(tmp_path):
    log = Log(tmp_path / "vm.log")
    log.write(1, 0, 2)
    log.synced(1)
    log.close()
    with open(tmp_path / "vm.log", "ab") as f:
        f.write(b"W\x00\x00")  # the process died in the middle of an append
    assert [e.kind for e in read_log(tmp_path / "vm.log")] == [b"W", b"S"]


def test_a_write_without_its_acknowledgement_may_be_in_flight(tmp_path):
    log = Log(tmp_path / "vm.log")
    log.write(1, 0, 2)
    log.done(1)
    log.write(2, 1, 2)  # issued, never acknowledged
    log.write(3, 8, 1)  # issued after it, and acknowledged: writes overlap in flight
    log.done(3)
    log.close()
    expected = Expected.replay(read_log(tmp_path / "vm.log"), 1 << 20)
    assert expected.generations == {0: 1, 1: 1, 8: 3}
    assert expected.in_flight == {1: 2, 2: 2}
    assert not expected.clean


# -- verification on a plain directory ---------------------------------------------------------


def run_vm(tmp_path, seconds=0.5, **settings) -> VM:
    vm = VM(Settings(mount=tmp_path / "disks", vm=VM_NAME, state=tmp_path / "state",
                     size=settings.pop("size", 4 << 20), seconds=seconds, seed=1, **settings))
    (tmp_path / "disks").mkdir(exist_ok=True)
    vm.open()
    try:
        stats = vm.run()
    finally:
        vm.close()
    assert stats.error is None and stats.writes > 50, stats
    return vm


def check(tmp_path):
    paths = Paths.of(tmp_path / "state", VM_NAME)
    expected = Expected.replay(read_log(paths.log), Facts.load(paths.facts).size)
    return verify(tmp_path / "disks" / f"{VM_NAME}.img", VM_NAME, expected), expected


def written_sector(expected: Expected, index: int = 0) -> int:
    return sorted(expected.generations)[index]


@pytest.mark.parametrize("iodepth", [1, 8])
def test_a_clean_run_verifies(tmp_path, iodepth):
    run_vm(tmp_path, grow_every=0.1, grow_by=1 << 20, iodepth=iodepth)
    report, expected = check(tmp_path)
    assert report.ok, report.listed
    assert expected.clean and expected.grows >= 2 and not expected.in_flight
    assert report.checked == report.size // stamp.SECTOR


@pytest.mark.parametrize("damage", ["lost write", "zeroed", "misplaced", "other vm", "stray"])
def test_verification_finds_every_kind_of_wrong_sector(tmp_path, damage):
    # 4 KiB writes for 0.2 s leave most of the 8192 sectors unwritten however fast the
    # machine (4k..64k writes for 0.5 s once covered them all)
    run_vm(tmp_path, size=32 << 20, block_max=4096, seconds=0.2)
    report, expected = check(tmp_path)
    assert report.ok
    victim = written_sector(expected, 3)
    generation = expected.generations[victim]
    own = stamp.vm_id(VM_NAME)
    if damage == "stray":  # a write where the VM never wrote
        victim = next(n for n in range(report.size // stamp.SECTOR)
                      if n not in expected.generations)
    data = {
        "lost write": stamp.sector(own, victim, generation - 1),  # the write before it
        "zeroed": bytes(stamp.SECTOR),
        "misplaced": stamp.sector(own, victim + 1, generation),  # right data, wrong place
        "other vm": stamp.sector(stamp.vm_id("vm2"), victim, generation),
        "stray": stamp.sector(own, victim, 1),
    }[damage]
    fd = os.open(tmp_path / "disks" / f"{VM_NAME}.img", os.O_WRONLY)
    os.pwrite(fd, data, victim * stamp.SECTOR)
    os.close(fd)
    report, _ = check(tmp_path)
    assert report.mismatches == 1 and report.listed[0].sector == victim, report.listed


def test_a_disk_shorter_than_the_vm_grew_it_fails(tmp_path):
    run_vm(tmp_path, grow_every=0.1, grow_by=1 << 20)
    disk = tmp_path / "disks" / f"{VM_NAME}.img"
    os.truncate(disk, 4 << 20)
    report, _ = check(tmp_path)
    assert not report.ok and "grew it to" in report.problem


def test_a_write_in_flight_may_or_may_not_have_landed(tmp_path):
    """The VM died with its last write issued: both outcomes verify. Taking the VM up
    again issues that write once more, so it counts as done from then on."""
    run_vm(tmp_path)
    paths = Paths.of(tmp_path / "state", VM_NAME)
    generation = max(e.value for e in read_log(paths.log) if e.kind == b"W") + 1
    target = 1000
    with open(paths.log, "r+b") as f:  # drop the clean end, as if the process had died
        f.truncate(os.path.getsize(paths.log) - ENTRY_SIZE)
    log = Log(paths.log)
    log.write(generation, target, 4)  # logged, never issued
    log.write(generation + 1, target + 8, 1)  # issued and acknowledged meanwhile
    log.done(generation + 1)
    log.close()
    disk = os.open(tmp_path / "disks" / f"{VM_NAME}.img", os.O_WRONLY)
    os.pwrite(disk, stamp.sector(stamp.vm_id(VM_NAME), target + 8, generation + 1),
              (target + 8) * stamp.SECTOR)
    os.close(disk)
    report, expected = check(tmp_path)
    assert report.ok and not expected.clean and len(expected.in_flight) == 4
    disk = os.open(tmp_path / "disks" / f"{VM_NAME}.img", os.O_WRONLY)
    os.pwrite(disk, stamp.sector(stamp.vm_id(VM_NAME), target + 1, generation),
              (target + 1) * stamp.SECTOR)  # one sector of the write in flight landed
    os.close(disk)
    report, _ = check(tmp_path)
    assert report.ok
    run_vm(tmp_path, seconds=0.2)  # takes the VM up again
    report, expected = check(tmp_path)
    assert report.ok
    assert all(expected.generations[target + i] >= generation for i in range(4))


# -- the command line --------------------------------------------------------------------------


def test_bad_arguments_get_one_line_and_exit_2(tmp_path):
    for args in (["run", "--mount", tmp_path, "--vm", "x", "--size", "5000"],
                 ["run", "--mount", tmp_path, "--vm", "x", "--block", "64k..4k"],
                 ["run", "--mount", tmp_path, "--vm", "x", "--seconds", "-1"],
                 ["run", "--mount", tmp_path, "--vm", "x", "--migrate-every", "1"],
                 ["run", "--mount", tmp_path, "--vm", "../escape"],
                 ["verify", "--mount", tmp_path, "--vm", ".hidden"],
                 ["frobnicate"]):
        result = vmload(*args, "--state", tmp_path / "state") if args != ["frobnicate"] \
            else vmload(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_unknown_vm_and_missing_disk_exit_3(tmp_path):
    result = vmload("verify", "--mount", tmp_path, "--vm", "nope", "--state", tmp_path)
    assert result.returncode == 3 and "no record" in result.stderr
    (tmp_path / "disks").mkdir()
    (tmp_path / "disks" / "vm1.img").write_bytes(b"")  # not made by vmload
    result = vmload("run", "--mount", tmp_path / "disks", "--vm", "vm1", "--state",
                    tmp_path / "state", "--seconds", "1")
    assert result.returncode == 3 and "not a vmload disk" in result.stderr
    (tmp_path / "a-file").write_bytes(b"")
    result = vmload("run", "--mount", tmp_path / "disks", "--vm", "vm2", "--state",
                    tmp_path / "a-file", "--seconds", "1")
    assert result.returncode == 3 and "state directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_migrating_a_vm_that_is_not_running_exits_5(tmp_path):
    (tmp_path / "disks").mkdir()
    result = vmload("run", "--mount", tmp_path / "disks", "--vm", "vm1", "--state",
                    tmp_path / "state", "--seconds", "0.3", "--size", "1M", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["writes"] > 0 and summary["error"] is None
    result = vmload("migrate", "--vm", "vm1", "--to", tmp_path, "--state", tmp_path / "state")
    assert result.returncode == 5 and "not running" in result.stderr
    result = vmload("verify", "--mount", tmp_path / "disks", "--vm", "vm1", "--state",
                    tmp_path / "state")
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout


def test_a_migration_that_cannot_open_the_disk_leaves_the_vm_where_it_runs(tmp_path):
    """As a hypervisor does: the target cannot open the disk, so the VM runs on."""
    nowhere = tmp_path / "empty"
    nowhere.mkdir()
    vm = run_vm(tmp_path, seconds=0.6, migrate_every=0.1, peers=[nowhere])
    moves = vm.stats.migrations
    assert len(moves) >= 3 and all("cannot open the disk" in m["error"] for m in moves)
    assert vm.mount == tmp_path / "disks"
    report, _ = check(tmp_path)
    assert report.ok


def test_a_commanded_migration_that_fails_exits_5(tmp_path):
    (tmp_path / "disks").mkdir()
    (tmp_path / "empty").mkdir()
    state = tmp_path / "state"
    runner = subprocess.Popen(
        [sys.executable, "-m", "vmload", "run", "--mount", str(tmp_path / "disks"), "--vm",
         "vm1", "--state", str(state), "--seconds", "5", "--size", "1M", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (state / "vm1.json").exists():
            assert time.monotonic() < deadline and runner.poll() is None
            time.sleep(0.05)
        result = vmload("migrate", "--vm", "vm1", "--to", tmp_path / "empty", "--state", state)
        assert result.returncode == 5 and "stays on" in result.stderr, result.stderr
        runner.send_signal(signal.SIGTERM)
        out, _ = runner.communicate(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()
    assert runner.returncode == 0 and json.loads(out)["writes"] > 0


def test_replay_at_a_point_in_time_and_at_a_freeze():
    """At a snapshot point: writes acknowledged before it are there, one issued before
    and acknowledged after may be, none issued after is. At a freeze: exactly those
    before it."""
    from vmload.record import DONE, FROZEN, WRITE, Entry

    entries = [
        Entry(WRITE, 1, 10, 1, time_ns=100), Entry(DONE, 1, time_ns=110),
        Entry(WRITE, 2, 10, 1, time_ns=120), Entry(DONE, 2, time_ns=210),  # across it
        Entry(WRITE, 3, 20, 1, time_ns=130), Entry(DONE, 3, time_ns=140),
        Entry(FROZEN, 77, time_ns=150),
        Entry(WRITE, 4, 20, 1, time_ns=220), Entry(DONE, 4, time_ns=230),  # after it
    ]
    at_point = Expected.replay(entries, 1 << 20, at_time=200)
    assert at_point.generations == {10: 1, 20: 3} and at_point.in_flight == {10: 2}
    at_freeze = Expected.replay(entries, 1 << 20, at_freeze=77)
    assert at_freeze.generations == {10: 2, 20: 3} and at_freeze.in_flight == {}
    with pytest.raises(RecordError):
        Expected.replay(entries, 1 << 20, at_freeze=78)
