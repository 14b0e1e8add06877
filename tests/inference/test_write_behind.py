"""Write-behind settlement: the final frame goes out first, then the ledger row; the row is exact and written once.

With ``TANDEM_SETTLE_AFTER_REPLY`` on (production's default), a stream's usage and cost are
worked out in memory and sent in its last frame (``done``, the finish/usage chunks and
``[DONE]``); its ledger row and SLO sample are written after. These tests check, for the
websocket and SSE, that a full, stopped, cancelled or disconnected stream still charges
exactly what it delivered, at exactly the cost the client was told; that bad input still
charges nothing; and that a failed write is logged as an error, never swallowed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest

from config.asgi import application
from inference import gateway, settlement
from inference.models import SloSample
from tenants.models import Reservation, UsageRecord
from tests.inference.conftest import GatedEngine, serving_gated
from tests.inference.test_consumers import key_socket, receive, receive_tokens, run_to_end, start
from tests.inference.test_openai_api import HELLO, MODEL, api_scope, asgi_post, content_of, sse_data

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


@pytest.fixture(autouse=True)
def write_behind(settings):
    settings.TANDEM_SETTLE_AFTER_REPLY = True


@pytest.fixture
def gated() -> Iterator[GatedEngine]:
    """``tandem-test`` served by an engine that emits a token only when the test releases one."""
    with serving_gated(GatedEngine()) as engine:
        yield engine


@pytest.fixture
def held_writes(monkeypatch) -> Iterator[threading.Event]:
    """Ledger writes wait (on their DB thread) until the test sets the event: proof that a frame came first."""
    gate = threading.Event()
    original = settlement._settle_write

    def held(*args, **kwargs):
        assert gate.wait(10), "the test never let the ledger write go"
        return original(*args, **kwargs)

    monkeypatch.setattr(settlement, "_settle_write", held)
    yield gate
    gate.set()


async def ledger_row(request_id: str) -> UsageRecord:
    await gateway.ledger_writes_flush()
    return await UsageRecord.objects.aget(request_id=request_id)


def cost_of(usage: dict) -> Decimal:
    return Decimal(usage["cost"]["total"])


# websocket ----------------------------------------------------------------------------------------
async def test_the_done_frame_goes_out_before_the_ledger_row_and_carries_its_exact_cost(account, held_writes):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=12))
    started, deltas, done = await run_to_end(ws, "s1")
    assert done["type"] == "done" and len(deltas) == done["usage"]["completion_tokens"] == 12
    # the done frame arrived while the ledger write was still held back
    assert not await UsageRecord.objects.filter(request_id=started["request_id"]).aexists()
    assert await Reservation.objects.filter(status="held").acount() == 1
    held_writes.set()
    row = await ledger_row(started["request_id"])
    assert row.completion_tokens == 12 and row.outcome == "completed"
    assert row.cost_total == cost_of(done["usage"]) > 0
    assert row.cost_edge == Decimal(done["usage"]["cost"]["edge"])
    assert row.cost_verifier == Decimal(done["usage"]["cost"]["verifier"])
    assert await Reservation.objects.filter(status="held").acount() == 0
    assert await SloSample.objects.filter(request_id=started["request_id"]).aexists()
    await ws.disconnect()


async def test_a_stopped_websocket_stream_charges_exactly_the_text_before_the_stop(account):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=40, stop=["edge"]))
    started, deltas, done = await run_to_end(ws, "s1")
    assert done["usage"]["finish_reason"] == "stop"
    row = await ledger_row(started["request_id"])
    assert row.completion_tokens == len(deltas) == done["usage"]["completion_tokens"]
    assert row.finish_reason == "stop" and row.cost_total == cost_of(done["usage"])
    await ws.disconnect()


async def test_a_cancelled_websocket_stream_charges_exactly_the_deltas_sent(account, gated):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=200))
    gated.gate.release(5)
    started = await receive(ws)
    await receive_tokens(ws, 5)
    await ws.send_json_to({"type": "cancel", "id": "s1"})
    done = await receive(ws)
    assert done["type"] == "done" and done["usage"]["outcome"] == "cancelled"
    row = await ledger_row(started["request_id"])
    assert row.outcome == "cancelled" and row.completion_tokens == done["usage"]["completion_tokens"] == 5
    assert row.cost_total == cost_of(done["usage"])
    assert await Reservation.objects.filter(status="held").acount() == 0
    await ws.disconnect()


async def test_a_disconnected_websocket_stream_charges_exactly_the_deltas_sent(account, gated):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=200))
    gated.gate.release(4)
    started = await receive(ws)
    await receive_tokens(ws, 4)
    await ws.disconnect()
    row = await ledger_row(started["request_id"])
    assert row.outcome == "cancelled" and row.completion_tokens == 4
    assert await Reservation.objects.filter(status="held").acount() == 0


async def test_a_bad_start_frame_still_charges_nothing(account):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=0))
    error = await receive(ws)
    assert error["type"] == "error" and error["usage"] is None
    await gateway.ledger_writes_flush()
    assert await UsageRecord.objects.acount() == 0 and await Reservation.objects.acount() == 0
    await ws.disconnect()


# SSE --------------------------------------------------------------------------------------------
def final_usage(body: str) -> dict:
    """The Tandem summary of an SSE body's finish chunk (the last chunk with a finish reason)."""
    chunks = [c for c in sse_data(body) if isinstance(c, dict) and c.get("choices")]
    return next(c for c in reversed(chunks) if c["choices"][0]["finish_reason"] is not None)["tandem"]


