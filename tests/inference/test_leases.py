"""The gateway on budget leases: requests paid for in memory, charged exactly in batches, falling back to reservations."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest
from asgiref.sync import sync_to_async

from config.asgi import application
from inference import gateway
from inference.errors import BudgetExceeded, InvalidRequest
from tenants.models import Budget, BudgetLease, Reservation, UsageRecord
from tenants.selectors import price_active
from tenants.services import budget_set, cost_estimate_max
from tests.inference.test_consumers import key_socket, receive, run_to_end, start, tokens_of, tokens_until_end
from tests.inference.test_openai_api import HELLO, MODEL

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


@pytest.fixture(autouse=True)
def leases_on(settings) -> Iterator[None]:
    settings.TANDEM_BUDGET_LEASES = True
    settings.TANDEM_SETTLE_AFTER_REPLY = True
    settings.TANDEM_LEASE_REQUESTS = 8
    settings.TANDEM_LEASE_MIN_REQUESTS = 4
    gateway.leases.forget_all()
    yield
    gateway.leases.close_all()
    gateway.leases.forget_all()


def call(**kwargs) -> gateway.CompletionCall:
    return gateway.CompletionCall(**{"model": MODEL, "prompt": "Hello there", "max_tokens": 12, **kwargs})


async def principal(account) -> gateway.Principal:
    return await gateway.authenticate_api_key(account.raw_key)


async def set_budget(account, limit: str) -> None:
    await sync_to_async(budget_set)(tenant=account.tenant, period="month", hard_limit=Decimal(limit), soft_limit=None)


async def budget_of(account) -> Budget:
    return await Budget.objects.aget(tenant=account.tenant)


async def test_requests_go_through_one_lease_with_no_reservation_row_and_are_charged_exactly(account):
    await set_budget(account, "100")
    streams = []
    for _ in range(5):
        stream = await gateway.start(await principal(account), call())
        await gateway.collect(stream, ledger_written=False)
        streams.append(stream)
    await gateway.ledger_writes_flush()
    assert await Reservation.objects.acount() == 0
    lease = await BudgetLease.objects.aget()
    for stream in streams:
        row = await UsageRecord.objects.aget(request_id=stream.request_id)
        assert row.lease_id == lease.pk and row.completion_tokens == 12
        assert row.cost_total == stream.usage.cost["total"] > 0
    total = sum(s.usage.cost["total"] for s in streams)
    assert lease.charged == total
    budget = await budget_of(account)
    assert budget.spent == total and budget.reserved == lease.amount - total


async def test_cancelled_and_disconnected_streams_on_a_lease_charge_exactly_what_was_delivered(account):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=4000))
    started = await receive(ws)
    received = [t for _ in range(3) for t in tokens_of(await receive(ws))]
    await ws.send_json_to({"type": "cancel", "id": "s1"})
    later, frame = await tokens_until_end(ws)
    received += later
    assert frame["type"] == "done"
    await gateway.ledger_writes_flush()
    row = await UsageRecord.objects.aget(request_id=started["request_id"])
    assert row.lease_id is not None and row.completion_tokens == len(received) == frame["usage"]["completion_tokens"]
    assert row.cost_total == Decimal(frame["usage"]["cost"]["total"])
    await ws.send_json_to(start("s2", max_tokens=4000))
    started = await receive(ws)
    assert (await receive(ws))["type"] == "delta"
    await ws.disconnect()
    await gateway.ledger_writes_flush()
    row = await UsageRecord.objects.aget(request_id=started["request_id"])
    assert row.outcome == "cancelled" and row.completion_tokens >= 1


async def test_a_full_websocket_stream_on_a_lease_reports_the_cost_the_ledger_gets(account):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=10, stop=["edge"]))
    started, deltas, done = await run_to_end(ws, "s1")
    await gateway.ledger_writes_flush()
    row = await UsageRecord.objects.aget(request_id=started["request_id"])
    assert row.lease_id is not None and row.completion_tokens == len(deltas)
    assert row.cost_total == Decimal(done["usage"]["cost"]["total"])
    await ws.disconnect()


async def test_bad_input_on_leases_charges_nothing_and_holds_nothing(account):
    await set_budget(account, "100")
    with pytest.raises(InvalidRequest):
        await gateway.start(await principal(account), call(max_tokens=0))
    engine_fails_at_once = call(model="tandem-test-broken", max_tokens=3)
    stream = await gateway.start(await principal(account), engine_fails_at_once)  # fails after 6 tokens: 3 is fine
    await gateway.collect(stream)
    await gateway.ledger_writes_flush()
    assert await UsageRecord.objects.acount() == 1
    lease = gateway.leases.leases()
    assert all(item.in_flight == 0 and item.requests == 0 for item in lease)


async def test_a_client_chosen_request_id_is_reserved_for_not_leased(account):
    """A client's own X-Request-Id is checked for reuse by the reservation row; a minted one skips it."""
    await set_budget(account, "100")
    transport = httpx.ASGITransport(app=application)
    headers = {"Authorization": f"Bearer {account.raw_key}"}
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as http:
        mine = await http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "mine-0001"})
        again = await http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "mine-0001"})
        minted = await http.post("/v1/chat/completions", json=body)
        posing = await http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "req_posing-as-minted"})
    assert mine.status_code == 200 and again.status_code == 409
    assert minted.status_code == 200 and posing.status_code == 200
    assert posing.headers["x-request-id"] != "req_posing-as-minted"  # replaced with a minted one
    await gateway.ledger_writes_flush()
    reserved = await UsageRecord.objects.aget(request_id="mine-0001")
    leased = await UsageRecord.objects.aget(request_id=minted.headers["x-request-id"])
    assert reserved.reservation_id is not None and reserved.lease_id is None
    assert leased.lease_id is not None and leased.reservation_id is None


