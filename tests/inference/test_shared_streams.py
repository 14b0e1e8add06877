"""Streams at once shared by every process through Redis (inference.shared_streams).

Two ``SharedStreams`` are two web processes: their own memory, one Redis. Skips (saying so)
where no Redis answers.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from config.asgi import application
from inference.errors import Overloaded
from inference.shared_streams import KEY_PREFIX, SharedStreams, shared_streams
from tenants.models import Tenant
from tests.inference.conftest import GatedEngine, serving_gated
from tests.inference.test_openai_api import HELLO

pytestmark = pytest.mark.asyncio


@pytest.fixture
def redis_url(redis_db, settings) -> str:
    settings.TANDEM_RATE_LIMIT_REDIS_URL = redis_db[0]
    return redis_db[0]


async def test_two_processes_together_never_run_more_than_a_tenants_limit(redis_url):
    first, second = SharedStreams(), SharedStreams()
    owners = [("t1", 3)]
    held = [await first.claim(owners, 5), await second.claim(owners, 5), await first.claim(owners, 5)]
    waiting = asyncio.ensure_future(second.claim(owners, 5))
    other_tenant = await second.claim([("t2", 3)], 5)  # another tenant's count is its own
    await asyncio.sleep(0.1)
    assert not waiting.done()  # the fourth waits, wherever it arrives
    held[0].release()  # a stream of the first process ends: the second's waiter goes
    claim = await asyncio.wait_for(waiting, 5)
    assert claim is not None and other_tenant is not None
    for c in (held[1], held[2], claim, other_tenant):
        c.release()
    await asyncio.sleep(0.05)
    assert await redis_db_count(redis_url, "t1") == 0


async def test_a_keys_limit_binds_inside_its_tenants(redis_url):
    process = SharedStreams()
    key_claim = await process.claim([("t1", 10), ("k5", 1)], 5)
    with pytest.raises(Overloaded) as refused:
        await process.claim([("t1", 10), ("k5", 1)], 0.1)  # the key is at its limit, the tenant is not
    assert refused.value.code == "queue_timeout" and refused.value.retry_after >= 1
    assert "API key" in refused.value.message
    assert await redis_db_count(redis_url, "t1") == 1  # the refused claim took nothing (all or none)
    key_claim.release()


async def test_a_dead_processes_claims_lapse_and_a_live_ones_are_renewed(redis_url):
    dead, alive, newcomer = SharedStreams(ttl_s=0.5), SharedStreams(ttl_s=0.5), SharedStreams()
    await dead.claim([("t1", 2)], 1)
    dead._live.clear()  # its process dies: nothing renews its claim
    kept = await alive.claim([("t1", 2)], 1)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        alive.renew()  # what its renewal thread does every ttl/3
        await asyncio.sleep(0.1)
        if await redis_db_count(redis_url, "t1", live_only=True) == 1:
            break
    assert await redis_db_count(redis_url, "t1", live_only=True) == 1  # the dead one lapsed, the live one is kept
    claim = await newcomer.claim([("t1", 2)], 1)  # the place the dead process held is free again
    assert claim is not None
    claim.release()
    kept.release()


async def test_without_redis_nothing_is_claimed_and_an_unreachable_one_does_not_stop_traffic(settings):
    settings.TANDEM_RATE_LIMIT_REDIS_URL = ""
    assert await SharedStreams().claim([("t1", 1)], 1) is None  # the local queue counts alone
    settings.TANDEM_RATE_LIMIT_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    assert await SharedStreams().claim([("t1", 1)], 1) is None


@pytest.mark.django_db(transaction=True)
async def test_a_request_waits_while_its_tenant_runs_its_limit_on_another_server(account, redis_url):
    await Tenant.objects.filter(pk=account.tenant.pk).aupdate(max_streams=1)
    elsewhere = await SharedStreams().claim([(f"t{account.tenant.pk}", 1)], 1)  # another server's stream
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://testserver") as http:
        with serving_gated(GatedEngine(free_tokens=1000)):
            request = asyncio.ensure_future(
                http.post(
                    "/v1/chat/completions",
                    json={"model": "tandem-test", "messages": HELLO, "max_tokens": 4},
                    headers={"Authorization": f"Bearer {account.raw_key}"},
                )
            )
            await asyncio.sleep(0.3)
            assert not request.done()  # waiting for the other server's stream, not refused
            elsewhere.release()
            response = await asyncio.wait_for(request, 10)
    assert response.status_code == 200
    await asyncio.sleep(0.05)
    assert await redis_db_count(redis_url, f"t{account.tenant.pk}") == 0  # its own claim went when it settled
    assert shared_streams.live() == 0


async def redis_db_count(url: str, owner: str, live_only: bool = False) -> int:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        if live_only:
            return int(await client.zcount(KEY_PREFIX + owner, time.time(), "+inf"))
        return int(await client.zcard(KEY_PREFIX + owner))
    finally:
        await client.aclose()
