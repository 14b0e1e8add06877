"""The cloud tier against a real upstream: llama-cpp-python's OpenAI-compatible server with SmolLM2 (a process)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async

from inference import gateway
from inference.engines import get_engines
from inference.errors import BudgetExceeded, InvalidRequest
from inference.model_tokenizers import gguf_tokenizer
from inference.services import cloud_upstream_register
from inference.standin import MODEL_ALIAS, model_path
from inference.upstream_pool import close_pool
from speculative.types import Provenance
from tenants.models import UsageRecord
from tenants.tiers import Tier
from tests.conftest import UPSTREAM_KEY_ENV, StandIn, _free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

CLOUD_PROMPT_PER_MTOK = Decimal("3.00")
CLOUD_COMPLETION_PER_MTOK = Decimal("15.00")


def register(
    base_url: str,
    *,
    name: str = "standin",
    tenants=(),
    all_tenants: bool = True,
    api_key_env: str = UPSTREAM_KEY_ENV,
    **options,
):
    upstream = cloud_upstream_register(
        name=name,
        model="tandem-test",
        base_url=base_url,
        upstream_model=MODEL_ALIAS,
        api_key_env=api_key_env,
        prompt_per_mtok=CLOUD_PROMPT_PER_MTOK,
        completion_per_mtok=CLOUD_COMPLETION_PER_MTOK,
        tenants=tenants,
        all_tenants=all_tenants,
        tokenizer=str(model_path()),
        **options,
    )
    get_engines().upstreams.forget()  # this process re-reads the upstreams on the next request
    return upstream


@pytest.fixture
def upstream(standin, account):
    return register(standin.base_url)


@pytest_asyncio.fixture(autouse=True)
async def upstream_connections_closed():
    """Each test's event loop closes its connections to the upstreams before the loop ends."""
    yield
    close_pool()


@pytest.fixture(autouse=True)
def breakers_closed():
    """Each test starts with every upstream's breaker closed (the directory outlives tests)."""
    directory = get_engines().upstreams
    directory._breakers.clear()
    yield
    directory._breakers.clear()


def serve_a_verifier_that_fails_after_6_tokens():
    """This process serves ``tandem-test`` with a speculative tier that fails after 6 tokens, nothing below it
    (so the cloud takes over), and a cloud tier; returns the engines it replaced."""
    from inference.engines import EngineSet, ModelEntry, TrivialEngine, set_engines
    from speculative.errors import VerifierUnavailableError

    flaky = TrivialEngine(fail_after=6, fail_as=VerifierUnavailableError("connection reset"))
    entry = ModelEntry(
        name="tandem-test",
        speculative=flaky,
        edge=None,
        verifier_version="v@1",
        draft_version="d@1",
        context_length=4096,
        tokenizer=flaky.tokenizer,
    )
    return set_engines(EngineSet([entry], cloud=True))


TANDEM_CHAT = ({"role": "user", "content": "Tell me about Tandem."},)


async def a_chat_taken_over_mid_stream(account, base_url: str, **upstream):
    """A chat whose verifier fails after 6 tokens, the upstream at ``base_url`` taking over: (stream, deltas)."""
    from inference.engines import set_engines

    previous = serve_a_verifier_that_fails_after_6_tokens()
    try:
        await sync_to_async(register)(base_url, **upstream)
        chat = call(
            prompt="User: Tell me about Tandem.\nAssistant:", messages=TANDEM_CHAT, requested_tier=None, max_tokens=12
        )
        stream = await gateway.start(await principal(account), chat)
        deltas = [d async for d in stream]
        await stream.settled()
    finally:
        set_engines(previous)
    return stream, deltas


async def principal(account):
    return await gateway.authenticate_api_key(account.raw_key)


def call(**kwargs) -> gateway.CompletionCall:
    fields = {"model": "tandem-test", "prompt": "The capital of France is", "max_tokens": 6, "requested_tier": "cloud"}
    return gateway.CompletionCall(**(fields | kwargs))


