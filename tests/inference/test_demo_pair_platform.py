"""The platform's core paths once more, served by the shipped demo pair instead of the trivial engine.

The OpenAI API (the official client, and raw SSE), the websocket stream and the ledger,
with the real 12M verifier and the llama.cpp draft built by ``load_default_engines``;
greedy answers are checked against the verifier decoding alone. Then a verifier in its own
process (``python -m speculative.serve``), killed with SIGKILL mid-stream: the edge tier
goes on from the delivered text and each leg is charged once. The pair loads once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from django.test import override_settings

from config.asgi import application
from inference.engines import EngineSet, file_version, load_default_engines, set_engines
from inference.prompts import Message, chat_prompt
from speculative.edge import EdgeEngine
from speculative.engine import SpeculativeEngine
from speculative.pair import DEMO_DRAFT_GGUF, default_verifier_path, load_pair
from speculative.remote import RemoteVerifier
from tenants.models import UsageRecord
from tenants.tiers import Tier
from tests.conftest import REPO, TEST_MODELS, TEST_RATES, TIERS
from tests.inference.test_consumers import key_socket, receive, start, tokens_of, tokens_until_end
from tests.inference.test_openai_api import asgi_post, content_of, sse_data

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

BASE = "http://testserver"
MODEL = "tandem-demo"
HELLO = [{"role": "user", "content": "How do I add a field to a Django model?"}]
PROMPT = "The Django ORM"
MAX_TOKENS = 32
# The failover stream: long enough that the edge writes most of it. The kill comes at the
# first delta frame, while dozens of rounds are still to go (checked below, not assumed: the
# handover must come after the first token and before the last).
FAILOVER_PROMPT = "User: Tell me about Django models\nAssistant:"
FAILOVER_MAX_TOKENS = 300
SERVER_START_S = 90  # torch, transformers and the verifier load in a fresh interpreter


# the pair, loaded once; the engines as load_default_engines builds them -------------------------
class DemoPair:
    def __init__(self, verifier_path: Path | None = None) -> None:
        # by default the verifier load_default_engines picks on this machine (llama.cpp's GGUF on a CPU)
        self.verifier_path = verifier_path
        self.verifier, self.draft, self.tokenizer = load_pair(verifier_path or default_verifier_path(), DEMO_DRAFT_GGUF)
        self.plain = SpeculativeEngine(self.verifier, self.tokenizer, None)  # the verifier decoding alone
        self.edge = EdgeEngine(self.draft, self.tokenizer, self.tokenizer.eos_token_id)  # the draft alone

    def engines(self, verifier_urls: list[str] | None = None) -> EngineSet:
        """``load_default_engines`` (cloud tier and all), with this already loaded pair in place of a second load."""
        with (
            pytest.MonkeyPatch.context() as patch,
            override_settings(
                TANDEM_VERIFIER=str(self.verifier_path or ""), TANDEM_DRAFT="", TANDEM_VERIFIER_URLS=verifier_urls or []
            ),
        ):
            patch.setattr(
                "speculative.pair.load_pair", lambda *args, **kwargs: (self.verifier, self.draft, self.tokenizer)
            )
            return load_default_engines()

    def greedy(self, prompt: str, max_tokens: int):
        return self.plain.generate(prompt, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def pair() -> Iterator[DemoPair]:
    if not DEMO_DRAFT_GGUF.exists():
        pytest.fail("the shipped demo pair is missing: rebuild it with python -m speculative.train_pair")
    demo = DemoPair()
    yield demo
    demo.plain.close()


@pytest.fixture(scope="module")
def local_engines(pair) -> Iterator[EngineSet]:
    engine_set = pair.engines()
    yield engine_set
    engine_set.close()


@pytest.fixture
def serving(local_engines) -> Iterator[EngineSet]:
    """``tandem-demo`` on the in-process demo pair, for one test."""
    previous = set_engines(local_engines)
    yield local_engines
    set_engines(previous)


@pytest.fixture
def price_book(db):
    """The test price book, with ``tandem-demo`` priced on every tier too (overrides tests/conftest.py's)."""
    from tenants.services import price_book_publish

    prices = [{"model": m, "tier": t, **TEST_RATES} for m in (*TEST_MODELS, MODEL) for t in TIERS]
    return price_book_publish(version=1, prices=prices, note="test prices and the demo pair's")


def official_client(raw_key: str, http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key=raw_key, http_client=http, max_retries=0)


def assert_ledger_row_is_what_the_client_got(row: UsageRecord, usage: dict, tier: str = "speculative") -> None:
    """One row, the client's usage exactly: tokens, drafts, cost (> 0), tier, the real pair's versions."""
    assert row.model == MODEL and row.route_tier == tier and row.outcome == "completed"
    assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert row.accepted_tokens == usage["accepted_tokens"] and row.drafted_tokens == Decimal(usage["drafted_tokens"])
    assert row.gpu_ms == Decimal(usage["gpu_ms"]) > 0  # the verifier really ran
    assert row.cost_total == Decimal(usage["cost"]["total"]) > 0
    assert row.verifier_version == file_version(default_verifier_path())
    assert row.draft_version == file_version(DEMO_DRAFT_GGUF)


# the OpenAI API ------------------------------------------------------------------------------------
async def test_official_client_chat_completion_is_the_verifiers_own_greedy_answer_and_charged_so(
    account, pair, serving
):
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
        raw = await official_client(account.raw_key, http).chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO, max_tokens=MAX_TOKENS, temperature=0
        )
    completion = raw.parse()
    reference = pair.greedy(chat_prompt(pair.tokenizer, [Message(**m) for m in HELLO]), MAX_TOKENS)
    choice = completion.choices[0]
    assert completion.model == MODEL and choice.message.content == reference.text
    assert choice.finish_reason == reference.stats.finish_reason.value
    assert completion.usage.completion_tokens == len(reference.token_ids)
    tandem = completion.model_extra["tandem"]
    assert tandem["route"]["tier"] == "speculative" and tandem["accepted_tokens"] > 0  # the draft was used
    row = await UsageRecord.objects.aget(request_id=raw.headers["x-request-id"])
    assert row.request_id == tandem["request_id"]
    assert_ledger_row_is_what_the_client_got(row, tandem)
    assert row.prompt_tokens == completion.usage.prompt_tokens


