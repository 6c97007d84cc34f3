"""Backups of a live cluster on real mounts: the snapshot holds its point while nodes
write, restores are exact, and bad input gets a clear error and its exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csvfs.volume.errors import ExitCode
from tests.cluster import csvfs, status
from tests.stamp_writer import BLOCK, read_log, read_stamp, stamped
from tests.test_fast_lane import lane_counts

pytestmark = pytest.mark.timeout(120)

M = 1 << 20
STRIPE = 64 << 10


def start_cluster(nodes, image, count, *extra):
    return [nodes.start(image, f"n{index}", *extra) for index in range(1, count + 1)]


def backup(*args, check: bool = True) -> subprocess.CompletedProcess:
    return csvfs("backup", *args, check=check, timeout=90)


def manifest_of(repo: Path, backup_id: str) -> dict:
    from csvfs.backup.repository import Repository

    return Repository.open(repo).load_manifest(backup_id)


def last_backup(repo: Path) -> dict:
    listed = json.loads(backup("list", "--repo", repo, "--json").stdout)
    return manifest_of(repo, listed[-1]["id"])


def start_writer(path: Path, writer: int, blocks: int, seconds: float, log: Path,
                 stderr=None, threads: int = 1):
    return subprocess.Popen([sys.executable, "-m", "tests.stamp_writer", str(path),
                             str(writer), str(blocks), str(seconds), str(log), str(threads)],
                            stdin=subprocess.DEVNULL, stderr=stderr)


def fill_stamped(path: Path, blocks: int) -> None:
    """Writer 0, sequence 0: what every block holds before the writers start."""
    with open(path, "wb") as file:
        for block in range(blocks):
            file.write(stamped(0, 0, block))


def check_point_in_time(data: bytes, blocks: int, logs: list[Path], point_ns: int) -> int:
    """Every block holds a write that began before the point, and no write that began
    after it was acknowledged and was itself acknowledged before the point (that one
    would have overwritten it). Returns how many blocks were rewritten after the point."""
    writes: dict[tuple[int, int], tuple[int, int]] = {}
    by_block: dict[int, list[tuple[int, int]]] = {}
    for log in logs:
        for writer, seq, block, start, ack in read_log(log):
            writes[writer, seq] = start, ack
            by_block.setdefault(block, []).append((start, ack))
    changed_after = 0
    for block in range(blocks):
        stamp = read_stamp(data[block * BLOCK:(block + 1) * BLOCK])
        assert stamp is not None, f"block {block} is torn or foreign"
        writer, seq, stamped_block = stamp
        assert stamped_block == block
        start, ack = writes.get((writer, seq), (0, 0))
        assert start < point_ns, f"block {block} holds a write begun after the point"
        later = [w for w in by_block.get(block, ()) if w[0] > ack and w[1] < point_ns]
        assert not later, f"block {block} misses a write acknowledged before the point"
        changed_after += any(w[0] > point_ns for w in by_block.get(block, ()))
    return changed_after


# One write in flight per node, and eight: the hold must wait for every request in
# flight (the fast lane's workers, csvfs/_fast_path.c), not just the one running.
@pytest.mark.parametrize("threads", [1, 8], ids=["one-at-a-time", "eight-in-flight"])
def test_a_volume_backup_holds_its_point_while_two_nodes_write_the_same_units(
        tmp_path, image, nodes, threads):
    n1, n2 = start_cluster(nodes, image, 2, *(("--io-threads", "4") if threads > 1 else ()))
    blocks = 1024  # 4 MiB: four units, rewritten from both nodes at once
    fill_stamped(n1.path("disk"), blocks)
    os.makedirs(n2.path("etc", "conf"))
    n2.path("etc", "conf", "a").write_bytes(b"config\n")
    os.symlink("etc/conf/a", n1.path("link"))
    os.setxattr(n1.path("disk"), "user.vm", b"guest-1")
    static = os.urandom(3 * M + 5)
    n1.path("static").write_bytes(static)
    backup("init", tmp_path / "repo")
    before = status(image)

    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    writers = [start_writer(n1.path("disk"), 1, blocks, 4.0, logs[0], threads=threads),
               start_writer(n2.path("disk"), 2, blocks, 4.0, logs[1], threads=threads)]
    try:
        time.sleep(1.0)
        backup("volume", image, "--repo", tmp_path / "repo")
    finally:
        assert [writer.wait(timeout=30) for writer in writers] == [0, 0]
    manifest = last_backup(tmp_path / "repo")
    assert status(image)["snapshots"] == []  # released at the end
    assert manifest["kind"] == "volume" and manifest["stats"]["pause_s"] < 1.0

    restored = tmp_path / "disk.out"
    backup("restore", "--repo", tmp_path / "repo", manifest["id"], "--file", "/disk",
           "--to", restored)
    changed = check_point_in_time(restored.read_bytes(), blocks, logs, manifest["time_ns"])
    assert changed > blocks // 4  # the writers really went on after the point
    assert n1.path("disk").read_bytes() != restored.read_bytes()

    new_image = tmp_path / "restored.img"
    backup("restore", "--repo", tmp_path / "repo", manifest["id"], "--to", new_image)
    assert csvfs("fsck", new_image).returncode == 0
    copy = nodes.start(new_image, "r1")
    assert copy.path("static").read_bytes() == static
    assert copy.path("disk").read_bytes() == restored.read_bytes()
    assert copy.path("etc", "conf", "a").read_bytes() == b"config\n"
    assert os.readlink(copy.path("link")) == "etc/conf/a"
    assert os.getxattr(copy.path("disk"), "user.vm") == b"guest-1"
    assert before["snapshots"] == []


def test_space_is_given_back_when_the_backup_ends(tmp_path, image, nodes):
    n1, n2 = start_cluster(nodes, image, 2)
    n1.path("f").write_bytes(os.urandom(8 * M))
    free = os.statvfs(n1.mountpoint).f_bfree
    backup("init", tmp_path / "repo")
    backup("volume", image, "--repo", tmp_path / "repo")
    with open(n2.path("f"), "r+b") as file:  # after the release: no copy any more
        file.write(b"x" * M)
    assert os.statvfs(n1.mountpoint).f_bfree == free
    for node in (n2, n1):
        node.unmount()
    report = csvfs("fsck", image).stdout
    assert "volume is clean" in report and "snapshots in progress" not in report


def test_a_snapshot_whose_backup_was_killed_is_released_after_its_timeout(
        tmp_path, image, nodes):
    n1, n2 = start_cluster(nodes, image, 2)
    n2.path("f").write_bytes(os.urandom(2 * M))
    taker = subprocess.Popen([sys.executable, "-m", "tests.snapshot_taker", str(image), "2"],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert taker.stdout.readline().startswith("snapshot ")
        [snapshot] = status(image)["snapshots"]
        assert snapshot["requester"].startswith("backup-")
        table = csvfs("status", image).stdout
        assert "snapshots in progress" in table
    finally:
        taker.send_signal(signal.SIGKILL)
        taker.wait()
        taker.stdout.close()
    with open(n2.path("f"), "r+b") as file:  # copy-on-write while it is held
        file.write(b"y" * 100)
    assert status(image)["snapshots"][0]["preserved"] == 1
    deadline = time.monotonic() + 10
    while status(image)["snapshots"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status(image)["snapshots"] == []
    events = csvfs("events", image).stdout
    assert "stopped renewing it (timeout)" in events


def test_sigkill_of_the_coordinator_during_a_backup(tmp_path, image, nodes, vm_processes):
    """The snapshot is journaled: the backup goes on with the new coordinator, the
    snapshot goes at the end, no space is lost, and a VM on the member sees no error."""
    nodes.allow_log_errors = True  # the killed coordinator's node logs its end
    n1, n2 = start_cluster(nodes, image, 2)
    data = os.urandom(48 * M)
    n2.path("big").write_bytes(data)
    backup("init", tmp_path / "repo")
    state = tmp_path / "vmstate"
    vm = start_vm(state, n2.mountpoint, "guest", "--seconds", "6")
    vm_processes.append(vm)
    time.sleep(0.5)
    job = subprocess.Popen([*_csvfs(), "backup", "volume", str(image), "--repo",
                            str(tmp_path / "repo"), "--snapshot-timeout", "3"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL)
    time.sleep(0.3)
    n1.kill()
    out, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    assert "Traceback" not in err
    manifest = last_backup(tmp_path / "repo")
    restored = tmp_path / "big.out"
    backup("restore", "--repo", tmp_path / "repo", manifest["id"], "--file", "/big",
           "--to", restored)
    assert restored.read_bytes() == data
    deadline = time.monotonic() + 15  # one taken but never answered goes by its timeout
    while status(image)["snapshots"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status(image)["snapshots"] == []
    assert n2.path("big").read_bytes() == data
    out, err = vm.communicate(timeout=60)
    assert vm.returncode == 0 and json.loads(out)["error"] is None, err
    check = vmload("verify", "--mount", n2.mountpoint, "--vm", "guest", "--state", state)
    assert check.returncode == 0, check.stdout
    n2.unmount()
    assert "volume is clean" in csvfs("fsck", image).stdout


def _csvfs() -> list[str]:
    from tests.cluster import CSVFS

    return list(CSVFS)


def test_backup_errors_have_their_exit_codes(tmp_path, image, nodes):
    repo = tmp_path / "repo"
    result = backup("volume", image, "--repo", repo, check=False)
    assert result.returncode == ExitCode.REPO_MISSING
    backup("init", repo)
    assert backup("init", repo, check=False).returncode == ExitCode.REPO_EXISTS
    result = backup("volume", image, "--repo", repo, check=False)  # nothing mounted
    assert result.returncode == ExitCode.UNREACHABLE
    assert "no node has the volume mounted" in result.stderr
    node = nodes.start(image, "n1")
    node.path("f").write_bytes(b"data" * 1000)
    result = backup("vm", image, "--repo", repo, "/missing", check=False)
    assert result.returncode == ExitCode.NO_SUCH_FILE
    assert result.stderr.strip() == ("csvfs: error: /missing: no such file on the volume "
                                     "at the snapshot point")
    result = backup("volume", image, "--repo", repo, "--key", tmp_path / "nokey", check=False)
    assert result.returncode == ExitCode.BAD_KEY
    other = tmp_path / "other.key"
    other.write_text("00" * 32 + "\n")
    other.chmod(0o600)
    result = backup("list", "--repo", repo, "--repo-key", other, check=False)
    assert result.returncode == ExitCode.REPO_KEY
    backup("vm", image, "--repo", repo, "/f")
    result = backup("restore", "--repo", repo, "nosuchid", "--file", "/f", "--to",
                    tmp_path / "x", check=False)
    assert result.returncode == ExitCode.NO_SUCH_BACKUP
    result = backup("prune", "--repo", repo, "--keep-last", "0", check=False)
    assert result.returncode == ExitCode.USAGE
    for result in [backup("list", "--repo", repo, "--json", check=False)]:
        assert all("Traceback" not in text for text in (result.stdout, result.stderr))


def test_verify_finds_a_flipped_byte_and_restore_refuses_it(tmp_path, image, nodes):
    repo = tmp_path / "repo"
    node = nodes.start(image, "n1")
    node.path("f").write_bytes(os.urandom(2 * M))
    backup("init", repo)
    backup("vm", image, "--repo", repo, "/f")
    manifest = last_backup(repo)
    assert "1 backups verified" in backup("verify", "--repo", repo).stdout
    chunk = next(path for path in (repo / "chunks").rglob("*") if path.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    result = backup("verify", "--repo", repo, check=False)
    assert result.returncode == ExitCode.REPO_CORRUPT and "problem:" in result.stdout
    result = backup("restore", "--repo", repo, manifest["id"], "--file", "/f", "--to",
                    tmp_path / "out", check=False)
    assert result.returncode == ExitCode.REPO_CORRUPT
    assert "Traceback" not in result.stderr
    stored = repo / "manifests" / manifest["id"]  # and a byte of the manifest
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    stored.write_bytes(bytes(raw))
    for args in (["verify"], ["list"], ["restore", manifest["id"], "--file", "/f", "--to",
                                        tmp_path / "out2"]):
        result = backup(*args[:1], "--repo", repo, *args[1:], check=False)
        assert result.returncode == ExitCode.REPO_CORRUPT, (args, result.stderr)
        assert manifest["id"] in result.stderr + result.stdout
        assert "Traceback" not in result.stderr


# -- incrementals from change tracking ------------------------------------------------------


def rewrite_spots(path: Path, spots: list[int], size: int = 64 << 10) -> None:
    with open(path, "r+b") as file:
        for spot in spots:
            file.seek(spot)
            file.write(os.urandom(size))
            file.flush()


def restore_and_compare(tmp_path: Path, repo: Path, manifest: dict, path: str,
                        expected: bytes) -> None:
    restored = tmp_path / f"restored-{manifest['id']}"
    backup("restore", "--repo", repo, manifest["id"], "--file", path, "--to", restored)
    assert restored.read_bytes() == expected


def test_an_incremental_reads_only_what_changed(tmp_path, image, nodes):
    n1, n2 = start_cluster(nodes, image, 2)
    repo = tmp_path / "repo"
    backup("init", repo)
    original = os.urandom(32 * M)
    n1.path("disk").write_bytes(original)
    backup("vm", image, "--repo", repo, "/disk")
    full = last_backup(repo)
    assert full["stats"]["read"] == 32 * M and full["files"][0]["read"] == "all"

    rewrite_spots(n2.path("disk"), [3 * M + 100, 17 * M, 30 * M + 5000])  # from the member
    rewrite_spots(n1.path("disk"), [17 * M + 70000])
    backup("vm", image, "--repo", repo, "/disk")
    incremental = last_backup(repo)
    # the 64 KiB stripes the spots touched: two of unit 3, two of unit 30, and of unit
    # 17 the member's first and the coordinator's next two
    assert incremental["stats"]["read"] == 7 * STRIPE, incremental["stats"]
    assert incremental["files"][0]["read"] == "changed"
    # the three changed runs are packed into one new chunk, each a slice of it
    before = {item[2] for item in full["files"][0]["chunks"]}
    new = [item for item in incremental["files"][0]["chunks"] if item[2] not in before]
    assert [item[1] for item in new] == [2 * STRIPE, 3 * STRIPE, 2 * STRIPE]
    assert len({item[2] for item in new}) == 1
    restore_and_compare(tmp_path, repo, incremental, "/disk", n1.path("disk").read_bytes())
    restore_and_compare(tmp_path, repo, full, "/disk", original)  # still as it was
    forced = backup("vm", image, "--repo", repo, "/disk", "--full", "--json").stdout
    assert json.loads(forced)["read"] == 32 * M


def test_stripes_written_without_asking_and_before_a_goodbye_are_read(tmp_path, image, nodes):
    """A node that writes a unit another node marked first asks for nothing, and a
    node that unmounts reports its stripes in its goodbye: an incremental still reads
    every stripe they wrote, and only those, also in a unit allocated in a hole."""
    n1, n2, n3 = start_cluster(nodes, image, 3)
    repo = tmp_path / "repo"
    backup("init", repo)
    with open(n1.path("disk"), "wb") as disk:  # data, then a hole from 4 MiB on
        disk.write(os.urandom(4 * M))
        disk.truncate(8 * M)
    backup("vm", image, "--repo", repo, "/disk")

    with open(n2.path("disk"), "r+b") as member, open(n3.path("disk"), "r+b") as other:
        for handle, spot in ((member, 2 * M), (other, 2 * M + 5 * STRIPE),
                             (member, 2 * M + 9 * STRIPE), (other, 6 * M + 100)):
            os.pwrite(handle.fileno(), os.urandom(4096), spot)
    n3.unmount()
    backup("vm", image, "--repo", repo, "/disk")
    manifest = last_backup(repo)
    assert manifest["stats"]["read"] == 4 * STRIPE, manifest["stats"]
    restore_and_compare(tmp_path, repo, manifest, "/disk", n1.path("disk").read_bytes())


def test_a_tracked_files_writes_stay_in_the_lane_and_the_incremental_reads_them(
        tmp_path, image, nodes):
    """After a backup a VM disk keeps its fast lane: the lane notes the stripes of its
    writes itself, and the node reports them at the next hold with the file open."""
    n1, n2 = start_cluster(nodes, image, 2)
    repo = tmp_path / "repo"
    backup("init", repo)
    n1.path("disk").write_bytes(os.urandom(8 * M))
    backup("vm", image, "--repo", repo, "/disk")
    fd = os.open(n2.path("disk"), os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(4096), 2 * M)  # the first write since the point asks
        for stripe in (3, 9, 15):  # and the map it brings lets the rest go to the lane
            os.pwrite(fd, os.urandom(4096), 2 * M + stripe * STRIPE + 100)
        backup("vm", image, "--repo", repo, "/disk")
    finally:
        os.close(fd)
    manifest = last_backup(repo)
    assert manifest["stats"]["read"] == 4 * STRIPE, manifest["stats"]
    restore_and_compare(tmp_path, repo, manifest, "/disk", n1.path("disk").read_bytes())
    n2.unmount()
    assert lane_counts(n2)["writes"] >= 3


def test_change_tracking_survives_a_node_kill_failover_and_unmount(tmp_path, image, nodes):
    nodes.allow_log_errors = True  # killed nodes log their end
    n1, n2, n3 = start_cluster(nodes, image, 3)
    repo = tmp_path / "repo"
    backup("init", repo)
    n1.path("disk").write_bytes(os.urandom(16 * M))
    backup("vm", image, "--repo", repo, "/disk")

    # SIGKILL of a member in the middle of its writes
    writer = start_writer(n3.path("disk"), 3, M // BLOCK, 30.0, tmp_path / "w3.log",
                          stderr=subprocess.DEVNULL)  # it fails when its node dies
    time.sleep(1.0)
    n3.kill()
    writer.kill()
    writer.wait()
    backup("vm", image, "--repo", repo, "/disk")
    manifest = last_backup(repo)
    assert manifest["stats"]["read"] == M  # the writer's first unit only
    restore_and_compare(tmp_path, repo, manifest, "/disk", n1.path("disk").read_bytes())

    # SIGKILL of the coordinator: the changes its journal had are still tracked
    rewrite_spots(n2.path("disk"), [5 * M])
    n1.kill()
    rewrite_spots(n2.path("disk"), [9 * M])
    backup("vm", image, "--repo", repo, "/disk")
    manifest = last_backup(repo)
    assert manifest["stats"]["read"] == 2 * M, manifest["stats"]  # the two spots
    restore_and_compare(tmp_path, repo, manifest, "/disk", n2.path("disk").read_bytes())

    # unmount of every node, and a new mount
    rewrite_spots(n2.path("disk"), [M])
    n2.unmount()
    again = nodes.start(image, "n4")
    rewrite_spots(again.path("disk"), [12 * M])
    backup("vm", image, "--repo", repo, "/disk")
    manifest = last_backup(repo)
    assert manifest["stats"]["read"] == 2 * M, manifest["stats"]
    restore_and_compare(tmp_path, repo, manifest, "/disk", again.path("disk").read_bytes())


# -- writers: application-consistent backups of VMs ----------------------------------------


def vmload(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmload", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def start_vm(state: Path, mount: Path, vm: str, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vmload", "run", "--mount", str(mount),
                             "--vm", vm, "--state", str(state), "--json", "--size", "32M",
                             *map(str, extra)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def vm_processes():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_vm_backups_are_application_consistent_on_three_nodes(tmp_path, image, nodes,
                                                             vm_processes):
    """Three VMs, one migrating between nodes and one growing its disk; a VM backup of
    all three freezes each VM on the node it runs on, and every restored disk holds
    exactly the writes its VM made before its freeze. In a volume backup taken while
    they run, every disk holds every write acknowledged before its point and none
    issued after it; the volume restores to one that fsck passes."""
    n1, n2, n3 = start_cluster(nodes, image, 3)
    state, repo = tmp_path / "vmstate", tmp_path / "repo"
    backup("init", repo)
    vm_processes += [
        start_vm(state, n1.mountpoint, "steady", "--seconds", "12"),
        start_vm(state, n2.mountpoint, "mover", "--seconds", "12", "--migrate-every", "1",
                 "--peer", n3.mountpoint, "--peer", n1.mountpoint),
        start_vm(state, n3.mountpoint, "grower", "--seconds", "12", "--grow-every", "1",
                 "--grow-by", "4M", "--max-size", "64M"),
    ]
    time.sleep(3)
    taken, volumes = [], []
    for _round in range(2):
        result = backup("vm", image, "--repo", repo, "/steady.img", "/mover.img",
                        "/grower.img", "--json")
        taken.append(json.loads(result.stdout))
        volumes.append(json.loads(backup("volume", image, "--repo", repo, "--json").stdout))
        time.sleep(1.5)
    for process in vm_processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert json.loads(out)["freezes"] == 2
    for summary in taken:
        manifest = manifest_of(repo, summary["id"])
        assert {entry["consistency"] for entry in manifest["files"]} == {"application"}
        for entry in manifest["files"]:
            vm = entry["path"].strip("/").removesuffix(".img")
            restored = tmp_path / f"{summary['id']}-{vm}.img"
            backup("restore", "--repo", repo, summary["id"], "--file", entry["path"],
                   "--to", restored)
            check = vmload("verify", "--mount", n1.mountpoint, "--vm", vm, "--state", state,
                           "--disk", restored, "--at-freeze", entry["freeze_id"], "--json")
            report = json.loads(check.stdout)
            assert check.returncode == 0 and report["ok"], report
            assert report["in_flight"] == 0 and report["written"] > 0
    for summary in volumes:
        manifest = manifest_of(repo, summary["id"])
        assert {entry["consistency"] for entry in manifest["files"]} == {"crash"}
        for vm in ("steady", "mover", "grower"):
            restored = tmp_path / f"{summary['id']}-{vm}.img"
            backup("restore", "--repo", repo, summary["id"], "--file", f"/{vm}.img",
                   "--to", restored)
            check = vmload("verify", "--mount", n1.mountpoint, "--vm", vm, "--state", state,
                           "--disk", restored, "--at-time", manifest["time_ns"], "--json")
            report = json.loads(check.stdout)
            assert check.returncode == 0 and report["ok"], report
    new_image = tmp_path / "volume.img"
    backup("restore", "--repo", repo, volumes[-1]["id"], "--to", new_image)
    assert "volume is clean" in csvfs("fsck", new_image).stdout


def test_a_writer_that_does_not_freeze_fails_the_backup_unless_allowed(tmp_path, image,
                                                                       nodes):
    """A registered writer that never answers: the backup fails after the freeze's time
    limit; with --allow-crash-consistent it is taken crash-consistent, and the manifest
    and the event ring say so. A file with no writer is crash-consistent, with a warning."""
    from csvfs.volume import writer_protocol as wp

    n1, n2 = start_cluster(nodes, image, 2)
    repo = tmp_path / "repo"
    backup("init", repo)
    n2.path("stuck.img").write_bytes(os.urandom(M))
    n1.path("plain.img").write_bytes(os.urandom(M))
    import socket

    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stuck.connect(str(wp.socket_path(n2.mountpoint)))
        stuck.sendall(wp.encode({"op": "register", "name": "stuck", "files": [
            {"path": str(n2.path("stuck.img")), "ino": os.stat(n2.path("stuck.img")).st_ino}]}))
        assert wp.decode(stuck.recv(4096).split(b"\n")[0])["op"] == "registered"
        started = time.monotonic()
        result = backup("vm", image, "--repo", repo, "/stuck.img", "--freeze-timeout", "2",
                        check=False)
        assert result.returncode == ExitCode.BACKUP_FAILED
        assert "the writer of /stuck.img did not freeze" in result.stderr
        assert 2 <= time.monotonic() - started < 15
        assert status(image)["snapshots"] == []
        result = backup("vm", image, "--repo", repo, "/stuck.img", "/plain.img",
                        "--allow-crash-consistent", "--freeze-timeout", "1")
        assert "taken crash-consistent, as the requester allowed" in result.stdout
    finally:
        stuck.close()
    manifest = last_backup(repo)
    by_path = {entry["path"]: entry for entry in manifest["files"]}
    assert by_path["/stuck.img"]["consistency"] == "crash"
    assert "did not freeze" in by_path["/stuck.img"]["consistency_detail"]
    assert by_path["/plain.img"]["consistency"] == "crash"
    assert "no writer registered" in by_path["/plain.img"]["consistency_detail"]
    events = csvfs("events", image).stdout
    assert "/stuck.img: its writer did not freeze" in events
    assert "/plain.img: no writer registered for it on any node" in events


@pytest.mark.parametrize("trouble", ["move", "storage fault"])
def test_a_backup_goes_on_through_a_move_or_a_storage_fault(tmp_path, image, nodes, trouble):
    """Mid-backup (the backup stopped right after its snapshot point, so that the
    trouble surely falls inside it), the coordinator role moves, or the writing
    member's path to the image fails: the backup completes, its copy is the point in
    time, the writers see no error, and the snapshot is released."""
    n1, n2 = start_cluster(nodes, image, 2)
    blocks = 1024
    fill_stamped(n1.path("disk"), blocks)
    data = os.urandom(48 * M)
    n1.path("big").write_bytes(data)
    backup("init", tmp_path / "repo")
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    writers = [start_writer(n1.path("disk"), 1, blocks, 5.0, logs[0]),
               start_writer(n2.path("disk"), 2, blocks, 5.0, logs[1])]
    try:
        time.sleep(0.5)
        job = subprocess.Popen([*_csvfs(), "backup", "volume", str(image), "--repo",
                                str(tmp_path / "repo"), "--snapshot-timeout", "30"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL)
        wait_for_event(image, "snapshot")
        job.send_signal(signal.SIGSTOP)  # the snapshot holds while the trouble comes
        try:
            if trouble == "move":
                csvfs("move", image, "--to", "n2")
            else:
                csvfs("fault", image, "--node", "n2", "storage-down")
            time.sleep(1.0)  # the writers go on meanwhile, through the trouble
            assert len(status(image)["snapshots"]) == 1  # it all fell inside the backup
        finally:
            job.send_signal(signal.SIGCONT)
        out, err = job.communicate(timeout=90)
        assert job.returncode == 0, err
    finally:
        assert [writer.wait(timeout=30) for writer in writers] == [0, 0]
    if trouble == "move":
        assert status(image)["coordinator"]["name"] == "n2"
    else:
        node = next(n for n in status(image)["nodes"] if n["name"] == "n2")
        assert node["io_mode"] == "redirected" and node["redirected_io"]["writes"] > 0
        csvfs("fault", image, "--node", "n2", "storage-up")
    manifest = last_backup(tmp_path / "repo")
    restored = tmp_path / "disk.out"
    backup("restore", "--repo", tmp_path / "repo", manifest["id"], "--file", "/disk",
           "--to", restored)
    assert check_point_in_time(restored.read_bytes(), blocks, logs, manifest["time_ns"]) > 0
    backup("restore", "--repo", tmp_path / "repo", manifest["id"], "--file", "/big",
           "--to", tmp_path / "big.out")
    assert (tmp_path / "big.out").read_bytes() == data
    assert status(image)["snapshots"] == []


def wait_for_event(image, kind: str, timeout: float = 30.0) -> None:
    """Until the event ring has an event of this kind, read straight from the image."""
    from csvfs.cluster.events import read_events
    from csvfs.volume.image import Volume

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        volume = Volume.open(image)
        try:
            if any(event["kind"] == kind for event in read_events(volume)):
                return
        finally:
            volume.close()
        time.sleep(0.005)
    raise AssertionError(f"no {kind} event within {timeout} s")
