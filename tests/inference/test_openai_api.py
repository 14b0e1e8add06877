"""The OpenAI-compatible API (``inference.openai_api``): the official client, SSE bytes, the ledger, bad input, tenants."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal

import httpx
import openai
import pytest
import pytest_asyncio
from django.test import AsyncRequestFactory

from config.asgi import application
from inference import api_handler as api_handler_module
from inference import gateway, openai_api
from inference.engines import TRIVIAL_TEXT
from inference.errors import InvalidRequest
from inference.queueing import scheduler
from tenants.models import Budget, Reservation, UsageRecord
from tenants.services import api_key_create, api_key_revoke, budget_set
from tests.inference.conftest import GatedEngine, serving_gated

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

BASE = "http://testserver"
MODEL = "tandem-test"
HELLO = [{"role": "user", "content": "Hello there"}]


# clients ----------------------------------------------------------------------------------------
@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield client


def official_client(raw_key: str, http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    # no retries: a 429 or 5xx must surface, not be retried with back-off sleeps
    return openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key=raw_key, http_client=http, max_retries=0)


@pytest.fixture
def client(account, http) -> openai.AsyncOpenAI:
    return official_client(account.raw_key, http)


def bearer(raw_key: str) -> dict:
    return {"Authorization": f"Bearer {raw_key}"}


async def post_chat(http: httpx.AsyncClient, raw_key: str, **fields) -> httpx.Response:
    return await http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, **fields}, headers=bearer(raw_key)
    )


def sse_events(body: str) -> list[str]:
    """The events of an SSE body, each as its one line (``data: ...`` or a ``: comment``)."""
    assert body.endswith("\n\n"), body[-80:]
    events = body[:-2].split("\n\n")
    assert all("\n" not in event for event in events), "every event is one line"
    return events


def sse_data(body: str) -> list[dict | str]:
    """The JSON payloads of the ``data:`` events (``"[DONE]"`` as the string)."""
    out: list[dict | str] = []
    for event in sse_events(body):
        if event.startswith("data: "):
            payload = event.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def content_of(chunks: list[dict | str]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if isinstance(c, dict) and c.get("choices")
    )


async def nothing_charged(account) -> bool:
    """No ledger row, no reservation, and no budget counter moved: the request cost nothing."""
    budgets = [b async for b in Budget.objects.filter(tenant=account.tenant)]
    return (
        await UsageRecord.objects.acount() == 0
        and await Reservation.objects.acount() == 0
        and all(b.spent == 0 and b.reserved == 0 for b in budgets)
    )


@pytest_asyncio.fixture
async def budgeted(account):
    """The account with a generous daily budget, so a test can see that no counter moved."""
    await asyncio.to_thread(budget_set, tenant=account.tenant, period="day", hard_limit=Decimal("100"), soft_limit=None)
    return account


@pytest.fixture
def gated() -> Iterator[GatedEngine]:
    """``tandem-test`` served by an engine that emits 3 tokens, then one per ``gate.release()``."""
    with serving_gated(GatedEngine(free_tokens=3)) as engine:
        yield engine


# raw ASGI: the body as it is sent, and a client that can hang up ----------------------------------
def api_scope(path: str, raw_key: str, *headers: tuple[bytes, bytes]) -> dict:
    """An ASGI scope of a JSON POST to ``path`` with ``raw_key`` as its bearer (and ``headers``)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {raw_key}".encode()),
            *headers,
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }


async def asgi_post(
    path: str, body: dict, raw_key: str, on_body: Callable[[str], bool | None] = lambda text: None
) -> tuple[int, dict[str, str], str]:
    """POST straight to the ASGI app; ``on_body(body so far)`` returning True hangs up (``http.disconnect``)."""
    hang_up = asyncio.Event()
    request_sent = False
    status, headers, received = 0, {}, []

    async def receive() -> dict:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            received.append(message.get("body", b"").decode())
            if not message.get("more_body"):
                hang_up.set()  # the response is complete: the server's listener may stop too
            elif on_body("".join(received)):
                hang_up.set()

    await asyncio.wait_for(application(api_scope(path, raw_key), receive, send), timeout=10)
    return status, headers, "".join(received)


# the official client -------------------------------------------------------------------------------
async def test_official_client_chat_completion_returns_the_text_usage_and_tandem_extension(client):
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content == TRIVIAL_TEXT[:20]
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 20
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 20
    tandem = completion.model_extra["tandem"]
    assert tandem["route"]["tier"] == "speculative" and Decimal(tandem["cost"]["total"]) > 0


async def test_official_client_chat_stream_joins_to_the_non_streaming_text_and_ends_with_usage(client):
    whole = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30)
    stream = await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=30, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])


async def test_official_client_text_completion_takes_a_string_or_a_one_string_list(client):
    one = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=12)
    listed = await client.completions.create(model=MODEL, prompt=["Once upon"], max_tokens=12)
    assert one.object == "text_completion" and one.choices[0].text == TRIVIAL_TEXT[:12]
    assert listed.choices[0].text == one.choices[0].text and one.usage.completion_tokens == 12


async def test_official_client_text_completion_streams(client):
    stream = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=12, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks) == TRIVIAL_TEXT[:12]
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_official_client_lists_and_retrieves_models(client):
    listed = [m.id async for m in client.models.list()]
    assert listed == ["tandem-test", "tandem-test-broken"]
    model = await client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "tandem"


