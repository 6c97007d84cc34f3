"""`csvfs status`: who serves a volume, from any shell, with no mount of its own.

The lease region names the coordinator and every node that ever took a slot
(name, pid, RPC address, I/O mode, heartbeat); a slot is alive while its
node holds the slot's liveness lock. With `--election etcd://...`, etcd says the
same (csvfs/cluster/elections.py): there a slot exists only while its node lives.
The coordinator itself, asked over RPC with the cluster key, adds its sessions
and its open-file table.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import trio

from coordinator.locks import F_RDLCK, F_WRLCK, OFFSET_MAX
from csvfs.cluster import elections, messages
from csvfs.cluster.errors import MetaError, is_not_coordinator
from csvfs.cluster.rpc_client import RpcClient
from csvfs.cluster.transport import split_address
from csvfs.cluster.wire import RpcError
from csvfs.volume.errors import ExitCode, UserError
from csvfs.volume.image import Volume, read_key

ASK_TIMEOUT = 3.0
MOVE_WAIT = 2.0  # seconds status waits for the heir of a move to answer
LOCK_TYPES = {F_RDLCK: "shared", F_WRLCK: "exclusive"}


class CoordinatorUnreachable(UserError):
    exit_code = ExitCode.UNREACHABLE


def gather(image: Path, key_path: Path, election: str = "") -> dict:
    """Everything status shows, as one JSON-ready dict. While the coordinator role is
    moving (`csvfs move`, balancing), it asks again until the heir answers."""
    deadline = time.monotonic() + MOVE_WAIT
    while True:
        report, moving = _gather_once(image, key_path, election)
        if not moving or time.monotonic() > deadline:
            return report
        time.sleep(0.02)


def _gather_once(image: Path, key_path: Path, election: str) -> tuple[dict, bool]:
    """The report, and whether the role was moving meanwhile (ask again)."""
    volume = Volume.open(image)
    try:
        view = elections.view(election, volume)
        lease = view.lease
        nodes = [_node(view, slot) for slot in sorted(view.records)]
        report = {
            "volume": str(volume.sb.uuid),
            "image": str(image),
            "coordinator": None,
            "nodes": nodes,
            "open_files": [],
        }
        owner = next((n for n in nodes if n["coordinator"]), None)
        if owner is None:
            return report, lease.moving()
        key = read_key(key_path)
        volume.check_key(key)
    finally:
        volume.close()
    report["coordinator"] = {"name": owner["name"], "slot": owner["slot"], "epoch": lease.epoch,
                             "address": owner["address"],
                             "lease_left_s": round((lease.expiry_ns - time.time_ns()) / 1e9, 3)}
    try:
        answer = trio.run(_ask, owner["address"], key)
    except (RpcError, MetaError, OSError, ValueError, trio.TooSlowError) as exc:
        reason = str(exc) or f"no answer within {ASK_TIMEOUT:g} s"
        report["error"] = f"coordinator {owner['name']} at {owner['address']} did not answer: " \
                          f"{reason}"
        return report, is_not_coordinator(exc)  # it handed the role on meanwhile
    _merge(report, answer)
    return report, False


def find_coordinator(image: Path, key_path: Path, election: str = "") -> tuple[str, str, bytes]:
    """(name, RPC address, cluster key) of the volume's live coordinator; while the role
    is moving, the heir once it has taken it."""
    deadline = time.monotonic() + MOVE_WAIT
    while True:
        volume = Volume.open(image)
        try:
            view = elections.view(election, volume)
            lease, owner = view.lease, view.owner()
            if owner:
                key = read_key(key_path)
                volume.check_key(key)
                return owner.get("name", "?"), owner.get("address", ""), key
        finally:
            volume.close()
        if not lease.moving() or time.monotonic() > deadline:
            raise CoordinatorUnreachable(f"{image}: no coordinator (no node has the volume "
                                         "mounted)")
        time.sleep(0.02)


def _node(view: elections.View, slot: int) -> dict:
    record, lease = view.records[slot], view.lease
    alive = slot in view.alive
    coordinator = alive and lease.owner_slot == slot and lease.unexpired()
    mode = record.get("mode", "?") if alive else "-"
    return {
        "slot": slot,
        "name": record.get("name", "?"),
        "pid": record.get("pid", 0),
        "address": record.get("address", ""),
        "alive": alive,
        "state": "alive" if alive else ("stopped" if record.get("mode") == "stopped" else "dead"),
        "coordinator": coordinator,
        "io_mode": mode,  # as the slot says; the coordinator's word replaces it
        "io_reason": "",
        "io_since_ns": None,
        "redirected_io": {},  # what the coordinator did for the node: reads, writes, ...
        "heartbeat_age_s": round((time.time_ns() - record.get("heartbeat_ns", 0)) / 1e9, 3),
        "session": coordinator,
    }


async def _ask(address: str, key: bytes) -> dict:
    host, port = split_address(address)
    with trio.fail_after(ASK_TIMEOUT):
        async with await RpcClient.connect(host, port, key, f"status-{os.getpid()}",
                                           timeout=ASK_TIMEOUT) as client:
            return await client.call(messages.STATUS, timeout=ASK_TIMEOUT)


def _merge(report: dict, answer: dict) -> None:
    members = {session["name"]: session for session in answer["sessions"]}
    for node in report["nodes"]:
        node["session"] = node["name"] in members and node["alive"]
        io = members[node["name"]].get("io") if node["session"] else None
        if io:  # Direct or Redirected, why, and since when (csvfs/redirect.py)
            node["io_mode"], node["io_reason"] = io["mode"], io["reason"]
            node["io_since_ns"] = io["since_ns"]
            node["redirected_io"] = io.get("served", {})
    report["coordinator"]["epoch"] = answer["epoch"]
    report["lingering"] = answer.get("lingering", [])
    report["open_files"] = [{"ino": ino, "path": path, "nodes": nodes}
                            for ino, path, nodes in answer["open_files"]]
    report["locks"] = [{"ino": ino, "path": path, "node": node, "kind": kind,
                        "type": LOCK_TYPES.get(type_, "?"), "start": start, "end": end,
                        "pid": pid}
                       for ino, path, node, kind, type_, start, end, pid in answer.get("locks", [])]
    report["snapshots"] = [{"id": snap_id, "requester": requester, "age_s": age,
                            "preserved": preserved, "held": held}
                           for snap_id, requester, age, preserved, held
                           in answer.get("snapshots", [])]


def render(report: dict) -> str:
    lines = [f"volume {report['volume']} ({report['image']})"]
    coordinator = report["coordinator"]
    if coordinator is None:
        lines.append("coordinator: none (no node has the volume mounted)")
    else:
        lines.append(f"coordinator: {coordinator['name']} at {coordinator['address']}, "
                     f"epoch {coordinator['epoch']}, lease valid for "
                     f"{max(coordinator['lease_left_s'], 0):.1f} s more")
    lines.append("")
    rows = [["NODE", "SLOT", "PID", "ADDRESS", "STATE", "ROLE", "I/O MODE", "SINCE", "REASON",
             "HEARTBEAT"]]
    for node in report["nodes"]:
        role = "coordinator" if node["coordinator"] else ("member" if node["session"] else "-")
        age = f"{node['heartbeat_age_s']:.1f} s ago" if node["alive"] else "-"
        rows.append([node["name"], str(node["slot"]), str(node["pid"]), node["address"] or "-",
                     node["state"], role, node["io_mode"], _since(node["io_since_ns"]),
                     node["io_reason"] or "-", age])
    lines += _table(rows)
    if coordinator is not None and "error" not in report:
        lines.append("")
        if report["open_files"]:
            rows = [["INODE", "PATH", "OPEN ON"]]
            for entry in report["open_files"]:
                holders = ", ".join(f"{name} ({count})"
                                    for name, count in sorted(entry["nodes"].items()))
                rows.append([str(entry["ino"]), entry["path"] or "(unlinked)", holders])
            lines += _table(rows)
        else:
            lines.append("no open files")
        lines += _locks(report.get("locks", []))
        lines += _snapshots(report.get("snapshots", []))
    return "\n".join(lines)


def _since(since_ns: int | None) -> str:
    if since_ns is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(since_ns / 1e9))


def _snapshots(snapshots: list[dict]) -> list[str]:
    if not snapshots:
        return []
    rows = [["SNAPSHOT", "REQUESTER", "AGE", "PRESERVED", "STILL HELD"]]
    for snap in snapshots:
        rows.append([str(snap["id"]), snap["requester"], f"{snap['age_s']:.1f} s",
                     f"{snap['preserved']} granules", f"{snap['held']} granules"])
    return ["", "snapshots in progress (backups):", *_table(rows)]


def _locks(locks: list[dict]) -> list[str]:
    if not locks:
        return []
    rows = [["INODE", "PATH", "NODE", "KIND", "TYPE", "RANGE", "PID"]]
    for lock in locks:
        end = "EOF" if lock["end"] == OFFSET_MAX else str(lock["end"])
        rows.append([str(lock["ino"]), lock["path"] or "(unlinked)", lock["node"], lock["kind"],
                     lock["type"], f"{lock['start']}-{end}", str(lock["pid"])])
    return ["", *_table(rows)]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def run_status(image: Path, key_path: Path, as_json: bool, election: str = "") -> int:
    report = gather(image, key_path, election)
    print(json.dumps(report, indent=2) if as_json else render(report))
    if "error" in report:
        raise CoordinatorUnreachable(report["error"])
    return 0
