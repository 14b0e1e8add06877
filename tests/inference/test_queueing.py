"""The fair queue in front of the engines (inference.queueing), on its own: no engine, no database."""

from __future__ import annotations

import asyncio
import threading

import pytest

from inference.errors import Overloaded, RateLimited
from inference.queueing import Pool, Slot

pytestmark = pytest.mark.asyncio


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def queue_up(
    pool: Pool, tenant_id: int, n: int, cls: str = "interactive", limit: int = 1000
) -> list[asyncio.Task]:
    tasks = [asyncio.ensure_future(pool.acquire(tenant_id, limit, cls)) for _ in range(n)]
    await settle()
    return tasks


async def drain(pool: Pool, first: list[Slot], waiting: list[asyncio.Task]) -> list[int]:
    """Release slots one at a time; the tenant of each waiter as it gets one, in order."""
    order: list[int] = []
    running = list(first)
    pending = set(waiting)
    while pending:
        running.pop(0).release()
        await settle()
        for task in [t for t in waiting if t in pending and t.done()]:
            pending.discard(task)
            slot = task.result()
            order.append(slot.tenant_id)
            running.append(slot)
    for slot in running:
        slot.release()
    return order


async def test_a_free_slot_is_taken_at_once_and_given_back():
    pool = Pool("p", 2)
    a, b = await pool.acquire(1, 10), await pool.acquire(2, 10)
    assert pool.running == 2 and pool.running_for(1) == 1
    a.release()
    a.release()  # idempotent
    assert pool.running == 1
    b.release()
    assert pool.running == 0 and pool.waiting() == 0


async def test_a_burst_from_one_tenant_does_not_push_back_another_tenants_few():
    pool = Pool("p", 1)
    first = [await pool.acquire(0, 10)]
    greedy = await queue_up(pool, 1, 20)
    modest = await queue_up(pool, 2, 4)  # arrive after all twenty
    order = await drain(pool, first, greedy + modest)
    assert order.count(2) == 4
    # start-time fair queueing: the modest tenant's four go out alternating with the greedy one's
    assert [i for i, t in enumerate(order) if t == 2] == [1, 3, 5, 7]


async def test_three_tenants_bursting_at_once_share_slots_evenly():
    pool = Pool("p", 3)
    first = [await pool.acquire(0, 10) for _ in range(3)]
    tasks = []
    for _ in range(10):  # interleaved arrivals of unequal bursts
        for tenant, n in ((1, 3), (2, 1), (3, 2)):
            tasks += await queue_up(pool, tenant, n)
    order = await drain(pool, first, tasks)
    head = order[:30]  # while all three still wait, each gets a third
    assert {t: head.count(t) for t in (1, 2, 3)} == {1: 10, 2: 10, 3: 10}


async def test_interactive_requests_go_before_batch_ones():
    pool = Pool("p", 1)
    first = [await pool.acquire(0, 10)]
    batch = await queue_up(pool, 1, 3, "batch")
    interactive = await queue_up(pool, 2, 3, "interactive")
    order = await drain(pool, first, batch + interactive)
    assert order == [2, 2, 2, 1, 1, 1]


async def test_a_tenant_at_its_stream_limit_waits_while_others_go_ahead():
    pool = Pool("p", 4)
    mine = [await pool.acquire(1, 2) for _ in range(2)]
    blocked = await queue_up(pool, 1, 1, limit=2)
    other = await pool.acquire(2, 2)  # a slot is free, and tenant 2 is under its limit: no wait
    assert not blocked[0].done() and pool.running == 3
    mine[0].release()
    await settle()
    assert blocked[0].done() and blocked[0].result().tenant_id == 1
    for slot in (mine[1], other, blocked[0].result()):
        slot.release()


async def test_a_waiter_that_gives_up_leaves_no_trace_and_no_slot_is_lost():
    pool = Pool("p", 1)
    held = await pool.acquire(1, 10)
    gone, stays = await queue_up(pool, 2, 1) + await queue_up(pool, 3, 1)
    gone.cancel()
    await settle()
    assert pool.waiting() == 1 and pool.waiting(2) == 0
    held.release()
    await settle()
    assert stays.done() and stays.result().tenant_id == 3
    stays.result().release()
    assert pool.running == 0