async def test_official_client_raises_its_own_error_classes(account, http):
    with pytest.raises(openai.AuthenticationError):
        await official_client("tdm_00000000_wrong", http).chat.completions.create(model=MODEL, messages=HELLO)
    client = official_client(account.raw_key, http)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="gpt-nothing", messages=HELLO)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-nothing")
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=MODEL, messages=HELLO, n=2)
    assert bad.value.param == "n"


async def test_official_client_sees_an_exhausted_budget_as_status_402(account, client):
    await asyncio.to_thread(budget_set, tenant=account.tenant, period="day", hard_limit=Decimal("0"), soft_limit=None)
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    assert info.value.status_code == 402 and info.value.code == "budget_exceeded"


async def test_official_client_sees_a_tenant_past_its_queue_share_as_a_rate_limit_with_retry_after(client, settings):
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 0
    settings.TANDEM_MAX_QUEUED_PER_TENANT = 0
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    assert info.value.code == "too_many_queued" and int(info.value.response.headers["retry-after"]) >= 1


async def test_official_client_sees_a_queue_deadline_as_a_503_with_retry_after(client, settings):
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 0
    settings.TANDEM_QUEUE_DEADLINE_S = {"interactive": 0.1, "batch": 0.1}
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    assert info.value.status_code == 503 and info.value.code == "queue_timeout"
    assert int(info.value.response.headers["retry-after"]) >= 1


async def test_official_client_raises_the_mid_stream_error_event(client):
    stream = await client.chat.completions.create(
        model="tandem-test-broken", messages=HELLO, max_tokens=30, stream=True
    )
    with pytest.raises(openai.APIError, match="engine failed") as info:
        async for _ in stream:
            pass
    # the server's error event, not a broken connection (APIConnectionError is an APIError too)
    assert type(info.value) is openai.APIError and info.value.message == "the engine failed: RuntimeError"
    assert info.value.body == {
        "message": "the engine failed: RuntimeError",
        "type": "server_error",
        "param": None,
        "code": "engine_error",
    }
    assert (info.value.type, info.value.code) == ("server_error", "engine_error")


# SSE, byte by byte ------------------------------------------------------------------------------
async def test_chat_stream_is_role_chunk_then_deltas_then_finish_then_usage_then_done(account, http):
    response = await post_chat(http, account.raw_key, max_tokens=6, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
    events = sse_events(response.text)
    assert all(e.startswith("data: ") for e in events)
    chunks = sse_data(response.text)
    role, *deltas, finish, usage, done = chunks
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert [d["choices"][0]["delta"] for d in deltas] == [{"content": c} for c in TRIVIAL_TEXT[:6]]
    assert [d["tandem"]["provenance"] for d in deltas] == ["drafted", "drafted", "verifier"] * 2
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": usage["usage"]["prompt_tokens"],
        "completion_tokens": 6,
        "total_tokens": usage["usage"]["prompt_tokens"] + 6,
    }
    assert all(c["usage"] is None for c in [role, *deltas, finish])
    assert done == "[DONE]"
    assert len({c["id"] for c in [role, *deltas, finish, usage]}) == 1


async def test_chat_stream_without_include_usage_has_no_usage_keys(account, http):
    response = await post_chat(http, account.raw_key, max_tokens=4, stream=True)
    *chunks, done = sse_data(response.text)
    assert done == "[DONE]" and all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["tandem"]["completion_tokens"] == 4  # the summary rides on the finish chunk


async def test_text_completion_stream_uses_text_completion_chunks(account, http):
    response = await http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True},
        headers=bearer(account.raw_key),
    )
    *chunks, done = sse_data(response.text)
    assert done == "[DONE]" and {c["object"] for c in chunks} == {"text_completion"}
    assert [c["choices"][0]["text"] for c in chunks] == ["T", "a", "n", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_a_slow_engine_gets_keep_alive_comments_between_tokens(account, gated, settings):
    settings.TANDEM_KEEPALIVE_S = 0.01

    def release_a_token_after_each_keep_alive(body: str) -> None:
        if body.endswith(openai_api.SSE_KEEPALIVE.decode()):
            gated.gate.release()

    status, _, body = await asgi_post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": HELLO, "max_tokens": 5, "stream": True},
        account.raw_key,
        release_a_token_after_each_keep_alive,
    )
    events = sse_events(body)
    assert status == 200 and ": keep-alive" in events
    assert content_of(sse_data(body)) == TRIVIAL_TEXT[:5]
    assert events[-1] == "data: [DONE]"
    row = await UsageRecord.objects.aget()
    assert row.outcome == "completed" and row.completion_tokens == 5


async def test_tokens_ready_together_go_out_in_one_write_one_openai_chunk_each(account, gated):
    gated.free_tokens = 5
    principal = await gateway.authenticate_api_key(account.raw_key)
    call = gateway.CompletionCall(model=MODEL, prompt="Hello there", max_tokens=30)
    stream = await gateway.start(principal, call)
    await asyncio.to_thread(gated.blocked.wait, 5)  # 5 tokens are queued; the engine waits for the gate
    chunks_of = openai_api._Chunks(stream, chat=True, include_usage=False)
    events = openai_api._sse_events(stream, chunks_of)
    assert sse_data((await anext(events)).decode()) == [chunks_of.opening()]
    write = (await anext(events)).decode()
    chunks = sse_data(write)
    assert [c["choices"][0]["delta"] for c in chunks] == [{"content": c} for c in TRIVIAL_TEXT[:5]]
    assert write == "".join(openai_api._sse(c).decode() for c in chunks)  # each token its own event
    await events.aclose()  # the client leaves: exactly the five tokens it was sent are charged
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.outcome == "cancelled" and row.completion_tokens == 5