async def test_a_requested_cloud_tier_streams_the_upstreams_text_and_charges_the_cloud_bucket(upstream, account):
    stream = await gateway.start(await principal(account), call(seed=7))
    text, deltas = await gateway.collect(stream)
    assert stream.route.tier is Tier.CLOUD and stream.route.reason == "requested" and not stream.route.degraded
    assert text and all(d.provenance is Provenance.CLOUD for d in deltas)
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert (row.route_tier, row.outcome, row.finish_reason) == ("cloud", "completed", "length")
    # llama.cpp's server reports no usage in a stream: the upstream model's own tokenizer counts
    tokenizer = gguf_tokenizer(str(model_path()))
    assert row.completion_tokens == len(tokenizer.encode(text)) == 6
    assert row.prompt_tokens == len(tokenizer.encode("The capital of France is"))
    expected = (row.prompt_tokens * CLOUD_PROMPT_PER_MTOK + row.completion_tokens * CLOUD_COMPLETION_PER_MTOK) / 10**6
    assert row.cost_cloud == row.cost_total == expected and row.cost_edge == row.cost_verifier == 0
    assert stream.usage.cost["total"] == row.cost_total


async def test_a_chat_goes_upstream_as_messages_rendered_by_the_upstreams_template(upstream, account):
    messages = ({"role": "user", "content": "Say hello."},)
    stream = await gateway.start(await principal(account), call(prompt="User: Say hello.\n", messages=messages))
    text, _ = await gateway.collect(stream)
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    rendered = gguf_tokenizer(str(model_path())).render_chat(messages)
    assert text and row.prompt_tokens == len(gguf_tokenizer(str(model_path())).encode(rendered))


async def test_the_same_seed_gives_the_same_cloud_answer(upstream, account):
    texts = []
    for _ in range(2):
        stream = await gateway.start(await principal(account), call(seed=3, temperature=0.8))
        texts.append((await gateway.collect(stream))[0])
    assert texts[0] == texts[1]


async def test_an_upstream_for_other_tenants_is_not_offered_to_this_one(standin, account, other_account):
    await sync_to_async(register)(standin.base_url, tenants=[other_account.tenant], all_tenants=False)
    with pytest.raises(InvalidRequest) as info:
        await gateway.start(await principal(account), call())
    assert info.value.param == "tier"
    stream = await gateway.start(await principal(other_account), call())
    await gateway.collect(stream)
    assert stream.route.tier is Tier.CLOUD


async def test_without_a_cloud_request_the_default_route_stays_off_the_cloud(upstream, account):
    stream = await gateway.start(await principal(account), call(requested_tier=None))
    await gateway.collect(stream)
    assert stream.route.tier is Tier.SPECULATIVE


async def test_a_wrong_key_fails_over_before_the_first_token_and_counts_against_the_breaker(standin, account):
    await sync_to_async(register)(standin.base_url, api_key_env="TANDEM_TEST_NO_SUCH_KEY")
    stream = await gateway.start(await principal(account), call())
    text, _ = await gateway.collect(stream)
    assert stream.route.tier is Tier.SPECULATIVE and stream.route.reason == "cloud_down" and stream.route.degraded
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.route_tier == "speculative" and row.cost_cloud == 0
    breaker = get_engines().upstreams.breaker(get_engines().upstreams.for_model("tandem-test", None)[0])
    assert breaker.snapshot()["consecutive_failures"] == 1 and "401" in breaker.last_error


async def test_an_unreachable_upstream_opens_its_breaker_and_later_requests_skip_it(account):
    await sync_to_async(register)(f"http://127.0.0.1:{_free_port()}/v1")
    for _ in range(3):  # FAILURES_TO_OPEN
        stream = await gateway.start(await principal(account), call())
        await gateway.collect(stream)
        assert stream.route.tier is Tier.SPECULATIVE
    directory = get_engines().upstreams
    assert directory.breaker(directory.for_model("tandem-test", None)[0]).state.value == "open"
    stream = await gateway.start(await principal(account), call())
    await gateway.collect(stream)
    # the router no longer offers the cloud at all: chosen cloud, served below it, degraded
    assert stream.route.tier is Tier.SPECULATIVE and stream.route.degraded


async def test_the_next_upstream_serves_when_the_first_refuses_the_connection(standin, account):
    await sync_to_async(register)(f"http://127.0.0.1:{_free_port()}/v1", name="dead", priority=1)
    await sync_to_async(register)(standin.base_url, name="alive", priority=2)
    stream = await gateway.start(await principal(account), call())
    text, _ = await gateway.collect(stream)
    assert stream.route.tier is Tier.CLOUD and text


async def test_a_policy_that_refuses_an_unknown_tier_names_it(upstream, account):
    with pytest.raises(InvalidRequest) as info:
        await gateway.start(await principal(account), call(requested_tier="gpu-cluster"))
    assert info.value.param == "tier" and "gpu-cluster" in info.value.message


