"""Take a snapshot as a backup would, say so, and then do nothing until killed.

    python -m tests.snapshot_taker IMAGE TIMEOUT_SECONDS
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from csvfs.backup.requester import Requester
from csvfs.cluster import messages


async def main(image: Path, timeout: float) -> None:
    async with Requester.connect(image, None, timeout) as requester:
        point = await requester.call(messages.SNAPSHOT_TAKE, timeout=timeout)
        print(f"snapshot {point['id']}", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), float(sys.argv[2]))
