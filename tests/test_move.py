"""Moving the coordinator role on real mounts: `csvfs move` hands it over cleanly;
applications on every node see a pause and no error, and nothing is lost."""

from __future__ import annotations

import os
import threading
import time

import pytest

from scripts.nodes import events_json as events
from tests.cluster import csvfs, make_volume, status
from tests.test_vmload import VMs, assert_verifies_everywhere

pytestmark = pytest.mark.timeout(120)

RECORD = 4096


class Writer(threading.Thread):
    """Writes numbered 4 KiB records to its own file on a node, with creates, renames
    and fsyncs in between; remembers the first error and the longest write."""

    def __init__(self, root, name: str):
        super().__init__(daemon=True)
        self.root, self.name = root, name
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.count = 0
        self.longest = 0.0

    def run(self) -> None:
        path = os.path.join(self.root, self.name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while not self.stop.is_set():
                    started = time.monotonic()
                    os.pwrite(fd, self.count.to_bytes(8, "little") * (RECORD // 8),
                              self.count * RECORD)
                    if self.count % 16 == 0:
                        os.fsync(fd)
                        side = f"{path}.{self.count}"
                        with open(side, "wb") as extra:
                            extra.write(b"x")
                        os.rename(side, f"{path}.last")
                    self.longest = max(self.longest, time.monotonic() - started)
                    self.count += 1
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc

    def check(self, root) -> None:
        with open(os.path.join(root, self.name), "rb") as records:
            data = records.read()
        assert len(data) == self.count * RECORD
        for index in range(self.count):
            block = data[index * RECORD:(index + 1) * RECORD]
            assert block == index.to_bytes(8, "little") * (RECORD // 8), index


def coordinator(image) -> tuple[str, int]:
    report = status(image)["coordinator"]
    return report["name"], report["epoch"]


def test_a_move_hands_the_role_over_with_no_error_and_nothing_lost(image, nodes):
    started = [nodes.start(image, name) for name in ("n1", "n2", "n3")]
    writers = [Writer(node.mountpoint, f"w-{node.name}") for node in started]
    for writer in writers:
        writer.start()
    time.sleep(0.5)
    name, epoch = coordinator(image)
    assert name == "n1"
    for heir in ("n2", "n3", "n1"):
        result = csvfs("move", image, "--to", heir)
        assert result.stdout.startswith(f"coordinator of {image} moved from {name} to {heir} ")
        new_name, new_epoch = coordinator(image)
        assert (new_name, new_epoch) == (heir, epoch + 1)
        name, epoch = new_name, new_epoch
        time.sleep(0.5)
    for writer in writers:
        writer.stop.set()
    for writer in writers:
        writer.join(timeout=30)
        assert writer.error is None, writer.error
        assert writer.count > 50
        for node in started:
            writer.check(node.mountpoint)  # every node reads every record
    roles = {node["name"]: (node["coordinator"], node["session"])
             for node in status(image)["nodes"]}
    assert roles == {"n1": (True, True), "n2": (False, True), "n3": (False, True)}
    moves = [e["msg"] for e in events(image) if e["kind"] == "move"]
    assert moves == ["coordinator role moves from n1 to n2 (requested)",
                     "coordinator role moves from n2 to n3 (requested)",
                     "coordinator role moves from n3 to n1 (requested)"]


def test_a_move_without_a_target_picks_another_node(image, nodes):
    for name in ("n1", "n2"):
        nodes.start(image, name)
    result = csvfs("move", image)
    assert " moved from n1 to n2 " in result.stdout
    assert coordinator(image)[0] == "n2"


def test_a_move_refuses_what_it_cannot_do(image, nodes):
    result = csvfs("move", image, check=False)
    assert result.returncode == 15 and "no coordinator" in result.stderr
    nodes.start(image, "n1")
    result = csvfs("move", image, check=False)
    assert result.returncode == 17
    assert result.stderr.strip().splitlines() == [
        f"csvfs: error: {image}: no other node with a working path to the image is in session"]
    nodes.start(image, "n2")
    result = csvfs("move", image, "--to", "n1")
    assert result.stdout.strip() == "n1 is the coordinator already"
    result = csvfs("move", image, "--to", "nobody", check=False)
    assert result.returncode == 16 and "no node named nobody" in result.stderr
    csvfs("fault", image, "--node", "n2", "storage-down")
    with open(os.path.join(nodes.started[1].mountpoint, "probe"), "wb") as probe:
        probe.write(b"x" * 10000)  # n2's write fails over to redirected
    result = csvfs("move", image, "--to", "n2", check=False)
    assert result.returncode == 17 and "n2 has lost its path to the image" in result.stderr
    assert coordinator(image)[0] == "n1"


@pytest.mark.timeout(150)
def test_vms_on_three_nodes_through_storage_flips_and_moves(tmp_path, nodes):
    """One node's path fails and heals every 2 s, and the coordinator role moves every
    5 s, while a VM writes (and grows) through each node: not one error, not one
    sector wrong, read back through every node."""
    image = make_volume(tmp_path, size="512M")
    cluster = [nodes.start(image, name) for name in ("n1", "n2", "n3")]
    vms = VMs(tmp_path / "vmstate")
    try:
        running = [vms.start(node.mountpoint, f"vm-{node.name}", "--size", "16M",
                             "--seconds", "14", "--iodepth", "4", "--fsync-every", "16",
                             "--grow", "--grow-every", "1", "--grow-by", "1M",
                             "--max-size", "32M")
                   for node in cluster]
        flips, moves = chaos(image, seconds=14)
        for process in running:
            code, summary = vms.finish(process, timeout=60)
            assert code == 0, summary
            assert summary["writes"] > 200, summary
        for node in cluster:
            assert_verifies_everywhere(vms, cluster, f"vm-{node.name}")
    finally:
        vms.stop_all()
    assert flips >= 6 and moves >= 2, (flips, moves)
    kinds = [e["kind"] for e in events(image)]
    assert kinds.count("move") >= moves and kinds.count("io_mode") >= flips


def chaos(image, seconds: float) -> tuple[int, int]:
    """n3's path down and up every 2 s; the role to the next node every 5 s."""
    flips = moves = 0
    down = False
    started = time.monotonic()
    next_flip, next_move = started + 2, started + 5
    while next_flip < started + seconds:
        time.sleep(max(0.0, next_flip - time.monotonic()))
        next_flip += 2
        down = not down
        csvfs("fault", image, "--node", "n3", "storage-down" if down else "storage-up")
        flips += 1
        if time.monotonic() >= next_move:
            current = coordinator(image)[0]
            heirs = [n for n in ("n1", "n2", "n3") if n != current and not (down and n == "n3")]
            csvfs("move", image, "--to", heirs[moves % len(heirs)])
            moves += 1
            next_move += 5
    if down:
        csvfs("fault", image, "--node", "n3", "storage-up")
    return flips, moves