async def test_official_client_reads_through_keep_alive_comments(account, gated, http, settings):
    settings.TANDEM_KEEPALIVE_S = 0.01
    gated.free_tokens = 1
    releaser = asyncio.get_running_loop().call_later(0.1, gated.gate.release, 10)  # after some keep-alives
    try:
        stream = await official_client(account.raw_key, http).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=4, stream=True
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == TRIVIAL_TEXT[:4]
    finally:
        releaser.cancel()


async def test_an_engine_failure_mid_stream_sends_one_error_event_and_charges_the_delivered_tokens(account, http):
    response = await post_chat(http, account.raw_key, model="tandem-test-broken", max_tokens=30, stream=True)
    assert response.status_code == 200
    *chunks, error = sse_data(response.text)
    assert error == {
        "error": {"message": error["error"]["message"], "type": "server_error", "param": None, "code": "engine_error"}
    }
    assert content_of(chunks) == TRIVIAL_TEXT[:6]
    row = await UsageRecord.objects.aget(request_id=response.headers["x-request-id"])
    assert row.outcome == "error" and row.completion_tokens == 6
    # exactly what six tokens of a working engine cost (same rounds, same GPU and draft shares)
    reference = await post_chat(http, account.raw_key, max_tokens=6)
    assert row.cost_total == (await UsageRecord.objects.aget(request_id=reference.headers["x-request-id"])).cost_total


# the ledger ----------------------------------------------------------------------------------------
async def test_a_full_stream_writes_one_completed_row_under_the_response_request_id(account, http):
    response = await post_chat(http, account.raw_key, max_tokens=9, stream=True)
    streamed = content_of(sse_data(response.text))
    row = await UsageRecord.objects.aget()
    assert row.request_id == response.headers["x-request-id"]
    assert row.outcome == "completed" and row.completion_tokens == len(streamed) == 9
    assert row.tenant_id == account.tenant.pk and row.api_key_id == account.api_key.pk


async def test_a_stop_string_finishes_with_stop_and_charges_only_what_was_generated(account, http):
    response = await post_chat(http, account.raw_key, max_tokens=200, stop=["edge"])
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "Tandem drafts at the "
    assert body["choices"][0]["finish_reason"] == "stop"
    row = await UsageRecord.objects.aget(request_id=response.headers["x-request-id"])
    # up to and including the stop string's tokens (which were generated), nothing after them
    assert row.completion_tokens == body["usage"]["completion_tokens"] == len("Tandem drafts at the edge")
    assert row.finish_reason == "stop"


async def test_a_client_that_hangs_up_mid_stream_is_charged_exactly_what_it_received(account, gated):
    def hang_up_after_three_tokens(body: str) -> bool:
        return len(content_of(sse_data(body))) >= 3

    status, headers, body = await asgi_post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": HELLO, "max_tokens": 50, "stream": True},
        account.raw_key,
        hang_up_after_three_tokens,
    )
    assert status == 200 and "[DONE]" not in body
    row = await UsageRecord.objects.aget(request_id=headers["x-request-id"])
    assert row.outcome == "cancelled" and row.completion_tokens == len(content_of(sse_data(body))) == 3
    assert await Reservation.objects.filter(status="held").acount() == 0


@pytest.mark.parametrize("after", [1, 4, 8])
async def test_a_client_that_hangs_up_on_a_fast_engine_is_not_charged_for_a_token_in_flight(account, after):
    # tokens are queued faster than they are sent, so some are always at hand when the client
    # leaves; a write carries every token at hand, so the client may get more than it waited for
    status, headers, body = await asgi_post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": HELLO, "max_tokens": 200, "stream": True},
        account.raw_key,
        lambda body: len(content_of(sse_data(body))) >= after,
    )
    row = await UsageRecord.objects.aget(request_id=headers["x-request-id"])
    received = len(content_of(sse_data(body)))
    assert row.outcome == "cancelled" and row.completion_tokens == received >= after


async def test_a_stream_response_dropped_before_its_body_is_read_releases_the_reservation(account):
    request = AsyncRequestFactory().post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": HELLO, "max_tokens": 20, "stream": True},
        content_type="application/json",
        headers=bearer(account.raw_key),
    )
    response = await openai_api.chat_completions(request)
    assert response.status_code == 200 and await Reservation.objects.filter(status="held").acount() == 1
    del response  # as when the request task is cancelled before Django reads the body
    await asyncio.sleep(0)  # the finalizer hands the close to the event loop
    await asyncio.gather(*openai_api._closing)
    assert await Reservation.objects.filter(status="released").acount() == 1
    assert await UsageRecord.objects.acount() == 0  # nothing was sent, so nothing is charged


async def test_without_max_tokens_a_completion_gets_256_tokens_or_what_the_context_leaves(account, http):
    short = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"}, headers=bearer(account.raw_key))
    assert short.json()["usage"]["completion_tokens"] == openai_api.DEFAULT_MAX_TOKENS == 256
    long_prompt = "x" * 4000  # one token per character; the test engine's context is 4096
    long = await http.post(
        "/v1/completions", json={"model": MODEL, "prompt": long_prompt}, headers=bearer(account.raw_key)
    )
    assert long.status_code == 200 and long.json()["usage"]["completion_tokens"] == 96


async def test_max_completion_tokens_wins_over_max_tokens(account, http):
    response = await post_chat(http, account.raw_key, max_tokens=10, max_completion_tokens=3)
    assert response.json()["usage"]["completion_tokens"] == 3


