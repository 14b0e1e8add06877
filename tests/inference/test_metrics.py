"""Prometheus metrics (``inference.metrics``): who may scrape, what a completion and a refusal move, live state."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from prometheus_client.parser import text_string_to_metric_families

from config.asgi import application
from inference import gateway, metrics
from inference.cloud import Upstream
from inference.engines import EngineSet, trivial_entry
from inference.errors import Overloaded
from inference.metrics import Metrics
from inference.queueing import Scheduler
from tenants.services import budget_set, price_book_amend
from tenants.tiers import Tier

MODEL = "tandem-test"
TOKEN = "scrape-token-0123456789abcdef"


@pytest.fixture
def fresh() -> Iterator[Metrics]:
    """This process's metrics replaced by an empty set for the test, so counts are exact."""
    mine = Metrics()
    previous = metrics.set_metrics(mine)
    try:
        yield mine
    finally:
        metrics.set_metrics(previous)


@pytest_asyncio.fixture
async def http():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://testserver") as c:
        yield c


def value(m: Metrics, name: str, **labels: str) -> float:
    """A sample's value (0 when it was never set)."""
    return m.registry.get_sample_value(name, labels) or 0.0


def requests(m: Metrics, tier: str, outcome: str, source: str) -> float:
    return value(m, "tandem_requests_total", model_name=MODEL, tier=tier, outcome=outcome, source=source)


def families(m: Metrics) -> dict:
    """The exposition parsed back, as Prometheus would read it: name -> family."""
    return {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}


# who may scrape --------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_anonymous_visitors_are_refused(client, settings):
    settings.TANDEM_METRICS_TOKEN = TOKEN
    response = client.get("/metrics")
    assert response.status_code == 403 and b"vllm:" not in response.content


@pytest.mark.django_db
def test_a_tenant_member_who_is_not_an_operator_is_refused(client, account):
    client.force_login(account.user)  # the owner of a tenant, but not staff
    assert client.get("/metrics").status_code == 403


@pytest.mark.django_db
def test_an_operator_session_gets_the_metrics_in_prometheus_text_format(client, django_user_model, fresh):
    operator = django_user_model.objects.create_user(username="ops", password="pw-ops-123456", is_staff=True)
    client.force_login(operator)
    response = client.get("/metrics")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain; version=")
    assert "no-cache" in response["Cache-Control"]
    names = {f.name for f in text_string_to_metric_families(response.content.decode())}
    assert {"vllm:e2e_request_latency_seconds", "tandem_request_errors", "vllm:num_requests_running"} <= names


@pytest.mark.django_db
def test_an_inactive_operator_is_refused(client, django_user_model):
    gone = django_user_model.objects.create_user(username="gone", password="pw-gone-12345", is_staff=True)
    client.force_login(gone)
    gone.is_active = False
    gone.save()
    assert client.get("/metrics").status_code == 403


@pytest.mark.django_db
def test_the_scrape_token_is_let_in_and_a_wrong_one_is_not(client, settings, fresh):
    settings.TANDEM_METRICS_TOKEN = TOKEN
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 403
    assert client.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 403


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_asgi_application_serves_it_to_the_scraper(settings, fresh, http):
    settings.TANDEM_METRICS_TOKEN = TOKEN
    scraped = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert scraped.status_code == 200 and "vllm:num_requests_waiting" in scraped.text
    assert (await http.get("/metrics")).status_code == 403


@pytest.mark.django_db
def test_with_no_token_configured_no_bearer_gets_in(client, settings):
    settings.TANDEM_METRICS_TOKEN = ""
    assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer x"}).status_code == 403


