"""Availability needs the failures: a request whose tiers fail before its first token writes an SLO sample (no
tokens, no TTFT); a client that goes away before it does not."""

from __future__ import annotations

import asyncio

import pytest

from inference import gateway
from inference.engines import EngineSet, set_engines, trivial_entry
from inference.errors import UpstreamFailed
from inference.models import SloSample
from speculative.errors import VerifierUnavailableError
from tests.inference.conftest import GatedEngine, empty_caches, serving_gated  # noqa: F401 - the fixture, too

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


def call(**kwargs) -> gateway.CompletionCall:
    return gateway.CompletionCall(**{"model": "tandem-test", "prompt": "Hello there", "max_tokens": 8, **kwargs})


@pytest.mark.parametrize("client_id", [False, True], ids=["lease", "reservation"])
async def test_a_failure_before_the_first_token_writes_an_availability_sample(account, client_id):
    principal = await gateway.authenticate_api_key(account.raw_key)
    down = trivial_entry(fail_after=0, fail_as=VerifierUnavailableError("connection refused"))  # every tier
    previous = set_engines(EngineSet([down]))
    kwargs = {"request_id": "client-chosen-failure"} if client_id else {}
    try:
        with pytest.raises(UpstreamFailed):
            await gateway.start(principal, call(**kwargs))
    finally:
        set_engines(previous)
    from inference.settlement import ledger_writes_flush

    await ledger_writes_flush()
    rows = [s async for s in SloSample.objects.filter(tenant=account.tenant)]
    assert len(rows) == 1
    row = rows[0]
    assert (row.outcome, row.tokens, row.ttft_ms, row.inter_token_ms) == ("error", 0, None, None)
    assert row.latency_class == "interactive" and row.e2e_ms >= 0
    if client_id:
        assert row.request_id == "client-chosen-failure"


async def test_a_client_that_leaves_before_the_first_token_writes_no_sample(account):
    principal = await gateway.authenticate_api_key(account.raw_key)
    with serving_gated(GatedEngine(free_tokens=0)) as engine:
        starting = asyncio.ensure_future(gateway.start(principal, call()))
        await asyncio.to_thread(engine.blocked.wait, 5)  # the engine waits before its first token
        starting.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await starting
        for _ in range(20):
            engine.gate.release()
    from inference.settlement import ledger_writes_flush

    await ledger_writes_flush()
    assert not await SloSample.objects.filter(tenant=account.tenant).aexists()


async def test_a_stream_closed_before_its_first_token_was_read_writes_no_sample(account):
    principal = await gateway.authenticate_api_key(account.raw_key)
    stream = await gateway.start(principal, call())
    usage = await stream.aclose()
    await stream.settled()
    assert usage is not None and usage.outcome == "cancelled" and usage.completion_tokens == 0
    assert not await SloSample.objects.filter(tenant=account.tenant).aexists()
