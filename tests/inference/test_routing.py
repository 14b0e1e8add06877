"""Routing policies through the gateway: versions pinned per request, tenant scoping, PII kept off or redacted."""

from __future__ import annotations

import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async

from inference import gateway
from inference.errors import InvalidRequest
from inference.services import routing_policy_publish
from inference.upstream_pool import close_pool
from speculative.types import Provenance
from tenants.models import UsageRecord
from tenants.tiers import Tier
from tests.inference.test_cloud import register

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


@pytest_asyncio.fixture(autouse=True)
async def upstream_connections_closed():
    """Each test's event loop closes its connections to the upstreams before the loop ends."""
    yield
    close_pool()


EMAIL = "maria.lopez.1987@gmail.com"


async def principal(account):
    return await gateway.authenticate_api_key(account.raw_key)


def call(**kwargs) -> gateway.CompletionCall:
    return gateway.CompletionCall(**{"model": "tandem-test", "prompt": "Hello there", "max_tokens": 8, **kwargs})


async def publish(tenant, **fields):
    return await sync_to_async(routing_policy_publish)(tenant=tenant, **fields)


async def test_a_published_policy_decides_and_its_version_is_in_the_ledger(account):
    policy = await publish(account.tenant, allowed_tiers=["edge"], note="edge only")
    stream = await gateway.start(await principal(account), call())
    await gateway.collect(stream)
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert (row.route_tier, row.policy_version) == ("edge", policy.label) and policy.label.endswith("-v1")
    assert row.route_signals["prompt_tokens"] == len("Hello there")


async def test_policies_are_immutable_versions_and_a_request_keeps_the_one_it_started_with(account):
    await publish(account.tenant, allowed_tiers=["speculative"])
    stream = await gateway.start(await principal(account), call())  # started under v1
    second = await publish(account.tenant, allowed_tiers=["edge"])  # v2 published mid-stream
    await gateway.collect(stream)
    later = await gateway.start(await principal(account), call())
    await gateway.collect(later)
    rows = {r.request_id: r async for r in UsageRecord.objects.all()}
    assert (
        rows[stream.request_id].policy_version.endswith("-v1") and rows[stream.request_id].route_tier == "speculative"
    )
    assert rows[later.request_id].policy_version == second.label and rows[later.request_id].route_tier == "edge"
    assert [p.version async for p in second.__class__.objects.filter(tenant=account.tenant).order_by("version")] == [
        1,
        2,
    ]


async def test_a_tenants_policy_applies_to_that_tenant_only(account, other_account):
    await publish(account.tenant, allowed_tiers=["edge"])
    mine = await gateway.start(await principal(account), call())
    theirs = await gateway.start(await principal(other_account), call())
    await gateway.collect(mine)
    await gateway.collect(theirs)
    assert mine.route.tier is Tier.EDGE and theirs.route.tier is Tier.SPECULATIVE
    assert theirs.route.policy_version == "builtin-2"


async def test_the_platform_default_applies_to_tenants_without_their_own(account):
    default = await publish(None, allowed_tiers=["edge", "speculative"], allow_requested_tier=False)
    with pytest.raises(InvalidRequest) as info:
        await gateway.start(await principal(account), call(requested_tier="edge"))
    assert info.value.param == "tier"
    stream = await gateway.start(await principal(account), call())
    await gateway.collect(stream)
    assert stream.route.policy_version == default.label == "default-v1"


async def test_an_invalid_policy_is_refused_naming_the_field(account):
    with pytest.raises(InvalidRequest) as info:
        await publish(account.tenant, allowed_tiers=["gpu"])
    assert info.value.param == "allowed_tiers"
    with pytest.raises(InvalidRequest) as info:
        await publish(account.tenant, cloud_threshold=1.5)
    assert info.value.param == "cloud_threshold"


