"""The `vmload` command: VM-like workloads on a mounted volume, and their verification."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

from csvfs.volume.errors import UserError
from csvfs.volume.sizes import parse_size

from . import stamp
from .record import Facts, Paths, RecordError, read_log
from .verify import Expected, Report, verify
from .vm import VM, Settings, VMError, completed_moves, is_vmload

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_MISMATCH = 1  # verify: some sector does not hold what the VM last wrote there
EXIT_USAGE = 2  # bad command-line argument
EXIT_NOT_FOUND = 3  # no such VM, record or disk, or it cannot be read or created
EXIT_IO = 4  # run: the disk failed under the VM (the record stays valid: verify it)
EXIT_NOT_MOVED = 5  # migrate: the VM is not running, or did not move in time

EPILOG = f"""\
exit codes:
  {EXIT_OK}  success (verify: every sector holds what the VM last wrote there)
  {EXIT_MISMATCH}  verify: mismatches (listed, with the sector, what was expected and found)
  {EXIT_USAGE}  bad command-line argument
  {EXIT_NOT_FOUND}  no such VM or record, or its disk cannot be created, opened or read
  {EXIT_IO}  run: an I/O error on the disk stopped the VM (its record is still valid)
  {EXIT_NOT_MOVED}  migrate: the VM is not running, or did not move within --timeout
  130  interrupted (run: SIGINT or SIGTERM stops it cleanly instead, with exit 0)

The VM's record (what it wrote, per sector) lives in --state, a local directory, not on
the volume: the reference a disk is checked against must not depend on the system under
test. Errors are one line on stderr.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0 or value % stamp.SECTOR:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive multiple of 4K")
    return value


def _blocks(text: str) -> tuple[int, int]:
    """'4k..64k' or '16k'."""
    low, _, high = text.partition("..")
    smallest, largest = _size(low), _size(high or low)
    if largest < smallest:
        raise argparse.ArgumentTypeError(f"{text!r}: the range is empty")
    return smallest, largest


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
        return value
    return parse