async def test_a_full_sse_stream_sends_done_before_the_ledger_row_and_the_row_matches(account, held_writes):
    status, headers, body = await asgi_post(
        "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 10, "stream": True}, account.raw_key
    )
    assert status == 200 and body.endswith("data: [DONE]\n\n")
    assert not await UsageRecord.objects.filter(request_id=headers["x-request-id"]).aexists()
    held_writes.set()
    row = await ledger_row(headers["x-request-id"])
    usage = final_usage(body)
    assert row.completion_tokens == usage["completion_tokens"] == 10
    assert row.cost_total == cost_of(usage) and row.outcome == "completed"


async def test_a_stopped_sse_stream_charges_exactly_the_text_before_the_stop(account):
    status, headers, body = await asgi_post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": HELLO, "max_tokens": 40, "stream": True, "stop": ["edge"]},
        account.raw_key,
    )
    row = await ledger_row(headers["x-request-id"])
    usage = final_usage(body)
    assert row.finish_reason == "stop" and row.completion_tokens == usage["completion_tokens"]
    assert row.cost_total == cost_of(usage)


async def test_an_sse_client_that_hangs_up_is_charged_exactly_what_it_received(account, gated):
    gated.gate.release(3)
    status, headers, body = await asgi_post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": HELLO, "max_tokens": 50, "stream": True},
        account.raw_key,
        lambda body: len(content_of(sse_data(body))) >= 3,
    )
    assert status == 200 and "[DONE]" not in body
    row = await ledger_row(headers["x-request-id"])
    assert row.outcome == "cancelled" and row.completion_tokens == len(content_of(sse_data(body))) == 3
    assert await Reservation.objects.filter(status="held").acount() == 0


async def test_a_non_streaming_response_carries_the_cost_the_ledger_gets(account):
    status, headers, body = await asgi_post(
        "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 7}, account.raw_key
    )
    tandem = json.loads(body)["tandem"]
    row = await ledger_row(headers["x-request-id"])
    assert row.completion_tokens == 7 and row.cost_total == cost_of(tandem)


