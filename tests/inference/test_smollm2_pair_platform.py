"""``TANDEM_PAIR=smollm2``: the platform serves SmolLM2-135M-Instruct and its distilled draft as ``tandem-demo``.

Loaded by ``load_default_engines`` as ``make run`` would (the draft assembled under the var
dir on first use); a chat question through the official OpenAI client is answered like an
assistant, in the verifier's own greedy words, and charged so.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import httpx
import openai
import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from config.asgi import application
from inference.engines import EngineSet, file_version, load_default_engines, pair_paths, set_engines
from inference.prompts import Message, chat_prompt
from inference.services import routing_policy_publish
from speculative.engine import SpeculativeEngine
from tenants.models import UsageRecord
from tenants.tiers import Tier
from tests.inference.test_demo_pair_platform import BASE, MODEL, price_book  # noqa: F401 (the demo's prices)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

QUESTION = [{"role": "user", "content": "Which planet is known as the Red Planet?"}]


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2-var")


@pytest.fixture(scope="module")
def smol_engines(smollm2_verifier, var_dir) -> Iterator[EngineSet]:
    with override_settings(TANDEM_PAIR="smollm2", TANDEM_VERIFIER="", TANDEM_DRAFT="", VAR_DIR=var_dir,
                           TANDEM_VERIFIER_THREADS=1, TANDEM_VERIFIER_URLS=[], TANDEM_MAX_CONTEXT=512):  # fmt: skip
        engine_set = load_default_engines()
    previous = set_engines(engine_set)
    yield engine_set
    set_engines(previous)
    engine_set.close()


async def test_an_unknown_pair_is_refused_with_the_ones_there_are():
    with pytest.raises(ImproperlyConfigured, match="TANDEM_PAIR must be one of demo, smollm2, not 'llama'"):
        pair_paths("llama")


async def test_the_smollm2_pair_answers_a_chat_question_as_its_verifier_would_and_is_charged_so(
    account, smol_engines, smollm2_verifier, var_dir
):
    entry = smol_engines.get(MODEL)
    (draft,) = (var_dir / "models").glob("smollm2-draft-*.gguf")  # assembled under the var dir
    assert (entry.verifier_version, entry.draft_version) == (file_version(smollm2_verifier), file_version(draft))
    assert "SmolLM2-135M-Instruct" in entry.description
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
        client = openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key=account.raw_key, http_client=http, max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, extra_body={"tier": "speculative"}
        )
    completion = raw.parse()
    plain = SpeculativeEngine(entry.speculative.verifier, entry.tokenizer, None, scheduler=entry.speculative.scheduler)
    reference = plain.generate(chat_prompt(entry.tokenizer, [Message(**m) for m in QUESTION]), max_tokens=24)
    answer = completion.choices[0].message.content
    assert answer == reference.text and "Mars" in answer  # an assistant's answer, the verifier's own words
    assert completion.usage.completion_tokens == len(reference.token_ids)
    tandem = completion.model_extra["tandem"]
    assert tandem["route"]["tier"] == "speculative"
    row = await UsageRecord.objects.aget(request_id=raw.headers["x-request-id"])
    assert (row.model, row.route_tier, row.outcome) == (MODEL, "speculative", "completed")
    assert (row.prompt_tokens, row.completion_tokens) == (completion.usage.prompt_tokens, len(reference.token_ids))
    assert row.cost_total == Decimal(tandem["cost"]["total"]) > 0
    assert (row.verifier_version, row.draft_version) == (entry.verifier_version, entry.draft_version)


async def test_the_smollm2_pair_serves_no_edge_tier_so_a_routine_chat_is_answered_by_its_verifier(
    account, smol_engines
):
    # its draft is two blocks distilled to propose the verifier's tokens: its own text is no answer
    entry = smol_engines.get(MODEL)
    assert entry.edge is None and Tier.EDGE not in entry.engines
    await sync_to_async(routing_policy_publish)(tenant=account.tenant, difficulty_routing=True)  # as make run's
    hello = [{"role": "user", "content": "Say hi to my team in one short line."}]
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
        client = openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key=account.raw_key, http_client=http, max_retries=0)
        completion = await client.chat.completions.create(model=MODEL, messages=hello, max_tokens=16, temperature=0)
        with pytest.raises(openai.BadRequestError, match="not served on the edge tier"):
            await client.chat.completions.create(
                model=MODEL, messages=hello, max_tokens=16, temperature=0, extra_body={"tier": "edge"}
            )
    route = completion.model_extra["tandem"]["route"]
    assert (route["tier"], route["reason"]) == (
        "speculative",
        "routine",
    )  # a routine prompt: the edge's, were there one
    plain = SpeculativeEngine(entry.speculative.verifier, entry.tokenizer, None, scheduler=entry.speculative.scheduler)
    reference = plain.generate(chat_prompt(entry.tokenizer, [Message(**m) for m in hello]), max_tokens=16)
    assert completion.choices[0].message.content == reference.text
