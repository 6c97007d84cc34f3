"""The event-loop watchdog, in-process: a blocked loop is reported with its stack."""

import logging
import time

import pytest
import trio

from csvfs.watchdog import LoopWatchdog

pytestmark = pytest.mark.timeout(30)


def block_the_loop_synchronously(seconds: float) -> None:
    time.sleep(seconds)


async def run_with_watchdog(body) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(LoopWatchdog(threshold=0.2).run)
        await trio.sleep(0.2)
        await body()
        await trio.sleep(0.3)  # the watchdog sees the loop run again
        nursery.cancel_scope.cancel()


def test_a_blocked_loop_is_reported_with_where_it_blocks(caplog):
    async def body():
        block_the_loop_synchronously(0.6)

    with caplog.at_level(logging.WARNING, logger="csvfs.watchdog"):
        trio.run(run_with_watchdog, body)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert "event loop stalled" in messages[0]
    assert "block_the_loop_synchronously" in messages[0]
    assert "ran again after a stall of about 0." in messages[1]


def test_a_busy_but_yielding_loop_is_not_reported(caplog):
    async def body():
        for _ in range(40):
            block_the_loop_synchronously(0.01)
            await trio.sleep(0)

    with caplog.at_level(logging.WARNING, logger="csvfs.watchdog"):
        trio.run(run_with_watchdog, body)
    assert caplog.records == []
