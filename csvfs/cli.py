"""The `csvfs` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from csvfs.volume.errors import ExitCode, UsageError, UserError
from csvfs.volume.sizes import format_size, parse_size

log = logging.getLogger(__name__)
KEY_HELP = "cluster key file (default $CSVFS_KEY, else IMAGE.key)"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every other usage error
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="csvfs", description="A clustered filesystem over FUSE.")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    # --debug after the command too; SUPPRESS keeps it from undoing one given before
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    mkfs = sub.add_parser("mkfs", help="create a volume image", parents=[debug])
    mkfs.add_argument("image", type=Path)
    mkfs.add_argument("--size", help="volume size, e.g. 64M, 10G, 1T (a block device: "
                      "its own size)")
    mkfs.add_argument("--unit", default="1M", help="allocation unit, 64K to 4M (default 1M)")
    mkfs.add_argument("--key", type=Path, help=KEY_HELP)
    mkfs.add_argument("--force", action="store_true", help="overwrite an existing volume")

    mount = sub.add_parser("mount", help="mount a volume on this node", parents=[debug])
    mount.add_argument("image", type=Path)
    mount.add_argument("mountpoint", type=Path)
    mount.add_argument("--name", default="", help="node name (default HOST-PID)")
    mount.add_argument("--key", type=Path, help=KEY_HELP)
    mount.add_argument("--io-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="how long applications wait while no coordinator is "
                       "reachable (a partition) before their I/O fails with EIO "
                       "(default 60, 1 to 86400)")
    mount.add_argument("--cluster", type=Path, metavar="FILE",
                       help="the cluster's volumes, one image per line: the coordinator "
                       "roles are balanced over them (csvfs/balance.py)")
    mount.add_argument("--direct-io", action=argparse.BooleanOptionalAction, default=None,
                       help="read and write the image with O_DIRECT, past this host's "
                       "page cache, as nodes on several hosts sharing a device must "
                       "(default: on for a block device, off for an image file)")
    mount.add_argument("--io-threads", type=int, default=None, metavar="N",
                       help="reads and writes of the data path in flight at once, each "
                       "on a thread of the FUSE shim's fast lane; 0 does them one at a "
                       "time on the node's own thread (default: 4 with O_DIRECT, 0 "
                       "through the page cache; 0 to 16)")
    _election_option(mount)
    mount.add_argument("--foreground", action="store_true", help="stay attached")
    mount.add_argument("--log", type=Path, help="append the node's log to this file")
    mount.add_argument("--lease", type=float, default=3.0,
                       help="coordinator lease and node grant, in seconds (default 3)")
    mount.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                       help="where this node's RPC server listens (default 127.0.0.1, any "
                       "free port); the address goes in the volume's lease region")
    mount.add_argument("--advertise", metavar="HOST[:PORT]",
                       help="the address other nodes and `csvfs status` reach this node at "
                       "(default: the --listen address; needed when that is a wildcard "
                       "such as 0.0.0.0; without PORT, the port it listens on)")

    from csvfs.backup.cli import add_parser as add_backup_parser

    add_backup_parser(sub, [debug])

    fsck = sub.add_parser("fsck", help="check a volume (and repair it with --repair)",
                          parents=[debug])
    fsck.add_argument("image", type=Path)
    fsck.add_argument("--repair", action="store_true", help="fix what can be fixed")

    status = sub.add_parser("status", help="show the coordinator, the nodes and open files",
                            parents=[debug])
    status.add_argument("image", type=Path)
    status.add_argument("--key", type=Path, help=KEY_HELP)
    status.add_argument("--json", action="store_true", help="print JSON")
    _election_option(status)

    fault = sub.add_parser("fault", help="make one node's path to the image fail, or "
                           "work again (for tests and drills)", parents=[debug])
    fault.add_argument("image", type=Path)
    fault.add_argument("--node", required=True, help="the node's name")
    fault.add_argument("--key", type=Path, help=KEY_HELP)
    fault.add_argument("action", choices=["storage-down", "storage-up"])
    _election_option(fault)

    redirect = sub.add_parser("redirect", help="send one node's data I/O through the "
                              "coordinator (on), or let it go direct again (off)",
                              parents=[debug])
    redirect.add_argument("image", type=Path)
    redirect.add_argument("--node", required=True, help="the node's name")
    redirect.add_argument("--key", type=Path, help=KEY_HELP)
    redirect.add_argument("action", choices=["on", "off"])
    _election_option(redirect)

    move = sub.add_parser("move", help="hand the coordinator role to another node",
                          parents=[debug])
    move.add_argument("image", type=Path)
    move.add_argument("--to", default="", metavar="NODE",
                      help="the node to take it (default: the best one by the balance rule)")
    move.add_argument("--key", type=Path, help=KEY_HELP)
    _election_option(move)

    balance = sub.add_parser("balance", help="even the coordinator roles out over the "
                             "volumes of a cluster, and print what moved", parents=[debug])
    balance.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    balance.add_argument("--key", type=Path,
                         help="cluster key file (default: each IMAGE.key)")
    _election_option(balance)

    events = sub.add_parser("events", help="print the volume's event ring", parents=[debug])
    events.add_argument("image", type=Path)
    events.add_argument("--json", action="store_true")
    events.add_argument("-f", "--follow", action="store_true",
                        help="then print new events as they come, until interrupted")
    return parser


def _election_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--election", metavar="etcd://HOST:PORT[,HOST:PORT...]",
                        help="elect the coordinator through etcd, not the volume's lease "
                             "region (default: $CSVFS_ELECTION, else the lease region)")


def _election(args) -> str:
    from csvfs.cluster.elections import election_spec

    return election_spec(args.election)


def _disk_election_asked(args) -> bool:
    from csvfs.cluster.elections import ENVIRONMENT

    asked = args.election if args.election is not None else os.environ.get(ENVIRONMENT, "")
    return asked.strip() == "disk"


def cmd_mkfs(args) -> int:
    from csvfs.mkfs import make_volume
    from csvfs.volume.image import default_key_path, is_block_device

    if args.size is None and not is_block_device(args.image):
        raise UsageError("--size is required for an image file")
    size = parse_size(args.size) if args.size else 0
    unit = parse_size(args.unit)
    key = args.key or default_key_path(args.image)
    kept = " (the key that was there)" if key.exists() else ""
    sb = make_volume(args.image, size, unit, force=args.force, key_path=key)
    print(f"created volume {sb.uuid} on {args.image}: {format_size(sb.size)}, "
          f"{sb.data_units} units of {format_size(sb.unit_size)}; cluster key in {key}{kept}")
    return ExitCode.OK


def _check_addresses(listen: str, advertise: str | None) -> None:
    """--listen HOST:PORT, and --advertise HOST[:PORT] wherever listen is a wildcard."""
    from csvfs.cluster.transport import WILDCARDS, split_address, split_advertised

    try:
        listen_host, _ = split_address(listen)
    except ValueError as exc:
        raise UsageError(f"--listen: {exc}") from None
    if advertise is None:
        if listen_host in WILDCARDS:
            raise UsageError(f"--listen {listen} takes every interface, and other nodes "
                             "cannot reach a wildcard: give --advertise HOST, an address of "
                             "this machine they can reach")
        return
    try:
        advertise_host, _ = split_advertised(advertise)
    except ValueError as exc:
        raise UsageError(f"--advertise: {exc}") from None
    if advertise_host in WILDCARDS:
        raise UsageError(f"--advertise {advertise}: other nodes cannot reach a wildcard "
                         "address")


def _cluster_volumes(cluster: Path, image: Path) -> list[Path]:
    from csvfs.balance import read_cluster_file

    images = read_cluster_file(cluster)
    if image.resolve() not in images:
        raise UsageError(f"--cluster {cluster} does not list {image}")
    return images


def cmd_mount(args) -> int:
    from csvfs import fuse_shim

    fuse_shim.load()  # must precede the first import of pyfuse3
    from csvfs import node
    from csvfs.volume.image import default_key_path

    if not 0.3 <= args.lease <= 600:
        raise UsageError("--lease must be between 0.3 and 600 seconds")
    if not 1 <= args.io_timeout <= 86400:
        raise UsageError("--io-timeout must be between 1 and 86400 seconds")
    if args.io_threads is not None and not 0 <= args.io_threads <= 16:
        raise UsageError("--io-threads must be between 0 and 16")
    _check_addresses(args.listen, args.advertise)
    cluster = _cluster_volumes(args.cluster, args.image) if args.cluster else []
    config = node.NodeConfig(
        cluster=cluster,
        io_timeout=args.io_timeout,
        direct_io=args.direct_io,
        io_threads=args.io_threads,
        image=args.image.resolve(),
        mountpoint=args.mountpoint.resolve(),
        key_path=(args.key or default_key_path(args.image)).resolve(),
        name=args.name,
        lease_seconds=args.lease,
        listen_text=args.listen,
        advertise_text=args.advertise or "",
        election=_election(args),
        disk_election_asked=_disk_election_asked(args),
    )
    node.mount(config, foreground=args.foreground)
    return ExitCode.OK


def cmd_fsck(args) -> int:
    from csvfs.fsck import run_fsck

    return run_fsck(args.image, repair=args.repair)


def cmd_events(args) -> int:
    from csvfs.cluster.events import follow, read_events
    from csvfs.volume.image import Volume

    volume = Volume.open(args.image)
    try:
        events = follow(volume) if args.follow else read_events(volume)
        for event in events:
            print(_event_line(event, args.json), flush=args.follow)
    except KeyboardInterrupt:  # the way to stop --follow, as with tail -f
        pass
    finally:
        volume.close()
    return ExitCode.OK


def _event_line(event: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(event)
    if "missed" in event:
        return f"  ... {event['missed']} events overwritten before they could be shown"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["t"] / 1e9))
    return (f"{event['seq']:>6} {stamp} {event['level']:<7} {event['node']:<16} "
            f"{event['kind']:<10} {event['msg']}")


def cmd_status(args) -> int:
    from csvfs.status import run_status
    from csvfs.volume.image import default_key_path

    return run_status(args.image, args.key or default_key_path(args.image), args.json,
                      _election(args))


def cmd_control(args) -> int:
    from csvfs.control import run_control
    from csvfs.volume.image import default_key_path

    action = args.action if args.command == "fault" else f"redirect-{args.action}"
    return run_control(args.image, args.key or default_key_path(args.image), args.node,
                       action, _election(args))


def cmd_move(args) -> int:
    from csvfs.control import run_move
    from csvfs.volume.image import default_key_path

    return run_move(args.image, args.key or default_key_path(args.image), args.to,
                    _election(args))


def cmd_balance(args) -> int:
    from csvfs.control import run_balance

    return run_balance(args.images, args.key, _election(args))


def cmd_backup(args) -> int:
    from csvfs.backup.cli import run

    return run(args)


COMMANDS = {"mkfs": cmd_mkfs, "mount": cmd_mount, "fsck": cmd_fsck, "events": cmd_events,
            "status": cmd_status, "backup": cmd_backup, "fault": cmd_control,
            "redirect": cmd_control, "move": cmd_move,
            "balance": cmd_balance}


def default_node_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def setup_logging(debug: bool, log_file: Path | None, node: str = "") -> None:
    """Log lines name the node, so that the logs of several nodes can be read as one."""
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    who = f"{node.replace('%', '%%')} " if node else ""
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(process)d {who}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO if log_file else logging.WARNING)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "mount":
        args.name = args.name or default_node_name()
    setup_logging(args.debug, getattr(args, "log", None), getattr(args, "name", ""))
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"csvfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())


