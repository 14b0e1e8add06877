"""Requests and tokens per minute (inference.limits): buckets, refusals with Retry-After, OpenAI's headers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async

from config.asgi import application
from inference.errors import InvalidRequest, RateLimited
from inference.limits import Limiter, Limits, LocalBuckets, duration
from inference.principals import Principal
from tenants.models import ApiKey, Tenant, UsageRecord

HELLO = [{"role": "user", "content": "Hello there"}]


# the buckets on their own ----------------------------------------------------------------------
def test_a_bucket_lets_a_minutes_allowance_through_at_once_then_refills_continuously():
    buckets = LocalBuckets()
    take = [("r", 60, 1.0)]
    assert all(buckets.take(take, 0.0)[0] for _ in range(60))
    ok, (level,) = buckets.take(take, 0.0)
    assert not ok and level == pytest.approx(0.0)
    assert not buckets.take(take, 0.5)[0]  # half a request refilled
    ok, (level,) = buckets.take(take, 1.0)  # one a second at 60 a minute
    assert ok and level == pytest.approx(0.0)
    assert buckets.take(take, 1000.0)[1][0] == pytest.approx(59.0)  # refilled to the brim, never past it


def test_a_take_from_several_buckets_is_all_or_none():
    buckets = LocalBuckets()
    assert buckets.take([("a", 10, 5.0), ("b", 10, 9.0)], 0.0)[0]
    ok, levels = buckets.take([("a", 10, 5.0), ("b", 10, 5.0)], 0.0)
    assert not ok and levels == [pytest.approx(5.0), pytest.approx(1.0)]  # "a" was not taken from either
    buckets.give([("b", 10, 100.0)], 0.0)
    assert buckets.take([("b", 10, 10.0)], 0.0)[0]  # given back up to the capacity


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (0.0004, "1ms"), (0.12, "120ms"), (1.0, "1s"), (6.2, "7s"), (90, "1m30s")]
)
def test_reset_durations_read_like_openais(seconds, text):
    assert duration(seconds) == text


def principal(tenant_id=1, key_id=7, rpm=3, tpm=1000, key: Limits | None = None) -> Principal:
    return Principal(tenant_id=tenant_id, user_id=None, api_key_id=key_id, limits=Limits(64, rpm, tpm), key_limits=key)


@pytest.mark.asyncio
async def test_past_its_requests_per_minute_a_principal_gets_429_with_when_to_retry():
    limiter = Limiter()
    who = principal(rpm=3)
    states = [await limiter.admit(who, 10) for _ in range(3)]
    assert [s.requests.remaining for s in states] == [2, 1, 0]
    assert [s.tokens.remaining for s in states] == [990, 980, 970]
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(who, 10)
    assert refused.value.code == "requests_per_minute_exceeded" and refused.value.retry_after == 20  # 3 a minute
    other = principal(tenant_id=2)
    assert (await limiter.admit(other, 10)).requests.remaining == 2  # another tenant's bucket is its own


@pytest.mark.asyncio
async def test_tokens_held_are_given_back_and_a_request_larger_than_a_minute_is_a_400():
    limiter = Limiter()
    who = principal(rpm=100, tpm=1000)
    assert (await limiter.admit(who, 900)).tokens.remaining == 100
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(who, 200)
    assert refused.value.code == "tokens_per_minute_exceeded" and refused.value.retry_after >= 6
    await limiter.give_back(who, 850)  # it used 50 of the 900 it held
    assert (await limiter.admit(who, 200)).tokens.remaining == pytest.approx(750, abs=1)
    with pytest.raises(InvalidRequest) as never:
        await limiter.admit(who, 1001)
    assert never.value.code == "tokens_exceed_limit" and never.value.param == "max_tokens"


@pytest.mark.asyncio
async def test_a_keys_own_limits_bind_inside_its_tenants():
    limiter = Limiter()
    tight_key = principal(key_id=1, rpm=100, key=Limits(None, 1, None))
    loose_key = principal(key_id=2, rpm=100)
    await limiter.admit(tight_key, 1)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(tight_key, 1)
    assert "this API key" in refused.value.message
    state = await limiter.admit(loose_key, 1)  # the tenant has room; only the tight key is out
    assert state.requests.remaining == 98


# shared through Redis ------------------------------------------------------------------------------
@pytest.fixture
def redis_url(redis_db, settings) -> str:
    settings.TANDEM_RATE_LIMIT_REDIS_URL = redis_db[0]
    return redis_db[0]


@pytest.mark.asyncio
async def test_two_processes_share_a_tenants_limit_through_redis(redis_url):
    first, second = Limiter(), Limiter()  # two web processes: their own memory, one Redis
    who = principal(rpm=4)
    await first.admit(who, 1)
    await second.admit(who, 1)
    await first.admit(who, 1)
    assert (await second.admit(who, 1)).requests.remaining == 0
    with pytest.raises(RateLimited):
        await first.admit(who, 1)
    await second.give_back(who, 1)
    assert (await first.state(who)).tokens.remaining == 997


@pytest.mark.asyncio
async def test_an_unreachable_redis_does_not_stop_traffic(settings):
    settings.TANDEM_RATE_LIMIT_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    limiter = Limiter()
    who = principal(rpm=2)
    assert (await limiter.admit(who, 1)).requests.remaining == 1  # counted in this process instead
    with pytest.raises(RateLimited):
        await limiter.admit(who, 1)
        await limiter.admit(who, 1)


# through the API ---------------------------------------------------------------------------------------
@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://testserver") as c:
        yield c


def chat(http: httpx.AsyncClient, raw_key: str, **fields):
    body = {"model": "tandem-test", "messages": HELLO, "max_tokens": 5, **fields}
    return http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {raw_key}"})


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_every_api_response_carries_openais_rate_limit_headers(account, http, settings):
    await Tenant.objects.filter(pk=account.tenant.pk).aupdate(requests_per_minute=60, tokens_per_minute=600)
    first = await chat(http, account.raw_key)
    second = await chat(http, account.raw_key)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "60"
    assert int(first.headers["x-ratelimit-remaining-requests"]) == 59
    assert int(second.headers["x-ratelimit-remaining-requests"]) == 58
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert first.headers["x-ratelimit-limit-tokens"] == "600"
    # what the two used (not the max_tokens held) is gone; a minute's 600 refill at 10 a second meanwhile
    used = first.json()["usage"]["total_tokens"] + second.json()["usage"]["total_tokens"]
    assert 600 - used - 1 <= int(second.headers["x-ratelimit-remaining-tokens"]) <= 600 - used + 10
    models = await http.get("/v1/models", headers={"Authorization": f"Bearer {account.raw_key}"})
    assert int(models.headers["x-ratelimit-remaining-requests"]) == 58  # reading takes nothing
    streamed = await chat(http, account.raw_key, stream=True)
    assert int(streamed.headers["x-ratelimit-remaining-requests"]) == 57
    default = await http.get("/v1/models", headers={"Authorization": f"Bearer {account.raw_key}"})
    assert default.headers["x-ratelimit-limit-requests"] == "60"


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_tenant_without_limits_of_its_own_gets_the_platform_defaults(account, http, settings):
    response = await chat(http, account.raw_key)
    assert response.headers["x-ratelimit-limit-requests"] == str(settings.TANDEM_REQUESTS_PER_MINUTE)
    assert response.headers["x-ratelimit-limit-tokens"] == str(settings.TANDEM_TOKENS_PER_MINUTE)


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_tenants_own_limits_from_the_console_apply_and_a_refusal_charges_nothing(account, http):
    await Tenant.objects.filter(pk=account.tenant.pk).aupdate(requests_per_minute=2, tokens_per_minute=400)
    assert (await chat(http, account.raw_key)).status_code == 200
    assert (await chat(http, account.raw_key)).status_code == 200
    refused = await chat(http, account.raw_key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "requests_per_minute_exceeded"
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert await UsageRecord.objects.acount() == 2
    too_big = await chat(http, account.raw_key, max_tokens=500)
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "tokens_exceed_limit"


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_keys_stream_limit_makes_its_requests_wait_not_fail(account, http, settings):
    await ApiKey.objects.filter(pk=account.api_key.pk).aupdate(max_streams=1)
    replies = await asyncio.gather(*(chat(http, account.raw_key, max_tokens=20) for _ in range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    assert await sync_to_async(lambda: UsageRecord.objects.filter(outcome="completed").count())() == 4
