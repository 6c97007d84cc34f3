#!/usr/bin/env python3
"""A local csvfs cluster for development: N nodes on one volume image, on this machine.

    python scripts/cluster.py up [-n N] [--dir DIR] [--image IMG] [--size SIZE] [--lease S]
    python scripts/cluster.py status [--dir DIR] [--json]
    python scripts/cluster.py down [--dir DIR]

`up` creates the image if it is missing, then runs `csvfs mount` for node1..nodeN, one
after the other (node1 becomes the coordinator, the others join it), with mountpoints
DIR/node1.. and logs DIR/node1.log... What it started goes to DIR/cluster.json; `down`
reads it back and stops exactly those processes, and no others.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# scripts/nodes.py: run as a script, this directory is on sys.path
from nodes import (
    NodeError,
    Waits,
    csvfs_command,
    is_mounted,
    is_process_of,
    processes_naming,
    status_json,
    stop_daemon,
)

PROG = "cluster.py"
STATE_FILE = "cluster.json"

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected failure
EXIT_USAGE = 2  # bad command-line argument
EXIT_ALREADY_UP = 3  # up: a cluster is already up in DIR, or a mountpoint is already in use
EXIT_NOT_UP = 4  # status: no cluster is recorded in DIR
EXIT_START_FAILED = 5  # up: mkfs or a node's mount failed (the nodes already started are stopped)
EXIT_STOP_FAILED = 6  # down: a node would not stop even after SIGKILL (cluster.json keeps it)

EPILOG = f"""\
exit codes:
  {EXIT_OK}   success (down: also when nothing was up)
  {EXIT_FAILURE}   unexpected failure
  {EXIT_USAGE}   bad command-line argument
  {EXIT_ALREADY_UP}   up: a cluster is already up in DIR (run `down` first), or one of its
      mountpoints is already mounted
  {EXIT_NOT_UP}   status: no cluster is up in DIR
  {EXIT_START_FAILED}   up: mkfs or a node failed to start; the nodes already started were
      stopped again, and the error names the node and csvfs's reason
  {EXIT_STOP_FAILED}   down: a node did not stop even after SIGKILL; cluster.json keeps it
  130 interrupted (up: the nodes it had started are stopped again)
  other  status: the exit code of `csvfs status` (15: the coordinator does not answer)

Errors are one line on stderr. Node logs stay in DIR/NODE.log, the image in DIR/vol.img
(or --image) with its key IMAGE.key; `down` keeps both.
"""

MOUNT_TIMEOUT = 60.0  # one `csvfs mount`, until the node is ready
STATUS_TIMEOUT = 15.0
UNMOUNT_WAIT = 15.0  # after fusermount3 -u, for the node to write its checkpoint and exit
TERM_WAIT = 10.0  # after SIGTERM
KILL_WAIT = 5.0  # after SIGKILL
LOCK_WAIT = 120.0  # for another cluster.py working on the same DIR


class ClusterError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like csvfs itself
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}\n")


# -- state --------------------------------------------------------------------------------


@dataclass
class NodeRecord:
    name: str
    mountpoint: str
    log: str
    pid: int
    slot: int | None = None


@dataclass
class Cluster:
    directory: Path
    image: str
    nodes: list[NodeRecord]
    lease: float | None = None
    started: str = ""

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def save(self) -> None:
        data = {"image": self.image, "lease": self.lease, "started": self.started,
                "nodes": [asdict(node) for node in self.nodes]}
        temporary = self.state_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(temporary, self.state_path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    @classmethod
    def load(cls, directory: Path) -> Cluster | None:
        path = directory / STATE_FILE
        try:
            data = json.loads(path.read_text())
            return cls(directory, data["image"], [NodeRecord(**node) for node in data["nodes"]],
                       data.get("lease"), data.get("started", ""))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClusterError(f"{path} is unreadable ({exc}); stop its nodes by hand "
                               f"(fusermount3 -u DIR/nodeN) and remove it") from None


@contextlib.contextmanager
def locked(directory: Path):
    """One cluster.py at a time per DIR: a second `up` waits, then sees the cluster is up."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"another cluster.py has been working on {directory} "
                                       f"for over {LOCK_WAIT:.0f} s") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