async def test_a_prompt_with_pii_is_refused_under_a_refusing_policy_and_nothing_is_charged(account):
    await publish(account.tenant, pii_action="refuse")
    with pytest.raises(InvalidRequest) as info:
        await gateway.start(await principal(account), call(prompt=f"Write to {EMAIL} about the invoice."))
    assert info.value.code == "pii_detected" and info.value.status == 400 and "EMAIL" in info.value.message
    assert not await UsageRecord.objects.aexists()


async def test_pii_asked_for_the_cloud_is_refused_under_the_default_policy(standin, account):
    await sync_to_async(register)(standin.base_url)
    with pytest.raises(InvalidRequest) as info:
        await gateway.start(await principal(account), call(prompt=f"Email {EMAIL} the agenda.", requested_tier="cloud"))
    assert info.value.code == "pii_detected" and info.value.param == "tier"


async def test_pii_never_fails_over_to_the_cloud(standin, account):
    from inference.engines import EngineSet, ModelEntry, TrivialEngine, set_engines
    from speculative.errors import VerifierUnavailableError

    down = TrivialEngine(fail_after=0, fail_as=VerifierUnavailableError("refused"))
    entry = ModelEntry("tandem-test", down, None, "v", "d", 4096, down.tokenizer)  # no edge: only the cloud is left
    previous = set_engines(EngineSet([entry], cloud=True))
    try:
        await sync_to_async(register)(standin.base_url)
        with pytest.raises(gateway.GatewayError):
            await gateway.start(await principal(account), call(prompt=f"Call me at {EMAIL} please."))
        clean = await gateway.start(await principal(account), call(prompt="Call me later please."))
        await gateway.collect(clean)
    finally:
        set_engines(previous)
    assert clean.route.tier is Tier.CLOUD and clean.route.reason == "verifier_down"
    assert await UsageRecord.objects.acount() == 1


async def test_redact_then_cloud_sends_placeholders_and_restores_them_in_the_answer(standin, account):
    await publish(account.tenant, pii_action="redact_then_cloud")
    await sync_to_async(register)(standin.base_url)
    prompt = f"Repeat exactly, nothing else: {EMAIL}"
    messages = ({"role": "user", "content": prompt},)
    stream = await gateway.start(
        await principal(account),
        call(prompt=prompt, messages=messages, requested_tier="cloud", max_tokens=24, temperature=0.0),
    )
    assert stream.route.tier is Tier.CLOUD and stream.route.redact
    text, deltas = await gateway.collect(stream)
    assert all(d.provenance is Provenance.CLOUD for d in deltas)
    assert "<EMAIL_1>" not in text  # whatever the model echoed of the placeholder came back as the address
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.route_signals["pii"] == ["EMAIL"] and EMAIL not in str(row.route_signals)
    # the upstream read the placeholder, not the address: its prompt count is the redacted one's
    from inference.model_tokenizers import gguf_tokenizer
    from inference.standin import model_path

    tokenizer = gguf_tokenizer(str(model_path()))
    redacted = ({"role": "user", "content": "Repeat exactly, nothing else: <EMAIL_1>"},)
    assert row.prompt_tokens == len(tokenizer.encode(tokenizer.render_chat(redacted)))


async def test_difficulty_routing_sends_routine_prompts_to_the_edge(account, settings):
    await publish(account.tenant, difficulty_routing=True)
    stream = await gateway.start(await principal(account), call(prompt="Say hi to my team in one short line."))
    await gateway.collect(stream)
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.route_signals["difficulty"] in ("routine", "hard_open", "hard_frontier")
    assert set(row.route_signals["difficulty_probs"]) == {"routine", "hard_open", "hard_frontier"}
    assert (
        row.route_tier
        == {"routine": "edge", "hard_open": "speculative", "hard_frontier": "speculative"}[
            row.route_signals["difficulty"]
        ]
    )


async def test_a_batch_request_is_recorded_as_such(account):
    stream = await gateway.start(await principal(account), call(latency_class="batch"))
    await gateway.collect(stream)
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.route_signals["latency_class"] == "batch"


