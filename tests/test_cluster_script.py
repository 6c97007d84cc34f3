"""scripts/cluster.py: a local cluster brought up, used, refused twice and brought down,
on one volume and on several."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from csvfs.balance import read_cluster_file
from scripts.nodes import (
    cmdline,
    events_json,
    force_unmount,
    mounts_under,
    pid_alive,
    processes_naming,
    status_json,
    stop_daemon,
    wait_until,
)
from tests.cluster import LOG_PROBLEMS

pytestmark = pytest.mark.timeout(90)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cluster.py"
NAMES = ["node1", "node2", "node3"]
VOLUMES = ["vol1", "vol2", "vol3"]


def run_script(directory: Path, *args: str, timeout: float = 75) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.fspath(SCRIPT), *args, "--dir", os.fspath(directory)],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def processes_under(directory: Path) -> list[int]:
    """Live processes with this test's own directory in their argv: only ours can have it."""
    return sorted(processes_naming([directory], below=True))


def recorded(directory: Path) -> dict:
    return json.loads((directory / "cluster.json").read_text())


@pytest.fixture
def cluster_dir(tmp_path):
    """The cluster's DIR; whatever the test leaves running or mounted is cleaned up by force."""
    directory = tmp_path / "cluster"
    pids: set[int] = set()
    yield directory, pids
    for mountpoint in mounts_under(directory):
        force_unmount(mountpoint)
    for pid in processes_under(directory):  # the recorded pids too, unless reused since
        argv = cmdline(pid)  # as it is now: stop_daemon leaves the pid alone if it changes
        if argv:
            stop_daemon(pid, None, argv=argv)
    for mountpoint in mounts_under(directory):
        force_unmount(mountpoint)


def log_problems(directory: Path) -> list[str]:
    return [line for log in sorted(directory.glob("node*.log"))
            for line in log.read_text().splitlines()
            if any(marker in line for marker in LOG_PROBLEMS)]


