"""Rollouts of real drafts on the demo pair, eager Celery: convert -> validate -> evaluate -> canary -> decision.

A good variant (the demo draft, exported again and converted to f16 by llama.cpp's
quantiser) is promoted; a bad one (the demo draft with each layer's weights shuffled: low acceptance) is
rolled back automatically by the canary while a client streams, and every stream stays the
verifier's own greedy text. The evaluation and the canary use few prompts and samples here
to stay fast; ``python -m registry.demo_rollout`` runs the full-size chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from inference import gateway
from inference.engines import EngineSet, file_version, set_engines
from inference.stream import Tally
from registry import services
from registry.demo_rollout import shuffled_draft
from registry.models import ModelVersion, Rollout
from registry.serving import draft_plans
from speculative.engine import SpeculativeEngine
from speculative.pair import DEMO_DRAFT_GGUF, DEMO_DRAFT_HF, DEMO_VERIFIER
from tenants.models import AuditEvent, UsageRecord
from tests.conftest import TEST_MODELS, TEST_RATES, TIERS
from tests.inference.test_demo_pair_platform import MODEL, DemoPair

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

PROMPTS = ("The Django ORM", "A view function takes", "Models are defined", "URL patterns map")
MAX_TOKENS = 12
SAMPLES = 2  # completions of each version before the canary decides


@pytest.fixture(scope="module")
def pair() -> Iterator[DemoPair]:
    # The torch checkpoint, where drafting pays: a canary is judged on its draft's acceptance, and on
    # llama.cpp (the CPU default) the controllers soon stop drafting this pair at all, because there
    # a drafting round costs more than the tokens it saves; two 12-token samples then carry one
    # drafted round's evidence, and the canary's verdict was a coin toss (one run in four).
    demo = DemoPair(DEMO_VERIFIER)
    yield demo
    demo.plain.close()


@pytest.fixture(scope="module")
def bad_draft(tmp_path_factory) -> Path:
    return shuffled_draft(tmp_path_factory.mktemp("bad-draft"))


@pytest.fixture(scope="module")
def bad_gguf(bad_draft, tmp_path_factory) -> Path:
    from speculative.gguf_export import export_gguf

    return export_gguf(bad_draft, tmp_path_factory.mktemp("bad-gguf") / "bad.gguf")


@pytest.fixture
def serving(pair) -> Iterator[EngineSet]:
    engines = pair.engines()
    previous = set_engines(engines)
    yield engines
    set_engines(previous)
    engines.close()


@pytest.fixture
def price_book(db):
    from tenants.services import price_book_publish

    prices = [{"model": m, "tier": t, **TEST_RATES} for m in (*TEST_MODELS, MODEL) for t in TIERS]
    return price_book_publish(version=1, prices=prices, note="test prices and the demo pair's")


@pytest.fixture(autouse=True)
def quick_evaluation(monkeypatch, settings, tmp_path):
    monkeypatch.setattr(services, "EVAL_PROMPTS", services.EVAL_PROMPTS[:1])
    monkeypatch.setattr(services, "EVAL_MAX_TOKENS", 12)
    settings.VAR_DIR = tmp_path  # converted drafts go to this test's folder


async def complete(principal, prompt: str):
    stream = await gateway.start(
        principal, gateway.CompletionCall(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    )
    return stream, [d async for d in stream]


async def served(principal, pair, prompts) -> list[str]:
    """Complete each prompt; check each is the verifier's greedy text; return the draft versions the ledger records."""
    versions = []
    for prompt in prompts:
        stream, deltas = await complete(principal, prompt)
        assert "".join(d.text for d in deltas) == pair.greedy(prompt, MAX_TOKENS).text
        versions.append((await UsageRecord.objects.aget(request_id=stream.request_id)).draft_version)
    return versions


def steps_of(rollout: Rollout) -> list[tuple[str, str]]:
    return [(s.name, s.status) for s in rollout.steps.order_by("id")]


async def test_the_ledgers_counts_are_the_engines_accepted_drafts_and_rounds_cut_short(pair):
    # the canary's per-token acceptance reads these two counts from the ledger, which a gateway's
    # Tally takes from the tokens alone: a verifier token that carries rejected drafts ends a cut round
    engine = SpeculativeEngine(pair.verifier, pair.tokenizer, pair.draft)
    try:
        rejections = 0
        for prompt in PROMPTS:
            completion, tally = engine.stream(prompt, max_tokens=64), Tally()
            for event in completion:
                tally.count(event)
            assert (tally.accepted, tally.rejections) == (completion.stats.accepted, completion.stats.rejections)
            rejections += tally.rejections
        assert rejections > 0  # the prompts do exercise the count
    finally:
        engine.close()


