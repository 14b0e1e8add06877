"""The websocket stream (``inference.consumers``): authentication, the frame protocol, settlement, tenant scoping."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import AsyncClient
from uvicorn.protocols.utils import ClientDisconnected

from config.asgi import application
from inference import gateway, prompts
from inference.consumers import MAX_STREAMS_PER_CONNECTION, CompletionConsumer
from inference.engines import aget_engines, trivial_entry
from tenants.models import Reservation, UsageRecord
from tenants.services import api_key_revoke, membership_create
from tests.inference.conftest import GatedEngine, serving_gated

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

PATH = "/ws/v1/completions"
ORIGIN = (b"origin", b"http://testserver")
TIMEOUT = 5


# connecting --------------------------------------------------------------------------------------
async def connect(*headers: tuple[bytes, bytes]) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, PATH, headers=list(headers))
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    return communicator


def bearer(raw_key: str) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {raw_key}".encode())


async def session_cookie(user) -> tuple[bytes, bytes]:
    """The cookie header of a console session signed in as ``user``."""
    client = AsyncClient()
    await client.aforce_login(user)
    name = settings.SESSION_COOKIE_NAME
    return (b"cookie", f"{name}={client.cookies[name].value}".encode())


async def key_socket(account) -> WebsocketCommunicator:
    return await connect(ORIGIN, bearer(account.raw_key))


async def receive(ws: WebsocketCommunicator) -> dict:
    return await ws.receive_json_from(timeout=TIMEOUT)


def start(stream_id: str = "s1", **fields) -> dict:
    return {"type": "start", "id": stream_id, "model": "tandem-test", "prompt": "Hello there", **fields}


def chat_start(messages: list, **fields) -> dict:
    """A start frame that carries a chat instead of a prompt."""
    return {k: v for k, v in start(**fields).items() if k != "prompt"} | {"messages": messages}


def tokens_of(frame: dict) -> list[dict]:
    """A delta frame's tokens, one dict each: its stream id, index, id, text and provenance."""
    assert frame["type"] == "delta", frame
    assert 1 <= len(frame["tokens"]) <= gateway.MAX_DELTAS_AT_ONCE
    assert frame["text"] == "".join(t["text"] for t in frame["tokens"])
    return [{"id": frame["id"], "index": frame["index"] + i, **t} for i, t in enumerate(frame["tokens"])]


async def receive_tokens(ws: WebsocketCommunicator, n: int) -> list[dict]:
    """The tokens of the next delta frames, until there are ``n`` (one frame may carry several)."""
    tokens: list[dict] = []
    while len(tokens) < n:
        tokens += tokens_of(await receive(ws))
    assert len(tokens) == n, tokens
    return tokens


async def tokens_until_end(ws: WebsocketCommunicator) -> tuple[list[dict], dict]:
    """The tokens of the delta frames up to the stream's last frame (its done or error), and that frame."""
    tokens: list[dict] = []
    while (frame := await receive(ws))["type"] == "delta":
        tokens += tokens_of(frame)
    return tokens, frame


async def run_to_end(ws: WebsocketCommunicator, stream_id: str) -> tuple[dict, list[dict], dict]:
    """(started, tokens, last frame) of one stream, the last frame being its done or error."""
    started = await receive(ws)
    assert started["type"] == "started" and started["id"] == stream_id, started
    tokens, frame = await tokens_until_end(ws)
    return started, tokens, frame


async def nothing_charged() -> bool:
    return await UsageRecord.objects.acount() == 0 and await Reservation.objects.acount() == 0


@pytest.fixture
def gated() -> Iterator[GatedEngine]:
    """``tandem-test`` served by an engine that emits a token only when the test releases one."""
    with serving_gated(GatedEngine(), trivial_entry("tandem-test-broken", fail_after=6)) as engine:
        yield engine


# authentication --------------------------------------------------------------------------------
async def test_an_api_key_in_the_authorization_header_authenticates(account):
    ws = await key_socket(account)
    await ws.send_json_to({"type": "ping"})
    assert await receive(ws) == {"type": "pong"}
    await ws.send_json_to(start(max_tokens=3))
    _, deltas, done = await run_to_end(ws, "s1")
    assert done["type"] == "done" and len(deltas) == 3
    row = await UsageRecord.objects.aget(request_id=done["usage"]["request_id"])
    assert row.api_key_id == account.api_key.pk and row.tenant_id == account.tenant.pk
    await ws.disconnect()


