"""Election and liveness through etcd: a real 3-member etcd cluster on loopback ports,
csvfs nodes on real FUSE mounts elected through it (csvfs/cluster/etcd_election.py)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from coordinator.journal import raw_records
from csvfs.cluster.elections import election_spec
from csvfs.cluster.etcd_client import KeyValue, parse_endpoints
from csvfs.cluster.etcd_election import coordinator_key, slot_key, state_of
from csvfs.volume.errors import UsageError
from csvfs.volume.image import Volume
from scripts.etcd_cluster import EtcdCluster
from scripts.netns import Network
from tests.cluster import csvfs, status

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def etcd(tmp_path, monkeypatch):
    """Three etcd members; the nodes and `csvfs status` use them through CSVFS_ELECTION.
    Every member is killed afterwards, whatever happened."""
    # With CSVFS_TEST_ISOLATE=1 the nodes reach etcd through their bridge, at the
    # host's address on it (tests/cluster.py Isolation makes the bridge of tmp_path).
    isolated = os.environ.get("CSVFS_TEST_ISOLATE") == "1"
    host = Network.for_directory(tmp_path).host_address if isolated else "127.0.0.1"
    cluster = EtcdCluster(tmp_path / "etcd", members=3, client_host=host)
    try:
        cluster.start()
        monkeypatch.setenv("CSVFS_ELECTION", cluster.url)
        yield cluster
    finally:
        cluster.stop()


def coordinator(image) -> tuple[str, int]:
    report = status(image)
    return report["coordinator"]["name"], report["coordinator"]["epoch"]


@pytest.mark.also_on_a_loop_device  # as on hosts sharing a LUN: O_DIRECT, etcd
def test_election_status_and_takeover_after_sigkill(etcd, image, nodes):
    first, second, third = (nodes.start(image, name) for name in ("n1", "n2", "n3"))
    report = status(image)
    assert report["coordinator"]["name"] == "n1"
    assert sorted(node["name"] for node in report["nodes"] if node["alive"]) == \
        ["n1", "n2", "n3"]
    epoch = report["coordinator"]["epoch"]
    (second.path("before")).write_text("acknowledged")
    first.kill(signal.SIGKILL)
    started = time.monotonic()
    os.mkdir(third.path("after-kill"))
    takeover = time.monotonic() - started
    assert takeover < 1.0, takeover  # the dead coordinator's etcd lease was revoked
    name, new_epoch = coordinator(image)
    assert name in ("n2", "n3") and new_epoch > epoch
    assert (third.path("before")).read_text() == "acknowledged"
    assert [node["name"] for node in status(image)["nodes"]] == ["n2", "n3"]
    second.unmount()
    third.unmount()
    assert csvfs("fsck", image, check=False).returncode == 0


def test_hung_coordinator_is_replaced_within_its_lease(etcd, image, nodes):
    lease = 1.0
    hung, other = (nodes.start(image, name, "--lease", str(lease)) for name in ("n1", "n2"))
    assert coordinator(image)[0] == "n1"
    (hung.path("before")).write_text("from n1")
    hung.process.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        os.mkdir(other.path("after-stop"))
        takeover = time.monotonic() - stopped
        assert coordinator(image)[0] == "n2"
    finally:
        hung.process.send_signal(signal.SIGCONT)
    assert takeover < lease + 1.5, takeover  # etcd expires the TTL, checked every 0.5 s
    os.mkdir(hung.path("after-rejoining"))  # it fenced itself and joined n2
    assert sorted(os.listdir(other.path())) == ["after-rejoining", "after-stop", "before"]
    assert coordinator(image)[0] == "n2"


def test_move_hands_the_role_over_through_etcd(etcd, image, nodes):
    first, second = (nodes.start(image, name) for name in ("n1", "n2"))
    epoch = coordinator(image)[1]
    result = csvfs("move", image, "--to", "n2")
    assert "moved from n1 to n2" in result.stdout, result.stdout
    name, new_epoch = coordinator(image)
    assert name == "n2" and new_epoch > epoch
    os.mkdir(first.path("after-move"))
    assert os.listdir(second.path()) == ["after-move"]


def journal_records(image) -> int:
    volume = Volume.open(image)
    try:
        return len(raw_records(volume))
    finally:
        volume.close()


def test_one_etcd_member_lost_and_then_the_quorum(etcd, image, nodes):
    lease = 3.0  # TTL 2 s: a few etcd elections (0.5 s here); losing its leader costs one
    first, second = (nodes.start(image, name, "--lease", str(lease)) for name in ("n1", "n2"))
    etcd.kill(0)  # one member of three: everything goes on
    for index in range(5):
        (second.path(f"one-down-{index}")).write_text(str(index))
        time.sleep(0.2)
    assert coordinator(image)[0] == "n1"

    etcd.pause(1)  # two of three: no quorum, so no metadata commit once the lease is
    time.sleep(lease)  # unconfirmed for GRANT_USE of it
    committed = journal_records(image)
    done, failed = threading.Event(), []

    def make_directory():
        try:
            os.mkdir(second.path("during-loss"))
            done.set()
        except OSError as exc:
            failed.append(exc)

    waiter = threading.Thread(target=make_directory, daemon=True)
    waiter.start()  # the application waits, with no error
    time.sleep(2.0)
    assert not done.is_set(), "a metadata change was acknowledged without an etcd quorum"
    assert journal_records(image) == committed, "committed without an etcd quorum"
    etcd.resume(1)  # the quorum is back: the waiting request completes
    waiter.join(timeout=20)
    assert done.is_set() and not failed, failed
    expected = ["during-loss", *(f"one-down-{i}" for i in range(5))]
    assert sorted(os.listdir(first.path())) == expected
    assert sorted(os.listdir(second.path())) == expected
    assert (first.path("one-down-4")).read_text() == "4"
    nodes.allow_log_errors = True  # "cannot take over the volume" while etcd had no quorum


def test_bad_election_urls_and_unreachable_etcd(tmp_path, image):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = csvfs("mount", image, mountpoint, "--election", "etcd://nohostport",
                   check=False)
    assert result.returncode == 2 and "HOST:PORT" in result.stderr, result.stderr
    result = csvfs("status", image, "--election", "http://127.0.0.1:2379", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    unreachable = "etcd://127.0.0.1:9"  # the discard port: nothing listens
    result = csvfs("mount", image, mountpoint, "--election", unreachable, check=False)
    assert result.returncode == 18, result.stderr
    assert "no etcd endpoint answered" in result.stderr and "Traceback" not in result.stderr
    result = csvfs("status", image, "--election", unreachable, check=False)
    assert result.returncode == 18 and result.stderr.count("\n") == 1, result.stderr
    assert not os.path.ismount(mountpoint)


def test_election_urls_are_parsed_or_refused():
    assert parse_endpoints("etcd://127.0.0.1:2379,[::1]:2380,etcd-a:1") == \
        [("127.0.0.1", 2379), ("::1", 2380), ("etcd-a", 1)]
    for bad in ("127.0.0.1:2379", "etcd://", "etcd://host", "etcd://host:0",
                "etcd://host:99999", "etcd://a:1,,b:2"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
    assert election_spec("disk") == "" and election_spec("") == ""
    with pytest.raises(UsageError):
        election_spec("etcd://nohostport")


def test_the_coordinator_key_reads_as_a_lease_with_the_revision_as_epoch():
    uuid = "u"
    owner = KeyValue(coordinator_key(uuid), {"owner_slot": 2, "owner_name": "b", "ttl": 3,
                                             "address": "10.0.0.2:7000", "base": 0}, 41, 77)
    freed = KeyValue(coordinator_key(uuid), {"owner_slot": -1, "heir_slot": 1, "base": 5,
                                             "heir_until_ns": 1 << 62}, 50, 0)
    slot = KeyValue(slot_key(uuid, 2), {"name": "b", "address": "10.0.0.2:7000"}, 40, 77)
    state = state_of(uuid, [owner, slot])
    assert (state.lease.owner_slot, state.lease.epoch, state.lease.etcd_lease) == (2, 41, 77)
    assert state.lease.unexpired() and list(state.slots) == [2]
    lease = state_of(uuid, [freed]).lease
    assert lease.owner_slot == -1 and lease.epoch == 55 and lease.moving()
    assert not lease.unexpired() and lease.etcd_lease == 0


def test_every_node_of_a_volume_must_elect_the_same_way(etcd, image, nodes, tmp_path,
                                                        monkeypatch):
    """Nodes electing through etcd and through the lease region would each find a
    coordinator of their own: the volume remembers how it elects, and a node that
    would elect otherwise refuses to mount, in either direction."""
    etcd_node = nodes.start(image, "n1")
    (etcd_node.path("kept")).write_text("by n1")
    mountpoint = tmp_path / "mnt-disk"
    mountpoint.mkdir()
    refused = csvfs("mount", image, mountpoint, "--name", "n2", "--election", "disk",
                    check=False)  # explicitly the region, while n1 lives through etcd
    assert refused.returncode == 13
    assert refused.stderr.strip() == (f"csvfs: error: {image}: nodes elected through "
                                      f"{etcd.url} still mount it; unmount them first")
    monkeypatch.delenv("CSVFS_ELECTION")
    refused = csvfs("mount", image, mountpoint, "--name", "n2", check=False)
    assert refused.returncode == 13
    assert refused.stderr.strip() == (
        f"csvfs: error: {image} elects its coordinator through {etcd.url}: mount it with "
        f"--election {etcd.url} (or --election disk once no node uses etcd)")
    repair = csvfs("fsck", image, "--repair", check=False)  # its slot is in etcd only
    assert repair.returncode == 13 and "is mounted by a live node" in repair.stderr
    etcd_node.unmount()
    disk_node = nodes.start(image, "n3", "--election", "disk")  # etcd's nodes are gone
    assert (disk_node.path("kept")).read_text() == "by n1"
    refused = csvfs("mount", image, mountpoint, "--name", "n4", "--election", etcd.url,
                    check=False)
    assert refused.returncode == 13
    assert refused.stderr.strip() == (
        f"csvfs: error: {image} has a coordinator elected through its lease region (n3): "
        "every node of a volume must elect the same way")
