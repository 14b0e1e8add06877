"""``runtime.db_read_once``: the callers that miss a cache together share one read of the database."""

from __future__ import annotations

import asyncio
import threading

import pytest

from inference import runtime
from inference.runtime import db_read_once

pytestmark = [pytest.mark.django_db, pytest.mark.asyncio]


class Read:
    """A read that waits on the DB thread until the test lets it go, counting its runs."""

    def __init__(self, answer: object = None, error: BaseException | None = None) -> None:
        self.answer, self.error = answer, error
        self.runs: list[tuple] = []
        self.go = threading.Event()

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.runs.append((args, kwargs))
        assert self.go.wait(5)
        if self.error is not None:
            raise self.error
        return self.answer


async def _until_running(read: Read, runs: int = 1) -> None:
    for _ in range(2500):
        if len(read.runs) >= runs:
            return
        await asyncio.sleep(0.002)
    raise AssertionError("the read never started")


async def test_callers_of_one_key_share_one_read_and_its_answer():
    read = Read(answer=object())
    callers = [asyncio.ensure_future(db_read_once(("price", "m", "edge"), read, model="m")) for _ in range(4)]
    await _until_running(read)
    await asyncio.sleep(0.01)  # the others have asked meanwhile
    read.go.set()
    answers = await asyncio.gather(*callers)
    assert read.runs == [((), {"model": "m"})]
    assert all(answer is read.answer for answer in answers)
    assert runtime._reads_in_flight == {}


async def test_an_error_reaches_every_caller_of_the_read():
    read = Read(error=LookupError("no active price"))
    callers = [asyncio.ensure_future(db_read_once("key", read)) for _ in range(3)]
    await _until_running(read)
    read.go.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert len(read.runs) == 1
    assert all(isinstance(r, LookupError) and str(r) == "no active price" for r in results)


async def test_a_caller_that_leaves_does_not_cancel_the_read_for_the_others():
    read = Read(answer="policy")
    first = asyncio.ensure_future(db_read_once(("routing policy", 7), read))
    await _until_running(read)
    second = asyncio.ensure_future(db_read_once(("routing policy", 7), read))
    await asyncio.sleep(0.01)
    first.cancel()  # its client disconnected
    with pytest.raises(asyncio.CancelledError):
        await first
    read.go.set()
    assert await second == "policy"
    assert len(read.runs) == 1


async def test_other_keys_and_later_calls_read_again():
    read = Read(answer="row")
    read.go.set()
    assert await asyncio.gather(db_read_once("a", read), db_read_once("b", read)) == ["row", "row"]
    assert await db_read_once("a", read) == "row"  # nothing is kept once the read has ended: caching is the caller's
    assert len(read.runs) == 3


async def test_a_read_left_by_another_event_loop_is_not_awaited():
    # a Celery job's loop (asyncio.run) that stopped mid-read leaves its task behind: the next loop reads anew
    stuck = asyncio.new_event_loop()
    try:
        left = stuck.create_future()
        runtime._reads_in_flight["k"] = left
        read = Read(answer="fresh")
        read.go.set()
        assert await db_read_once("k", read) == "fresh"
        assert len(read.runs) == 1 and "k" not in runtime._reads_in_flight
    finally:
        runtime._reads_in_flight.pop("k", None)
        stuck.close()
