"""Several volumes, balanced coordinators: the pure rules, then a 3-node, 3-volume
cluster on real mounts."""

from __future__ import annotations

import time

import pytest

from csvfs.balance import (
    DEFER_MAX,
    DEFER_STEP,
    Move,
    VolumeRoles,
    plan,
    read_cluster_file,
    role_counts,
    takeover_delay,
)
from csvfs.volume.errors import UsageError
from tests.cluster import Node, csvfs, make_volume, status

NODES = ("n1", "n2", "n3")


def volume(image: str, coordinator: str | None, nodes=NODES, able=None) -> VolumeRoles:
    return VolumeRoles(image, coordinator, list(nodes), list(nodes if able is None else able))


# -- the rules --------------------------------------------------------------------------------


def test_one_node_with_every_role_gives_one_to_each_other_node():
    volumes = [volume(f"v{i}", "n1") for i in (1, 2, 3)]
    assert plan(volumes) == [Move("v1", "n1", "n2"), Move("v2", "n1", "n3")]


def test_a_gap_of_one_is_balanced():
    volumes = [volume("v1", "n1", ("n1", "n2")), volume("v2", "n1", ("n1", "n2")),
               volume("v3", "n2", ("n1", "n2"))]
    assert plan(volumes) == []
    assert role_counts(volumes) == {"n1": 2, "n2": 1}


def test_a_node_whose_path_is_lost_or_that_does_not_mount_the_volume_gets_nothing():
    volumes = [volume("v1", "n1", able=("n1", "n2")), volume("v2", "n1", ("n1", "n2")),
               volume("v3", "n1", able=("n1",))]
    assert plan(volumes) == [Move("v1", "n1", "n2")]  # n3's path is lost everywhere


def test_volumes_with_no_coordinator_are_left_to_the_election():
    assert plan([volume("v1", None), volume("v2", None)]) == []


def test_a_takeover_waits_for_the_node_with_fewer_roles():
    volumes = [volume("v1", "n1"), volume("v2", "n1"), volume("v3", None)]
    assert takeover_delay(volumes, "v3", "n1") == 2 * DEFER_STEP  # 2 roles more than n2
    many = [volume(f"v{i}", "n1") for i in range(8)] + [volume("v9", None)]
    assert takeover_delay(many, "v9", "n1") == DEFER_MAX
    assert takeover_delay(volumes, "v3", "n2") == 0.0
    volumes = [volume("v1", "n1"), volume("v2", None)]
    assert takeover_delay(volumes, "v2", "n1") == DEFER_STEP
    assert takeover_delay([volume("v1", None, ("n1",))], "v1", "n1") == 0.0


def test_the_cluster_file(tmp_path):
    (tmp_path / "cluster").write_text("# volumes\nv1.img\n\n  v2.img  # the second\n")
    assert read_cluster_file(tmp_path / "cluster") == [tmp_path / "v1.img", tmp_path / "v2.img"]
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(UsageError, match="lists no volume"):
        read_cluster_file(tmp_path / "empty")
    with pytest.raises(UsageError, match="No such file"):
        read_cluster_file(tmp_path / "missing")


# -- a cluster on real mounts ---------------------------------------------------------------


@pytest.fixture
def volumes(tmp_path):
    images = []
    for index in (1, 2, 3):
        directory = tmp_path / f"v{index}"
        directory.mkdir()
        images.append(make_volume(directory, size="64M"))
    (tmp_path / "cluster").write_text("".join(f"{image}\n" for image in images))
    return images


def start(nodes, images, name: str) -> list[Node]:
    """Node `name`: one mount process per volume of the cluster (tmp_path/cluster)."""
    started = []
    for index, image in enumerate(images, 1):
        mountpoint = nodes.tmp_path / f"v{index}" / f"mnt-{name}"
        node = nodes.node(image, name, "--cluster", str(nodes.tmp_path / "cluster"),
                          "--lease", "1", mountpoint=mountpoint)
        started.append(node.start())
    return started


def roles(images) -> list[int]:
    counts = {}
    for image in images:
        name = status(image)["coordinator"]["name"]
        counts[name] = counts.get(name, 0) + 1
    return sorted(counts.values(), reverse=True)


def wait_for_roles(images, expected: list[int], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := roles(images)) != expected:
        assert time.monotonic() < deadline, f"roles per node {seen}, not {expected}"
        time.sleep(0.2)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("order", [("n1", "n2", "n3"), ("n3", "n1", "n2")])
def test_three_nodes_three_volumes_one_coordinator_each(volumes, nodes, order):
    by_name = {name: start(nodes, volumes, name) for name in order}
    wait_for_roles(volumes, [1, 1, 1])
    for mounts in by_name.values():  # every node reads and writes every volume
        for index, mount in enumerate(mounts):
            mount.path(f"from-{mount.name}").write_bytes(b"v%d" % index)
    leaving = next(name for name in order if name != order[0])
    for mount in by_name[leaving]:
        mount.stop()
    wait_for_roles(volumes, [2, 1])
    by_name[leaving] = start(nodes, volumes, leaving)
    wait_for_roles(volumes, [1, 1, 1])
    for index in range(len(volumes)):
        for name in order:
            assert by_name[order[0]][index].path(f"from-{name}").read_bytes() == b"v%d" % index
    moves = [e for image in volumes for e in events_of(image) if e["kind"] == "move"]
    assert moves and all("balancing" in e["msg"] for e in moves)


def events_of(image):
    from scripts.nodes import events_json

    return events_json(image)


@pytest.mark.timeout(120)
def test_balance_on_demand_prints_what_it_moved(tmp_path, nodes):
    images = []
    for index in (1, 2, 3):
        directory = tmp_path / f"v{index}"
        directory.mkdir()
        images.append(make_volume(directory, size="64M"))
    for name in ("n1", "n2", "n3"):  # no --cluster: nothing balances by itself
        for index, image in enumerate(images, 1):
            nodes.node(image, name, mountpoint=tmp_path / f"v{index}" / f"mnt-{name}").start()
    assert roles(images) == [3]
    result = csvfs("balance", *images)
    lines = result.stdout.strip().splitlines()
    assert lines[:2] == [f"{images[0]}: moved the coordinator role from n1 to n2",
                         f"{images[1]}: moved the coordinator role from n1 to n3"]
    assert lines[2] == "balanced: coordinator roles per node: n1 1, n2 1, n3 1"
    assert roles(images) == [1, 1, 1]
    again = csvfs("balance", *images).stdout.strip()
    assert again == "already balanced: coordinator roles per node: n1 1, n2 1, n3 1"