@pytest.mark.django_db
def test_only_reads_are_allowed(client, settings):
    settings.TANDEM_METRICS_TOKEN = TOKEN
    assert client.post("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 405


# what a completion moves -------------------------------------------------------------------------------
def call(**kwargs) -> gateway.CompletionCall:
    return gateway.CompletionCall(**{"model": MODEL, "prompt": "Hello there", "max_tokens": 12, **kwargs})


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_completion_moves_the_counters_and_histograms_by_its_own_figures(account, fresh):
    stream = await gateway.start(await gateway.authenticate_api_key(account.raw_key), call(max_tokens=12))
    deltas = [d async for d in stream]
    await stream.settled()
    assert len(deltas) == 12 and stream.usage is not None and stream.route.tier.value == "speculative"
    per_request = {"model_name": MODEL, "tier": "speculative", "source": "generation"}
    assert requests(fresh, "speculative", "completed", "generation") == 1
    assert value(fresh, "vllm:request_success_total", model_name=MODEL, finished_reason="length") == 1
    assert value(fresh, "vllm:prompt_tokens_total", model_name=MODEL, source="generation") == len("Hello there")
    assert value(fresh, "vllm:generation_tokens_total", model_name=MODEL, source="generation") == 12
    # the trivial engine: rounds of two drafted (accepted) tokens and one of the verifier's
    assert value(fresh, "vllm:spec_decode_num_draft_tokens_total", model_name=MODEL) == 8
    assert value(fresh, "vllm:spec_decode_num_accepted_tokens_total", model_name=MODEL) == 8
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        assert value(fresh, f"vllm:{name}_seconds_count", **per_request) == 1
    ttft = value(fresh, "vllm:time_to_first_token_seconds_sum", **per_request)
    e2e = value(fresh, "vllm:e2e_request_latency_seconds_sum", **per_request)
    assert stream.usage.ttft_ms is not None and 0 < ttft <= e2e  # the settlement's own figures, in seconds
    assert (ttft, e2e) == (pytest.approx(stream.usage.ttft_ms / 1e3), pytest.approx(stream.usage.duration_ms / 1e3))
    assert value(fresh, "vllm:e2e_request_latency_seconds_bucket", le="+Inf", **per_request) == 1
    assert value(fresh, "vllm:request_queue_time_seconds_count", model_name=MODEL, tier="speculative") == 1
    assert value(fresh, "tandem_cache_hits_total", model_name=MODEL, kind="exact") == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_cancelled_stream_is_an_abort_and_counts_only_what_it_delivered(account, fresh):
    stream = await gateway.start(await gateway.authenticate_api_key(account.raw_key), call(max_tokens=30))
    for _ in range(4):
        await stream.__anext__()
    await stream.aclose()
    assert value(fresh, "vllm:request_success_total", model_name=MODEL, finished_reason="abort") == 1
    assert value(fresh, "vllm:generation_tokens_total", model_name=MODEL, source="generation") == 4
    assert requests(fresh, "speculative", "cancelled", "generation") == 1


@pytest_asyncio.fixture
async def cached(account, settings):
    """The exact cache on (in memory), with a cache rate for ``tandem-test`` (as in test_cache.py)."""
    settings.TANDEM_CACHE_TTL_S = 60
    settings.TANDEM_CACHE_REDIS_URL = ""
    rates = {"prompt_per_mtok": "0.50", "completion_per_mtok": "1.50", "draft_per_mtok": "0.10"}
    rates |= {"gpu_per_hour": "2.00", "max_gpu_ms_per_token": "50", "cache_per_mtok": "0.05"}
    prices = [{"model": MODEL, "tier": tier, **rates} for tier in ("edge", "speculative", "cloud")]
    await sync_to_async(price_book_amend)(prices=prices, note="cache rate")
    return account


async def run_to_end(account) -> gateway.GatewayStream:
    from inference.stream import _storing

    stream = await gateway.start(await gateway.authenticate_api_key(account.raw_key), call())
    await gateway.collect(stream)
    await asyncio.sleep(0)
    if _storing:  # the answer is stored just after it settles
        await asyncio.gather(*_storing)
    return stream


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_replayed_answer_is_a_cache_hit_and_adds_no_draft_tokens(cached, fresh):
    await run_to_end(cached)
    replay = await run_to_end(cached)  # the same greedy request again
    assert replay.source == "exact_cache"
    assert value(fresh, "tandem_cache_hits_total", model_name=MODEL, kind="exact") == 1
    tier = replay.route.tier.value
    assert requests(fresh, tier, "completed", "exact_cache") == 1
    replays = {"model_name": MODEL, "tier": tier, "source": "exact_cache"}
    assert value(fresh, "vllm:e2e_request_latency_seconds_count", **replays) == 1
    # the generated answer's 8 drafts (12 tokens of the trivial engine), counted once: its replay adds none
    assert value(fresh, "vllm:spec_decode_num_draft_tokens_total", model_name=MODEL) == 8
    assert value(fresh, "vllm:request_queue_time_seconds_count", model_name=MODEL, tier=tier) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_failing_metric_never_fails_the_request(account, fresh, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("metrics broke")

    monkeypatch.setattr(fresh, "observe_settled", broken)
    stream = await gateway.start(await gateway.authenticate_api_key(account.raw_key), call(max_tokens=6))
    deltas = [d async for d in stream]
    await stream.settled()
    assert len(deltas) == 6 and stream.usage is not None and stream.usage.outcome == "completed"
    assert "recording its metrics failed" in caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_no_tenant_user_or_key_reaches_a_label(account, fresh):
    stream = await gateway.start(await gateway.authenticate_api_key(account.raw_key), call(max_tokens=3))
    _ = [d async for d in stream]
    text = fresh.exposition().decode()
    assert account.tenant.name not in text and account.user.username not in text
    assert account.raw_key not in text and account.raw_key[:12] not in text
    labels = {name for f in families(fresh).values() for s in f.samples for name in s.labels}
    assert not labels & {"tenant", "tenant_id", "user", "api_key", "key"}


# refusals, by code -------------------------------------------------------------------------------------
def chat(raw_key: str, **fields) -> dict:
    return {
        "json": {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5, **fields},
        "headers": {"Authorization": f"Bearer {raw_key}"},
    }


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_refusals_on_the_api_are_counted_by_code_and_status(account, fresh, http, settings):
    assert (await http.post("/v1/chat/completions", **chat("tdm_not-a-key"))).status_code == 401
    assert (await http.post("/v1/chat/completions", **chat(account.raw_key, model="nope"))).status_code == 404
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 0  # every request must queue...
    settings.TANDEM_MAX_QUEUED_PER_TENANT = 0  # ...and none may
    for _ in range(2):
        assert (await http.post("/v1/chat/completions", **chat(account.raw_key))).status_code == 429
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 64
    await sync_to_async(budget_set)(tenant=account.tenant, period="day", hard_limit=Decimal("0"), soft_limit=None)
    assert (await http.post("/v1/chat/completions", **chat(account.raw_key))).status_code == 402
    assert value(fresh, "tandem_request_errors_total", code="invalid_api_key", status="401") == 1
    assert value(fresh, "tandem_request_errors_total", code="model_not_found", status="404") == 1
    assert value(fresh, "tandem_request_errors_total", code="too_many_queued", status="429") == 2
    assert value(fresh, "tandem_request_errors_total", code="budget_exceeded", status="402") == 1
    assert sum(s.value for s in families(fresh)["tandem_request_errors"].samples if s.name.endswith("_total")) == 5


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_streamed_request_refused_while_queued_is_counted(account, fresh, http, settings):
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 0
    settings.TANDEM_QUEUE_DEADLINE_S = {"interactive": 0.05, "batch": 0.05}
    response = await http.post("/v1/chat/completions", **chat(account.raw_key, stream=True))
    assert response.status_code == 200 and b"queue_timeout" in response.content  # the error event of an SSE answer
    assert value(fresh, "tandem_request_errors_total", code="queue_timeout", status="503") == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_refusal_on_the_websocket_is_counted(account, fresh):
    ws = WebsocketCommunicator(
        application,
        "/ws/v1/completions",
        headers=[(b"origin", b"http://testserver"), (b"authorization", f"Bearer {account.raw_key}".encode())],
    )
    connected, _ = await ws.connect(timeout=5)
    assert connected
    await ws.send_json_to({"type": "start", "id": "s1", "model": "nope", "prompt": "Hello"})
    frame = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert frame["type"] == "error" and frame["error"]["code"] == "model_not_found"
    assert value(fresh, "tandem_request_errors_total", code="model_not_found", status="404") == 1


def test_a_failing_error_count_never_breaks_the_answer(fresh, monkeypatch, caplog):
    monkeypatch.setattr(fresh, "count_error", lambda error: 1 / 0)
    metrics.count_error(Overloaded("busy"))  # does not raise
    assert "counting an error answer (overloaded) failed" in caplog.text


# live state, read at scrape time -------------------------------------------------------------------------
def test_queue_depth_is_read_from_the_scheduler_at_each_scrape():
    pools = Scheduler()
    m = Metrics(pools=pools, loaded_engines=lambda: None)
    pool = pools.pool(f"{MODEL}/local", 2)

    async def scenario() -> None:
        first = await pool.acquire(1, 10)
        await pool.acquire(2, 10)
        third = asyncio.ensure_future(pool.acquire(3, 10))
        await asyncio.sleep(0)  # it queues: both slots are taken
        labels = {"model_name": MODEL, "pool": "local"}
        assert value(m, "vllm:num_requests_running", **labels) == 2
        assert value(m, "vllm:num_requests_waiting", **labels) == 1
        assert value(m, "tandem_pool_slots", **labels) == 2
        first.release()  # the slot goes straight to the waiter
        (await third).release()
        assert value(m, "vllm:num_requests_running", **labels) == 1
        assert value(m, "vllm:num_requests_waiting", **labels) == 0

    asyncio.run(scenario())


def test_breaker_states_are_read_from_the_engine_registry_at_each_scrape(settings):
    engines = EngineSet([trivial_entry()], cloud=True)
    assert engines.upstreams is not None
    upstream = Upstream(name="up-1", model=MODEL, base_url="http://127.0.0.1:9/v1", api_key_env="", upstream_model="x")
    engines.upstreams.replace([upstream])
    m = Metrics(pools=Scheduler(), loaded_engines=lambda: engines)

    def state(tier: str, breaker: str, which: str) -> float:
        return value(m, "tandem_circuit_breaker_state", model_name=MODEL, tier=tier, breaker=breaker, state=which)

    verifier = f"{MODEL}/verifier"
    assert state("speculative", verifier, "closed") == 1 and state("speculative", verifier, "open") == 0
    assert state("cloud", "cloud/up-1", "closed") == 1
    engines.models[MODEL].breakers[next(iter(engines.models[MODEL].breakers))].trip("refused")
    engines.upstreams.breaker(upstream).trip("refused")
    assert state("speculative", verifier, "open") == 1 and state("speculative", verifier, "closed") == 0
    assert state("cloud", "cloud/up-1", "open") == 1


def test_streams_per_tier_are_read_from_the_engine_registry_at_each_scrape():
    engines = EngineSet([trivial_entry()], cloud=True)
    m = Metrics(pools=Scheduler(), loaded_engines=lambda: engines)
    entry = engines.models[MODEL]
    entry.enter(Tier.SPECULATIVE)
    entry.enter(Tier.SPECULATIVE)
    entry.enter(Tier.EDGE)
    running = {
        tier: value(m, "tandem_streams_running", model_name=MODEL, tier=tier) for tier in ("edge", "speculative")
    }
    assert running == {"edge": 1, "speculative": 2}
    assert m.registry.get_sample_value("tandem_streams_running", {"model_name": MODEL, "tier": "cloud"}) == 0
    entry.leave(Tier.SPECULATIVE)
    assert value(m, "tandem_streams_running", model_name=MODEL, tier="speculative") == 1


def test_a_scrape_before_the_engines_load_has_no_breakers_and_loads_nothing():
    m = Metrics(pools=Scheduler(), loaded_engines=lambda: None)
    parsed = families(m)
    assert parsed["tandem_circuit_breaker_state"].samples == []
    assert parsed["vllm:num_requests_running"].samples == [] and parsed["tandem_streams_running"].samples == []


def test_the_exposition_parses_with_every_family_typed(fresh):
    parsed = families(fresh)
    expected = {
        "tandem_requests": "counter",
        "vllm:request_success": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:spec_decode_num_draft_tokens": "counter",
        "vllm:spec_decode_num_accepted_tokens": "counter",
        "tandem_request_errors": "counter",
        "tandem_cache_hits": "counter",
        "tandem_request_failovers": "counter",
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "tandem_pool_slots": "gauge",
        "tandem_streams_running": "gauge",
        "tandem_circuit_breaker_state": "gauge",
    }
    assert {name: parsed[name].type for name in expected} == expected