# request ids ---------------------------------------------------------------------------------------
async def test_every_response_carries_a_request_id_errors_included(account, http):
    ok = await post_chat(http, account.raw_key, max_tokens=2)
    streamed = await post_chat(http, account.raw_key, max_tokens=2, stream=True)
    unauthenticated = await http.get("/v1/models")
    invalid = await post_chat(http, account.raw_key, max_tokens=-1)
    for response in (ok, streamed, unauthenticated, invalid):
        assert response.headers["x-request-id"].startswith("req_"), response
    assert len({r.headers["x-request-id"] for r in (ok, streamed, unauthenticated, invalid)}) == 4


async def test_a_well_formed_client_request_id_is_honoured_and_a_malformed_one_replaced(account, http):
    honoured = await http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 2},
        headers={**bearer(account.raw_key), "X-Request-Id": "client-42:abc"},
    )
    assert honoured.headers["x-request-id"] == "client-42:abc"
    assert await UsageRecord.objects.filter(request_id="client-42:abc").aexists()
    replaced = await http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 2},
        headers={**bearer(account.raw_key), "X-Request-Id": "bad id with spaces"},
    )
    assert replaced.headers["x-request-id"].startswith("req_")


# bad input: a clear error, the right status, nothing charged -------------------------------------------
BAD_CHAT_BODIES = [
    pytest.param({"model": "gpt-nothing"}, 404, "model", id="unknown-model"),
    pytest.param({"max_tokens": -5}, 400, "max_tokens", id="negative-max-tokens"),
    pytest.param({"max_tokens": 0}, 400, "max_tokens", id="zero-max-tokens"),
    pytest.param({"max_tokens": "5"}, 400, "max_tokens", id="string-max-tokens"),
    pytest.param({"max_completion_tokens": 0}, 400, "max_completion_tokens", id="zero-max-completion-tokens"),
    pytest.param({"temperature": 3}, 400, "temperature", id="temperature-3"),
    pytest.param({"top_p": 1.5}, 400, "top_p", id="top-p-1.5"),
    pytest.param({"top_k": -1}, 400, "top_k", id="negative-top-k"),
    pytest.param({"n": 2}, 400, "n", id="n-2"),
    pytest.param({"stream": "yes"}, 400, "stream", id="string-stream"),
    pytest.param({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", id="five-stops"),
    pytest.param({"seed": 2**64}, 400, "seed", id="seed-past-int64"),
    pytest.param({"messages": []}, 400, "messages", id="empty-messages"),
    pytest.param({"messages": "hi"}, 400, "messages", id="messages-not-a-list"),
    pytest.param({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", id="unknown-role"),
    pytest.param({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", id="content-not-text"),
    pytest.param(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content[0]",
        id="image-part",
    ),
    pytest.param({"max_tokens": 5000}, 400, "max_tokens", id="past-the-context"),
    pytest.param({"model": None}, 400, "model", id="null-model"),
]


@pytest.mark.parametrize(("fields", "status", "param"), BAD_CHAT_BODIES)
async def test_a_bad_chat_request_is_refused_naming_the_param_and_charges_nothing(
    budgeted, http, fields, status, param
):
    response = await post_chat(http, budgeted.raw_key, **fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert await nothing_charged(budgeted)


async def test_the_shared_input_serializer_keeps_nothing_from_one_request_to_the_next():
    chat = openai_api.ChatCompletionInputSerializer
    full = {
        "model": "m",
        "messages": [1],
        "metadata": {"a": "b"},
        "stop": "x",
        "stream_options": {"include_usage": True},
    }
    first = openai_api._validated(chat, full)
    assert first["metadata"] == {"a": "b"} and first["stop"] == ("x",) and first["stream_options"]["include_usage"]
    first["metadata"]["c"] = "d"  # what a request does with its data is its own
    with pytest.raises(InvalidRequest) as info:
        openai_api._validated(chat, {"model": 5, "messages": [1], "top_p": 3})
    assert info.value.param == "model"
    second = openai_api._validated(chat, {"model": "m", "messages": [2]})
    assert second["metadata"] == {} and second["stop"] == () and second["stream_options"] is None
    assert second["messages"] == [2] and second["max_tokens"] is None


async def test_malformed_json_is_a_400_that_charges_nothing(budgeted, http):
    response = await http.post(
        "/v1/chat/completions", content=b'{"model": "tandem-test",', headers=bearer(budgeted.raw_key)
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    assert await nothing_charged(budgeted)


async def test_nan_is_not_json_and_is_refused(account, http):
    body = b'{"model": "tandem-test", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    response = await http.post("/v1/chat/completions", content=body, headers=bearer(account.raw_key))
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("depth", [40, 5_000, 200_000])
async def test_json_nested_past_any_request_is_a_400_not_a_500(budgeted, http, depth):
    nested = "[" * depth + "]" * depth
    body = '{"model": "tandem-test", "messages": [{"role": "user", "content": "hi"}], "metadata": ' + nested + "}"
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = await http.post(path, content=body.encode(), headers=bearer(budgeted.raw_key))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_json" and "nests deeper" in error["message"]
    assert await nothing_charged(budgeted)


async def test_a_prompt_over_the_character_limit_is_refused_and_charges_nothing(budgeted, http, settings):
    settings.TANDEM_MAX_PROMPT_CHARS = 100
    response = await post_chat(http, budgeted.raw_key, messages=[{"role": "user", "content": "x" * 200}])
    assert response.status_code == 400
    assert (
        response.json()["error"]["code"] == "context_length_exceeded" and "100" in response.json()["error"]["message"]
    )
    assert await nothing_charged(budgeted)


async def test_a_completion_prompt_must_be_one_string(account, http):
    for prompt in (["a", "b"], [1, 2, 3], None):
        response = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt}, headers=bearer(account.raw_key)
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", prompt


async def test_unknown_fields_are_ignored(account, http):
    # fields OpenAI's API does not have are ignored, as OpenAI does; its own fields that ask for
    # something Tandem does not do are refused (test_a_field_asking_for_what_tandem_does_not_do...)
    response = await post_chat(http, account.raw_key, max_tokens=2, logit_bias={}, whatever=[1])
    assert response.status_code == 200


async def test_wrong_method_is_a_405_in_openai_shape(account, http):
    response = await http.get("/v1/chat/completions", headers=bearer(account.raw_key))
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


# authentication and scopes -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Basic abc"}, id="not-bearer"),
        pytest.param({"Authorization": "Bearer tdm_00000000_unknown"}, id="unknown-key"),
    ],
)
async def test_a_missing_or_wrong_key_is_a_401_that_charges_nothing(budgeted, http, headers):
    response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO}, headers=headers)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"
    assert await nothing_charged(budgeted)


async def test_a_revoked_key_is_a_401(budgeted, http):
    await asyncio.to_thread(api_key_revoke, api_key=budgeted.api_key)
    response = await post_chat(http, budgeted.raw_key, max_tokens=2)
    assert response.status_code == 401
    assert await nothing_charged(budgeted)


async def test_a_key_without_the_completions_scope_is_a_403_but_may_list_models(budgeted, http):
    _, raw_key = await asyncio.to_thread(
        api_key_create, tenant=budgeted.tenant, created_by=budgeted.user, name="catalogue", scopes=["models:read"]
    )
    response = await post_chat(http, raw_key, max_tokens=2)
    assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
    assert await nothing_charged(budgeted)
    assert (await http.get("/v1/models", headers=bearer(raw_key))).status_code == 200


async def test_models_need_a_key_with_the_models_scope(account, http):
    assert (await http.get("/v1/models")).status_code == 401
    _, raw_key = await asyncio.to_thread(
        api_key_create, tenant=account.tenant, created_by=account.user, name="worker", scopes=["completions"]
    )
    assert (await http.get("/v1/models", headers=bearer(raw_key))).status_code == 403
    assert (await http.get(f"/v1/models/{MODEL}", headers=bearer(raw_key))).status_code == 403


async def test_an_exhausted_budget_is_a_402_that_charges_nothing(account, http):
    await asyncio.to_thread(budget_set, tenant=account.tenant, period="day", hard_limit=Decimal("0"), soft_limit=None)
    response = await post_chat(http, account.raw_key, max_tokens=5, stream=True)
    assert response.status_code == 402 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert await nothing_charged(account)


# tenants -------------------------------------------------------------------------------------------
async def test_a_key_spends_only_its_own_tenants_budget_and_ledger(account, other_account, http):
    await asyncio.to_thread(
        budget_set, tenant=other_account.tenant, period="day", hard_limit=Decimal("0"), soft_limit=None
    )
    response = await post_chat(http, account.raw_key, max_tokens=3, user="alice", metadata={"team": "search"})
    assert response.status_code == 200  # the other tenant's empty budget does not apply
    row = await UsageRecord.objects.aget()
    assert row.tenant_id == account.tenant.pk and row.tags == {"team": "search", "user": "alice"}
    other_budget = await Budget.objects.aget(tenant=other_account.tenant)
    assert other_budget.spent == 0 and other_budget.reserved == 0
    refused = await post_chat(http, other_account.raw_key, max_tokens=3)
    assert refused.status_code == 402  # and its own budget does apply to it


async def test_reusing_another_tenants_request_id_never_touches_its_ledger_row(account, other_account, http):
    theirs = await http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 2},
        headers={**bearer(other_account.raw_key), "X-Request-Id": "shared-id-0001"},
    )
    assert theirs.status_code == 200
    before = await UsageRecord.objects.aget(request_id="shared-id-0001")
    mine = await http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 2},
        headers={**bearer(account.raw_key), "X-Request-Id": "shared-id-0001"},
    )
    assert mine.status_code == 409 and mine.json()["error"]["code"] == "duplicate_request_id"
    assert "other" not in mine.json()["error"]["message"]  # never says whose id it was
    after = await UsageRecord.objects.aget(request_id="shared-id-0001")
    assert (after.tenant_id, after.cost_total, after.completion_tokens) == (
        other_account.tenant.pk,
        before.cost_total,
        before.completion_tokens,
    )
    assert not await UsageRecord.objects.filter(tenant=account.tenant).aexists()


