"""The gateway: the one path every completion takes (admit, route, reserve, stream, settle)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from inference import gateway
from inference.engines import get_engines
from inference.errors import (
    BudgetExceeded,
    ContextTooLong,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    RateLimited,
)
from inference.models import SloSample
from speculative.types import Provenance
from tenants.models import Budget, Reservation, UsageRecord
from tenants.services import budget_set, membership_create
from tenants.tiers import Tier
from tests.inference.conftest import GatedEngine, serving_gated

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


def call(**kwargs) -> gateway.CompletionCall:
    return gateway.CompletionCall(**{"model": "tandem-test", "prompt": "Hello there", "max_tokens": 12, **kwargs})


async def key_principal(account) -> gateway.Principal:
    return await gateway.authenticate_api_key(account.raw_key)


async def test_a_full_stream_is_charged_for_every_token_it_delivered(account):
    stream = await gateway.start(await key_principal(account), call(max_tokens=12))
    deltas = [d async for d in stream]
    usage = stream.usage
    assert usage is not None and usage.outcome == "completed" and usage.finish_reason == "length"
    assert usage.completion_tokens == len(deltas) == 12
    assert [d.index for d in deltas] == list(range(12))
    assert {d.provenance for d in deltas} == {Provenance.DRAFTED, Provenance.VERIFIER}
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.tenant_id == account.tenant.pk and row.api_key_id == account.api_key.pk
    assert row.completion_tokens == 12 and row.prompt_tokens == len("Hello there")
    assert row.accepted_tokens == 8  # the trivial engine: two drafted tokens, then one verifier token
    assert row.drafted_tokens == Decimal("8.000") and row.gpu_ms == Decimal("3.000")  # 4 rounds x 0.75 ms
    assert row.cost_total == usage.cost["total"] > 0
    assert row.route_tier == "speculative" and row.route_reason == "default"
    assert await Reservation.objects.filter(status="held").acount() == 0
    assert await SloSample.objects.filter(request_id=stream.request_id, outcome="completed").aexists()


async def test_cancelling_mid_stream_charges_exactly_the_delivered_tokens(account):
    stream = await gateway.start(await key_principal(account), call(max_tokens=30))
    got = [await stream.__anext__() for _ in range(4)]  # a partial round: tokens 0-2 and 3 of 4-5
    usage = await stream.aclose()
    assert usage is not None and usage.outcome == "cancelled" and usage.completion_tokens == len(got) == 4
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.completion_tokens == 4 and row.outcome == "cancelled"
    assert row.gpu_ms == Decimal("1.000")  # 1 full round (0.75) + a third of the next (0.25)
    assert await stream.aclose() is usage  # closing twice settles once
    assert await UsageRecord.objects.filter(request_id=stream.request_id).acount() == 1


async def test_take_at_hand_takes_the_ready_tokens_without_waiting_and_each_is_charged(account):
    with serving_gated(GatedEngine(free_tokens=5)) as engine:
        stream = await gateway.start(await key_principal(account), call(max_tokens=30))
        await asyncio.to_thread(engine.blocked.wait, 5)  # 5 tokens handed over; the engine waits for the gate
        assert [d.index for d in stream.take_at_hand(limit=3)] == [0, 1, 2]
        assert [d.index for d in stream.take_at_hand()] == [3, 4]
        assert stream.take_at_hand() == []  # nothing more is ready, and it does not wait for more
        usage = await stream.aclose()
    assert usage is not None and usage.outcome == "cancelled" and usage.completion_tokens == 5
    assert stream.take_at_hand() == []  # a closed stream hands nothing over
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.completion_tokens == 5


async def test_tokens_handed_over_while_the_loop_is_busy_cost_it_one_wake_up(account, monkeypatch):
    loop = asyncio.get_running_loop()
    handoffs: list[object] = []
    wake = loop.call_soon_threadsafe

    def counted(callback, *args, **kwargs):
        if getattr(callback, "__name__", "") == "_take_handoff":
            handoffs.append(callback)
        return wake(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    with serving_gated(GatedEngine(free_tokens=1)) as engine:
        stream = await gateway.start(await key_principal(account), call(max_tokens=30))
        assert engine.waits.acquire(timeout=5)  # token 0 is out; the engine waits at the gate
        handoffs.clear()
        engine.gate.release(5)
        assert engine.waits.acquire(timeout=5)  # the loop is busy (here) while tokens 1-5 are handed over
        await asyncio.sleep(0)
        assert len(handoffs) == 1
        assert [d.index for d in stream.take_at_hand()] == [0, 1, 2, 3, 4, 5]
        await stream.aclose()


async def test_collect_takes_a_whole_answers_tokens_together_and_charges_each(account, monkeypatch):
    steps = 0
    next_item = gateway.GatewayStream.__anext__

    async def counted(self):
        nonlocal steps
        steps += 1
        return await next_item(self)

    monkeypatch.setattr(gateway.GatewayStream, "__anext__", counted)
    stream = await gateway.start(await key_principal(account), call(max_tokens=30))
    text, deltas = await gateway.collect(stream)
    # the answer is handed to the loop whole (a client that takes it whole): its first token, then the end
    assert steps == 2
    assert [d.index for d in deltas] == list(range(30)) and text == "".join(d.text for d in deltas)
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.completion_tokens == 30 and row.outcome == "completed"


async def test_take_at_hand_leaves_the_end_of_the_stream_to_anext_which_settles(account):
    stream = await gateway.start(await key_principal(account), call(max_tokens=3))
    taken: list[gateway.TokenDelta] = []
    while len(taken) < 3:
        await stream.ready()
        taken += stream.take_at_hand()
    await stream.ready()  # the end is at hand now
    assert stream.take_at_hand() == [] and stream.usage is None
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    assert stream.usage is not None and stream.usage.outcome == "completed"
    assert stream.usage.completion_tokens == len(taken) == 3 and "".join(d.text for d in taken) == "Tan"


async def test_a_stop_string_ends_the_stream_and_only_the_text_before_it_is_charged(account):
    stream = await gateway.start(await key_principal(account), call(max_tokens=40, stop=("edge",)))
    text, deltas = await gateway.collect(stream)
    assert text == "Tandem drafts at the "
    assert stream.usage.finish_reason == "stop"
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.completion_tokens == len(deltas) and row.finish_reason == "stop"


async def test_an_engine_failure_mid_stream_settles_what_was_delivered_and_raises(account):
    stream = await gateway.start(await key_principal(account), call(model="tandem-test-broken", max_tokens=30))
    delivered = 0
    with pytest.raises(gateway.GatewayError) as info:
        async for _ in stream:
            delivered += 1
    assert info.value.status == 502 and delivered == 6
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.outcome == "error" and row.completion_tokens == 6 and row.error


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"model": "no-such-model"}, ModelNotFound),
        ({"max_tokens": 0}, InvalidRequest),
        ({"max_tokens": -5}, InvalidRequest),
        ({"prompt": ""}, InvalidRequest),
        ({"prompt": "x" * 40_000}, ContextTooLong),
        ({"max_tokens": 5000}, ContextTooLong),
        ({"temperature": -1.0}, InvalidRequest),
        ({"top_p": 0.0}, InvalidRequest),
        ({"tags": {"k": 5}}, InvalidRequest),
    ],
)
async def test_bad_requests_are_refused_before_anything_is_reserved(account, kwargs, error):
    with pytest.raises(error):
        await gateway.start(await key_principal(account), call(**kwargs))
    assert await Reservation.objects.acount() == 0
    assert await UsageRecord.objects.acount() == 0


async def test_a_request_past_the_hard_budget_is_refused_and_charges_nothing(account):
    from asgiref.sync import sync_to_async

    await sync_to_async(budget_set)(
        tenant=account.tenant, period="month", hard_limit=Decimal("0.000001"), soft_limit=None
    )
    with pytest.raises(BudgetExceeded):
        await gateway.start(await key_principal(account), call())
    budget = await Budget.objects.aget(tenant=account.tenant)
    assert budget.spent == 0 and budget.reserved == 0
    assert await UsageRecord.objects.acount() == 0


async def test_a_wrong_api_key_is_an_authentication_error(account):
    for raw in ("", "tdm_nope", account.raw_key + "x", "Bearer " + account.raw_key):
        with pytest.raises(gateway.AuthenticationFailed):
            await gateway.authenticate_api_key(raw)


async def test_a_viewer_may_not_spend_and_a_user_acts_only_in_their_tenants(account, other_account, django_user_model):
    from asgiref.sync import sync_to_async

    viewer = await sync_to_async(django_user_model.objects.create_user)(username="vic", password="pw-vic-123456")
    await sync_to_async(membership_create)(tenant=account.tenant, user=viewer, role="viewer")
    principal = await gateway.principal_for_user(viewer, account.tenant.pk)
    with pytest.raises(PermissionDenied):
        await gateway.start(principal, call())
    with pytest.raises(PermissionDenied):
        await gateway.principal_for_user(account.user, other_account.tenant.pk)


async def test_streams_past_the_tenants_limit_wait_their_turn_and_past_its_queue_share_get_429(account, settings):
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 2
    settings.TANDEM_MAX_QUEUED_PER_TENANT = 1
    principal = await key_principal(account)
    open_streams = [await gateway.start(principal, call(max_tokens=50)) for _ in range(2)]
    positions: list[int] = []
    waiting = asyncio.ensure_future(gateway.start(principal, call(max_tokens=3), positions.append))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if positions:
            break
    assert positions == [1] and not waiting.done()  # it waits (first in line), it is not refused
    second = call()
    with pytest.raises(RateLimited) as refused:  # a second waiter is past this tenant's share of the queue
        await gateway.start(principal, second)
    assert refused.value.code == "too_many_queued" and refused.value.retry_after >= 1
    await open_streams[0].aclose()  # a slot frees: the waiter takes it
    later = await asyncio.wait_for(waiting, 5)
    text, _ = await gateway.collect(later)
    assert text
    await open_streams[1].aclose()
    for stream in (*open_streams, later):
        await stream.settled()
    assert await UsageRecord.objects.filter(request_id=later.request_id).aexists()
    assert not await UsageRecord.objects.filter(request_id=second.request_id).aexists()


async def test_a_request_that_cannot_start_before_its_deadline_gets_503_with_retry_after(account, settings):
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 1
    settings.TANDEM_QUEUE_DEADLINE_S = {"interactive": 0.2, "batch": 0.2}
    principal = await key_principal(account)
    running = await gateway.start(principal, call(max_tokens=50))
    late = call()
    with pytest.raises(Overloaded) as refused:
        await gateway.start(principal, late)
    assert refused.value.code == "queue_timeout" and refused.value.retry_after >= 1
    await running.aclose()
    await running.settled()
    assert not await UsageRecord.objects.filter(request_id=late.request_id).aexists()  # refused: charged nothing
    next_one = await gateway.start(principal, call(max_tokens=3))  # the slot it waited for was not lost
    await gateway.collect(next_one)


async def test_a_verifier_that_is_down_sends_requests_to_the_edge_tier(account):
    entry = get_engines().get("tandem-test")
    breaker = entry.breaker(Tier.SPECULATIVE)
    breaker.trip("connection refused")
    try:
        stream = await gateway.start(await key_principal(account), call(max_tokens=5))
        await gateway.collect(stream)
    finally:
        breaker.record_success()
    assert stream.route.tier is Tier.EDGE and stream.route.degraded
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.route_tier == "edge" and row.route_reason == "verifier_down" and row.verifier_version == ""


async def test_tenants_spend_only_their_own_budget(account, other_account):
    from asgiref.sync import sync_to_async

    await sync_to_async(budget_set)(
        tenant=other_account.tenant, period="month", hard_limit=Decimal("5"), soft_limit=None
    )
    stream = await gateway.start(await key_principal(account), call())
    await gateway.collect(stream)
    other = await Budget.objects.aget(tenant=other_account.tenant)
    assert other.spent == 0 and other.reserved == 0
    assert not await UsageRecord.objects.filter(tenant=other_account.tenant).aexists()


async def test_a_verifier_that_fails_before_the_first_token_is_failed_over_to_the_edge(account):
    from inference.engines import EngineSet, ModelEntry, TrivialEngine, set_engines
    from speculative.errors import VerifierUnavailableError

    down = TrivialEngine(fail_after=0, fail_as=VerifierUnavailableError("connection refused"))
    entry = ModelEntry(
        name="tandem-test",
        speculative=down,
        edge=TrivialEngine(),
        verifier_version="v@1",
        draft_version="d@1",
        context_length=4096,
        tokenizer=down.tokenizer,
    )
    previous = set_engines(EngineSet([entry]))
    try:
        stream = await gateway.start(await key_principal(account), call(max_tokens=6))
        text, _ = await gateway.collect(stream)
        assert text == "Tandem" and stream.route.tier is Tier.EDGE and stream.route.degraded
        row = await UsageRecord.objects.aget(request_id=stream.request_id)
        assert (row.route_tier, row.route_reason, row.outcome) == ("edge", "verifier_down", "completed")
        assert row.cost_total <= (await Reservation.objects.aget(request_id=stream.request_id)).amount
        later = await gateway.start(await key_principal(account), call(max_tokens=3))  # routed to the edge at once
        await gateway.collect(later)
        assert later.route.tier is Tier.EDGE
    finally:
        set_engines(previous)


def serving_flaky_verifier(fail_after: int, edge_text: str = "EDGE "):
    """``tandem-test`` whose verifier goes away after ``fail_after`` tokens; the edge writes ``edge_text`` over and over."""
    from inference.engines import EngineSet, ModelEntry, TrivialEngine, set_engines
    from speculative.errors import VerifierUnavailableError

    flaky = TrivialEngine(fail_after=fail_after, fail_as=VerifierUnavailableError("connection reset"))
    entry = ModelEntry(
        name="tandem-test",
        speculative=flaky,
        edge=TrivialEngine(text=edge_text),
        verifier_version="v@1",
        draft_version="d@1",
        context_length=4096,
        tokenizer=flaky.tokenizer,
    )
    return set_engines(EngineSet([entry]))


@pytest.mark.parametrize("client_id", [False, True], ids=["lease", "reservation"])
async def test_a_verifier_lost_mid_stream_hands_over_to_the_edge_and_each_leg_is_charged_once(account, client_id):
    from asgiref.sync import sync_to_async

    from inference.engines import set_engines

    await sync_to_async(budget_set)(tenant=account.tenant, period="month", hard_limit=Decimal("100"), soft_limit=None)
    previous = serving_flaky_verifier(fail_after=6)
    try:
        kwargs = {"request_id": "client-chosen-id-1"} if client_id else {}
        stream = await gateway.start(await key_principal(account), call(max_tokens=16, **kwargs))
        deltas = [d async for d in stream]
        await stream.settled()
    finally:
        set_engines(previous)
    text = "".join(d.text for d in deltas)
    assert text == "Tandem" + "EDGE EDGE " and [d.index for d in deltas] == list(range(16))
    assert deltas[6].route is not None and deltas[6].route.tier is Tier.EDGE and deltas[6].route.degraded
    assert all(d.route is None for i, d in enumerate(deltas) if i != 6)
    rows = [r async for r in UsageRecord.objects.filter(leg_of=stream.request_id).order_by("leg")]
    assert [(r.leg, r.route_tier, r.route_reason, r.outcome, r.completion_tokens) for r in rows] == [
        (0, "speculative", "default", "error", 6),
        (1, "edge", "verifier_down", "completed", 10),
    ]
    assert "mid-stream" in rows[0].error and rows[1].request_id == f"{stream.request_id}~1"
    assert rows[1].prompt_tokens == len("Hello there" + "Tandem")  # the edge read the prompt and the answer so far
    total = rows[0].cost_total + rows[1].cost_total
    assert stream.usage.cost["total"] == total and stream.usage.completion_tokens == 16
    budget = await Budget.objects.aget(tenant=account.tenant, api_key__isnull=True)
    if client_id:
        reservation = await Reservation.objects.aget(request_id=stream.request_id)
        assert reservation.status == "settled" and total <= reservation.amount
        assert budget.spent == total and budget.reserved == 0
    assert await SloSample.objects.filter(request_id=stream.request_id).acount() == 1


async def test_an_empty_completed_answer_still_pays_for_reading_its_prompt(account):
    from inference.engines import EngineSet, ModelEntry, TrivialCompletion, TrivialEngine, set_engines
    from speculative.types import FinishReason

    class EmptyCompletion(TrivialCompletion):
        def _run(self):
            self.stats.finish_reason = FinishReason.STOP  # the model's first token was its end of text
            yield from ()

    class EmptyEngine(TrivialEngine):
        def stream(self, prompt, **kwargs):
            return EmptyCompletion(self, self.request(prompt, **kwargs))

    engine = EmptyEngine()
    previous = set_engines(EngineSet([ModelEntry("tandem-test", engine, engine, "v", "d", 4096, engine.tokenizer)]))
    try:
        stream = await gateway.start(await key_principal(account), call(max_tokens=5))
        text, deltas = await gateway.collect(stream)
    finally:
        set_engines(previous)
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert text == "" and (row.outcome, row.completion_tokens, row.prompt_tokens) == (
        "completed",
        0,
        len("Hello there"),
    )
    assert row.cost_total > 0 and stream.usage.cost["total"] == row.cost_total


async def test_a_model_without_a_published_price_is_a_clear_error_and_holds_nothing(account):
    from inference.engines import EngineSet, set_engines, trivial_entry

    previous = set_engines(EngineSet([trivial_entry("tandem-unpriced")]))
    try:
        with pytest.raises(gateway.GatewayError) as info:
            await gateway.start(await key_principal(account), call(model="tandem-unpriced"))
    finally:
        set_engines(previous)
    assert "publish a price" in info.value.message
    assert not await Reservation.objects.aexists() and not await UsageRecord.objects.aexists()


async def test_requests_that_miss_the_caches_together_read_each_row_once(account, monkeypatch):
    # when a cache expires every request then in flight misses it at once: one read serves them all
    from inference import selectors
    from tenants import selectors as tenant_selectors
    from tenants import services as tenant_services

    reads: list[str] = []

    def counted(name, read):
        def wrapper(*args, **kwargs):
            reads.append(name)
            return read(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(tenant_services, "api_key_authenticate", counted("key", tenant_services.api_key_authenticate))
    monkeypatch.setattr(gateway, "routing_policy_for", counted("policy", gateway.routing_policy_for))
    monkeypatch.setattr(tenant_selectors, "price_active", counted("price", tenant_selectors.price_active))
    tenant_services.api_key_cache.forget()
    selectors.policy_cache.forget()
    tenant_selectors.price_cache.forget()
    principals = await asyncio.gather(*(gateway.authenticate_api_key(account.raw_key) for _ in range(4)))
    assert reads == ["key"] and len({p.api_key_id for p in principals}) == 1
    streams = await asyncio.gather(*(gateway.start(principals[0], call(max_tokens=3)) for _ in range(4)))
    for stream in streams:
        assert len([d async for d in stream]) == 3
    assert sorted(reads) == ["key", "policy", "price"]