async def test_a_slot_handed_to_a_waiter_that_just_gave_up_goes_on_to_the_next():
    pool = Pool("p", 1)
    held = await pool.acquire(1, 10)
    first, second = await queue_up(pool, 2, 1) + await queue_up(pool, 3, 1)
    held.release()  # handed to `first` (its future resolves on the loop's next turn) ...
    first.cancel()  # ... which gives up in the same turn
    await settle()
    assert first.cancelled() and second.done() and second.result().tenant_id == 3
    second.result().release()
    assert pool.running == 0 and pool.waiting() == 0


async def test_the_deadline_refuses_with_503_and_retry_after(settings):
    settings.TANDEM_QUEUE_DEADLINE_S = {"interactive": 0.05, "batch": 10}
    pool = Pool("p", 1)
    held = await pool.acquire(1, 10)
    with pytest.raises(Overloaded) as refused:
        await pool.acquire(2, 10)
    assert refused.value.code == "queue_timeout" and refused.value.retry_after >= 1
    assert pool.waiting() == 0
    held.release()
    assert pool.running == 0


async def test_a_wait_the_recent_pace_says_is_past_the_deadline_is_refused_at_once(settings):
    settings.TANDEM_QUEUE_DEADLINE_S = {"interactive": 4.5, "batch": 4.5}
    pool = Pool("p", 2)
    pool.hold_s = 2.0  # slots have been held two seconds each
    held = [await pool.acquire(1, 10) for _ in range(2)]
    waiting = await queue_up(pool, 1, 4)  # expected waits 1, 2, 3, 4 s: inside the deadline
    assert not any(t.done() for t in waiting)
    with pytest.raises(Overloaded) as refused:  # the fifth would wait about 5 s
        await pool.acquire(2, 10)
    assert refused.value.code == "queue_full" and refused.value.retry_after >= 5
    for task in waiting:
        task.cancel()
    for slot in held:
        slot.release()


async def test_queue_bounds_say_429_for_a_tenants_share_and_503_for_the_whole(settings):
    settings.TANDEM_MAX_QUEUED = 3
    settings.TANDEM_MAX_QUEUED_PER_TENANT = 2
    pool = Pool("p", 1)
    held = await pool.acquire(1, 10)
    waiting = await queue_up(pool, 1, 2)
    with pytest.raises(RateLimited) as share:
        await pool.acquire(1, 10)
    assert share.value.code == "too_many_queued"
    waiting += await queue_up(pool, 2, 1)
    with pytest.raises(Overloaded):
        await pool.acquire(3, 10)
    for task in waiting:
        task.cancel()
    held.release()


async def test_waiters_hear_their_place_and_it_only_improves():
    pool = Pool("p", 1)
    held = await pool.acquire(1, 10)
    heard: list[list[int]] = [[], [], []]
    tasks = [asyncio.ensure_future(pool.acquire(2 + i, 10, "interactive", heard[i].append)) for i in range(3)]
    await settle()
    assert [h[0] for h in heard] == [1, 2, 3]
    held.release()
    await settle()
    assert tasks[0].done() and heard[0] == [1]
    assert all(h == sorted(h, reverse=True) for h in heard)
    for task in tasks[1:]:
        task.cancel()
    tasks[0].result().release()


async def test_a_slot_given_back_on_another_thread_wakes_the_waiter_on_its_loop():
    pool = Pool("p", 1)
    held = await pool.acquire(1, 10)
    waiter = asyncio.ensure_future(pool.acquire(2, 10))
    await settle()
    thread = threading.Thread(target=held.release)
    thread.start()
    thread.join()
    slot = await asyncio.wait_for(waiter, 2)
    assert slot.tenant_id == 2 and slot.waited_s > 0
    slot.release()


async def test_a_request_waiting_for_a_slot_is_no_longer_counted_on_its_way():
    """Where it waits there is no telling when it starts: a scheduler opening sessions does not wait for it."""
    from inference.arrivals import counted_arrival
    from speculative.arrivals import ARRIVALS

    pool = Pool("p", 1)
    first = await pool.acquire(1, 10)
    before = ARRIVALS.coming

    @counted_arrival
    async def view() -> Slot:
        assert ARRIVALS.coming == before + 1  # on its way
        return await pool.acquire(2, 10)

    waiting = asyncio.ensure_future(view())
    await settle()
    assert pool.waiting() == 1 and ARRIVALS.coming == before
    first.release()
    (await asyncio.wait_for(waiting, 5)).release()
    assert ARRIVALS.coming == before
