"""`csvfs fault` and `csvfs redirect`: ask one node, through the volume's
coordinator, to lose or regain its path to the image, or to send its I/O through
the coordinator on purpose (csvfs/redirect.py tells the protocol).

    csvfs fault IMAGE --node NAME storage-down|storage-up
    csvfs redirect IMAGE --node NAME on|off
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import trio

from csvfs.cluster import messages
from csvfs.cluster.errors import MetaError
from csvfs.cluster.rpc_client import RpcClient
from csvfs.cluster.transport import split_address
from csvfs.cluster.wire import RpcError
from csvfs.redirect import REDIRECT_OFF, REDIRECT_ON
from csvfs.status import ASK_TIMEOUT, CoordinatorUnreachable, find_coordinator
from csvfs.volume.errors import ExitCode, UserError

CONTROL_TIMEOUT = ASK_TIMEOUT + 5.0  # the coordinator waits up to 5 s for the node


class NoSuchNode(UserError):
    exit_code = ExitCode.NO_SUCH_NODE


def run_control(image: Path, key_path: Path, node: str, action: str) -> int:
    name, address, key = find_coordinator(image, key_path)
    try:
        answer = trio.run(_ask, address, key, node, action)
    except MetaError as exc:
        if exc.errno == errno.ENOENT:
            raise NoSuchNode(f"{image}: {exc}") from None
        raise CoordinatorUnreachable(f"coordinator {name} at {address}: {exc}") from None
    except (RpcError, OSError, ValueError, trio.TooSlowError) as exc:
        reason = str(exc) or f"no answer within {CONTROL_TIMEOUT:g} s"
        raise CoordinatorUnreachable(f"coordinator {name} at {address} did not answer: "
                                     f"{reason}") from None
    print(_describe(node, action, answer))
    return ExitCode.OK


def _describe(node: str, action: str, answer: dict) -> str:
    mode = answer["mode"]
    reason = f" ({answer['reason']})" if answer.get("reason") else ""
    if action in (REDIRECT_ON, REDIRECT_OFF):
        return f"{node}: {mode}{reason}"
    effect = ("its I/O on the image now fails with EIO, and goes through the coordinator"
              if action == "storage-down" else "its path to the image works again; it goes "
              "back to direct I/O at its next probe")
    return f"{node}: {action}: {effect}; I/O mode now {mode}{reason}"


async def _ask(address: str, key: bytes, node: str, action: str) -> dict:
    host, port = split_address(address)
    with trio.fail_after(CONTROL_TIMEOUT):
        async with await RpcClient.connect(host, port, key, f"control-{os.getpid()}",
                                           timeout=ASK_TIMEOUT) as client:
            return await client.call(messages.CONTROL, {"node": node, "action": action},
                                     timeout=CONTROL_TIMEOUT)