async def test_an_unknown_latency_class_is_a_400(account):
    with pytest.raises(InvalidRequest) as info:
        await gateway.start(await principal(account), call(latency_class="urgent"))
    assert info.value.param == "latency_class"


# confidence escalation ------------------------------------------------------------------------------
ROUTINE = "Say hi to my team in one short line."  # the classifier's routine: the edge


async def test_a_confident_edge_answer_is_kept_and_its_confidence_recorded(account):
    await publish(account.tenant, difficulty_routing=True, escalation=True, escalation_hold_tokens=6)
    stream = await gateway.start(await principal(account), call(prompt=ROUTINE))
    text, deltas = await gateway.collect(stream)
    rows = [r async for r in UsageRecord.objects.filter(leg_of=stream.request_id)]
    assert stream.route.tier is Tier.EDGE and len(deltas) == 8 and text.startswith("Tandem")
    assert len(rows) == 1 and rows[0].route_signals["confidence"]["tokens"] == 6
    assert rows[0].route_signals["confidence"]["mean_logprob"] > -2.5
    assert all(d.logprob is None for d in deltas)  # judged from logprobs the client did not ask for: not sent


async def test_a_low_confidence_edge_answer_goes_up_a_tier_and_both_legs_are_charged(account):
    # the trivial engine's tokens sit at log-probabilities -0.1 and -0.5 (mean -0.23): a floor of -0.2 sends it up
    await publish(
        account.tenant,
        difficulty_routing=True,
        escalation=True,
        escalation_hold_tokens=6,
        escalation_min_mean_logprob=-0.2,
    )
    stream = await gateway.start(await principal(account), call(prompt=ROUTINE, max_tokens=8))
    text, deltas = await gateway.collect(stream)
    assert (stream.route.tier, stream.route.reason, stream.route.degraded) == (Tier.SPECULATIVE, "escalated", False)
    assert [d.index for d in deltas] == list(range(8)) and text.startswith("Tandem")  # the held text was never sent
    rows = [r async for r in UsageRecord.objects.filter(leg_of=stream.request_id).order_by("leg")]
    assert [(r.leg, r.route_tier, r.escalation, r.completion_tokens) for r in rows] == [
        (0, "edge", True, 6),
        (1, "speculative", False, 8),
    ]
    assert rows[0].cost_total > 0 and stream.usage.cost["total"] == rows[0].cost_total + rows[1].cost_total
    assert rows[1].route_signals["confidence"]["mean_logprob"] < -0.2
    assert [leg["escalation"] for leg in stream.usage.as_dict()["legs"]] == [True, False]


async def test_a_client_that_asked_for_the_edge_is_never_escalated(account):
    await publish(account.tenant, escalation=True, escalation_hold_tokens=6, escalation_min_mean_logprob=-0.01)
    stream = await gateway.start(await principal(account), call(requested_tier="edge"))
    await gateway.collect(stream)
    assert stream.route.tier is Tier.EDGE and await UsageRecord.objects.acount() == 1


async def test_a_failover_onto_the_cloud_redacts_the_pii_as_a_first_route_would(standin, account):
    from inference.engines import EngineSet, ModelEntry, TrivialEngine, set_engines
    from inference.model_tokenizers import gguf_tokenizer
    from inference.standin import model_path
    from speculative.errors import VerifierUnavailableError

    await publish(account.tenant, pii_action="redact_then_cloud", difficulty_routing=False)
    down = TrivialEngine(fail_after=0, fail_as=VerifierUnavailableError("refused"))
    entry = ModelEntry("tandem-test", down, None, "v", "d", 4096, down.tokenizer)  # no edge: the cloud takes over
    previous = set_engines(EngineSet([entry], cloud=True))
    try:
        await sync_to_async(register)(standin.base_url)
        prompt = f"Repeat exactly, nothing else: {EMAIL}"
        messages = ({"role": "user", "content": prompt},)
        stream = await gateway.start(await principal(account), call(prompt=prompt, messages=messages, max_tokens=24))
        text, _ = await gateway.collect(stream)
    finally:
        set_engines(previous)
    assert (stream.route.tier, stream.route.reason, stream.route.redact) == (Tier.CLOUD, "verifier_down", True)
    assert "<EMAIL_1>" not in text
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    tokenizer = gguf_tokenizer(str(model_path()))
    redacted = ({"role": "user", "content": "Repeat exactly, nothing else: <EMAIL_1>"},)
    assert row.prompt_tokens == len(tokenizer.encode(tokenizer.render_chat(redacted)))  # the upstream never saw it


