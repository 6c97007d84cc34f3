#!/usr/bin/env python3
"""A local csvfs cluster for development: N nodes on one or more volume images, on this
machine.

    python scripts/cluster.py up [-n N] [--volumes K] [--dir DIR] [--image IMG] [--size SIZE]
                                 [--lease S] [--io-timeout S] [--isolate]
    python scripts/cluster.py status [--dir DIR] [--json]
    python scripts/cluster.py exec [--dir DIR] [--cwd PATH] NODE -- CMD...
    python scripts/cluster.py cut|heal [--dir DIR] NODE
    python scripts/cluster.py down [--dir DIR]

`up` creates the image if it is missing, then runs `csvfs mount` for node1..nodeN, one
after the other (node1 becomes the coordinator, the others join it), with mountpoints
DIR/node1.. and logs DIR/node1.log...

With --volumes K (K > 1) the images are DIR/vol1.img..DIR/volK.img, listed in the
cluster file DIR/cluster.volumes, and a node is one `csvfs mount --cluster
DIR/cluster.volumes` process per volume, all with the node's name, on DIR/nodeI/volJ
with the log DIR/nodeI-volJ.log. The nodes start one after the other, each on every
volume, so node1 first coordinates them all; the coordinators then hand roles over
until each node has its share (csvfs/balance.py), and `up` waits for that (up to
SETTLE_WAIT seconds, scripts/cluster_status.py) before it shows the status of each
volume.

With --isolate (one volume only, for now) every node runs in a network and a mount
namespace of its own, made by scripts/netns.py: it listens on its own address on a
bridge, and its mount is seen only inside its namespace. `exec NODE -- CMD` runs CMD
there (in its mountpoint unless --cwd), `cut NODE` drops every packet to and from it,
`heal NODE` lets them through again. `down` also removes the namespaces and links.

What it started goes to DIR/cluster.json, one record per `csvfs mount` process; `down`
reads it back and stops exactly those processes, and no others.

This module is the command line: the parser, the commands up, status and down, their
exit codes and messages. What DIR/cluster.json records, and finding, checking and
stopping the node processes it names, are in scripts/cluster_state.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# scripts/cluster_state.py, scripts/nodes.py: run as a script, this directory is on sys.path
import netns
from cluster_state import (
    STATE_FILE,
    Cluster,
    ClusterError,
    NodeRecord,
    find_pid,
    is_our_node,
    live_nodes,
    locked,
    remove_network,
    stop_all,
)
from cluster_status import settle, show_status
from nodes import NodeError, csvfs_command, is_mounted

PROG = "cluster.py"
VOLUMES_FILE = "cluster.volumes"  # with --volumes K > 1: csvfs mount --cluster reads it

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
  other  status: the exit code of `csvfs status` (15: the coordinator does not answer);
      exec: the exit code of CMD

Errors are one line on stderr. Node logs stay in DIR/NODE.log, the image in DIR/vol.img
(or --image) with its key IMAGE.key; `down` keeps both. With --volumes K > 1: the logs
are DIR/NODE-volJ.log, the images DIR/vol1.img..DIR/volK.img, listed in
DIR/cluster.volumes, and `status` shows every volume (its exit code is the first
non-zero one of them).
"""

MOUNT_TIMEOUT = 60.0  # one `csvfs mount`, until the node is ready


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like csvfs itself
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}\n")


# -- running csvfs ------------------------------------------------------------------------