async def test_a_client_gone_mid_stream_pays_only_the_cloud_text_it_was_sent(upstream, account):
    stream = await gateway.start(await principal(account), call(max_tokens=40))
    first = await stream.__anext__()
    usage = await stream.aclose()
    await stream.settled()
    tokenizer = gguf_tokenizer(str(model_path()))
    assert usage.outcome == "cancelled" and usage.completion_tokens == max(1, len(tokenizer.encode(first.text)))


async def test_a_killed_upstream_mid_stream_hands_over_to_the_next_tier_without_repeating_a_token(account):
    server = StandIn(key="").start()
    try:
        await sync_to_async(register)(server.base_url, api_key_env="")
        stream = await gateway.start(await principal(account), call(max_tokens=60))
        received = [await stream.__anext__()]
        server.kill()
        received += [delta async for delta in stream]
    finally:
        server.kill()
    await stream.settled()
    assert [d.index for d in received] == list(range(len(received)))  # nothing repeated, nothing skipped
    switch = next(i for i, d in enumerate(received) if d.route is not None)
    assert all(d.provenance is Provenance.CLOUD for d in received[:switch])
    assert all(d.provenance is not Provenance.CLOUD for d in received[switch:])
    new_route = received[switch].route
    assert (new_route.tier, new_route.reason, new_route.degraded) == (Tier.SPECULATIVE, "cloud_down", True)
    cloud_text = "".join(d.text for d in received[:switch])
    rows = [row async for row in UsageRecord.objects.filter(leg_of=stream.request_id).order_by("leg")]
    assert [(r.request_id, r.leg, r.route_tier, r.outcome) for r in rows] == [
        (stream.request_id, 0, "cloud", "error"),
        (f"{stream.request_id}~1", 1, "speculative", "completed"),
    ]
    tokenizer = gguf_tokenizer(str(model_path()))
    assert rows[0].completion_tokens == max(len(tokenizer.encode(cloud_text)), switch) and rows[0].cost_cloud > 0
    assert rows[1].completion_tokens == len(received) - switch and rows[1].cost_cloud == 0
    assert stream.usage.cost["total"] == rows[0].cost_total + rows[1].cost_total
    assert [leg["request_id"] for leg in stream.usage.as_dict()["legs"]] == [r.request_id for r in rows]


async def test_a_handover_to_a_dearer_tier_the_budget_cannot_hold_ends_with_a_budget_error(account):
    from tenants.models import Reservation
    from tenants.services import budget_set

    await sync_to_async(budget_set)(tenant=account.tenant, period="month", hard_limit=Decimal(100), soft_limit=None)
    server = StandIn(key="").start()
    try:
        await sync_to_async(register)(server.base_url, api_key_env="")
        stream = await gateway.start(await principal(account), call(max_tokens=60, request_id="client-chosen-cloud-1"))
        received = [await stream.__anext__()]
        # the rest of the month's budget is gone: the verifier's worst case cannot be held on top
        reservation = await Reservation.objects.aget(request_id=stream.request_id)
        await sync_to_async(budget_set)(
            tenant=account.tenant, period="month", hard_limit=reservation.amount, soft_limit=None
        )
        server.kill()
        with pytest.raises(BudgetExceeded):
            async for delta in stream:
                received.append(delta)
    finally:
        server.kill()
    await stream.settled()
    rows = [r async for r in UsageRecord.objects.filter(leg_of=stream.request_id)]
    assert [(r.leg, r.route_tier, r.outcome) for r in rows] == [(0, "cloud", "error")]
    assert rows[0].completion_tokens >= len(received) and all(d.route is None for d in received)


async def test_a_chat_handed_to_the_cloud_mid_stream_continues_the_partial_answer_in_the_models_template(
    standin, account
):
    stream, deltas = await a_chat_taken_over_mid_stream(account, standin.base_url)
    messages = TANDEM_CHAT
    assert "".join(d.text for d in deltas[:6]) == "Tandem" and deltas[6].route.tier is Tier.CLOUD
    assert all(d.provenance is Provenance.CLOUD for d in deltas[6:]) and [d.index for d in deltas] == list(
        range(len(deltas))
    )
    rows = [r async for r in UsageRecord.objects.filter(leg_of=stream.request_id).order_by("leg")]
    assert [(r.route_tier, r.upstream) for r in rows] == [("speculative", ""), ("cloud", "standin")]
    # the upstream read the conversation in its own template, ending inside the partial answer
    tokenizer = gguf_tokenizer(str(model_path()))
    partial = [*messages, {"role": "assistant", "content": "Tandem"}]
    assert rows[1].prompt_tokens == len(tokenizer.encode(tokenizer.render_chat(partial, continue_final=True)))