async def test_a_good_draft_goes_convert_validate_evaluate_canary_promote(account, pair, serving):
    await sync_to_async(services.registry_sync)()
    principal = await gateway.authenticate_api_key(account.raw_key)
    baseline = file_version(DEMO_DRAFT_GGUF)
    assert await served(principal, pair, PROMPTS[:SAMPLES]) == [baseline] * SAMPLES  # the current's record
    rollout = await sync_to_async(services.rollout_start)(
        model=MODEL,
        source=DEMO_DRAFT_HF,
        quantisation="f16",
        canary_share=1,
        canary_min_samples=SAMPLES,
        max_canary_drop="0.5",  # two short samples, whose draft lengths follow timings: only a gross drop counts
    )  # eager Celery: the chain runs to the canary's start
    rollout = await Rollout.objects.select_related("candidate").aget(pk=rollout.pk)
    assert rollout.status == "canary" and rollout.candidate.quantisation == "f16"
    candidate = rollout.candidate.version
    assert await served(principal, pair, PROMPTS[:SAMPLES]) == [candidate] * SAMPLES  # the same prompts
    status = await sync_to_async(services.rollout_canary_check)(rollout_id=rollout.pk)
    rollout = await Rollout.objects.aget(pk=rollout.pk)
    assert status == "promoted", rollout.decision  # the canary's reasons, where it judged the draft worse
    assert await sync_to_async(steps_of)(rollout) == [
        ("convert", "passed"),
        ("validate", "passed"),
        ("evaluate", "passed"),
        ("canary", "passed"),
        ("promote", "passed"),
    ]
    validate = await rollout.steps.aget(name="validate")
    assert validate.figures["max_logit_diff"] <= services.LOGIT_TOLERANCE["f16"]
    evaluate = await rollout.steps.aget(name="evaluate")
    assert evaluate.figures["acceptance_ratio"] >= 0.9 and evaluate.figures["candidate"]["tokens_per_s"] > 0
    assert evaluate.figures["same_greedy_text"]  # both drafts gave the verifier's own greedy text
    assert await ModelVersion.objects.filter(version=candidate, status="current").aexists()
    assert await ModelVersion.objects.filter(version=baseline, status="retired").aexists()
    actions = [a async for a in AuditEvent.objects.order_by("id").values_list("action", flat=True)]
    # convert, validate, evaluate, the canary's start and its verdict; then the promotion
    assert actions.count("rollout.step") == 5 and "rollout.start" in actions and actions[-1] == "rollout.promote"
    assert "model_version.register" in actions


async def test_a_bad_draft_is_rolled_back_by_the_canary_with_no_client_error_and_lossless_output(
    account, pair, serving, bad_draft
):
    await sync_to_async(services.registry_sync)()
    principal = await gateway.authenticate_api_key(account.raw_key)
    baseline = file_version(DEMO_DRAFT_GGUF)
    await served(principal, pair, PROMPTS[:SAMPLES])
    rollout = await sync_to_async(services.rollout_start)(
        model=MODEL, source=bad_draft, canary_share=1, canary_min_samples=SAMPLES, min_eval_ratio=0
    )  # min_eval_ratio 0: the evaluation lets it through, so that the live canary has to catch it
    rollout = await Rollout.objects.select_related("candidate").aget(pk=rollout.pk)
    assert rollout.status == "canary"
    candidate = rollout.candidate.version
    assert await served(principal, pair, PROMPTS[SAMPLES:]) == [candidate] * SAMPLES
    # a client streams on the bad draft while the canary decides against it
    stream = await gateway.start(
        principal, gateway.CompletionCall(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    )
    first = await stream.__anext__()
    assert await sync_to_async(services.rollout_canary_check)(rollout_id=rollout.pk) == "rolled_back"
    rest = [d async for d in stream]
    assert first.text + "".join(d.text for d in rest) == pair.greedy(PROMPTS[0], MAX_TOKENS).text
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert row.outcome == "completed" and row.draft_version == candidate  # it finished on the draft it started with
    assert await served(principal, pair, PROMPTS[:1]) == [baseline]  # new sessions: the current draft again
    rollout = await Rollout.objects.aget(pk=rollout.pk)
    canary = await rollout.steps.aget(name="canary")
    assert canary.status == "failed" and "acceptance" in canary.error
    assert canary.figures["candidate"]["acceptance"] < canary.figures["current"]["acceptance"]
    assert await ModelVersion.objects.filter(version=candidate, status="rejected").aexists()
    assert await AuditEvent.objects.filter(action="rollout.rollback", object_id=str(rollout.pk)).aexists()
    assert draft_plans.plan(MODEL).candidate is None


async def test_evaluation_fails_a_bad_draft_before_it_serves_anyone(account, pair, serving, bad_gguf):
    await sync_to_async(services.registry_sync)()
    rollout = await sync_to_async(services.rollout_start)(model=MODEL, source=bad_gguf)  # GGUF: nothing to convert
    rollout = await Rollout.objects.aget(pk=rollout.pk)
    assert rollout.status == "failed" and rollout.decision.startswith("evaluate: acceptance")
    assert await sync_to_async(steps_of)(rollout) == [
        ("convert", "skipped"),
        ("validate", "passed"),
        ("evaluate", "failed"),
    ]
    assert await ModelVersion.objects.filter(version=file_version(bad_gguf), status="rejected").aexists()
    assert await AuditEvent.objects.filter(action="rollout.fail").aexists()