async def test_a_budget_too_near_its_limit_for_a_lease_reserves_per_request_and_refuses_at_the_limit(account):
    price = await sync_to_async(price_active)(model=MODEL, tier="speculative")
    worst = cost_estimate_max(price=price, prompt_tokens=len("Hello there"), max_tokens=12)
    # Room for 3 worst cases: a quarter of it is less than TANDEM_LEASE_MIN_REQUESTS (4) of them.
    await set_budget(account, str(worst * 3))
    served = []
    for _ in range(3):
        stream = await gateway.start(await principal(account), call())
        await gateway.collect(stream)
        served.append(stream)
    assert not await BudgetLease.objects.aexists()
    assert await Reservation.objects.filter(status="settled").acount() == 3
    spent = (await budget_of(account)).spent
    assert spent == sum(s.usage.cost["total"] for s in served)
    # what is left is less than a worst case only if the three cost it all; else one more fits
    deadline = time.monotonic() + 30  # each request spends money, so the refusal must come; never hang for it
    more = 0
    while True:
        if time.monotonic() > deadline:
            budget = await budget_of(account)
            pytest.fail(
                f"no BudgetExceeded within 30 s: {more} more requests were admitted past the first 3 "
                f"(spent {budget.spent}, reserved {budget.reserved}, hard limit {budget.hard_limit})"
            )
        try:
            stream = await gateway.start(await principal(account), call())
        except BudgetExceeded:
            break
        await gateway.collect(stream)
        more += 1
    budget = await budget_of(account)
    assert budget.spent + budget.reserved <= budget.hard_limit and budget.reserved == 0


async def test_a_used_up_lease_is_replaced_by_a_new_one_and_returned_once_drained(account, settings):
    await set_budget(account, "100")
    settings.TANDEM_LEASE_REQUESTS = 4  # each lease admits 4 worst cases at once
    running = [await gateway.start(await principal(account), call()) for _ in range(4)]
    assert await BudgetLease.objects.acount() == 1
    fifth = await gateway.start(await principal(account), call())  # no room left: a second lease
    assert await BudgetLease.objects.acount() == 2 and not await Reservation.objects.aexists()
    for stream in [*running, fifth]:
        await gateway.collect(stream)
    first, second = [lease async for lease in BudgetLease.objects.order_by("created_at")]
    await asyncio.to_thread(gateway.leases.tick)  # the first one is drained: returned
    await first.arefresh_from_db()
    assert first.status == "closed" and first.charged == sum(s.usage.cost["total"] for s in running)
    await second.arefresh_from_db()
    assert second.status == "active" and second.charged == fifth.usage.cost["total"]
    budget = await budget_of(account)
    assert budget.reserved == second.amount - second.charged
    assert budget.spent == first.charged + second.charged


async def test_a_caller_cannot_choose_a_request_id_in_the_servers_namespace(account):
    with pytest.raises(InvalidRequest, match="server's"):
        await gateway.start(await principal(account), call(request_id="req_0123456789abcdef"))