async def test_api_responses_carry_the_security_headers_with_no_thread_hop(account, http, settings, monkeypatch):
    # /v1/ runs SecurityMiddleware's hooks inline on the event loop: the same headers as
    # the console gets, and an HTTPS redirect where one is configured
    hops = []
    real = api_handler_module.SecurityMiddleware.process_response

    def counted(self, request, response):
        hops.append(threading.current_thread() is threading.main_thread())
        return real(self, request, response)

    monkeypatch.setattr(api_handler_module.SecurityMiddleware, "process_response", counted)
    response = await http.get("/v1/models", headers=bearer(account.raw_key))
    assert response.status_code == 200
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    assert response.headers["cross-origin-opener-policy"] == "same-origin"
    assert hops == [True]  # called once, on the event loop's thread, not a sync worker's


async def test_api_requests_send_no_request_signals_and_the_console_still_does(account, http):
    # Their receivers tidy the calling thread's connections and caches; /v1/ has none on the
    # event loop (its ORM runs on inference.runtime.db), so it skips them (70 us a request)
    from django.core.signals import request_finished, request_started

    seen: list[str] = []

    def started(**kwargs):
        seen.append("started")

    def finished(**kwargs):
        seen.append("finished")

    request_started.connect(started)
    request_finished.connect(finished)
    try:
        for stream in (False, True, False):
            response = await post_chat(http, account.raw_key, max_tokens=3, stream=stream)
            assert response.status_code == 200
        assert seen == []
        response = await http.get("/signin/")  # the console: Django's own handler
        assert response.status_code == 200
    finally:
        request_started.disconnect(started)
        request_finished.disconnect(finished)
    assert seen == ["started", "finished"]