def _vm_name(text: str) -> str:
    """A VM's name is a file name on the mount and in the state directory."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a VM name is 1 to 100 letters, digits, '_', '-' or '.', and does "
            "not start with '.' or '-'")
    return text


def _default_state() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "vmload"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmload", description="VM-like disk workloads on a mounted volume.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    state_help = f"the VMs' records (default {_default_state()})"

    run = sub.add_parser("run", help="run one VM: random stamped writes to its disk",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--mount", type=Path, required=True, help="where the VM starts")
    run.add_argument("--vm", type=_vm_name, required=True,
                     help="the VM's name; its disk is MOUNT/VM.img")
    run.add_argument("--state", type=Path, default=_default_state(), help=state_help)
    run.add_argument("--size", type=_size, default=1 << 30,
                     help="disk size when it is created (default 1G)")
    run.add_argument("--block", type=_blocks, default=(4096, 65536),
                     help="write sizes, powers of two from LOW to HIGH (default 4k..64k)")
    run.add_argument("--seconds", type=positive(float), default=30.0)
    run.add_argument("--fsync-every", type=int, default=64, metavar="WRITES",
                     help="fsync after this many writes (default 64; 0: only at the end)")
    run.add_argument("--grow", action="store_true", help="grow the disk now and then")
    run.add_argument("--grow-every", type=positive(float), default=5.0, metavar="SECONDS")
    run.add_argument("--grow-by", type=_size, default=64 << 20, help="(default 64M)")
    run.add_argument("--max-size", type=_size, help="grow no further than this")
    run.add_argument("--migrate-every", type=positive(float), metavar="SECONDS",
                     help="move to the next --peer mount in turn, this often")
    run.add_argument("--peer", type=Path, action="append", default=[], metavar="MOUNT",
                     help="another node's mount to migrate to (repeatable)")
    run.add_argument("--overlap", type=float, default=0.0, metavar="SECONDS",
                     help="during a migration, keep writing on the source this long after "
                     "the target has opened the disk (default 0)")
    run.add_argument("--iodepth", type=positive(int), default=1,
                     help="writes in flight at once, never overlapping (default 1); above "
                     "1 they are issued from threads, and their latencies include the wait "
                     "for Python's GIL once each write has returned")
    run.add_argument("--seed", type=int, help="random seed (default: random)")
    run.add_argument("--no-writer", action="store_true",
                     help="do not register as the disk's writer with its csvfs node (then "
                     "backups of it are crash-consistent)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")

    check = sub.add_parser("verify", help="check a VM's disk against its record",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("--mount", type=Path, required=True, help="any node's mount")
    check.add_argument("--vm", type=_vm_name, required=True)
    check.add_argument("--disk", type=Path,
                       help="check this file instead of the disk on the mount (a restored "
                       "backup, say)")
    point = check.add_mutually_exclusive_group()
    point.add_argument("--at-freeze", type=int, metavar="ID",
                       help="expect exactly the writes before this backup freeze (the id is "
                       "in the backup's manifest)")
    point.add_argument("--at-time", type=int, metavar="NS",
                       help="expect a crash-consistent snapshot taken at this time (ns since "
                       "the epoch, the manifest's time_ns): every write acknowledged before "
                       "it, none issued after it")
    check.add_argument("--state", type=Path, default=_default_state(), help=state_help)
    check.add_argument("--json", action="store_true")

    move = sub.add_parser("migrate", help="move a running VM to another node's mount",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    move.add_argument("--vm", type=_vm_name, required=True)
    move.add_argument("--to", type=Path, required=True, metavar="MOUNT")
    move.add_argument("--state", type=Path, default=_default_state(), help=state_help)
    move.add_argument("--timeout", type=positive(float), default=30.0, metavar="SECONDS")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="vmload: %(message)s")
    command = {"run": cmd_run, "verify": cmd_verify, "migrate": cmd_migrate}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        return 130
    except _Failed as failed:
        print(f"vmload: {failed.message}", file=sys.stderr)
        return failed.code


class _Failed(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def cmd_run(args) -> int:
    if args.migrate_every and not args.peer:
        raise _Failed(EXIT_USAGE, "--migrate-every needs at least one --peer")
    settings = Settings(
        mount=args.mount.resolve(), vm=args.vm, state=args.state, size=args.size,
        block_min=args.block[0], block_max=args.block[1], seconds=args.seconds,
        fsync_every=max(0, args.fsync_every),
        grow_every=args.grow_every if args.grow else None, grow_by=args.grow_by,
        max_size=args.max_size, migrate_every=args.migrate_every,
        peers=[peer.resolve() for peer in args.peer],
        overlap=max(0.0, args.overlap), seed=args.seed, iodepth=args.iodepth,
        writer=not args.no_writer)
    vm = VM(settings)
    try:
        vm.open()
    except (VMError, RecordError) as exc:
        raise _Failed(EXIT_NOT_FOUND, str(exc)) from None
    except OSError as exc:
        raise _Failed(EXIT_NOT_FOUND, f"{args.vm}: {exc.strerror or exc}") from None
    try:
        stats = vm.run()
    finally:
        vm.close()
    summary = stats.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print(_format_run(summary))
    if stats.error:
        print(f"vmload: {args.vm}: stopped by an I/O error: {stats.error}", file=sys.stderr)
        return EXIT_IO
    return EXIT_OK


def _format_run(summary: dict) -> str:
    moves = completed_moves(summary["migrations"])
    handoffs = ", ".join(f"{m['handoff_ms']:.1f}" for m in moves) or "-"
    return (f"{summary['vm']}: {summary['writes']} writes in {summary['seconds']:.1f} s, "
            f"{summary['ops_s']:.0f} ops/s, {summary['mib_s']:.1f} MiB/s, latency p50 "
            f"{summary['p50_ms']} ms p99 {summary['p99_ms']} ms; {summary['fsyncs']} fsyncs, "
            f"{summary['grows']} grows, size {summary['size']}, {len(moves)} migrations "
            f"(handoff ms: {handoffs})")


def cmd_verify(args) -> int:
    paths = Paths.of(args.state, args.vm)
    try:
        facts = Facts.load(paths.facts)
        expected = Expected.replay(read_log(paths.log), facts.size, args.at_freeze,
                                   args.at_time)
    except RecordError as exc:
        raise _Failed(EXIT_NOT_FOUND, str(exc)) from None
    disk = args.disk or args.mount / facts.disk
    try:
        report = verify(disk, args.vm, expected)
    except OSError as exc:
        raise _Failed(EXIT_NOT_FOUND, f"cannot read {disk}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps(_report_json(report, expected)))
    else:
        print(_format_report(report, expected))
    return EXIT_OK if report.ok else EXIT_MISMATCH


def _report_json(report: Report, expected: Expected) -> dict:
    return {"vm": report.vm, "disk": report.path, "size": report.size, "ok": report.ok,
            "sectors": report.checked, "written": report.written,
            "mismatches": report.mismatches, "problem": report.problem,
            "listed": [m.__dict__ for m in report.listed], "writes": expected.writes,
            "in_flight": len(expected.in_flight), "clean_end": expected.clean}


def _format_report(report: Report, expected: Expected) -> str:
    verdict = "OK" if report.ok else f"{report.mismatches} MISMATCHES"
    lines = [f"{report.vm}: {verdict}: {report.checked} sectors of {report.path} checked, "
             f"{report.written} written by {expected.writes} writes"
             + ("" if expected.clean else
                f"; the run did not end cleanly ({len(expected.in_flight)} sectors in flight)")]
    if report.problem:
        lines.append(f"  {report.problem}")
    for mismatch in report.listed:
        lines.append(f"  sector {mismatch.sector}: expected {mismatch.expected}, "
                     f"found {mismatch.found}")
    if report.mismatches > len(report.listed):
        lines.append(f"  ... and {report.mismatches - len(report.listed)} more")
    return "\n".join(lines)


def cmd_migrate(args) -> int:
    paths = Paths.of(args.state, args.vm)
    try:
        facts = Facts.load(paths.facts)
    except RecordError as exc:
        raise _Failed(EXIT_NOT_FOUND, str(exc)) from None
    if not args.to.is_dir():
        raise _Failed(EXIT_USAGE, f"{args.to} is not a directory")
    if not is_vmload(facts.pid):
        raise _Failed(EXIT_NOT_MOVED, f"{args.vm} is not running (pid {facts.pid})")
    moves = len(facts.migrations)
    paths.request.write_text(f"{args.to.resolve()}\n")
    try:
        os.kill(facts.pid, signal.SIGUSR1)
    except (ProcessLookupError, PermissionError):
        paths.request.unlink(missing_ok=True)
        raise _Failed(EXIT_NOT_MOVED, f"{args.vm} is not running (pid {facts.pid})") from None
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            now = Facts.load(paths.facts)
        except RecordError:
            continue  # being replaced
        if len(now.migrations) > moves:
            move = now.migrations[-1]
            if "error" in move:
                raise _Failed(EXIT_NOT_MOVED, f"{args.vm} stays on {move['from']}: "
                                              f"{move['error']}")
            print(f"{args.vm}: moved from {move['from']} to {move['to']} "
                  f"(handoff {move['handoff_ms']:.1f} ms)")
            return EXIT_OK
    raise _Failed(EXIT_NOT_MOVED, f"{args.vm} did not move within {args.timeout:g} s")