def run_csvfs(*args, timeout: float, holder: int = 0) -> tuple[int, str, str]:
    """Run csvfs (inside the namespaces of holder, if given); returns (exit code,
    stdout, last stderr line).

    Output goes through temporary files, not pipes: `csvfs mount` leaves a daemon behind
    that holds the caller's stdio until the mount is ready, and a pipe would wait for it.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            command = [*csvfs_command(), *map(os.fspath, args)]
            code = subprocess.run(netns.enter(holder, command) if holder else command,
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


# -- commands -----------------------------------------------------------------------------


def again(args, command: str) -> str:
    """How to run another command of this script on the same DIR, for messages."""
    where = "" if args.dir == Path("cluster") else f" --dir {args.dir}"
    return f"python {sys.argv[0]} {command}{where}"


def cmd_up(args) -> int:
    if args.n < 1:
        raise ClusterError("-n must be at least 1", EXIT_USAGE)
    if args.volumes < 1:
        raise ClusterError("--volumes must be at least 1", EXIT_USAGE)
    if args.volumes > 1 and args.image is not None:
        raise ClusterError("--image is the image of a single volume; with --volumes K the "
                           "images are DIR/vol1.img..DIR/volK.img", EXIT_USAGE)
    if args.isolate:
        check_isolate(args)
    directory = args.dir.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with locked(directory):
        forget_stale_cluster(args, directory)
        images = image_paths(args, directory)
        cluster = Cluster(directory, [os.fspath(image) for image in images], [], args.lease,
                          time.strftime("%Y-%m-%dT%H:%M:%S%z"), io_timeout=args.io_timeout)
        nodes = node_records(directory, args.n, cluster.images)
        refuse_busy_mountpoints(cluster, nodes)
        for image in images:
            create_image(image, args)
        if cluster.several:
            cluster.volumes_file = os.fspath(write_volumes_file(directory, images))
        if args.isolate:
            cluster.network = netns.Network.for_directory(directory)
        start_all(cluster, nodes)
        announce(args, cluster)
        return show_status(cluster, as_json=False, exit_code=False)


def check_isolate(args) -> None:
    if args.volumes > 1:
        raise ClusterError("--isolate works with one volume only, for now", EXIT_USAGE)
    if args.n > 253:
        raise ClusterError("--isolate: at most 253 nodes (one /24 per cluster)", EXIT_USAGE)
    if os.geteuid() != 0:
        raise ClusterError("--isolate makes namespaces, links and a bridge: run as root")


def announce(args, cluster: Cluster) -> None:
    """What is up, and how to stop it; with several volumes, once their roles are even."""
    down = again(args, "down")
    if not cluster.several:
        print(f"{len(cluster.nodes)} node(s) up in {cluster.directory}; stop them with "
              f"`{down}`\n")
    else:
        print(f"{args.n} node(s) up on {len(cluster.images)} volumes in {cluster.directory} "
              f"({len(cluster.nodes)} csvfs processes); stop them with `{down}`")
        settle(cluster)
        print()
    sys.stdout.flush()


def forget_stale_cluster(args, directory: Path) -> None:
    """Refuse if a cluster recorded in DIR still has a node running or mounted; forget
    one whose nodes are all gone."""
    old = Cluster.load(directory)
    if old is None:
        return
    live = live_nodes(old)
    if live:
        what = "node processes" if old.several else "nodes"
        raise ClusterError(
            f"a cluster is already up in {directory} ({len(live)} of {len(old.nodes)} "
            f"{what} running or mounted, {old.describe_images()}); "
            f"run `{again(args, 'down')}` first", EXIT_ALREADY_UP)
    print(f"{old.state_path} is stale (none of its nodes is running): replacing it")
    remove_network(old)
    old.remove()


def image_paths(args, directory: Path) -> list[Path]:
    if args.volumes == 1:  # the name of before --volumes, so that old DIRs still work
        return [(args.image or directory / "vol.img").resolve()]
    return [directory / f"vol{number}.img" for number in range(1, args.volumes + 1)]


def node_records(directory: Path, count: int, images: list[str]) -> list[NodeRecord]:
    """The processes to start, in order: node by node, each on every volume."""
    nodes = []
    for index in range(1, count + 1):
        name = f"node{index}"
        for number, image in enumerate(images, 1):
            if len(images) == 1:
                mountpoint, log = directory / name, directory / f"{name}.log"
            else:
                mountpoint, log = directory / name / f"vol{number}", \
                    directory / f"{name}-vol{number}.log"
            nodes.append(NodeRecord(name, os.fspath(mountpoint), os.fspath(log), 0,
                                    image=image))
    return nodes


def refuse_busy_mountpoints(cluster: Cluster, nodes: list[NodeRecord]) -> None:
    paths = [node.mountpoint for node in nodes]
    if cluster.several:  # a mount on DIR/NAME would hide the mountpoints of its volumes
        paths = [*dict.fromkeys(os.path.dirname(path) for path in paths), *paths]
    busy = [path for path in paths if is_mounted(path)]
    if busy:
        raise ClusterError(f"{busy[0]} is already mounted, and not by a cluster recorded "
                           f"in {cluster.state_path}; unmount it first", EXIT_ALREADY_UP)


def create_image(image: Path, args) -> None:
    if not image.exists():
        code, stdout, error = run_csvfs("mkfs", image, "--size", args.size, timeout=60)
        if code != 0:
            raise ClusterError(f"cannot create {image}: {strip_prefix(error)}",
                               EXIT_START_FAILED)
        print(stdout.strip())
    elif args.size_given:
        print(f"{image} exists: using it as it is (--size applies only to a new image)")


def write_volumes_file(directory: Path, images: list[Path]) -> Path:
    """The cluster file every node gets with --cluster (csvfs/balance.py
    read_cluster_file). Paths relative to DIR, so that DIR can be moved."""
    path = directory / VOLUMES_FILE
    lines = [f"# the volumes of the cluster in this directory, written by {PROG} up",
             *(os.path.relpath(image, directory) for image in images)]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_all(cluster: Cluster, nodes: list[NodeRecord]) -> None:
    try:
        if cluster.network is not None:
            cluster.save()  # before the first namespace: `down` can always remove them
            make_namespaces(cluster.network, netns.create_bridge)
        for node in nodes:
            if cluster.network is not None:
                make_namespaces(cluster.network, netns.add_node, node.index)
                node.holder = make_namespaces(cluster.network, netns.start_holder, node.index)
            start_node(cluster, node)
    except BaseException:  # a failed node, or ^C: stop what this run started
        roll_back(cluster)
        raise


def make_namespaces(network: netns.Network, make, *args):
    try:
        return make(network, *args)
    except netns.NetnsError as exc:
        raise ClusterError(f"--isolate: {exc}", EXIT_START_FAILED) from None


def roll_back(cluster: Cluster) -> None:
    """Stop the nodes this run started, and remove its namespaces and links."""
    if not cluster.nodes and cluster.network is None:
        return
    if cluster.nodes:
        what = "node process(es)" if cluster.several else "node(s)"
        print(f"stopping the {len(cluster.nodes)} {what} already started")
    left = stop_all(cluster)
    remove_network(cluster)  # also kills what was left in the namespaces
    cluster.nodes = [node for node in left if is_our_node(node.pid, node)]
    if cluster.nodes:
        cluster.save()
    else:
        cluster.remove()


def start_node(cluster: Cluster, node: NodeRecord) -> None:
    make_mountpoint(node)
    extra = ["--lease", str(cluster.lease)] if cluster.lease is not None else []
    if cluster.io_timeout is not None:
        extra += ["--io-timeout", str(cluster.io_timeout)]
    if cluster.volumes_file is not None:
        extra += ["--cluster", cluster.volumes_file]
    if cluster.network is not None:  # RPC over the node's own address on the bridge
        extra += ["--listen", f"{cluster.network.address(node.index)}:0"]
    try:
        code, _stdout, error = run_csvfs("mount", node.image, node.mountpoint, "--name",
                                         node.name, "--log", node.log, *extra,
                                         timeout=MOUNT_TIMEOUT, holder=node.holder)
        if code == 0:
            node.pid, node.slot = find_pid(node)
            cluster.nodes.append(node)
    except BaseException:  # ^C while mounting: the node's daemon may be on its way up
        adopt(cluster, node)
        raise
    if code != 0:
        adopt(cluster, node)  # a mount that timed out may have left a daemon
        detail = strip_prefix(error) or "no error message"
        raise ClusterError(f"{cluster.label(node)} failed to start (csvfs exit {code}): "
                           f"{detail}", EXIT_START_FAILED)
    cluster.save()  # at once: an interrupted `up` can still be brought `down`
    if not node.pid:
        raise ClusterError(f"{cluster.label(node)} mounted {node.mountpoint} but its pid is "
                           f"not in `csvfs status` nor in /proc", EXIT_START_FAILED)
    where = ""
    if cluster.network is not None:
        where = (f" (netns {cluster.network.netns(node.index)}, "
                 f"{cluster.network.address(node.index)})")
    print(f"started {node.name}: pid {node.pid}, {node.mountpoint}, log {node.log}{where}")
    sys.stdout.flush()


def make_mountpoint(node: NodeRecord) -> None:
    """Create node's mountpoint, and DIR/NAME above it with several volumes. Only below
    a directory: anything else in the way is left for csvfs to name in its error."""
    mountpoint = Path(node.mountpoint)
    for path in (mountpoint.parent, mountpoint):
        if not os.path.lexists(path) and os.path.isdir(path.parent):
            os.mkdir(path)


def adopt(cluster: Cluster, node: NodeRecord) -> None:
    """After a failed or interrupted mount: if node's daemon exists, record it so that
    the rollback stops it too."""
    if not node.pid:
        node.pid, node.slot = find_pid(node)
    if (node.pid or is_mounted(node.mountpoint)) and node not in cluster.nodes:
        cluster.nodes.append(node)


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
        remove_network(cluster)  # also kills what was left in the namespaces
        left = [node for node in left if is_our_node(node.pid, node)]
        if left:
            cluster.nodes = left
            cluster.save()
            names = ", ".join(f"{cluster.label(node)} (pid {node.pid})" for node in left)
            raise ClusterError(f"{names} did not stop; {cluster.state_path} keeps them",
                               EXIT_STOP_FAILED)
        cluster.remove()
        print(f"cluster in {directory} is down: {stopped_summary(cluster)}")
    return EXIT_OK


def isolated_node(args) -> tuple[Cluster, NodeRecord]:
    """The cluster in DIR and its node args.node, which must be isolated and running."""
    directory = args.dir.resolve()
    cluster = Cluster.load(directory) if directory.is_dir() else None
    if cluster is None:
        raise ClusterError(f"no cluster is up in {directory} (no {STATE_FILE})", EXIT_NOT_UP)
    if cluster.network is None:
        raise ClusterError(f"the cluster in {directory} was not started with --isolate",
                           EXIT_USAGE)
    node = next((node for node in cluster.nodes if node.name == args.node), None)
    if node is None or not netns.is_holder(node.holder):
        names = ", ".join(node.name for node in cluster.nodes)
        raise ClusterError(f"no running node {args.node} in {directory} (nodes: {names})",
                           EXIT_NOT_UP)
    return cluster, node


def cmd_exec(args) -> int:
    _cluster, node = isolated_node(args)
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise ClusterError("exec: no command given (exec NODE -- CMD...)", EXIT_USAGE)
    sys.stdout.flush()
    return subprocess.run(netns.enter(node.holder, command, args.cwd or node.mountpoint)
                          ).returncode


def cmd_link(args) -> int:
    """cut or heal a node's link to the bridge."""
    cluster, node = isolated_node(args)
    try:
        netns.set_link(cluster.network, node.index, up=args.command == "heal")
    except netns.NetnsError as exc:
        raise ClusterError(str(exc)) from None
    state = "healed: its link is up" if args.command == "heal" else "cut: its link is down"
    print(f"{node.name} {state} ({cluster.network.link(node.index)})")
    return EXIT_OK