async def test_a_handover_mid_stream_carries_the_new_route_in_the_chunks_tandem_field(account, http):
    from inference.engines import set_engines
    from tests.inference.test_gateway import serving_flaky_verifier

    previous = serving_flaky_verifier(fail_after=6)
    try:
        response = await post_chat(http, account.raw_key, stream=True, max_tokens=16, temperature=0)
    finally:
        set_engines(previous)
    chunks = [c for c in sse_data(response.text) if isinstance(c, dict) and c.get("choices")]
    tokens = [c for c in chunks if "provenance" in c.get("tandem", {})]  # the finish chunk carries the summary
    announced = [c for c in tokens if "route" in c["tandem"]]
    assert len(announced) == 1
    assert announced[0]["tandem"]["route"]["tier"] == "edge" and announced[0]["tandem"]["route"]["degraded"]
    assert content_of(chunks) == "Tandem" + "EDGE EDGE "
    assert [leg["route"]["tier"] for leg in chunks[-1]["tandem"]["legs"]] == ["speculative", "edge"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("presence_penalty", 0.5),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"50256": -100}),
    ],
)
async def test_a_field_asking_for_what_tandem_does_not_do_is_a_400_naming_it(account, http, field, value):
    response = await post_chat(http, account.raw_key, **{field: value})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == field and error["code"] == "unsupported_parameter"
    assert await nothing_charged(account)


async def test_the_same_fields_at_their_defaults_are_accepted(account, http):
    defaults = {
        "tools": [],
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "response_format": {"type": "text"},
        "logit_bias": None,
    }
    response = await post_chat(http, account.raw_key, max_tokens=3, **defaults)
    assert response.status_code == 200, response.text


async def test_chat_logprobs_come_from_the_serving_model_with_the_top_alternatives(client):
    completion = await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = completion.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == completion.choices[0].message.content and len(content) == 6
    # the trivial engine's made-up but exact values: drafted -0.1, the verifier's -0.5, alternatives below
    assert [entry.logprob for entry in content] == [-0.1, -0.1, -0.5] * 2
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in content)
    assert all(e.top_logprobs[1].logprob < e.top_logprobs[0].logprob for e in content)


async def test_streamed_chat_logprobs_ride_on_each_chunk(client):
    stream = await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, temperature=0, logprobs=True, stream=True
    )
    entries = [
        e
        async for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert [e.logprob for e in entries] == [-0.1, -0.1, -0.5] and all(e.top_logprobs == [] for e in entries)


async def test_completion_logprobs_use_the_legacy_shape(account, http):
    response = await http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "logprobs": 1},
        headers=bearer(account.raw_key),
    )
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] == [-0.1, -0.1, -0.5] and len(logprobs["top_logprobs"]) == 3
    assert all(len(alternatives) == 1 for alternatives in logprobs["top_logprobs"])


async def test_without_logprobs_the_field_is_null(client):
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert completion.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
    ],
)
async def test_bad_logprobs_fields_are_refused_naming_them(account, http, fields, param):
    response = await post_chat(http, account.raw_key, max_tokens=2, **fields)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


# waiting for an engine slot -----------------------------------------------------------------------
async def test_a_stream_that_waits_for_a_slot_is_answered_at_once_told_its_place_then_streamed(
    account, gated, settings
):
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 1
    running = asyncio.ensure_future(
        asgi_post(
            "/v1/chat/completions",
            {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True},
            account.raw_key,
        )
    )
    await asyncio.sleep(0.2)  # it holds the tenant's only slot, waiting at the gate after 3 tokens
    seen: list[str] = []

    def hang_up_once_streaming(body: str) -> bool:
        seen.append(body)
        return "[DONE]" in body

    waiting = asyncio.ensure_future(
        asgi_post(
            "/v1/chat/completions",
            {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True},
            account.raw_key,
            hang_up_once_streaming,
        )
    )
    for _ in range(200):  # the second stream's response began while the first still holds the only slot
        await asyncio.sleep(0.01)
        if seen:
            break
    assert seen and seen[-1].startswith(": queued, position 1") and not waiting.done()
    gated.gate.release(100)  # the first stream ends; its slot goes to the waiter
    assert (await asyncio.wait_for(running, 10))[0] == 200
    status, headers, body = await asyncio.wait_for(waiting, 10)
    assert status == 200 and body.startswith(": queued, position 1")
    assert content_of(sse_data(body)) and sse_data(body)[-1] == "[DONE]"
    row = await UsageRecord.objects.aget(request_id=headers["x-request-id"])
    assert row.outcome == "completed" and row.completion_tokens == 4


