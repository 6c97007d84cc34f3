"""`csvfs fault`, `csvfs redirect` and `csvfs move`: ask the volume's coordinator
to have one node lose or regain its path to the image, or send its I/O through the
coordinator on purpose (csvfs/redirect.py tells the protocol), or to hand its own
role to another node (csvfs/move.py).

    csvfs fault IMAGE --node NAME storage-down|storage-up
    csvfs redirect IMAGE --node NAME on|off
    csvfs move IMAGE [--to NODE]
    csvfs balance IMAGE...
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import trio

from csvfs.balance import plan, read_cluster, role_counts
from csvfs.cluster import elections, messages
from csvfs.cluster.errors import MetaError, is_not_coordinator
from csvfs.cluster.rpc_client import RpcClient
from csvfs.cluster.transport import split_address
from csvfs.cluster.wire import RpcError
from csvfs.redirect import REDIRECT_OFF, REDIRECT_ON
from csvfs.status import ASK_TIMEOUT, MOVE_WAIT, CoordinatorUnreachable, find_coordinator
from csvfs.volume.errors import ExitCode, UserError
from csvfs.volume.image import Volume, default_key_path

CONTROL_TIMEOUT = ASK_TIMEOUT + 5.0  # the coordinator waits up to 5 s for the node


HEIR_WAIT = 10.0  # seconds for the heir to take the lease


class NoSuchNode(UserError):
    exit_code = ExitCode.NO_SUCH_NODE


class CannotMove(UserError):
    exit_code = ExitCode.CANNOT_MOVE


def run_control(image: Path, key_path: Path, node: str, action: str, election: str = "") -> int:
    answer = _request(image, key_path, messages.CONTROL, {"node": node, "action": action},
                      election)
    print(_describe(node, action, answer))
    return ExitCode.OK


def run_move(image: Path, key_path: Path, heir: str, election: str = "") -> int:
    started = time.monotonic()
    try:
        answer = _request(image, key_path, messages.MOVE, {"to": heir}, election)
    except AlreadyThere as exc:
        print(exc)
        return ExitCode.OK
    owner = _wait_for_owner(image, answer["to"], election)
    print(f"coordinator of {image} moved from {answer['from']} to {owner.owner_name} "
          f"(epoch {owner.epoch}) in {(time.monotonic() - started) * 1e3:.0f} ms")
    return ExitCode.OK


def run_balance(images: list[Path], key_path: Path | None, election: str = "") -> int:
    """Make the moves that even the coordinator roles out over these volumes."""
    volumes = read_cluster([image.resolve() for image in images], election)
    moves = plan(volumes)
    for move in moves:
        image = Path(move.image)
        key = key_path or default_key_path(image)
        _request(image, key, messages.MOVE, {"to": move.target}, election)
        _wait_for_owner(image, move.target, election)
        print(f"{image}: moved the coordinator role from {move.source} to {move.target}")
    counts = role_counts(read_cluster([image.resolve() for image in images], election))
    summary = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
    print(f"{'balanced' if moves else 'already balanced'}: coordinator roles per node: "
          f"{summary or 'none (no volume is mounted)'}")
    return ExitCode.OK


class AlreadyThere(Exception):
    pass


def _wait_for_owner(image: Path, heir: str, election: str = ""):
    deadline = time.monotonic() + HEIR_WAIT
    while True:
        volume = Volume.open(image)
        try:
            lease = elections.view(election, volume).lease
        finally:
            volume.close()
        if lease.owner_name == heir and lease.expiry_ns > time.time_ns():
            return lease
        if time.monotonic() > deadline:
            raise CannotMove(f"{image}: {heir} did not take the coordinator role within "
                             f"{HEIR_WAIT:g} s (csvfs events {image} may say why)")
        time.sleep(0.01)


def _request(image: Path, key_path: Path, method: str, args: dict,
             election: str = "") -> dict:
    """One request to the volume's coordinator; its errors as user errors. A coordinator
    that has just handed the role on is asked again, as the new one."""
    deadline = time.monotonic() + MOVE_WAIT
    while True:
        name, address, key = find_coordinator(image, key_path, election)
        try:
            return trio.run(_ask, address, key, method, args)
        except MetaError as exc:
            if not is_not_coordinator(exc) or time.monotonic() > deadline:
                _refused(image, name, address, exc)
        except (RpcError, OSError, ValueError, trio.TooSlowError) as exc:
            reason = str(exc) or f"no answer within {CONTROL_TIMEOUT:g} s"
            raise CoordinatorUnreachable(f"coordinator {name} at {address} did not answer: "
                                         f"{reason}") from None
        time.sleep(0.02)


def _refused(image: Path, name: str, address: str, exc: MetaError) -> None:
    """The coordinator's refusal, as the user error it is."""
    if exc.errno == errno.ENOENT:
        raise NoSuchNode(f"{image}: {exc}") from None
    if exc.errno == errno.EALREADY:
        raise AlreadyThere(str(exc)) from None
    if exc.errno == errno.EHOSTUNREACH:
        raise CannotMove(f"{image}: {exc}") from None
    raise CoordinatorUnreachable(f"coordinator {name} at {address}: {exc}") from None


def _describe(node: str, action: str, answer: dict) -> str:
    mode = answer["mode"]
    reason = f" ({answer['reason']})" if answer.get("reason") else ""
    if action in (REDIRECT_ON, REDIRECT_OFF):
        return f"{node}: {mode}{reason}"
    effect = ("its I/O on the image now fails with EIO, and goes through the coordinator"
              if action == "storage-down" else "its path to the image works again; it goes "
              "back to direct I/O at its next probe")
    return f"{node}: {action}: {effect}; I/O mode now {mode}{reason}"


async def _ask(address: str, key: bytes, method: str, args: dict) -> dict:
    host, port = split_address(address)
    with trio.fail_after(CONTROL_TIMEOUT):
        async with await RpcClient.connect(host, port, key, f"control-{os.getpid()}",
                                           timeout=ASK_TIMEOUT) as client:
            return await client.call(method, args, timeout=CONTROL_TIMEOUT)