async def test_a_streamed_chat_completion_joins_to_the_verifiers_greedy_answer_and_is_charged_so(
    account, pair, serving
):
    from speculative.controller import ControllerPriors
    from speculative.governor import SpeculationGovernor

    # A fresh engine's first round drafts (k = 4): the module's earlier tests taught this engine (its
    # controllers and its governor) that on llama.cpp drafting this pair does not pay, and a stream that
    # drafts nothing shows one side only.
    engine = serving.get(MODEL).speculative
    engine.controller_priors = ControllerPriors()
    engine.scheduler.governor = SpeculationGovernor()
    status, headers, body = await asgi_post(
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": HELLO,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        account.raw_key,
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    *chunks, usage_chunk, done = sse_data(body)
    assert done == "[DONE]" and usage_chunk["choices"] == []
    reference = pair.greedy(chat_prompt(pair.tokenizer, [Message(**m) for m in HELLO]), MAX_TOKENS)
    assert content_of(chunks) == reference.text
    tokens = [c for c in chunks if "provenance" in c.get("tandem", {})]
    assert len(tokens) == usage_chunk["usage"]["completion_tokens"] == len(reference.token_ids)
    assert {t["tandem"]["provenance"] for t in tokens} == {"drafted", "verifier"}  # both sides of the pair spoke
    summary = chunks[-1]["tandem"]  # the finish chunk carries the summary
    assert summary["request_id"] == headers["x-request-id"]
    row = await UsageRecord.objects.aget(request_id=headers["x-request-id"])
    assert_ledger_row_is_what_the_client_got(row, summary)
    assert row.prompt_tokens == usage_chunk["usage"]["prompt_tokens"]


# the websocket ---------------------------------------------------------------------------------------
async def test_a_websocket_stream_is_the_verifiers_greedy_tokens_and_is_charged_so(account, pair, serving):
    ws = await key_socket(account)
    await ws.send_json_to(start(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0))
    started = await receive(ws)
    tokens, done = await tokens_until_end(ws)
    await ws.disconnect()
    reference = pair.greedy(PROMPT, MAX_TOKENS)
    assert started["type"] == "started" and started["route"]["tier"] == "speculative"
    assert done["type"] == "done", done
    assert [t["token_id"] for t in tokens] == reference.token_ids
    assert "".join(t["text"] for t in tokens) == reference.text
    assert [t["index"] for t in tokens] == list(range(len(reference.token_ids)))
    usage = done["usage"]
    assert usage["completion_tokens"] == len(tokens) and usage["request_id"] == started["request_id"]
    row = await UsageRecord.objects.aget(request_id=started["request_id"])
    assert_ledger_row_is_what_the_client_got(row, usage)
    assert row.prompt_tokens == len(pair.tokenizer.encode(PROMPT, add_special_tokens=False))


# a verifier in its own process, killed mid-stream ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def verifier_server(tmp_path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m speculative.serve`` with the demo verifier on a free loopback port: (its URL, its process)."""
    port = _free_port()
    log_path = tmp_path / "verifier.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "speculative.serve", "--port", str(port), "--device", "cpu"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the verifier server did not start within {SERVER_START_S} s:\n{log_path.read_text()}")
            time.sleep(0.1)  # polling a process that is starting: there is nothing to wait on instead
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def test_a_verifier_process_killed_mid_stream_hands_over_to_the_edge_and_each_leg_is_charged_once(
    account, pair, verifier_server
):
    url, process = verifier_server
    remote_engines = pair.engines(verifier_urls=[url])
    entry = remote_engines.get(MODEL)
    assert isinstance(entry.speculative.verifier, RemoteVerifier) and entry.speculative.verifier.base_url == url
    previous = set_engines(remote_engines)
    try:
        ws = await key_socket(account)
        await ws.send_json_to(start(model=MODEL, prompt=FAILOVER_PROMPT, max_tokens=FAILOVER_MAX_TOKENS, temperature=0))
        started = await receive(ws)
        assert started["type"] == "started" and started["route"]["tier"] == "speculative", started
        first = tokens_of(await receive(ws))  # the verifier is serving: now kill it, no goodbye
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        tokens, route_frames = list(first), []
        while (frame := await receive(ws))["type"] in ("delta", "route"):
            if frame["type"] == "route":
                route_frames.append((len(tokens), frame))
            else:
                tokens += tokens_of(frame)
        await ws.disconnect()
        breaker = entry.breaker(Tier.SPECULATIVE)
        # read at once: it stays open for inference.breakers.OPEN_S after the failure
        verifier_marked_down = not breaker.available() and url in breaker.last_error
    finally:
        set_engines(previous)
        remote_engines.close()
        entry.speculative.verifier.close()
    assert frame["type"] == "done", frame
    # the handover is announced once, at the token where the edge's text begins
    assert len(route_frames) == 1, f"expected one route frame, got {route_frames} (was the kill too late?)"
    [(handed_over_at, route)] = route_frames
    assert route["index"] == handed_over_at and route["route"]["tier"] == "edge"
    assert route["route"]["reason"] == "verifier_down" and route["route"]["degraded"]
    assert 0 < handed_over_at < len(tokens) == FAILOVER_MAX_TOKENS
    assert [t["index"] for t in tokens] == list(range(FAILOVER_MAX_TOKENS))  # nothing repeated, nothing skipped
    verified, edge = tokens[:handed_over_at], tokens[handed_over_at:]
    assert {t["provenance"] for t in verified} <= {"drafted", "verifier"} and {t["provenance"] for t in edge} == {
        "edge"
    }
    # up to the kill: the verifier's own greedy answer; after it: the draft's greedy continuation
    # of the prompt and exactly that text, so no delivered text is written again
    delivered = "".join(t["text"] for t in verified)
    reference = pair.greedy(FAILOVER_PROMPT, FAILOVER_MAX_TOKENS)
    assert [t["token_id"] for t in verified] == reference.token_ids[:handed_over_at]
    continuation = pair.edge.generate(FAILOVER_PROMPT + delivered, max_tokens=FAILOVER_MAX_TOKENS - handed_over_at)
    assert "".join(t["text"] for t in edge) == continuation.text
    # each leg charged once, for exactly the tokens the client got from it
    usage = frame["usage"]
    rows = [r async for r in UsageRecord.objects.filter(leg_of=started["request_id"]).order_by("leg")]
    assert [(r.leg, r.route_tier, r.route_reason, r.outcome, r.completion_tokens) for r in rows] == [
        (0, "speculative", "default", "error", handed_over_at),
        (1, "edge", "verifier_down", "completed", FAILOVER_MAX_TOKENS - handed_over_at),
    ]
    assert await UsageRecord.objects.acount() == 2
    assert all(r.cost_total > 0 for r in rows) and rows[0].gpu_ms > 0 and rows[1].gpu_ms == 0
    assert rows[0].cost_verifier > 0 and rows[1].cost_verifier == 0 and rows[1].verifier_version == ""
    assert usage["completion_tokens"] == FAILOVER_MAX_TOKENS
    assert Decimal(usage["cost"]["total"]) == rows[0].cost_total + rows[1].cost_total
    assert [leg["route"]["tier"] for leg in usage["legs"]] == ["speculative", "edge"]
    assert verifier_marked_down  # the next request goes to the edge at once, without trying the dead verifier