async def test_a_console_session_authenticates_and_acts_in_the_chosen_tenant(account):
    ws = await connect(ORIGIN, await session_cookie(account.user))
    await ws.send_json_to(start(max_tokens=3, tenant=account.tenant.pk))
    _, deltas, done = await run_to_end(ws, "s1")
    assert done["type"] == "done" and len(deltas) == 3
    row = await UsageRecord.objects.aget(request_id=done["usage"]["request_id"])
    assert row.tenant_id == account.tenant.pk and row.user_id == account.user.pk and row.api_key_id is None
    await ws.disconnect()


@pytest.mark.parametrize(
    "auth",
    [
        [],
        [(b"authorization", b"Bearer tdm_00000000_not-a-real-key-not-a-real-key-not-a-real-key12")],
        [(b"authorization", b"Basic dXNlcjpwYXNz")],
    ],
    ids=["no-credentials", "unknown-key", "not-bearer"],
)
async def test_an_unauthenticated_connection_is_told_why_then_closed_with_4401(account, auth):
    ws = await connect(ORIGIN, *auth)
    frame = await receive(ws)
    assert frame["type"] == "error" and frame["id"] is None and frame["usage"] is None
    assert frame["error"]["type"] == "authentication_error"
    assert await ws.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}


async def test_a_key_revoked_while_connected_starts_nothing_more(account):
    ws = await key_socket(account)
    await sync_to_async(api_key_revoke)(api_key=account.api_key)
    await ws.send_json_to(start())
    frame = await receive(ws)
    assert frame["type"] == "error" and frame["error"]["type"] == "authentication_error"
    assert await nothing_charged()
    await ws.disconnect()


async def test_clients_without_an_origin_header_connect_but_foreign_origins_do_not(account):
    """Non-browser clients send no Origin; a browser on another site does (cross-site websocket hijacking)."""
    ws = await connect(bearer(account.raw_key))
    await ws.send_json_to({"type": "ping"})
    assert await receive(ws) == {"type": "pong"}
    await ws.disconnect()
    headers = [(b"origin", b"https://evil.example"), await session_cookie(account.user)]
    foreign = WebsocketCommunicator(application, PATH, headers=headers)
    connected, _ = await foreign.connect(timeout=TIMEOUT)
    assert not connected


# the protocol -------------------------------------------------------------------------------------
async def test_a_stream_sends_started_then_deltas_with_provenance_then_done_with_the_ledgers_usage(account):
    ws = await key_socket(account)
    await ws.send_json_to(start("run-1", max_tokens=12, tags={"feature": "tests"}))
    started, deltas, done = await run_to_end(ws, "run-1")
    assert started["model"] == "tandem-test" and started["request_id"].startswith("req_")
    assert started["route"] == {
        "tier": "speculative",
        "reason": "default",
        "degraded": False,
        "policy_version": "builtin-2",
    }
    assert [d["index"] for d in deltas] == list(range(12))
    assert all(d["id"] == "run-1" and isinstance(d["token_id"], int) for d in deltas)
    assert {d["provenance"] for d in deltas} == {"drafted", "verifier"}
    assert "".join(d["text"] for d in deltas) == "Tandem draft"
    assert done["type"] == "done" and done["id"] == "run-1"
    usage = done["usage"]
    assert usage["outcome"] == "completed" and usage["finish_reason"] == "length"
    assert usage["completion_tokens"] == len(deltas) == 12
    assert usage["accepted_tokens"] == sum(d["provenance"] == "drafted" for d in deltas)
    assert set(usage["cost"]) == {"edge", "verifier", "cloud", "total"} and usage["route"] == started["route"]
    row = await UsageRecord.objects.aget(request_id=started["request_id"])
    assert row.completion_tokens == len(deltas) and row.outcome == "completed" and row.tags == {"feature": "tests"}
    assert str(row.cost_total) == usage["cost"]["total"]
    await ws.disconnect()


