"""csvfs/cluster/blocking.py: blocking calls on a thread of their own, in process."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from csvfs.cluster.blocking import BlockingCalls

pytestmark = pytest.mark.timeout(30)


async def test_calls_run_on_the_thread_and_their_results_and_errors_come_back():
    calls = BlockingCalls("test")
    caller = threading.get_ident()
    total, thread = await calls.run(lambda a, b: (a + b, threading.get_ident()), 2, 3)
    assert total == 5 and thread != caller
    with pytest.raises(OSError, match="disk on fire"):
        await calls.run(_fail, "disk on fire")
    assert await calls.run(len, "still serving") == 13


async def test_calls_from_many_tasks_run_one_at_a_time_each_getting_its_own_result():
    calls = BlockingCalls("test")
    running, overlaps, results = [0], [], {}

    def slow_square(value: int) -> int:
        running[0] += 1
        overlaps.append(running[0])
        time.sleep(0.002)
        running[0] -= 1
        return value * value

    async def ask(value: int) -> None:
        results[value] = await calls.run(slow_square, value)

    async with trio.open_nursery() as nursery:
        for value in range(20):
            nursery.start_soon(ask, value)
    assert results == {value: value * value for value in range(20)}
    assert max(overlaps) == 1


async def test_a_cancelled_caller_waits_for_its_call_and_the_next_gets_its_own_result():
    calls = BlockingCalls("test")
    finished = []

    def slow(value: int) -> int:
        time.sleep(0.2)
        finished.append(value)
        return value

    with trio.move_on_after(0.05):
        await calls.run(slow, 1)
    assert finished == [1]  # the call ran to its end before the caller went
    assert await calls.run(int, 7) == 7


def _fail(message: str) -> None:
    raise OSError(message)
