"""With --debug, a failure can be followed in the node logs alone: every metadata
request (node and coordinator side), push, quiesce step and role change is logged,
with the inode and the node."""

import os

import pytest

from tests.cluster import FdHolder, make_volume

pytestmark = pytest.mark.timeout(60)

UNIT = 64 * 1024


def lines_after(log: str, marker: str) -> list[str]:
    lines = log.splitlines()
    start = max(i for i, line in enumerate(lines) if marker in line)
    return lines[start:]


def in_order(lines: list[str], *wanted: str) -> list[int]:
    """The index of each wanted text, each found after the one before."""
    found, start = [], 0
    for text in wanted:
        index = next((i for i in range(start, len(lines)) if text in lines[i]), None)
        assert index is not None, f"{text!r} not after line {start}:\n" + "\n".join(lines)
        found.append(index)
        start = index + 1
    return found


def test_a_quiesce_can_be_followed_in_the_logs(tmp_path, nodes):
    image = make_volume(tmp_path, unit="64K")
    one = nodes.start(image, "node1", "--debug")
    two = nodes.start(image, "node2", "--debug")
    disk = one.path("disk")
    disk.write_bytes(b"x" * 4 * UNIT)
    ino = os.stat(disk).st_ino
    with FdHolder(two.path("disk")) as holder:  # node2 holds the file: it must pause
        assert holder.ask("poke") == "ok"
        os.truncate(disk, UNIT)  # node1, the coordinator, frees three units
        assert holder.ask("poke") == "ok"  # node2 goes on with the new map
    os.truncate(two.path("disk"), 0)  # a request from the member

    coordinator = one.log.read_text()
    member = two.log.read_text()
    assert " node1 INFO csvfs.membership: role: coordinator" in coordinator
    assert " node2 INFO csvfs.membership: role: member" in member
    assert f"open to node1 over RPC: ino={ino}" in member
    assert f"open from node2: ino={ino}" in coordinator

    assert f"setattr to node1 in process: ino={ino}, changes={{'size': {UNIT}}}" in coordinator
    quiesce = lines_after(coordinator,
                          f"setattr from node1: ino={ino}, changes={{'size': {UNIT}}}")
    steps = in_order(quiesce,
             f"inode {ino}: quiesce begins; pausing ['node2']",
             f"pause to node2: {{'ino': {ino}, 'token':",
             f"node2 acknowledged pause of inode {ino}",
             f": map of inode {ino}",  # the journal record
             f"inode {ino}: record",  # durable
             f"map to node2: {{'ino': {ino}, 'size': {UNIT},",
             f"node2 acknowledged map of inode {ino}",
             f"inode {ino}: quiesce over")
    one_quiesce = quiesce[: steps[-1] + 1]
    for step in ("quiesce begins", "acknowledged pause", "quiesce over"):  # logged once
        assert sum(step in line for line in one_quiesce) == 1, step
    assert all(" node1 DEBUG " in line for line in one_quiesce if " DEBUG " in line)

    in_order(member.splitlines(),
             f"pause push: {{'ino': {ino}, 'token':",
             f"inode {ino}: pause",
             f"map push: {{'ino': {ino}, 'size': {UNIT},",
             f"inode {ino}: map version",
             f"setattr to node1 over RPC: ino={ino}, changes={{'size': 0}}")
    assert f"setattr from node2: ino={ino}, changes={{'size': 0}}" in coordinator