async def test_a_client_that_waits_for_the_whole_answer_gets_it_asked_for_whole_with_the_upstreams_usage(
    upstream, account
):
    streamed = await gateway.start(await principal(account), call(seed=5))
    streamed_text, _ = await gateway.collect(streamed)
    whole = await gateway.start(await principal(account), call(seed=5, stream=False))
    text, deltas = await gateway.collect(whole)
    assert text == streamed_text and len(deltas) == 1 and deltas[0].provenance is Provenance.CLOUD
    row = await UsageRecord.objects.aget(request_id=whole.request_id)
    # llama.cpp's server reports usage for a whole answer: it is what is charged
    assert (row.route_tier, row.outcome, row.finish_reason, row.completion_tokens) == (
        "cloud",
        "completed",
        "length",
        6,
    )


async def test_logprobs_asked_of_the_cloud_are_the_upstreams_own_named_as_it_names_its_tokens(upstream, account):
    stream = await gateway.start(await principal(account), call(temperature=0.0, logprobs=2))
    text, deltas = await gateway.collect(stream)
    assert stream.route.tier is Tier.CLOUD and text
    named = [n for d in deltas for n in d.named_logprobs]
    # every token the upstream sent, its logprob a probability's log, its alternatives the two likeliest
    assert "".join(n.token for n in named) == text and len(named) == 6
    assert all(n.logprob <= 0 and len(n.top) == 2 and n.top[0][1] >= n.top[1][1] for n in named)
    # a chosen token among its alternatives has the same logprob there (llama.cpp's server penalises
    # repeats after the logprobs are taken, so the chosen token is not always the likeliest)
    assert all(dict(n.top).get(n.token, n.logprob) == pytest.approx(n.logprob) for n in named)
    assert sum(n.top[0][0] == n.token for n in named) >= len(named) // 2
    assert all(d.logprob == pytest.approx(sum(n.logprob for n in d.named_logprobs)) for d in deltas)
    chat = await gateway.start(
        await principal(account),
        call(prompt="User: Say hello.\n", messages=({"role": "user", "content": "Say hello."},), logprobs=0),
    )
    chat_text, chat_deltas = await gateway.collect(chat)
    chat_named = [n for d in chat_deltas for n in d.named_logprobs]
    assert "".join(n.token for n in chat_named) == chat_text and all(n.top == () for n in chat_named)


async def test_without_logprobs_asked_the_cloud_is_not_asked_for_them(upstream, account):
    stream = await gateway.start(await principal(account), call(seed=7))
    _, deltas = await gateway.collect(stream)
    assert all(d.logprob is None and d.named_logprobs == () for d in deltas)


async def test_a_chat_taken_over_by_an_upstream_that_continues_a_final_message_gets_it_as_messages(account):
    """vLLM-style native continuation: the partial answer as the last assistant message, no template here."""
    from aiohttp import web

    bodies: list[dict] = []

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in (" is", " a", " platform."):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        usage = {"choices": [], "usage": {"prompt_tokens": 21, "completion_tokens": 3}}
        for last in (done, usage):
            await response.write(f"data: {json.dumps(last)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        stream, deltas = await a_chat_taken_over_mid_stream(
            account, base_url, name="native", continues_final_message=True
        )
    finally:
        await runner.cleanup()
    messages = TANDEM_CHAT
    text = "".join(d.text for d in deltas)
    assert text == "Tandem is a platform." and deltas[6].route.tier is Tier.CLOUD
    (body,) = bodies
    assert body["messages"] == [*messages, {"role": "assistant", "content": "Tandem"}]
    assert (body["continue_final_message"], body["add_generation_prompt"], body["stream"]) == (True, False, True)
    rows = [r async for r in UsageRecord.objects.filter(leg_of=stream.request_id).order_by("leg")]
    assert [(r.route_tier, r.upstream) for r in rows] == [("speculative", ""), ("cloud", "native")]
    # the upstream's own usage is what the cloud leg is charged
    assert (rows[1].prompt_tokens, rows[1].completion_tokens, rows[1].finish_reason) == (21, 3, "stop")