async def test_concurrent_streams_on_one_connection_are_told_apart_by_id(account):
    ws = await key_socket(account)
    await ws.send_json_to(start("a", max_tokens=5))
    await ws.send_json_to(start("b", max_tokens=7))
    frames: dict[str, list[dict]] = {"a": [], "b": []}
    finished = 0
    while finished < 2:
        frame = await receive(ws)
        frames[frame["id"]].append(frame)
        finished += frame["type"] == "done"
    for stream_id, n in (("a", 5), ("b", 7)):
        tokens = [t for f in frames[stream_id] if f["type"] == "delta" for t in tokens_of(f)]
        assert [t["index"] for t in tokens] == list(range(n))
        assert n == frames[stream_id][-1]["usage"]["completion_tokens"]
    await ws.disconnect()


async def test_cancel_mid_stream_settles_exactly_the_delivered_deltas(account, gated):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=200))
    gated.gate.release(5)
    started = await receive(ws)
    await receive_tokens(ws, 5)
    await ws.send_json_to({"type": "cancel", "id": "s1"})
    done = await receive(ws)
    assert done["type"] == "done" and done["usage"]["outcome"] == "cancelled"
    assert done["usage"]["completion_tokens"] == 5 and done["usage"]["finish_reason"] == ""
    row = await UsageRecord.objects.aget(request_id=started["request_id"])
    assert row.outcome == "cancelled" and row.completion_tokens == 5
    assert await Reservation.objects.filter(status="held").acount() == 0
    await ws.send_json_to({"type": "ping"})  # the connection goes on, the cancelled stream sends nothing more
    assert await receive(ws) == {"type": "pong"}
    await ws.disconnect()


async def test_a_cancel_racing_a_fast_stream_still_charges_exactly_the_deltas_sent(account):
    """No gate: tokens pour in while the cancel lands, so a read may be in flight when the stream settles."""
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=4000))
    started = await receive(ws)
    received = [t for _ in range(3) for t in tokens_of(await receive(ws))]
    await ws.send_json_to({"type": "cancel", "id": "s1"})
    later, frame = await tokens_until_end(ws)
    received += later
    assert frame["type"] == "done"
    usage = frame["usage"]
    assert [d["index"] for d in received] == list(range(len(received)))
    assert usage["completion_tokens"] == len(received)
    row = await UsageRecord.objects.aget(request_id=started["request_id"])
    assert row.completion_tokens == len(received) and row.outcome == usage["outcome"]
    await ws.disconnect()


async def test_a_cancel_stops_a_fast_stream_long_before_its_end(account):
    """Tokens already queued are relayed without waiting, yet a cancel frame still gets in between them."""
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=4000))
    started = await receive(ws)
    first = tokens_of(await receive(ws))
    await ws.send_json_to({"type": "cancel", "id": "s1"})
    later, frame = await tokens_until_end(ws)
    sent = len(first) + len(later)
    assert frame["type"] == "done" and frame["usage"]["outcome"] == "cancelled"
    assert frame["usage"]["completion_tokens"] == sent < 4000
    row = await UsageRecord.objects.aget(request_id=started["request_id"])
    assert row.completion_tokens == sent
    await ws.disconnect()


async def test_a_disconnect_mid_stream_settles_exactly_the_delivered_deltas(account, gated):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=200))
    gated.gate.release(4)
    started = await receive(ws)
    await receive_tokens(ws, 4)
    await ws.disconnect()  # returns once the consumer's disconnect handler (which settles) has finished
    row = await UsageRecord.objects.aget(request_id=started["request_id"])
    assert row.outcome == "cancelled" and row.completion_tokens == 4
    assert await Reservation.objects.filter(status="held").acount() == 0


@pytest.mark.parametrize(
    "closed",  # what uvicorn raises for a send on a connection the client closed: before, and after, it saw the close
    [lambda: ClientDisconnected(), lambda: RuntimeError("Unexpected ASGI message 'websocket.send', after sending ...")],
)
async def test_a_send_that_finds_the_client_gone_stops_and_settles_the_stream_quietly(
    account, gated, monkeypatch, caplog, closed
):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=200))
    gated.gate.release(4)
    started = await receive(ws)
    await receive_tokens(ws, 4)

    async def hung_up(self, content, close=False):  # the tab closed; its disconnect is not yet heard
        raise closed()

    monkeypatch.setattr(CompletionConsumer, "send_json", hung_up)
    with caplog.at_level(logging.INFO, logger="inference.consumers"):
        gated.gate.release(2)
        for _ in range(200):
            row = await UsageRecord.objects.filter(request_id=started["request_id"]).afirst()
            if row is not None:
                break
            await asyncio.sleep(0.025)
    monkeypatch.undo()
    await ws.disconnect()
    assert row is not None and row.outcome == "cancelled"
    # the frame the closed connection refused was taken before its write, as a write into a socket the peer has
    # closed is: charged with the four the client read
    assert row.completion_tokens == 6
    assert await Reservation.objects.filter(status="held").acount() == 0
    assert "left mid-stream" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback, no task left failing


