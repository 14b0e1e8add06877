"""The exact result cache (inference.cache) through the gateway: replays, charges, keys, scoping, retention."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async

from inference import gateway
from inference.cache import ExactCache, cache_key, exact_cache
from inference.engines import get_engines
from inference.services import routing_policy_publish
from tenants.models import UsageRecord
from tenants.services import price_book_amend

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

CACHE_RATE = Decimal("0.05")  # per million tokens, against 0.50 / 1.50 generated (tests/conftest.py TEST_RATES)
EMAIL = "maria.lopez.1987@gmail.com"


@pytest_asyncio.fixture
async def cached(account, settings):
    """The builtin policy with the cache on, and a cache rate for ``tandem-test`` on every tier."""
    settings.TANDEM_CACHE_TTL_S = 60
    settings.TANDEM_CACHE_REDIS_URL = ""
    prices = [
        {
            "model": "tandem-test",
            "tier": tier,
            "prompt_per_mtok": "0.50",
            "completion_per_mtok": "1.50",
            "draft_per_mtok": "0.10",
            "gpu_per_hour": "2.00",
            "max_gpu_ms_per_token": "50",
            "cache_per_mtok": CACHE_RATE,
        }
        for tier in ("edge", "speculative", "cloud")
    ]
    await sync_to_async(price_book_amend)(prices=prices, note="cache rate")
    return account


def call(**kwargs) -> gateway.CompletionCall:
    return gateway.CompletionCall(**{"model": "tandem-test", "prompt": "Hello there", "max_tokens": 12, **kwargs})


async def run(account, **kwargs) -> tuple[str, gateway.GatewayStream]:
    from inference.stream import _storing

    stream = await gateway.start(await gateway.authenticate_api_key(account.raw_key), call(**kwargs))
    text, _ = await gateway.collect(stream)
    await asyncio.sleep(0)
    if _storing:  # the answer is stored just after it settles
        await asyncio.gather(*_storing)
    return text, stream


async def row(stream) -> UsageRecord:
    return await UsageRecord.objects.aget(request_id=stream.request_id)


async def test_an_identical_greedy_request_replays_the_answer_at_the_cache_rate_and_records_its_saving(cached):
    first_text, first = await run(cached)
    second_text, second = await run(cached)
    assert second_text == first_text and second.route.reason == "exact_cache"
    generated, replayed = await row(first), await row(second)
    assert (generated.source, replayed.source) == ("generation", "exact_cache")
    assert replayed.route_tier == generated.route_tier and replayed.completion_tokens == generated.completion_tokens
    tokens = replayed.prompt_tokens + replayed.completion_tokens
    assert replayed.cost_total == (CACHE_RATE * tokens / 1_000_000).quantize(Decimal("1e-9"))
    assert replayed.gpu_ms == 0 and replayed.drafted_tokens == 0
    assert replayed.saving == generated.cost_total - replayed.cost_total > 0
    assert second.usage.finish_reason == first.usage.finish_reason


async def test_a_replay_needs_no_engine_slot_so_it_is_served_while_every_engine_is_busy(cached):
    from inference.queueing import scheduler
    from tenants.tiers import Tier

    await run(cached)
    pool = scheduler.pool(*get_engines().get("tandem-test").pool(Tier.SPECULATIVE))
    held = [await pool.acquire(10_000, pool.capacity) for _ in range(pool.capacity)]
    try:
        _, replay = await asyncio.wait_for(run(cached), 5)
    finally:
        for slot in held:
            slot.release()
    assert replay.route.reason == "exact_cache" and replay.slot is None


async def test_anything_that_decides_the_answer_changes_the_key(cached):
    entry = get_engines().get("tandem-test")
    from inference.selectors import builtin_policy

    policy = builtin_policy()
    base = cache_key(1, call(), entry, policy)
    for changed in (
        call(prompt="Hello there!"),
        call(max_tokens=13),
        call(temperature=0.5),
        call(top_p=0.9),
        call(top_k=5),
        call(seed=1),
        call(stop=("x",)),
        call(requested_tier="edge"),
    ):
        assert cache_key(1, changed, entry, policy) != base
    assert cache_key(2, call(), entry, policy) != base  # another tenant
    import dataclasses

    assert cache_key(1, call(), entry, dataclasses.replace(policy, version="t1-v9")) != base
    newer = dataclasses.replace(entry, verifier_version="other@1")
    assert cache_key(1, call(), newer, policy) != base


async def test_sampled_requests_are_not_cached_unless_the_policy_opts_in(cached):
    _, first = await run(cached, temperature=0.7, seed=3)
    _, second = await run(cached, temperature=0.7, seed=3)
    assert second.route.reason != "exact_cache" and (await row(second)).source == "generation"
    await sync_to_async(routing_policy_publish)(tenant=cached.tenant, cache_sampled=True, difficulty_routing=False)
    _, third = await run(cached, temperature=0.7, seed=3)
    _, fourth = await run(cached, temperature=0.7, seed=3)
    assert third.route.reason != "exact_cache" and fourth.route.reason == "exact_cache"


async def test_a_prompt_with_personal_data_is_never_stored_unless_the_policy_opts_in(cached):
    prompt = f"Write to {EMAIL} about the invoice."
    await run(cached, prompt=prompt)
    _, again = await run(cached, prompt=prompt)
    assert again.route.reason != "exact_cache"
    assert not exact_cache.local._entries  # nothing of it was kept
    await sync_to_async(routing_policy_publish)(tenant=cached.tenant, cache_pii=True, difficulty_routing=False)
    await run(cached, prompt=prompt)
    _, hit = await run(cached, prompt=prompt)
    assert hit.route.reason == "exact_cache"


async def test_one_tenants_cached_answer_is_never_served_to_another(cached, other_account):
    await run(cached)
    _, theirs = await run(other_account)
    assert theirs.route.reason != "exact_cache" and (await row(theirs)).source == "generation"


async def test_a_new_policy_version_makes_old_entries_unreachable_and_ttl_zero_turns_the_cache_off(cached):
    await run(cached)
    await sync_to_async(routing_policy_publish)(tenant=cached.tenant, difficulty_routing=False)
    _, after = await run(cached)
    assert after.route.reason != "exact_cache"
    await sync_to_async(routing_policy_publish)(tenant=cached.tenant, cache_ttl_s=0, difficulty_routing=False)
    await run(cached)
    _, off = await run(cached)
    assert off.route.reason != "exact_cache"


async def test_an_owner_forgets_the_tenants_entries_and_only_the_tenants(cached, other_account):
    await run(cached)
    await run(other_account)  # the builtin policy: cached for the other tenant too
    assert await exact_cache.forget_tenant(cached.tenant.pk) == 1
    _, mine = await run(cached)
    _, theirs = await run(other_account)
    assert mine.route.reason != "exact_cache" and theirs.route.reason == "exact_cache"


async def test_entries_expire_after_the_policys_retention(cached, settings):
    settings.TANDEM_CACHE_TTL_S = 1
    await run(cached)
    await asyncio.sleep(1.1)
    _, later = await run(cached)
    assert later.route.reason != "exact_cache"


async def test_a_cancelled_replay_is_charged_for_what_it_sent(cached):
    await run(cached)
    stream = await gateway.start(await gateway.authenticate_api_key(cached.raw_key), call())
    assert stream.route.reason == "exact_cache"
    first = await stream.__anext__()
    await stream.aclose()
    replayed = await row(stream)
    assert replayed.outcome == "cancelled" and replayed.completion_tokens == first.index + 1 < 12
    assert replayed.source == "exact_cache" and replayed.saving > 0


async def test_entries_are_shared_through_redis(cached, settings, redis_db):
    url, client = redis_db
    settings.TANDEM_CACHE_REDIS_URL = url
    await run(cached)
    exact_cache.reset()  # another process: nothing in its memory
    other = ExactCache()
    keys = [k async for k in client.scan_iter(match="tandem:cache:v1:*")]
    assert len(keys) == 1 and f":t{cached.tenant.pk}:" in keys[0].decode()
    assert await other.get(keys[0].decode()) is not None
    _, hit = await run(cached)
    assert hit.route.reason == "exact_cache"
    assert await exact_cache.forget_tenant(cached.tenant.pk) == 1


# request collapsing ---------------------------------------------------------------------------------------
async def test_identical_requests_in_flight_at_once_share_one_generation(cached):
    from inference.cache import in_flight
    from tests.inference.conftest import GatedEngine, serving_gated

    with serving_gated(GatedEngine(free_tokens=1)) as engine:
        principal = await gateway.authenticate_api_key(cached.raw_key)
        leading = asyncio.ensure_future(gateway.start(principal, call()))
        followers = [asyncio.ensure_future(gateway.start(principal, call())) for _ in range(3)]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if leading.done():
                break
        assert in_flight.leading() == 1 and not any(f.done() for f in followers)  # they wait for its answer
        engine.gate.release(100)
        leader = await leading
        text, _ = await gateway.collect(leader)
        for follower in followers:
            stream = await asyncio.wait_for(follower, 5)
            assert (await gateway.collect(stream))[0] == text and stream.route.reason == "collapsed"
    rows = [r async for r in UsageRecord.objects.order_by("id")]
    assert [r.source for r in rows] == ["generation"] + ["exact_cache"] * 3
    assert all(r.route_reason == "collapsed" and r.saving > 0 for r in rows[1:])
    assert in_flight.leading() == 0


async def test_followers_of_a_leader_that_fails_generate_their_own(cached):
    from inference.cache import in_flight
    from tests.inference.conftest import GatedEngine, serving_gated

    with serving_gated(GatedEngine(free_tokens=1)) as engine:
        principal = await gateway.authenticate_api_key(cached.raw_key)
        leader = await gateway.start(principal, call())
        follower = asyncio.ensure_future(gateway.start(principal, call()))
        await asyncio.sleep(0.05)
        assert not follower.done()
        await leader.aclose()  # its client went away: nothing is stored
        engine.gate.release(100)
        stream = await asyncio.wait_for(follower, 5)
        await gateway.collect(stream)
    assert stream.route.reason != "collapsed" and (await row(stream)).source == "generation"
    assert in_flight.leading() == 0