async def test_a_queued_stream_whose_deadline_passes_ends_with_an_error_event_and_charges_nothing(
    account, gated, settings
):
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 1
    settings.TANDEM_QUEUE_DEADLINE_S = {"interactive": 0.3, "batch": 0.3}
    first = asyncio.ensure_future(
        asgi_post(
            "/v1/chat/completions",
            {"model": MODEL, "messages": HELLO, "max_tokens": 50, "stream": True},
            account.raw_key,
            lambda body: "queue_timeout" in body,
        )
    )
    await asyncio.sleep(0.2)
    status, headers, body = await asgi_post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True},
        account.raw_key,
    )
    assert status == 200 and body.startswith(": queued, position 1")
    (error,) = sse_data(body)
    assert error["error"]["code"] == "queue_timeout" and error["retry_after"] >= 1
    assert not await UsageRecord.objects.filter(request_id=headers["x-request-id"]).aexists()
    gated.gate.release(100)
    await asyncio.wait_for(first, 10)


async def test_a_client_that_leaves_while_queued_leaves_the_queue_and_is_charged_nothing(account, gated, settings):
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 1
    first = asyncio.ensure_future(
        asgi_post(
            "/v1/chat/completions",
            {"model": MODEL, "messages": HELLO, "max_tokens": 50, "stream": True},
            account.raw_key,
            lambda body: "[DONE]" in body,
        )
    )
    await asyncio.sleep(0.2)
    status, headers, body = await asgi_post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True},
        account.raw_key,
        lambda body: "queued" in body,  # hang up as soon as it is told it waits
    )
    assert status == 200
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not scheduler.pool("tandem-test/local", 64).waiting():
            break
    assert scheduler.pool("tandem-test/local", 64).waiting() == 0
    assert not await UsageRecord.objects.filter(request_id=headers["x-request-id"]).aexists()
    gated.gate.release(100)
    await asyncio.wait_for(first, 10)


@pytest.mark.parametrize("path", ["/v1/nothing", "/v1/models/a%0Ab", "/v1/chat/completions/extra"])
async def test_a_path_no_endpoint_serves_is_openais_404_not_html(account, http, path):
    response = await http.get(path, headers=bearer(account.raw_key))
    assert response.status_code == 404 and response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] in ("unknown_url", "model_not_found") and response.headers["x-request-id"]
    assert "x-ratelimit-remaining-requests" in response.headers
    anonymous = await http.get(path)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "missing_api_key"


async def test_a_database_that_cannot_be_reached_is_a_503_with_retry_after_not_a_500(account, http, monkeypatch):
    from django.db import OperationalError

    async def unreachable(*args, **kwargs):
        raise OperationalError("terminating connection due to administrator command")

    monkeypatch.setattr(gateway, "start", unreachable)  # as a PostgreSQL restart looks mid-request
    response = await post_chat(http, account.raw_key, max_tokens=4)
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "database_unavailable"


@pytest.mark.parametrize("chat", [True, False])
async def test_a_cloud_chunks_logprobs_are_served_as_its_upstream_named_its_tokens(chat):
    from types import SimpleNamespace

    from inference.completion import NamedLogprob, TokenDelta
    from inference.openai_api import _Chunks
    from speculative.types import Provenance

    stream = SimpleNamespace(call=SimpleNamespace(logprobs=1), request_id="r", created=0, model=MODEL)
    chunks = _Chunks(stream, chat=chat, include_usage=False, tokenizer=None)
    named = (NamedLogprob(" Par", -0.25, ((" Par", -0.25),)), NamedLogprob("is", -0.5, (("is", -0.5),)))
    delta = TokenDelta(0, " Paris", -1, Provenance.CLOUD, None, -0.75, (), named)
    logprobs = chunks.delta(delta)["choices"][0]["logprobs"]
    if chat:
        assert [(e["token"], e["logprob"]) for e in logprobs["content"]] == [(" Par", -0.25), ("is", -0.5)]
        assert logprobs["content"][1]["top_logprobs"] == [{"token": "is", "logprob": -0.5, "bytes": [105, 115]}]
    else:
        assert (logprobs["tokens"], logprobs["token_logprobs"]) == ([" Par", "is"], [-0.25, -0.5])
        assert logprobs["top_logprobs"] == [{" Par": -0.25}, {"is": -0.5}]


async def test_api_routes_without_parameters_resolve_once_and_the_rest_every_time(account, http, monkeypatch):
    from django.urls.resolvers import URLResolver

    resolved: list[str] = []
    real = URLResolver.resolve

    def counted(self, path):
        match = real(self, path)
        if self.pattern.regex.pattern == "^/":  # the root resolver: once per request it serves
            resolved.append(path)
        return match

    monkeypatch.setattr(URLResolver, "resolve", counted)
    for _ in range(3):
        assert (await http.get("/v1/models", headers=bearer(account.raw_key))).status_code == 200
        detail = await http.get(f"/v1/models/{MODEL}", headers=bearer(account.raw_key))
        assert detail.status_code == 200 and detail.json()["id"] == MODEL
        missing = await http.get("/v1/no-such-route", headers=bearer(account.raw_key))
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    assert resolved.count("/v1/models") <= 1  # remembered (once, or not at all if an earlier test resolved it)
    assert resolved.count(f"/v1/models/{MODEL}") == 3 and resolved.count("/v1/no-such-route") == 3


async def test_whole_api_answers_carry_their_length_and_streams_are_chunked(account, http):
    response = await post_chat(http, account.raw_key, max_tokens=3)
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content)
    assert "transfer-encoding" not in response.headers
    error = await http.post("/v1/chat/completions", content=b"{", headers=bearer(account.raw_key))
    assert error.status_code == 400 and int(error.headers["content-length"]) == len(error.content)
    streamed = await post_chat(http, account.raw_key, max_tokens=3, stream=True)
    assert streamed.status_code == 200 and "content-length" not in streamed.headers