# -- processes and mounts -----------------------------------------------------------------


def run_csvfs(*args, timeout: float) -> tuple[int, str, str]:
    """Run csvfs; returns (exit code, stdout, last stderr line).

    Output goes through temporary files, not pipes: `csvfs mount` leaves a daemon behind
    that holds the caller's stdio until the mount is ready, and a pipe would wait for it.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            code = subprocess.run([*csvfs_command(), *map(os.fspath, args)],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        lines = err.read().decode(errors="replace").strip().splitlines()
    if code is None:
        return -1, stdout, f"csvfs {args[0]} did not finish within {timeout:.0f} s"
    return code, stdout, lines[-1].strip() if lines else ""


def strip_prefix(message: str) -> str:
    return message.removeprefix("csvfs: error: ")


def status_report(image: str) -> dict | None:
    """`csvfs status --json` as a dict, or None. Its JSON comes even when it exits 15."""
    try:
        return status_json(image, timeout=STATUS_TIMEOUT)
    except NodeError:
        return None


def node_argv(node: NodeRecord) -> list[str]:
    """Words only the `csvfs mount` daemon started for node has in its argv."""
    return ["mount", node.mountpoint, node.name]


def is_our_node(pid: int, node: NodeRecord) -> bool:
    """pid is still the `csvfs mount` daemon this script started for node (not a reused pid)."""
    return is_process_of(pid, node_argv(node))


def find_pid(image: str, node: NodeRecord) -> tuple[int, int | None]:
    """The pid and slot of a node that just mounted: from `csvfs status --json` by name,
    or else from /proc (the daemon is a fork of `csvfs mount`, so it has its argv)."""
    report = status_report(image) or {}
    for entry in report.get("nodes", []):
        if entry.get("name") == node.name and entry.get("alive"):
            pid = int(entry.get("pid", 0))
            if is_our_node(pid, node):
                return pid, entry.get("slot")
    for pid in sorted(processes_naming([node.mountpoint])):
        if is_our_node(pid, node):
            return pid, None
    return 0, None


def stop_node(node: NodeRecord) -> tuple[bool, str]:
    """Stop one node, gently first; returns (stopped, what was done)."""
    stopped, steps = stop_daemon(node.pid, node.mountpoint, argv=node_argv(node),
                                 waits=Waits(UNMOUNT_WAIT, TERM_WAIT, KILL_WAIT))
    with contextlib.suppress(OSError):
        if stopped:
            os.rmdir(node.mountpoint)  # only if empty
    return stopped, steps


def stop_order(cluster: Cluster) -> list[NodeRecord]:
    """Members first, newest first; the coordinator last, so nobody needs to take over."""
    report = status_report(cluster.image) or {}
    coordinator = (report.get("coordinator") or {}).get("name")
    nodes = list(reversed(cluster.nodes))
    return sorted(nodes, key=lambda node: node.name == coordinator)  # stable


def stop_all(cluster: Cluster) -> list[NodeRecord]:
    """Stop every node of cluster, printing one line each; returns those that would not stop."""
    left = []
    for node in stop_order(cluster):
        stopped, steps = stop_node(node)
        print(f"{node.name} (pid {node.pid}, {node.mountpoint}): {steps}")
        if not stopped:
            left.append(node)
    return left


def live_nodes(cluster: Cluster) -> list[NodeRecord]:
    return [node for node in cluster.nodes
            if is_our_node(node.pid, node) or is_mounted(node.mountpoint)]


# -- commands -----------------------------------------------------------------------------


def again(args, command: str) -> str:
    """How to run another command of this script on the same DIR, for messages."""
    where = "" if args.dir == Path("cluster") else f" --dir {args.dir}"
    return f"python {sys.argv[0]} {command}{where}"


def cmd_up(args) -> int:
    if args.n < 1:
        raise ClusterError("-n must be at least 1", EXIT_USAGE)
    directory = args.dir.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with locked(directory):
        old = Cluster.load(directory)
        if old is not None:
            live = live_nodes(old)
            if live:
                raise ClusterError(
                    f"a cluster is already up in {directory} ({len(live)} of "
                    f"{len(old.nodes)} nodes running or mounted, image {old.image}); "
                    f"run `{again(args, 'down')}` first", EXIT_ALREADY_UP)
            print(f"{old.state_path} is stale (none of its nodes is running): replacing it")
            old.remove()
        image = (args.image or directory / "vol.img").resolve()
        cluster = Cluster(directory, os.fspath(image), [], args.lease,
                          time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        nodes = [NodeRecord(f"node{index}", os.fspath(directory / f"node{index}"),
                            os.fspath(directory / f"node{index}.log"), 0)
                 for index in range(1, args.n + 1)]
        busy = [node.mountpoint for node in nodes if is_mounted(node.mountpoint)]
        if busy:
            raise ClusterError(f"{busy[0]} is already mounted, and not by a cluster recorded "
                               f"in {cluster.state_path}; unmount it first", EXIT_ALREADY_UP)
        if not image.exists():
            code, stdout, error = run_csvfs("mkfs", image, "--size", args.size, timeout=60)
            if code != 0:
                raise ClusterError(f"cannot create {image}: {strip_prefix(error)}",
                                   EXIT_START_FAILED)
            print(stdout.strip())
        elif args.size_given:
            print(f"{image} exists: using it as it is (--size applies only to a new image)")
        try:
            for node in nodes:
                start_node(cluster, node)
        except BaseException:  # a failed node, or ^C: stop what this run started
            if cluster.nodes:
                print(f"stopping the {len(cluster.nodes)} node(s) already started")
                left = stop_all(cluster)
                cluster.nodes = left
                if left:
                    cluster.save()
                else:
                    cluster.remove()
            raise
        print(f"{len(cluster.nodes)} node(s) up in {directory}; stop them with "
              f"`{again(args, 'down')}`\n")
        sys.stdout.flush()
        return show_status(cluster, as_json=False, exit_code=False)


def start_node(cluster: Cluster, node: NodeRecord) -> None:
    if not os.path.lexists(node.mountpoint):  # anything else there: csvfs says what is wrong
        os.mkdir(node.mountpoint)
    extra = ["--lease", str(cluster.lease)] if cluster.lease is not None else []
    try:
        code, _stdout, error = run_csvfs("mount", cluster.image, node.mountpoint, "--name",
                                         node.name, "--log", node.log, *extra,
                                         timeout=MOUNT_TIMEOUT)
        if code == 0:
            node.pid, node.slot = find_pid(cluster.image, node)
            cluster.nodes.append(node)
    except BaseException:  # ^C while mounting: the node's daemon may be on its way up
        adopt(cluster, node)
        raise
    if code != 0:
        adopt(cluster, node)  # a mount that timed out may have left a daemon
        detail = strip_prefix(error) or "no error message"
        raise ClusterError(f"{node.name} failed to start (csvfs exit {code}): {detail}",
                           EXIT_START_FAILED)
    cluster.save()  # at once: an interrupted `up` can still be brought `down`
    if not node.pid:
        raise ClusterError(f"{node.name} mounted {node.mountpoint} but its pid is not in "
                           f"`csvfs status` nor in /proc", EXIT_START_FAILED)
    print(f"started {node.name}: pid {node.pid}, {node.mountpoint}, log {node.log}")
    sys.stdout.flush()


def adopt(cluster: Cluster, node: NodeRecord) -> None:
    """After a failed or interrupted mount: if node's daemon exists, record it so that
    the rollback stops it too."""
    if not node.pid:
        node.pid, node.slot = find_pid(cluster.image, node)
    if (node.pid or is_mounted(node.mountpoint)) and node not in cluster.nodes:
        cluster.nodes.append(node)


def show_status(cluster: Cluster, as_json: bool, exit_code: bool = True) -> int:
    sys.stdout.flush()
    command = [*csvfs_command(), "status", cluster.image, *(["--json"] if as_json else [])]
    try:
        code = subprocess.run(command, stdin=subprocess.DEVNULL, timeout=STATUS_TIMEOUT).returncode
    except subprocess.TimeoutExpired:
        raise ClusterError(f"csvfs status did not answer within {STATUS_TIMEOUT:.0f} s") from None
    return code if exit_code else EXIT_OK


def cmd_status(args) -> int:
    directory = args.dir.resolve()
    cluster = Cluster.load(directory) if directory.is_dir() else None
    if cluster is None:
        raise ClusterError(f"no cluster is up in {directory} (no {STATE_FILE}); start one with "
                           f"`{again(args, 'up')}`", EXIT_NOT_UP)
    return show_status(cluster, args.json)


def cmd_down(args) -> int:
    directory = args.dir.resolve()
    if not (directory / STATE_FILE).exists():
        print(f"no cluster is up in {directory}: nothing to stop")
        return EXIT_OK
    with locked(directory):
        cluster = Cluster.load(directory)
        if cluster is None:  # another `down` got there first
            print(f"no cluster is up in {directory}: nothing to stop")
            return EXIT_OK
        left = stop_all(cluster)
        if left:
            cluster.nodes = left
            cluster.save()
            names = ", ".join(f"{node.name} (pid {node.pid})" for node in left)
            raise ClusterError(f"{names} did not stop; {cluster.state_path} keeps them",
                               EXIT_STOP_FAILED)
        cluster.remove()
        print(f"cluster in {directory} is down: {len(cluster.nodes)} node(s) stopped, "
              f"{STATE_FILE} removed; kept the image {cluster.image} and the node logs")
    return EXIT_OK


# -- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description="Run a local csvfs cluster: N nodes on one "
                     "volume image, each with its own mountpoint and log.",
                     epilog=EPILOG, formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    common = {"epilog": EPILOG, "formatter_class": formatter}
    dir_help = "where the image, mountpoints, logs and cluster.json go (default ./cluster)"

    up = sub.add_parser("up", help="create the image if missing and start N nodes", **common)
    up.add_argument("-n", type=int, default=3, metavar="N", help="number of nodes (default 3)")
    up.add_argument("--dir", type=Path, default=Path("cluster"), help=dir_help)
    up.add_argument("--image", type=Path, help="volume image (default DIR/vol.img)")
    up.add_argument("--size", help="size of a new image, e.g. 256M, 1G (default 1G)")
    up.add_argument("--lease", type=float, metavar="S",
                    help="coordinator lease in seconds, passed to every node (csvfs default 3)")

    status = sub.add_parser("status", help="run `csvfs status` on the cluster's image", **common)
    status.add_argument("--dir", type=Path, default=Path("cluster"), help=dir_help)
    status.add_argument("--json", action="store_true", help="print JSON (csvfs status --json)")

    down = sub.add_parser("down", help="stop every node of the cluster cleanly", **common)
    down.add_argument("--dir", type=Path, default=Path("cluster"), help=dir_help)
    return parser


COMMANDS = {"up": cmd_up, "status": cmd_status, "down": cmd_down}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        args.size_given = args.size is not None
        args.size = args.size or "1G"
    try:
        return COMMANDS[args.command](args)
    except (ClusterError, NodeError) as exc:  # NodeError: csvfs is not installed
        sys.stdout.flush()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_FAILURE)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, never a traceback
        sys.stdout.flush()
        print(f"{PROG}: error: unexpected failure: {exc.__class__.__name__}: {exc}",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