async def test_keep_alive_pings_are_sent_while_a_stream_waits_for_tokens(account, gated, settings):
    settings.TANDEM_KEEPALIVE_S = 0.05
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=50))
    gated.gate.release(1)
    assert (await receive(ws))["type"] == "started"
    assert (await receive(ws))["type"] == "delta"
    assert await receive(ws) == {"type": "ping"}
    await ws.disconnect()


async def test_an_engine_failure_sends_an_error_frame_with_the_usage_of_what_was_delivered(account):
    ws = await key_socket(account)
    await ws.send_json_to(start(model="tandem-test-broken", max_tokens=30))
    started, deltas, frame = await run_to_end(ws, "s1")
    assert frame["type"] == "error" and frame["id"] == "s1"
    assert frame["error"]["code"] == "engine_error" and frame["error"]["type"] == "server_error"
    assert frame["usage"]["outcome"] == "error" and frame["usage"]["completion_tokens"] == len(deltas) == 6
    row = await UsageRecord.objects.aget(request_id=started["request_id"])
    assert row.outcome == "error" and row.completion_tokens == 6
    await ws.disconnect()


@pytest.mark.parametrize(
    ("frame", "code", "param"),
    [
        ("this is not json", "invalid_json", None),
        ("[" * 5_000 + "]" * 5_000, "invalid_json", None),
        ('{"type": "start", "x": ' + "[" * 200 + "]" * 200 + "}", "invalid_json", None),
        (json.dumps(start()).replace('"prompt": ', '"temperature": NaN, "prompt": '), "invalid_json", None),
        (json.dumps(["start"]), "invalid_request", None),
        (json.dumps({"type": "launch", "id": "s1"}), "invalid_request", "type"),
        (json.dumps(start(max_tokens=-5)), "invalid_request", "max_tokens"),
        (json.dumps(start(max_tokens="64")), "invalid_request", "max_tokens"),
        (json.dumps(start(temperature=True)), "invalid_request", "temperature"),
        (json.dumps(start(stop=[1])), "invalid_request", "stop"),
        (json.dumps(start(id=7)), "invalid_request", "id"),
        (json.dumps(start(prompt=None)), "invalid_request", "prompt"),
        (json.dumps(start(prompt="")), "invalid_request", "prompt"),
        (json.dumps(start(stream=True)), "invalid_request", "stream"),
        (json.dumps(start(tenant="1")), "invalid_request", "tenant"),
        (json.dumps(start(model="no-such-model")), "model_not_found", "model"),
        (json.dumps(start(prompt="x" * 40_000)), "context_length_exceeded", "prompt"),
        (json.dumps({"type": "cancel", "id": "never-started"}), "invalid_request", "id"),
        (json.dumps(start(messages=[{"role": "user", "content": "Hi"}])), "invalid_request", "prompt"),
        (json.dumps(chat_start([])), "invalid_request", "messages"),
        (json.dumps(chat_start([{"role": "robot", "content": "Hi"}])), "invalid_request", "messages[0].role"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 24 else None,
)
async def test_a_bad_frame_gets_an_error_frame_charges_nothing_and_keeps_the_connection(account, frame, code, param):
    ws = await key_socket(account)
    await ws.send_to(text_data=frame)
    error = await receive(ws)
    assert error["type"] == "error" and error["usage"] is None
    assert error["error"]["code"] == code and error["error"]["param"] == param
    await ws.send_json_to({"type": "ping"})
    assert await receive(ws) == {"type": "pong"}
    assert await nothing_charged()
    await ws.disconnect()


async def test_a_frame_past_the_size_limit_is_refused_before_parsing(account, settings):
    settings.TANDEM_MAX_PROMPT_CHARS = 10
    ws = await key_socket(account)
    await ws.send_to(text_data=json.dumps(start(prompt="y" * 100_000)))
    error = await receive(ws)
    assert error["type"] == "error" and error["error"]["code"] == "invalid_request"
    assert await nothing_charged()
    await ws.disconnect()


async def test_a_live_id_cannot_be_reused_and_a_connection_runs_at_most_four_streams(account, gated):
    ws = await key_socket(account)
    gated.free_tokens = 1  # one token each, so every start returns
    for n in range(MAX_STREAMS_PER_CONNECTION):
        await ws.send_json_to(start(f"s{n}", max_tokens=100))
    await ws.send_json_to(start("s0", max_tokens=100))
    await ws.send_json_to(start("one-too-many", max_tokens=100))
    frames = [await receive(ws) for _ in range(2 * MAX_STREAMS_PER_CONNECTION + 2)]
    errors = {f["id"]: f["error"] for f in frames if f["type"] == "error"}
    assert errors["s0"]["param"] == "id" and errors["one-too-many"]["code"] == "too_many_streams"
    assert sum(f["type"] == "started" for f in frames) == MAX_STREAMS_PER_CONNECTION
    await ws.disconnect()
    assert await UsageRecord.objects.filter(outcome="cancelled", completion_tokens=1).acount() == 4


# tenant scoping ------------------------------------------------------------------------------------
async def test_a_console_user_cannot_act_in_a_tenant_they_are_not_a_member_of(account, other_account):
    ws = await connect(ORIGIN, await session_cookie(account.user))
    await ws.send_json_to(start(tenant=other_account.tenant.pk))
    frame = await receive(ws)
    assert frame["type"] == "error" and frame["error"]["type"] == "permission_error"
    assert await nothing_charged()
    await ws.disconnect()


async def test_an_api_key_naming_another_tenant_is_refused(account, other_account):
    ws = await key_socket(account)
    await ws.send_json_to(start(tenant=other_account.tenant.pk))
    frame = await receive(ws)
    assert frame["type"] == "error" and frame["id"] == "s1"
    assert frame["error"]["type"] == "permission_error" and frame["error"]["param"] == "tenant"
    await ws.send_json_to(start("own", tenant=account.tenant.pk, max_tokens=2))  # its own tenant is fine
    _, _, done = await run_to_end(ws, "own")
    assert done["type"] == "done"
    assert not await UsageRecord.objects.filter(tenant=other_account.tenant).aexists()
    await ws.disconnect()


async def test_a_viewer_may_watch_but_not_run_completions(account, django_user_model):
    viewer = await sync_to_async(django_user_model.objects.create_user)(username="vic", password="pw-vic-123456")
    await sync_to_async(membership_create)(tenant=account.tenant, user=viewer, role="viewer")
    ws = await connect(ORIGIN, await session_cookie(viewer))
    await ws.send_json_to(start(tenant=account.tenant.pk))
    frame = await receive(ws)
    assert frame["type"] == "error" and frame["error"]["type"] == "permission_error"
    assert await nothing_charged()
    await ws.disconnect()


async def test_a_handover_mid_stream_is_announced_by_a_route_frame_before_the_next_tiers_tokens(account):
    from inference.engines import set_engines
    from tests.inference.test_gateway import serving_flaky_verifier

    previous = serving_flaky_verifier(fail_after=6)
    try:
        ws = await key_socket(account)
        await ws.send_json_to(start(max_tokens=16))
        started = await receive(ws)
        tokens: list[dict] = []
        route_frames = []
        while (frame := await receive(ws))["type"] in ("delta", "route"):
            if frame["type"] == "route":
                route_frames.append((len(tokens), frame))
            else:
                tokens += tokens_of(frame)
        await ws.disconnect()
    finally:
        set_engines(previous)
    assert started["route"]["tier"] == "speculative" and frame["type"] == "done"
    assert [t["index"] for t in tokens] == list(range(16))
    [(before, route)] = route_frames
    assert before == 6 and route["index"] == 6 and route["id"] == "s1"
    assert route["route"] == {
        "tier": "edge",
        "reason": "verifier_down",
        "degraded": True,
        "policy_version": "builtin-2",
    }
    assert "".join(t["text"] for t in tokens[6:]) == "EDGE EDGE "  # the edge's own text, nothing repeated
    usage = frame["usage"]
    assert usage["completion_tokens"] == 16 and [leg["route"]["tier"] for leg in usage["legs"]] == [
        "speculative",
        "edge",
    ]


async def test_a_start_frame_may_carry_a_chat_rendered_through_the_models_template(account):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is Tandem?"},
    ]
    ws = await key_socket(account)
    await ws.send_json_to(chat_start(messages, max_tokens=4))
    _, tokens, done = await run_to_end(ws, "s1")
    await ws.disconnect()
    tokenizer = (await aget_engines()).get("tandem-test").tokenizer
    rendered = prompts.chat_prompt(tokenizer, [prompts.Message(**m) for m in messages])
    assert "What is Tandem?" in rendered and rendered != messages[-1]["content"]
    assert done["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered)) and len(tokens) == 4
    row = await UsageRecord.objects.aget(request_id=done["usage"]["request_id"])
    assert row.prompt_tokens == done["usage"]["prompt_tokens"]  # charged for the whole conversation


async def test_a_start_frame_may_ask_for_each_tokens_logprobs(account):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=3, logprobs=1))
    _, tokens, done = await run_to_end(ws, "s1")
    await ws.disconnect()
    assert [t["logprob"] for t in tokens] == [-0.1, -0.1, -0.5] and done["type"] == "done"
    assert all(len(t["top_logprobs"]) == 1 and t["top_logprobs"][0]["token_id"] == t["token_id"] for t in tokens)