async def test_a_client_that_hangs_up_on_a_whole_answer_stops_its_view_and_pays_nothing(account, gated):
    """Non-streaming: the view waits for the whole answer; the client leaves; the view is stopped, not left running."""
    hang_up = asyncio.Event()
    sent: list[dict] = []
    first = True

    async def receive() -> dict:
        nonlocal first
        if first:
            first = False
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 50}
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = api_scope("/v1/chat/completions", account.raw_key, (b"x-request-id", b"whole-answer-hang-up-1"))
    serving = asyncio.ensure_future(application(scope, receive, send))
    assert await asyncio.to_thread(gated.blocked.wait, 10)  # 3 tokens made, the engine waits at its gate
    hang_up.set()
    await asyncio.wait_for(serving, timeout=10)  # the view was stopped: it does not wait for the gate
    assert sent == []  # nobody to answer
    await gateway.ledger_writes_flush()
    # it was sent nothing, so it owes nothing: its hold goes back whole and no row is written
    reservation = await Reservation.objects.aget(request_id="whole-answer-hang-up-1")
    assert reservation.status == "released"
    assert not await UsageRecord.objects.filter(request_id="whole-answer-hang-up-1").aexists()


async def test_a_served_request_leaves_no_cycle_for_the_collector_to_free_it(account):
    # Django's disconnect listener ends with RequestAborted once the response is sent; raised in the
    # handler, its traceback held the handler's frame, which held the task that held it: every request's
    # objects (request, response, completion) waited for the cyclic collector
    import gc

    from django.core.handlers.asgi import ASGIRequest

    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3}
    await asgi_post("/v1/chat/completions", body, account.raw_key)  # one-off objects made outside the check
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable is kept in gc.garbage, to look at
    try:
        status, _, _ = await asgi_post("/v1/chat/completions", body, account.raw_key)
        gc.collect()
        held = [o for o in gc.garbage if isinstance(o, ASGIRequest)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert status == 200 and not held


# the schedulers' hint of requests on their way (speculative.arrivals) -------------------------------
async def test_a_burst_of_completions_is_counted_on_its_way_before_any_view_runs(account, monkeypatch):
    # the loop runs each request's handler up to its view, then each view up to its launch: counted from the
    # view's start, a view that never waits launched before the next counted, and a scheduler saw none coming
    from speculative.arrivals import ARRIVALS

    before = ARRIVALS.coming
    bodies: list[asyncio.Future] = []
    views_started = 0
    real_view = openai_api._complete

    async def view(*args, **kwargs):
        nonlocal views_started
        views_started += 1
        return await real_view(*args, **kwargs)

    async def post(path: str, body: dict) -> int:
        got_body = asyncio.get_running_loop().create_future()
        bodies.append(got_body)
        status = 0
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                await got_body  # the body is still on its way
                sent = True
                return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
            await asyncio.sleep(30)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await asyncio.wait_for(application(api_scope(path, account.raw_key), receive, send), timeout=10)
        return status

    monkeypatch.setattr(openai_api, "_complete", view)
    with serving_gated(GatedEngine(free_tokens=100)):
        posts = [
            asyncio.ensure_future(post("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2})),
            asyncio.ensure_future(post("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 2})),
            asyncio.ensure_future(post("/v1/models", {})),  # not a completion: never counted
        ]
        await asyncio.sleep(0.05)
        assert ARRIVALS.coming == before + 2 and views_started == 0  # counted before their bodies, let alone views
        for got_body in bodies:
            got_body.set_result(None)
        statuses = await asyncio.gather(*posts)
    assert statuses[:2] == [200, 200] and views_started == 2
    assert ARRIVALS.coming == before  # each counted once, and no longer once it started


async def test_a_view_counts_itself_where_its_context_holds_an_arrival_that_came_already():
    # (a context that ran a request before, as a test's may): that request's arrival is not this one's
    from inference.arrivals import _current, counted_arrival
    from speculative.arrivals import ARRIVALS

    stale = ARRIVALS.arrival()
    stale.came()
    before = ARRIVALS.coming
    seen: list[int] = []

    @counted_arrival
    async def view() -> None:
        seen.append(ARRIVALS.coming)

    token = _current.set(stale)
    try:
        await view()
    finally:
        _current.reset(token)
    assert seen == [before + 1] and ARRIVALS.coming == before


async def test_a_completion_is_counted_on_its_way_until_its_engine_starts_it_and_a_refused_one_until_refused(account):
    from speculative.arrivals import ARRIVALS

    seen: list[int] = []

    class Watching(GatedEngine):
        def stream(self, prompt, **kwargs):
            seen.append(ARRIVALS.coming)  # the platform is starting it: still on its way
            return super().stream(prompt, **kwargs)

    before = ARRIVALS.coming
    for path, body in (
        ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2}),
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 2, "stream": True}),
    ):
        with serving_gated(Watching(free_tokens=1)) as engine:
            post = asyncio.ensure_future(asgi_post(path, body, account.raw_key))
            assert await asyncio.to_thread(engine.waits.acquire, timeout=10)  # its engine runs, the view waits on it
            assert ARRIVALS.coming == before  # arrived
            engine.gate.release()
            status, _, _ = await post
            assert status == 200 and ARRIVALS.coming == before
    with serving_gated(Watching()):
        status, _, _ = await asgi_post(
            "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": -3}, account.raw_key
        )
        assert status == 400 and ARRIVALS.coming == before
    assert seen == [before + 1, before + 1]