def stopped_summary(cluster: Cluster) -> str:
    if not cluster.several:
        return (f"{len(cluster.nodes)} node(s) stopped, {STATE_FILE} removed; kept the image "
                f"{cluster.image} and the node logs")
    return (f"{len(cluster.nodes)} node process(es) stopped, {STATE_FILE} removed; kept the "
            f"images, {VOLUMES_FILE} and the node logs")


# -- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description="Run a local csvfs cluster: N nodes on one "
                     "volume image (or on K, with --volumes K), each with its own "
                     "mountpoint and log per volume.",
                     epilog=EPILOG, formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    common = {"epilog": EPILOG, "formatter_class": formatter}
    dir_help = "where the image, mountpoints, logs and cluster.json go (default ./cluster)"

    up = sub.add_parser("up", help="create the images if missing and start N nodes", **common)
    up.add_argument("-n", type=int, default=3, metavar="N", help="number of nodes (default 3)")
    up.add_argument("--volumes", type=int, default=1, metavar="K",
                    help="number of volumes (default 1): with K > 1, images DIR/vol1.img.."
                    "DIR/volK.img listed in DIR/cluster.volumes; every node mounts each one "
                    "on DIR/nodeI/volJ, and up waits until the coordinator roles are "
                    "balanced over the nodes")
    up.add_argument("--dir", type=Path, default=Path("cluster"), help=dir_help)
    up.add_argument("--image", type=Path,
                    help="volume image (default DIR/vol.img); only with one volume")
    up.add_argument("--size", help="size of a new image, e.g. 256M, 1G (default 1G)")
    up.add_argument("--lease", type=float, metavar="S",
                    help="coordinator lease in seconds, passed to every node (csvfs default 3)")
    up.add_argument("--io-timeout", type=float, metavar="S",
                    help="how long a node's applications wait for a coordinator before EIO, "
                    "passed to every node (csvfs default 60)")
    up.add_argument("--isolate", action="store_true",
                    help="each node in its own network and mount namespace, on a bridge "
                    "(root; one volume only)")

    status = sub.add_parser("status", help="run `csvfs status` on each of the cluster's "
                            "images", **common)
    status.add_argument("--dir", type=Path, default=Path("cluster"), help=dir_help)
    status.add_argument("--json", action="store_true",
                        help="print JSON (csvfs status --json; with several volumes "
                        '{"volumes": [one report per image]})')

    down = sub.add_parser("down", help="stop every node of the cluster cleanly", **common)
    down.add_argument("--dir", type=Path, default=Path("cluster"), help=dir_help)
    add_isolated_commands(sub, common, dir_help)
    return parser


def add_isolated_commands(sub, common: dict, dir_help: str) -> None:
    run = sub.add_parser("exec", help="run a command inside a node's namespaces "
                         "(--isolate); exits with its exit code", **common)
    run.add_argument("--dir", type=Path, default=Path("cluster"), help=dir_help)
    run.add_argument("--cwd", help="where CMD runs (default: the node's mountpoint)")
    run.add_argument("node", metavar="NODE")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    for name, what in (("cut", "drop every packet to and from a node (--isolate)"),
                       ("heal", "let a cut node's packets through again")):
        link = sub.add_parser(name, help=what, **common)
        link.add_argument("--dir", type=Path, default=Path("cluster"), help=dir_help)
        link.add_argument("node", metavar="NODE")


COMMANDS = {"up": cmd_up, "status": cmd_status, "down": cmd_down, "exec": cmd_exec,
            "cut": cmd_link, "heal": cmd_link}


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
        return getattr(exc, "exit_code", None) or EXIT_FAILURE
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