async def test_a_cloud_chunks_logprobs_go_out_named_as_its_upstream_named_them():
    from inference.completion import NamedLogprob, TokenDelta
    from inference.consumers import _token
    from speculative.types import Provenance

    named = (NamedLogprob(" Par", -0.25, ((" Par", -0.25), (" Lon", -2.0))), NamedLogprob("is", -0.5))
    token = _token(TokenDelta(0, " Paris", -1, Provenance.CLOUD, None, -0.75, (), named))
    assert (token["token_id"], token["logprob"], token["provenance"]) == (-1, -0.75, "cloud")
    assert token["logprobs"] == [
        {
            "token": " Par",
            "logprob": -0.25,
            "top_logprobs": [{"token": " Par", "logprob": -0.25}, {"token": " Lon", "logprob": -2.0}],
        },
        {"token": "is", "logprob": -0.5, "top_logprobs": []},
    ]
    assert "top_logprobs" not in token


async def test_a_stream_that_waits_for_a_slot_gets_a_queued_frame_then_runs(account, gated, settings):
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 1
    ws = await key_socket(account)
    await ws.send_json_to(start("s1", max_tokens=3))
    gated.gate.release(1)
    assert (await receive(ws))["type"] == "started"
    assert (await receive(ws))["type"] == "delta"  # its first token
    await ws.send_json_to(start("s2", max_tokens=3))
    queued = await receive(ws)
    assert queued["type"] == "queued" and queued["id"] == "s2" and queued["position"] == 1
    assert queued["request_id"]
    # s1's last two tokens: s1 ends; s2 gets its slot then, and waits at the gate for its first token
    # (the slot passes on when s1 settles, which may be before or after s1's done frame is sent)
    gated.gate.release(2)
    seen: set[tuple[str, str]] = set()
    while ("done", "s1") not in seen:
        frame = await receive(ws)
        seen.add((frame["type"], frame["id"]))
    assert ("started", "s2") not in seen  # it never ran beside s1
    gated.gate.release(100)
    while ("done", "s2") not in seen:
        frame = await receive(ws)
        seen.add((frame["type"], frame["id"]))
    assert ("started", "s2") in seen
    await ws.disconnect()


async def test_a_queue_refusal_on_the_websocket_says_when_to_retry(account, gated, settings):
    settings.TANDEM_MAX_STREAMS_PER_TENANT = 0
    settings.TANDEM_MAX_QUEUED_PER_TENANT = 0
    ws = await key_socket(account)
    await ws.send_json_to(start())
    error = await receive(ws)
    assert error["type"] == "error" and error["error"]["code"] == "too_many_queued" and error["retry_after"] >= 1
    assert await nothing_charged()
    await ws.disconnect()