async def test_a_continuation_handed_to_the_cloud_is_redacted_too():
    from inference.pii import scan
    from inference.redaction import redacted_call

    prompt = f"Write a note to {EMAIL} about the invoice."
    partial = f"Dear colleague at {EMAIL}, "
    report = scan(prompt)
    served, redaction = redacted_call(call(prompt=prompt, continue_from=partial), report)
    assert EMAIL not in served.prompt and EMAIL not in served.continue_from
    assert redaction.restore(served.continue_from) == partial


async def test_without_a_cloud_for_the_tenant_the_prompt_is_not_scanned_and_the_route_says_so(account):
    from inference.engines import get_engines

    get_engines().upstreams.forget()  # no upstream is registered here: re-read, not an earlier test's list
    stream = await gateway.start(await principal(account), call(prompt=f"Write to {EMAIL} please."))
    await gateway.collect(stream)
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.route_signals["pii_unscanned"] is True and "pii" not in row.route_signals


# engines at capacity: wait (the default) or spill -------------------------------------------------------
async def hold_every_local_slot() -> list:
    """Every slot of ``tandem-test``'s edge and speculative engines, taken by another tenant's streams."""
    from inference.engines import get_engines
    from inference.queueing import scheduler

    pool = scheduler.pool(*get_engines().get("tandem-test").pool(Tier.SPECULATIVE))
    return [await pool.acquire(10_000, pool.capacity) for _ in range(pool.capacity)]


async def test_a_spill_policy_sends_a_request_whose_engines_are_all_busy_to_a_free_tier(standin, account):
    await publish(account.tenant, at_capacity="spill")
    await sync_to_async(register)(standin.base_url)
    held = await hold_every_local_slot()
    try:
        stream = await gateway.start(await principal(account), call(max_tokens=4, temperature=0.0))
        await gateway.collect(stream)
    finally:
        for slot in held:
            slot.release()
    assert stream.route.tier is Tier.CLOUD and stream.route.reason == "at_capacity"
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert (row.route_tier, row.route_reason) == ("cloud", "at_capacity")


async def test_a_spill_never_takes_personal_data_to_the_cloud_it_waits_instead(standin, account):
    import asyncio

    await publish(account.tenant, at_capacity="spill")
    await sync_to_async(register)(standin.base_url)
    held = await hold_every_local_slot()
    waiting = asyncio.ensure_future(
        gateway.start(await principal(account), call(prompt=f"Write to {EMAIL} about the invoice.", max_tokens=4))
    )
    await asyncio.sleep(0.3)
    assert not waiting.done()  # no tier that may take it is free: it waits its turn
    held.pop().release()
    stream = await asyncio.wait_for(waiting, 10)
    await gateway.collect(stream)
    for slot in held:
        slot.release()
    assert stream.route.tier is not Tier.CLOUD and stream.route.reason != "at_capacity"


async def test_by_default_a_request_whose_engines_are_busy_waits_for_them(standin, account):
    import asyncio

    await sync_to_async(register)(standin.base_url)
    held = await hold_every_local_slot()
    waiting = asyncio.ensure_future(gateway.start(await principal(account), call(max_tokens=4)))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    held.pop().release()
    stream = await asyncio.wait_for(waiting, 10)
    await gateway.collect(stream)
    for slot in held:
        slot.release()
    assert stream.route.tier is Tier.SPECULATIVE and stream.route.reason != "at_capacity"
