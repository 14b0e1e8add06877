"""The semantic result cache (inference.semantic_cache) through the gateway: opt-in, per tenant, per bucket, charged as a replay."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async

from inference import gateway
from inference.errors import InvalidRequest
from inference.models import SEMANTIC_THRESHOLD_DEFAULT
from inference.semantic_cache import Embedder, SemanticCache, compatible, content_words, semantic_cache
from inference.services import routing_policy_publish
from tests.inference import test_cache
from tests.inference.test_cache import CACHE_RATE, row, run

cached = test_cache.cached  # the same fixture: the builtin policy's cache on, a cache rate on every tier

pytestmark = [pytest.mark.django_db(transaction=True)]

QUESTION = "What is the capital of France?"
PARAPHRASE = "what's the capital of france"
OTHER = "Write a short poem about autumn leaves."


@pytest_asyncio.fixture
async def semantic(cached):
    """The cache-rate account with a policy that opts in to the semantic cache."""
    await sync_to_async(routing_policy_publish)(
        tenant=cached.tenant, cache_ttl_s=60, semantic_cache=True, difficulty_routing=False
    )
    return cached


# the embedder ----------------------------------------------------------------------------------------
def test_paraphrases_are_closer_than_different_questions():
    embed = semantic_cache.embedder.embed
    pairs_same = [
        (QUESTION, PARAPHRASE),
        ("How do I reverse a list in Python?", "how can I reverse a python list"),
        ("Explain photosynthesis simply.", "Explain photosynthesis in simple terms."),
    ]
    pairs_different = [
        (QUESTION, "What is the capital of Germany?"),
        (QUESTION, OTHER),
        ("How do I reverse a list in Python?", "How do I sort a dictionary by value in Python?"),
    ]
    # each text embedded once (a second or so each on a loaded 2-core machine)
    vectors = {t: embed(t) for pair in pairs_same + pairs_different for t in pair}
    same = [float(vectors[a] @ vectors[b]) for a, b in pairs_same]
    different = [float(vectors[a] @ vectors[b]) for a, b in pairs_different]
    assert min(same) > max(different), (same, different)
    vector = vectors[QUESTION]
    assert vector.dtype == np.float32 and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5


@pytest.mark.parametrize(
    ("a", "b", "allowed"),
    [
        (QUESTION, PARAPHRASE, True),  # case, punctuation, a contraction
        ("Tell me a joke about cats.", "Tell me a cat joke.", False),  # the same words, another order
        ("What is the capital of France?", "What is the capital of Germany?", False),  # a word swapped
        ("Write a poem about the moon.", "Write a sad poem about the moon.", False),  # a word added
        ("Convert Celsius to Fahrenheit.", "Convert Fahrenheit to Celsius.", False),  # words moved
        ("When was the Eiffel Tower built?", "Where was the Eiffel Tower built?", False),  # question words count
        ("Explain how vaccines work", "explain how a vaccine works", True),  # inflection
    ],
)
def test_a_match_needs_the_same_content_words_in_the_same_order(a, b, allowed):
    assert compatible(content_words(a), content_words(b)) is allowed


@pytest.mark.asyncio
async def test_prompts_that_differ_in_a_number_never_meet(semantic):
    await run(semantic, prompt="What is 12 times 7?")
    _, other = await run(semantic, prompt="what is 12 times 8")
    assert (await row(other)).source == "generation"


@pytest.mark.asyncio
async def test_a_prompt_with_an_added_word_generates(semantic):
    await run(semantic, prompt="Write a poem about the moon.")
    _, other = await run(semantic, prompt="Write a sad poem about the moon.")
    assert (await row(other)).source == "generation"


# through the gateway -------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_paraphrase_replays_the_answer_at_the_cache_rate_and_says_it_was_semantic(semantic):
    first_text, first = await run(semantic, prompt=QUESTION)
    second_text, second = await run(semantic, prompt=PARAPHRASE)
    assert second.route.reason == "semantic_cache" and second_text == first_text
    generated, replayed = await row(first), await row(second)
    assert (generated.source, replayed.source) == ("generation", "semantic_cache")
    assert replayed.route_tier == generated.route_tier
    assert SEMANTIC_THRESHOLD_DEFAULT <= replayed.route_signals["similarity"] <= 1.0
    tokens = replayed.prompt_tokens + replayed.completion_tokens
    assert replayed.cost_total == (CACHE_RATE * tokens / 1_000_000).quantize(Decimal("1e-9"))
    assert replayed.saving > 0 and replayed.gpu_ms == 0


@pytest.mark.asyncio
async def test_a_different_question_generates(semantic):
    await run(semantic, prompt=QUESTION)
    _, other = await run(semantic, prompt="What is the capital of Germany?")
    assert other.route.reason != "semantic_cache" and (await row(other)).source == "generation"


@pytest.mark.asyncio
async def test_the_semantic_cache_is_off_unless_the_policy_opts_in(cached):
    await sync_to_async(routing_policy_publish)(tenant=cached.tenant, cache_ttl_s=60, difficulty_routing=False)
    await run(cached, prompt=QUESTION)
    _, paraphrase = await run(cached, prompt=PARAPHRASE)
    assert (await row(paraphrase)).source == "generation"


@pytest.mark.asyncio
async def test_one_tenants_answer_is_never_replayed_to_another_by_meaning(semantic, other_account):
    await sync_to_async(routing_policy_publish)(
        tenant=other_account.tenant, cache_ttl_s=60, semantic_cache=True, semantic_threshold=0.5
    )
    await run(semantic, prompt=QUESTION)
    _, theirs = await run(other_account, prompt=QUESTION)  # the very same prompt: still not theirs
    assert (await row(theirs)).source == "generation"


@pytest.mark.asyncio
async def test_another_sampling_setting_is_another_bucket(semantic):
    await run(semantic, prompt=QUESTION)
    _, longer = await run(semantic, prompt=PARAPHRASE, max_tokens=11)
    assert (await row(longer)).source == "generation"


@pytest.mark.asyncio
async def test_forgetting_a_tenants_entries_forgets_their_meaning_too(semantic):
    from inference.cache import exact_cache

    await run(semantic, prompt=QUESTION)
    assert await exact_cache.forget_tenant(semantic.tenant.pk) == 1
    _, after = await run(semantic, prompt=PARAPHRASE)
    assert (await row(after)).source == "generation"


@pytest.mark.asyncio
async def test_a_prompt_that_cannot_be_embedded_is_answered_without_the_cache(semantic, monkeypatch):
    def broken(text: str):
        raise RuntimeError("embedding model unavailable")

    monkeypatch.setattr(semantic_cache.embedder, "embed", broken)
    text, stream = await run(semantic, prompt=QUESTION)
    assert text and (await row(stream)).source == "generation"


@pytest.mark.asyncio
async def test_the_index_is_shared_through_redis(semantic, settings, redis_db):
    url, client = redis_db
    settings.TANDEM_CACHE_REDIS_URL = url
    await run(semantic, prompt=QUESTION)
    buckets = [k.decode() async for k in client.scan_iter(match="tandem:cache:v1:*:sem:*")]
    assert len(buckets) == 1 and f":t{semantic.tenant.pk}:" in buckets[0]
    semantic_cache.reset()  # another process: nothing in its memory
    other = SemanticCache(embedder=semantic_cache.embedder)
    entries = await other._index().entries(buckets[0])
    assert len(entries) == 1 and entries[0].words == content_words(QUESTION)
    assert float(entries[0].vector @ semantic_cache.embedder.embed(QUESTION)) > 0.99  # float16 on the way
    _, hit = await run(semantic, prompt=PARAPHRASE)
    assert hit.route.reason == "semantic_cache"


def test_a_threshold_outside_half_to_one_is_refused(db):
    with pytest.raises(InvalidRequest, match="semantic_threshold"):
        routing_policy_publish(tenant=None, semantic_threshold=0.2)


def test_the_embedder_version_names_its_model_without_loading_it():
    embedder = Embedder()
    assert embedder.version.startswith("smollm2-prompteol-centred-v1:") and not embedder.loaded()


@pytest.mark.asyncio
async def test_gateway_start_is_unchanged_for_an_exact_hit_under_a_semantic_policy(semantic):
    await run(semantic, prompt=QUESTION)
    _, exact = await run(semantic, prompt=QUESTION)
    assert exact.route.reason == "exact_cache" and (await row(exact)).source == "exact_cache"
    assert isinstance(exact, gateway.GatewayStream)