async def test_whole_answers_ending_together_each_go_out_right_after_their_own_charge(account, gated, monkeypatch):
    """A reply goes out on its charge's turn of the loop, not after the charges of every answer that ended with it.

    Settled in a task (and closed through a shield: a task too), a view waited a turn of the loop behind
    every other ready one: completions that started together, and so ended together, were all charged
    before the first reply went out (demo pair, 16 sessions: the first reply 10 ms after the last step).
    """
    order: list[str] = []
    charge = settlement.charge

    def charging(*args, **kwargs):
        order.append("charge")
        return charge(*args, **kwargs)

    monkeypatch.setattr(settlement, "charge", charging)
    gated.free_tokens = 1
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 2}).encode()

    async def post() -> int:
        status = 0
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # never hangs up
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                order.append("reply")
                status = message["status"]

        await application(api_scope("/v1/completions", account.raw_key), receive, send)
        return status

    n = 4
    posts = [asyncio.ensure_future(post()) for _ in range(n)]
    for _ in range(n):  # every completion has handed over its first token and waits at the gate for its last
        assert await asyncio.to_thread(gated.waits.acquire, timeout=10)
    assert order == []
    gated.gate.release(n)
    time.sleep(0.3)  # the loop held while the engine threads end: their ends are all at hand at its next turn
    assert await asyncio.wait_for(asyncio.gather(*posts), 10) == [200] * n
    assert order == ["charge", "reply"] * n


async def test_a_bad_request_still_charges_nothing(account):
    status, _, _ = await asgi_post(
        "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 0, "stream": True}, account.raw_key
    )
    assert status == 400
    await gateway.ledger_writes_flush()
    assert await UsageRecord.objects.acount() == 0 and await Reservation.objects.acount() == 0


# gateway ------------------------------------------------------------------------------------------
async def test_collect_returns_once_the_ledger_holds_the_charge(account):
    """Batch jobs end their event loop right after: ``collect`` waits for the row by default."""
    principal = await gateway.authenticate_api_key(account.raw_key)
    stream = await gateway.start(principal, gateway.CompletionCall(model=MODEL, prompt="Hello", max_tokens=5))
    await gateway.collect(stream)
    row = await UsageRecord.objects.aget(request_id=stream.request_id)  # no flush: collect waited
    assert row.cost_total == stream.usage.cost["total"]


async def test_a_failed_ledger_write_is_logged_as_an_error_and_the_reservation_stays_held(account, monkeypatch, caplog):
    from tenants import services

    def broken(**kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(services, "usage_settle_legs", broken)
    principal = await gateway.authenticate_api_key(account.raw_key)
    stream = await gateway.start(principal, gateway.CompletionCall(model=MODEL, prompt="Hello", max_tokens=5))
    with caplog.at_level(logging.ERROR, logger="inference.settlement"):
        await gateway.collect(stream, ledger_written=False)
        assert stream.usage is not None and stream.usage.completion_tokens == 5
        with pytest.raises(RuntimeError, match="went away"):
            await stream.settled()
        await asyncio.sleep(0)  # the write's done-callback runs on the next turn of the loop
    assert any(
        r.levelno == logging.ERROR and "ledger write failed" in r.getMessage() and r.exc_info for r in caplog.records
    )
    assert await Reservation.objects.filter(status="held").acount() == 1  # never freed as if paid
    assert await UsageRecord.objects.acount() == 0


async def test_a_ledger_write_the_database_refuses_is_tried_again_until_it_goes_through(monkeypatch):
    from django.db import OperationalError

    from inference import settlement
    from tenants import errors as tenant_errors

    monkeypatch.setattr(settlement, "LEDGER_RETRY_S", 5.0)
    calls = []

    async def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("terminating connection due to administrator command")

    await settlement.ledger_write("req-retry", flaky)
    assert len(calls) == 3

    async def committed_before_the_break() -> None:  # the retry finds it settled: done, not charged twice
        raise tenant_errors.AlreadySettled("already settled")

    await settlement.ledger_write("req-settled", committed_before_the_break)

    async def down() -> None:
        raise OperationalError("could not connect")

    monkeypatch.setattr(settlement, "LEDGER_RETRY_S", 0.3)
    with pytest.raises(OperationalError):
        await settlement.ledger_write("req-down", down)