def test_up_use_refuse_down(cluster_dir):
    directory, pids = cluster_dir
    up = run_script(directory, "up", "-n", "3", "--size", "256M")
    if (directory / "cluster.json").exists():
        pids.update(node["pid"] for node in recorded(directory)["nodes"])
    assert up.returncode == 0, up.stderr
    assert up.stderr == ""
    assert "coordinator: node1" in up.stdout  # up ends with `csvfs status`
    state = recorded(directory)
    assert state["image"] == os.fspath(directory / "vol.img")
    assert [node["name"] for node in state["nodes"]] == NAMES
    assert [node["mountpoint"] for node in state["nodes"]] == \
        [os.fspath(directory / name) for name in NAMES]
    assert sorted(mounts_under(directory)) == [os.fspath(directory / name) for name in NAMES]

    status = run_script(directory, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    alive = [node for node in report["nodes"] if node["state"] == "alive"]
    assert sorted(node["name"] for node in alive) == NAMES
    assert [node["name"] for node in alive if node["coordinator"]] == ["node1"]
    assert report["coordinator"]["name"] == "node1"
    assert {node["name"]: node["pid"] for node in alive} == \
        {node["name"]: node["pid"] for node in state["nodes"]}
    table = run_script(directory, "status")
    assert table.returncode == 0, table.stderr
    assert table.stdout.count(" alive ") == 3 and table.stdout.count(" coordinator ") == 1

    data = os.urandom(3 * 65536 + 17)
    (directory / "node1" / "hello.bin").write_bytes(data)
    assert (directory / "node3" / "hello.bin").read_bytes() == data

    again = run_script(directory, "up", "-n", "3", "--size", "256M")
    assert again.returncode == 3
    assert len(again.stderr.splitlines()) == 1 and "already up" in again.stderr
    assert "Traceback" not in again.stderr
    assert recorded(directory) == state
    assert all(pid_alive(node["pid"]) for node in state["nodes"])

    down = run_script(directory, "down")
    assert down.returncode == 0, down.stderr
    for name in NAMES:
        assert f"{name} (pid" in down.stdout
    assert down.stdout.index("node1 (pid") > down.stdout.index("node3 (pid")  # coordinator last
    assert mounts_under(directory) == []
    assert not [pid for pid in pids if pid_alive(pid)]
    assert processes_under(directory) == []
    assert not (directory / "cluster.json").exists()
    assert (directory / "vol.img").exists()

    kinds = [event["kind"] for event in events_json(directory / "vol.img")]
    assert kinds.count("election") == 1 and "takeover" not in kinds  # no needless failover
    assert kinds.count("leave") == 2 and kinds.count("unmount") == 1
    assert log_problems(directory) == []

    nothing = run_script(directory, "down")
    assert nothing.returncode == 0 and "nothing to stop" in nothing.stdout
    gone = run_script(directory, "status")
    assert gone.returncode == 4 and len(gone.stderr.splitlines()) == 1


def test_failed_node_stops_the_started_ones(cluster_dir):
    directory, pids = cluster_dir
    directory.mkdir()
    (directory / "node2").write_text("not a directory")
    up = run_script(directory, "up", "-n", "3", "--size", "256M")
    pids.update(processes_under(directory))
    assert up.returncode == 5
    assert len(up.stderr.splitlines()) == 1
    assert "node2 failed to start" in up.stderr and "not a directory" in up.stderr
    assert "node1 (pid" in up.stdout  # stopped again
    assert mounts_under(directory) == []
    assert processes_under(directory) == []
    assert not (directory / "cluster.json").exists()


def test_down_cleans_up_after_a_killed_node(cluster_dir):
    directory, pids = cluster_dir
    up = run_script(directory, "up", "-n", "2", "--size", "256M")
    assert up.returncode == 0, up.stderr
    member = recorded(directory)["nodes"][1]
    pids.update(node["pid"] for node in recorded(directory)["nodes"])
    os.kill(member["pid"], signal.SIGKILL)
    wait_until(lambda: not pid_alive(member["pid"]), 10, interval=0.02)
    down = run_script(directory, "down")
    assert down.returncode == 0, down.stderr
    assert "node2 (pid" in down.stdout and "had already exited" in down.stdout
    assert mounts_under(directory) == []
    assert processes_under(directory) == []
    assert not (directory / "cluster.json").exists()


# -- several volumes ----------------------------------------------------------------------


def up_on_three_volumes(directory: Path, pids: set[int]) -> dict:
    """`up -n 3 --volumes 3`; returns what cluster.json recorded."""
    up = run_script(directory, "up", "-n", "3", "--volumes", "3", "--size", "256M",
                    timeout=150)  # 9 mounts, then up to ~10 s for the roles to settle
    if (directory / "cluster.json").exists():
        pids.update(node["pid"] for node in recorded(directory)["nodes"])
    assert up.returncode == 0, up.stderr
    assert up.stderr == ""
    assert up.stdout.count("coordinator: node") == 3  # `csvfs status` of every volume
    return recorded(directory)


def check_records(directory: Path, state: dict) -> None:
    """One record per node per volume, started node by node, each with its own image."""
    images = [os.fspath(directory / f"{volume}.img") for volume in VOLUMES]
    assert state["images"] == images
    assert read_cluster_file(directory / "cluster.volumes") == [Path(i) for i in images]
    nodes = state["nodes"]
    assert [(node["name"], node["image"]) for node in nodes] == \
        [(name, image) for name in NAMES for image in images]
    assert [node["mountpoint"] for node in nodes] == \
        [os.fspath(directory / name / volume) for name in NAMES for volume in VOLUMES]
    assert len({node["pid"] for node in nodes}) == 9
    assert all(pid_alive(node["pid"]) for node in nodes)
    assert sorted(mounts_under(directory)) == sorted(node["mountpoint"] for node in nodes)


def check_volumes(directory: Path, state: dict) -> None:
    """Each volume has the three nodes in session, and each node coordinates one volume."""
    coordinators = []
    for image in state["images"]:
        report = status_json(image)
        alive = {node["name"]: node["pid"] for node in report["nodes"]
                 if node["state"] == "alive"}
        assert alive == {node["name"]: node["pid"] for node in state["nodes"]
                         if node["image"] == image}
        coordinators.append(report["coordinator"]["name"])
    assert Counter(coordinators) == Counter(NAMES)  # up waited for the balance


@pytest.mark.timeout(300)
def test_up_on_three_volumes_use_refuse_down(cluster_dir):
    directory, pids = cluster_dir
    state = up_on_three_volumes(directory, pids)
    check_records(directory, state)
    check_volumes(directory, state)

    status = run_script(directory, "status", "--json")
    assert status.returncode == 0, status.stderr
    reports = json.loads(status.stdout)["volumes"]
    assert [report["image"] for report in reports] == state["images"]

    data = os.urandom(3 * 65536 + 17)
    (directory / "node1" / "vol2" / "hello.bin").write_bytes(data)
    assert (directory / "node3" / "vol2" / "hello.bin").read_bytes() == data
    assert not (directory / "node3" / "vol1" / "hello.bin").exists()  # another volume

    again = run_script(directory, "up", "-n", "3", "--volumes", "3")
    assert again.returncode == 3
    assert len(again.stderr.splitlines()) == 1 and "already up" in again.stderr
    assert recorded(directory) == state

    down = run_script(directory, "down", timeout=150)
    assert down.returncode == 0, down.stderr
    assert down.stdout.count(" (pid ") == 9
    assert mounts_under(directory) == []  # /proc/mounts
    assert not [pid for pid in pids if pid_alive(pid)]
    assert processes_under(directory) == []
    assert not (directory / "cluster.json").exists()
    for image in state["images"]:  # each volume's coordinator stopped last
        assert "takeover" not in [event["kind"] for event in events_json(image)]
    assert log_problems(directory) == []


def test_a_cluster_json_of_one_image_is_still_read(cluster_dir):
    """cluster.json as written before --volumes: no "images", no image per node."""
    directory, pids = cluster_dir
    up = run_script(directory, "up", "-n", "1", "--size", "256M")
    assert up.returncode == 0, up.stderr
    assert not (directory / "cluster.volumes").exists()
    state = recorded(directory)
    pids.update(node["pid"] for node in state["nodes"])
    old = {"image": state["image"], "lease": state["lease"], "started": state["started"],
           "nodes": [{key: value for key, value in node.items() if key != "image"}
                     for node in state["nodes"]]}
    (directory / "cluster.json").write_text(json.dumps(old))

    status = run_script(directory, "status")
    assert status.returncode == 0, status.stderr
    assert "coordinator: node1" in status.stdout
    down = run_script(directory, "down")
    assert down.returncode == 0, down.stderr
    assert "node1 (pid" in down.stdout and "1 node(s) stopped" in down.stdout
    assert mounts_under(directory) == []
    assert processes_under(directory) == []
