"""Several nodes on one volume, on real mounts: coherence, quiesce, eviction, status."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import stat
import threading
import time
from functools import partial

import pytest

from scripts.nodes import events_json as events
from tests.cluster import BOTH_WAYS, FdHolder, csvfs, make_volume, status

pytestmark = pytest.mark.timeout(90)


def start_cluster(nodes, image, count, *extra, env=None):
    """The first node becomes coordinator; the others join it."""
    return [nodes.start(image, f"n{index}", *extra, env=env) for index in range(1, count + 1)]


# -- joining ------------------------------------------------------------------------------


def test_second_node_joins_and_status_shows_both(image, nodes):
    first, second = start_cluster(nodes, image, 2)
    report = status(image)
    assert report["coordinator"]["name"] == "n1"
    assert report["coordinator"]["epoch"] == 1
    by_name = {node["name"]: node for node in report["nodes"]}
    assert by_name["n1"]["coordinator"] and by_name["n1"]["alive"]
    assert by_name["n2"]["session"] and not by_name["n2"]["coordinator"]
    assert by_name["n2"]["io_mode"] == "direct"
    assert by_name["n2"]["pid"] == second.process.pid
    assert by_name["n2"]["address"] == second.rpc_address()

    with open(second.path("held"), "wb") as held:
        held.write(b"x")
        table = csvfs("status", image).stdout
        open_files = status(image)["open_files"]
    assert open_files == [{"ino": open_files[0]["ino"], "path": "/held", "nodes": {"n2": 1}}]
    assert "coordinator: n1" in table and "/held" in table and "n2 (1)" in table
    assert any(e["kind"] == "join" and e["msg"].startswith("n2 joined") for e in events(image))


def test_a_node_listening_on_every_interface_publishes_its_advertised_address(image, nodes):
    # isolated, n1's loopback is its own: it advertises its address on the bridge
    own = nodes.isolation.address("n1") if nodes.isolation else "127.0.0.1"
    first = nodes.start(image, "n1", "--listen", "0.0.0.0:0", "--advertise", own)
    nodes.start(image, "n2")  # reaches n1 at the published address
    published = first.rpc_address()
    assert published.startswith(f"{own}:") and int(published.split(":")[1]) > 0
    report = status(image)
    assert report["coordinator"]["name"] == "n1"
    assert {node["name"] for node in report["nodes"] if node.get("session")} >= {"n2"}
    with socket.create_connection((own, int(published.split(":")[1])), timeout=5):
        pass  # the port it listens on is the one it published


def test_status_without_a_mount(image):
    report = status(image)
    assert report["coordinator"] is None and report["nodes"] == []
    assert "coordinator: none" in csvfs("status", image).stdout


def test_status_of_a_coordinator_that_does_not_answer(image, nodes):
    """Stopped, but its lease still runs: exit 15, one line saying why."""
    node = nodes.start(image, "n1", "--lease", "60")
    node.process.send_signal(signal.SIGSTOP)
    try:
        result = csvfs("status", image, check=False)
    finally:
        node.process.send_signal(signal.SIGCONT)
    assert result.returncode == 15, result
    assert result.stderr.strip().splitlines() == [
        f"csvfs: error: coordinator n1 at {node.rpc_address()} did not answer: "
        "no answer within 3 s"]
    assert "coordinator: n1" in result.stdout


# -- coherence: a change on one node shows on every other at once --------------------------


@pytest.mark.parametrize("count", [2, 3])
@BOTH_WAYS
def test_namespace_and_attributes_are_coherent(image, nodes, count):
    cluster = start_cluster(nodes, image, count)
    for step in range(count):
        actor = cluster[step]
        others = [node for node in cluster if node is not actor]
        name = f"s{step}"

        actor.path(f"{name}-file").write_bytes(b"made on " + actor.name.encode())
        os.mkdir(actor.path(f"{name}-dir"))
        for other in others:
            assert other.path(f"{name}-file").read_bytes() == b"made on " + actor.name.encode()
            assert other.path(f"{name}-dir").is_dir()
            assert f"{name}-file" in os.listdir(other.mountpoint)

        os.rename(actor.path(f"{name}-file"), actor.path(f"{name}-dir", "moved"))
        for other in others:
            assert not other.path(f"{name}-file").exists()
            assert other.path(f"{name}-dir", "moved").exists()

        os.chmod(actor.path(f"{name}-dir", "moved"), 0o600)
        os.utime(actor.path(f"{name}-dir", "moved"), ns=(10**18, 2 * 10**18))
        for other in others:
            info = os.stat(other.path(f"{name}-dir", "moved"))
            assert stat.S_IMODE(info.st_mode) == 0o600
            assert info.st_mtime_ns == 2 * 10**18 and info.st_atime_ns == 10**18

        os.unlink(actor.path(f"{name}-dir", "moved"))
        os.rmdir(actor.path(f"{name}-dir"))
        for other in others:
            assert not other.path(f"{name}-dir").exists()


@pytest.mark.parametrize("count", [2, 3])
def test_directories_cached_by_kernels_are_coherent(image, nodes, count):
    """Directory names and attributes are the one thing kernels cache: every change
    to them must still show on the other nodes at once."""
    cluster = start_cluster(nodes, image, count)
    for step in range(count):
        actor = cluster[step]
        others = [node for node in cluster if node is not actor]
        os.makedirs(actor.path(f"top{step}", "sub"))
        actor.path(f"top{step}", "sub", "file").write_bytes(b"x")
        for other in others:  # walk the path, so that each kernel caches it
            assert other.path(f"top{step}", "sub", "file").read_bytes() == b"x"
            assert stat.S_IMODE(os.stat(other.path(f"top{step}")).st_mode) == 0o755

        os.chmod(actor.path(f"top{step}"), 0o711)
        os.utime(actor.path(f"top{step}"), ns=(10**18, 3 * 10**18))
        for other in others:
            info = os.stat(other.path(f"top{step}"))
            assert stat.S_IMODE(info.st_mode) == 0o711, other.name
            assert info.st_mtime_ns == 3 * 10**18

        os.rename(actor.path(f"top{step}"), actor.path(f"moved{step}"))
        for other in others:
            assert not other.path(f"top{step}").exists(), other.name
            assert other.path(f"moved{step}", "sub", "file").read_bytes() == b"x"

        os.unlink(actor.path(f"moved{step}", "sub", "file"))
        os.rmdir(actor.path(f"moved{step}", "sub"))
        actor.path(f"moved{step}", "sub").write_bytes(b"now a file")
        for other in others:
            assert other.path(f"moved{step}", "sub").read_bytes() == b"now a file"
        before = os.stat(others[0].path(f"moved{step}")).st_mtime_ns
        os.mkdir(actor.path(f"moved{step}", "another"))
        for other in others:  # pushed without waiting: a moment later at most
            deadline = time.monotonic() + 2
            while os.stat(other.path(f"moved{step}")).st_mtime_ns == before:
                assert time.monotonic() < deadline, "directory mtime never changed"
                time.sleep(0.01)


def test_fsync_carries_the_write_time_to_the_other_nodes(image, nodes):
    """The time of a node's writes reaches the coordinator with an fsync (in the same
    round trip as the coordinator's sync), or at the close; fdatasync, like ext4's,
    leaves it to them."""
    writer, other = nodes.start(image, "n1"), nodes.start(image, "n2")
    writer.path("f").write_bytes(b"x" * 8192)
    old = 10**18
    os.utime(writer.path("f"), ns=(old, old))

    def seen_by_other() -> int:
        deadline = time.monotonic() + 5
        while (mtime := os.stat(other.path("f")).st_mtime_ns) == old:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return mtime

    fd = os.open(writer.path("f"), os.O_RDWR)
    try:
        os.pwrite(fd, b"y" * 4096, 0)
        os.fdatasync(fd)
        os.pwrite(fd, b"z" * 4096, 4096)
        before = time.time_ns()
        os.fsync(fd)
        synced = seen_by_other()
        assert old < synced <= before, synced
        os.utime(writer.path("f"), ns=(old, old))
        os.pwrite(fd, b"w" * 4096, 0)
    finally:
        os.close(fd)
    assert seen_by_other() > old
    assert other.path("f").read_bytes() == b"w" * 4096 + b"z" * 4096


@pytest.mark.also_on_a_loop_device
@pytest.mark.parametrize("count", [2, 3])
def test_sizes_and_data_are_coherent_on_open_files(image, nodes, count):
    cluster = start_cluster(nodes, image, count)
    cluster[0].path("shared").write_bytes(b"")
    fds = [os.open(node.path("shared"), os.O_RDWR) for node in cluster]
    try:
        data = b""
        for step in range(3 * count):
            writer = step % count
            chunk = bytes([65 + step]) * random.Random(step).choice([100, 5000, 1 << 20])
            os.pwrite(fds[writer], chunk, len(data))  # an extend
            data += chunk
            for index, node in enumerate(cluster):
                assert os.fstat(fds[index]).st_size == len(data), node.name
                assert os.stat(node.path("shared")).st_size == len(data)
                assert os.pread(fds[index], len(data) + 10, 0) == data, node.name
            # new data inside the allocated size, no extend: read at once elsewhere
            os.pwrite(fds[writer], b"overwritten", 3)
            data = data[:3] + b"overwritten" + data[14:]
            for index in range(count):
                assert os.pread(fds[index], 20, 0) == data[:20]
            # a truncate on another node: everybody sees the shorter file
            cutter = (step + 1) % count
            os.ftruncate(fds[cutter], len(data) // 2)
            data = data[: len(data) // 2]
            for index in range(count):
                assert os.fstat(fds[index]).st_size == len(data)
                assert os.pread(fds[index], len(data) + 100, 0) == data
            # attributes of a file open everywhere (each kernel may cache them)
            os.fchmod(fds[cutter], 0o600 + step)
            os.utime(cluster[cutter].path("shared"), ns=(10**18, 10**18 + step))
            for index in range(count):
                info = os.fstat(fds[index])
                assert stat.S_IMODE(info.st_mode) == 0o600 + step, cluster[index].name
                assert info.st_mtime_ns == 10**18 + step
    finally:
        for fd in fds:
            os.close(fd)


# -- the hard rule: no write lands in a unit freed or given to another file ----------------


# "in-flight": eight writes at once, as a VM disk at queue depth has them; the pause
# must wait for every one in flight (the fast lane's workers, csvfs/_fast_path.c).
@pytest.mark.parametrize("writer_path", ["direct", "in-flight", "redirected"])
def test_truncate_while_another_node_writes_never_touches_other_files(tmp_path, nodes,
                                                                      writer_path):
    # A small volume with small units: the allocator's cursor comes round fast, so units
    # freed by the shrink go to the other files within moments.
    image = make_volume(tmp_path, size="24M", unit="64K")
    lane_workers = ("--io-threads", "4") if writer_path == "in-flight" else ()
    shrinker, writer = start_cluster(nodes, image, 2, *lane_workers)
    shrinker.path("contested").write_bytes(b"")
    if writer_path == "redirected":  # the writer's path fails: the coordinator writes for it
        csvfs("fault", image, "--node", writer.name, "storage-down")
    stop = threading.Event()
    failures: list[BaseException] = []
    counts = {"cycles": 0, "writes": 0, "others": 0}

    def guarded(work):
        def run():
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
                stop.set()
        return threading.Thread(target=run)

    def shrink_and_grow():
        path = shrinker.path("contested")
        while not stop.is_set():
            os.truncate(path, 0)
            os.truncate(path, 256 << 10)
            counts["cycles"] += 1

    def write_contested(seed=1):
        fd = os.open(writer.path("contested"), os.O_WRONLY)
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                # a few units, known to the writer's map from its first writes: without
                # the pause and the new map it would go on writing to them once freed
                os.pwrite(fd, b"\xee" * 4096, rng.randrange(0, 256 << 10, 4096))
                counts["writes"] += 1
        finally:
            os.close(fd)

    checksums: dict[str, str] = {}
    damaged: list[str] = []

    def create_and_extend_others():
        rng = random.Random(2)
        index = 0
        while not stop.is_set():
            node = (shrinker, writer)[index % 2]
            name = f"other-{index}"
            data = rng.randbytes(rng.choice([30000, 200000, 500000]))
            with open(node.path(name), "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                handle.write(data[len(data) // 2 :])  # the second half extends the file
            checksums[name] = hashlib.sha256(data).hexdigest()
            if index >= 4:  # keep space churning: check an old one, then free it
                victim = f"other-{index - 4}"
                seen = hashlib.sha256(node.path(victim).read_bytes()).hexdigest()
                if seen != checksums.pop(victim):
                    damaged.append(victim)
                os.unlink(node.path(victim))
            index += 1
            counts["others"] += 1

    writers = 8 if writer_path == "in-flight" else 1
    threads = [guarded(shrink_and_grow), guarded(create_and_extend_others),
               *(guarded(partial(write_contested, seed)) for seed in range(1, writers + 1))]
    for thread in threads:
        thread.start()
    time.sleep(4)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not failures, failures
    assert not damaged, f"other files changed while the contested one was cut: {damaged}"
    assert counts["cycles"] > 20 and counts["writes"] > 200 and counts["others"] > 10, counts
    for name, digest in checksums.items():
        for node in (shrinker, writer):
            assert hashlib.sha256(node.path(name).read_bytes()).hexdigest() == digest, \
                f"{name} changed, seen from {node.name}"
    contested = shrinker.path("contested").read_bytes()
    assert set(contested) <= {0, 0xEE}  # only the writer's bytes, or zeros
    writer_state = next(node for node in status(image)["nodes"] if node["name"] == writer.name)
    assert writer_state["io_mode"] == ("redirected" if writer_path == "redirected"
                                       else "direct"), writer_state
    for node in (shrinker, writer):
        node.unmount()
    report = csvfs("fsck", image, check=False)
    assert report.returncode == 0, report.stdout


# -- eviction: a node that does not pause in time is cut off, and rejoins --------------------


def test_node_that_does_not_pause_is_evicted_and_rejoins(tmp_path, nodes):
    image = make_volume(tmp_path, size="48M", unit="64K")
    coordinator, sleeper = start_cluster(nodes, image, 2)
    with FdHolder(sleeper.path("held")) as holder:
        try:
            for _ in range(64):  # 512 KiB: eight units
                assert holder.ask("write") == "ok"
            sleeper.process.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            os.truncate(coordinator.path("held"), 0)  # needs the stopped node to pause
            waited = time.monotonic() - started
            # the freed units go to another file at once
            fresh = random.Random(3).randbytes(3 << 20)
            coordinator.path("fresh").write_bytes(fresh)
            assert any(e["kind"] == "evict" and "n2" in e["msg"] for e in events(image))
            sleeper.process.send_signal(signal.SIGCONT)
            assert holder.ask("poke") == "ok"  # after rejoining, with the new map
        finally:
            sleeper.process.send_signal(signal.SIGCONT)
    assert 1.5 < waited < 10, waited  # the pause timeout, then the rest of the grant
    assert coordinator.path("held").read_bytes() == b"x" * 10
    for node in (coordinator, sleeper):
        assert node.path("fresh").read_bytes() == fresh
    assert "joined coordinator n1" in sleeper.log.read_text()
    for node in (coordinator, sleeper):
        node.unmount()
    assert csvfs("fsck", image, check=False).returncode == 0


# -- the coordinator's RPC port faces bad peers and goes on serving ---------------------------


def _closed_by_peer(sock) -> bool:
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_coordinator_cuts_off_bad_peers_and_keeps_serving(image, nodes):
    coordinator, member = start_cluster(nodes, image, 2)
    host, port = coordinator.rpc_address().rsplit(":", 1)
    bad_frames = {
        "garbage": b"\x00\x00\x00\x05" + b"\xc1" * 5,  # 0xc1 is never valid msgpack
        "oversized": (1 << 30).to_bytes(4, "big"),
        "not a handshake": b"\x00\x00\x00\x04" + b"\x93\x01\x02\x03",
    }
    for frame in bad_frames.values():
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(frame)
            assert _closed_by_peer(sock)
    member.path("still-served").write_bytes(b"yes")
    assert coordinator.path("still-served").read_bytes() == b"yes"
    third = nodes.start(image, "n3")
    assert third.path("still-served").read_bytes() == b"yes"
    log = coordinator.log.read_text()
    assert log.count(f"cut off {nodes.host_address}:") >= len(bad_frames), log


def test_open_o_creat_of_one_new_name_from_two_nodes_at_once_never_fails(image, nodes):
    """Without O_EXCL, the node whose create loses the race opens the winner's file."""
    first, second = start_cluster(nodes, image, 2)
    rounds = 80
    barrier = threading.Barrier(2)
    failures: list[str] = []

    def opener(node, tag):
        for index in range(rounds):
            barrier.wait(timeout=30)
            try:
                fd = os.open(node.path(f"race-{index}"), os.O_CREAT | os.O_RDWR, 0o644)
                os.pwrite(fd, tag, 0 if tag == b"a" else 1)
                os.close(fd)
            except OSError as exc:
                failures.append(f"{tag!r} round {index}: {exc}")

    threads = [threading.Thread(target=opener, args=(node, tag))
               for node, tag in ((first, b"a"), (second, b"b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:5]
    assert all(first.path(f"race-{index}").read_bytes() == b"ab" for index in range(rounds))
