"""The tests' cluster helper with isolated nodes (tests/cluster.py Isolation; the nodes
fixture with CSVFS_TEST_ISOLATE=1 or the parameter "isolated"): each node in a network
and a mount namespace of its own, RPC over the veths, the mounts seen from the host,
and nothing left behind."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from scripts.nodes import is_mounted, mounts_under, pid_alive, wait_until
from tests.cluster import Isolation, Node, isolation_missing, make_volume, status

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(bool(isolation_missing()), reason=isolation_missing())]

ISOLATED = pytest.mark.parametrize("nodes", ["isolated"], indirect=True)


def namespace(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def mounts_of(pid: int) -> list[str]:
    with open(f"/proc/{pid}/mounts") as mounts:
        return [line.split()[1] for line in mounts]


@ISOLATED
def test_isolated_nodes_talk_over_their_veths_and_their_mounts_show_on_the_host(image, nodes):
    first, second = nodes.start(image, "n1"), nodes.start(image, "n2")
    isolation = nodes.isolation
    for kind in ("net", "mnt"):  # each in namespaces of its own, not the host's
        seen = {namespace(node.pid, kind) for node in (first, second)}
        assert len(seen) == 2 and namespace("self", kind) not in seen, kind
    # RPC: each node on its own address, the member's connection from its own address
    addresses = {node["name"]: node["address"] for node in status(image)["nodes"]}
    assert addresses["n1"].startswith(isolation.address("n1") + ":")
    assert addresses["n2"].startswith(isolation.address("n2") + ":")
    assert f"{isolation.address('n2')}:" in first.log.read_text()  # n2 joined from there
    port = int(addresses["n1"].rsplit(":", 1)[1])
    with pytest.raises(OSError):  # the host's loopback is not n1's
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    # the mounts: made in each node's mount namespace, shown at the same path here
    assert is_mounted(first.mountpoint) and is_mounted(second.mountpoint)
    assert os.fspath(first.mountpoint) in mounts_of(first.pid)
    first.path("f").write_bytes(b"from n1")
    assert second.path("f").read_bytes() == b"from n1"

    isolation.cut("n2")  # the link carries the RPC: cut, n2 cannot reach n1
    try:
        assert wait_until(lambda: heartbeat_age(image, "n2") > 1.5, 10, interval=0.25)
    finally:
        isolation.heal("n2")
    assert wait_until(lambda: heartbeat_age(image, "n2") < 1, 15, interval=0.25)
    assert second.path("f").read_bytes() == b"from n1"


def heartbeat_age(image, name: str) -> float:
    for node in status(image)["nodes"]:
        if node["name"] == name and node["session"]:
            return node.get("heartbeat_age_s", 99)
    return 99


def test_an_isolation_leaves_nothing_behind_even_after_its_node_was_killed(tmp_path, image):
    isolation = Isolation(tmp_path)
    node = Node(image, tmp_path / "mnt-a", "a", isolation=isolation)
    try:
        isolation.open()
        node.start()
        holder = isolation.holders["a"]
        node.kill(signal.SIGKILL, unmount=False)  # its dead mount stays, here and there
        assert is_mounted(node.mountpoint)
    finally:
        try:
            isolation.close()  # all of it: node.stop() only closes its pipe now
        finally:
            node.stop()
    assert isolation.leftovers() == []
    assert not pid_alive(holder) and mounts_under(tmp_path) == []


def test_a_holder_never_keeps_a_fuse_mount_of_the_host_alive(tmp_path, image):
    """A node's mount namespace is a copy of the host's; its copy of a FUSE mount made
    outside the shared directory, which it does not own, must not keep that mount's
    connection alive once the host unmounts it, so its server exits at once."""
    plain = Node(image, tmp_path / "mnt-plain", "plain")  # on the host
    isolation = Isolation(tmp_path / "isolated")
    other = None
    try:
        plain.start()
        isolation.open()  # another volume: b must not join plain
        other = Node(make_volume(isolation.directory, size="64M"),
                     tmp_path / "isolated" / "mnt-b", "b", isolation=isolation)
        other.start()
        assert os.fspath(plain.mountpoint) not in mounts_of(isolation.holders["b"])
        assert os.fspath(plain.mountpoint) not in mounts_of(other.pid)
        assert plain.unmount(timeout=10) == 0  # exits: no copy held its connection
        assert other.unmount(timeout=20) == 0
    finally:
        plain.stop()
        if other is not None:
            other.stop()
        isolation.close()
    assert isolation.leftovers() == []


def test_a_node_of_the_same_name_restarts_in_the_same_namespaces(image, tmp_path):
    isolation = Isolation(tmp_path)
    first = Node(image, tmp_path / "mnt-a", "a", isolation=isolation)
    again = Node(image, tmp_path / "mnt-a", "a", isolation=isolation)
    try:
        isolation.open()
        first.start()
        holder = isolation.holders["a"]
        net = namespace(first.pid, "net")
        assert first.unmount() == 0
        again.start()
        assert isolation.holders["a"] == holder and namespace(again.pid, "net") == net
        assert again.rpc_address().startswith(isolation.address("a") + ":")
    finally:
        first.stop()
        again.stop()
        isolation.close()
    assert isolation.leftovers() == []
