"""The gateway's draft for each new session: the current version, a canary's candidate, a tenant's pin."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from inference import gateway
from registry import services
from registry.models import ModelVersion, Rollout, TenantModelPin
from registry.serving import draft_plans
from tenants.models import AuditEvent, UsageRecord
from tests.inference.conftest import GatedEngine
from tests.registry.conftest import CURRENT, OTHER, OTHER_TEXT

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

MODEL = "tandem-test"


def _versions() -> tuple[ModelVersion, ModelVersion]:
    """Registry rows for the two trivial drafts (their files do not exist: rows as another process wrote them)."""
    current = ModelVersion.objects.create(
        model=MODEL, role="draft", version=CURRENT, source="trivial", format="gguf", status="current"
    )
    other = ModelVersion.objects.create(
        model=MODEL, role="draft", version=OTHER, source="trivial-1", format="gguf", status="retired"
    )
    return current, other


async def _complete(account, max_tokens: int = 9) -> tuple[str, str]:
    """(text, ledger draft_version) of one completion by ``account``'s key."""
    principal = await gateway.authenticate_api_key(account.raw_key)
    stream = await gateway.start(principal, gateway.CompletionCall(model=MODEL, prompt="Hi", max_tokens=max_tokens))
    text = "".join([d.text async for d in stream])
    row = await UsageRecord.objects.aget(request_id=stream.request_id)
    return text, row.draft_version


async def test_without_a_plan_sessions_get_the_draft_the_engine_started_with(account, two_drafts):
    await sync_to_async(draft_plans.refresh)()
    text, version = await _complete(account)
    assert version == CURRENT and text != OTHER_TEXT[:9]


async def test_a_tenants_pin_serves_its_sessions_the_pinned_draft_and_the_ledger_records_it(
    account, other_account, two_drafts
):
    _, other = await sync_to_async(_versions)()
    pin = await sync_to_async(services.model_pin_set)(
        tenant=account.tenant, model=MODEL, version=other, by=account.user
    )
    assert pin is not None
    await sync_to_async(draft_plans.refresh)()
    text, version = await _complete(account)
    assert (text, version) == (OTHER_TEXT[:9], OTHER)
    _, unpinned = await _complete(other_account)  # another tenant: the current draft
    assert unpinned == CURRENT
    event = await AuditEvent.objects.aget(action="model_pin.set")
    assert event.tenant_id == account.tenant.pk and event.changes["version"]["after"] == OTHER


async def test_only_an_owner_may_pin_and_a_refused_pin_changes_nothing(account, two_drafts, django_user_model):
    from tenants.errors import PermissionDenied
    from tenants.services import membership_create

    _, other = await sync_to_async(_versions)()
    member = await sync_to_async(django_user_model.objects.create_user)(username="m", password="pw-m-1234567")
    await sync_to_async(membership_create)(tenant=account.tenant, user=member, role="member")
    with pytest.raises(PermissionDenied):
        await sync_to_async(services.model_pin_set)(tenant=account.tenant, model=MODEL, version=other, by=member)
    assert not await TenantModelPin.objects.aexists()
    assert not await AuditEvent.objects.filter(action="model_pin.set").aexists()


async def test_a_canary_at_full_share_serves_new_sessions_the_candidate(account, two_drafts):
    current, other = await sync_to_async(_versions)()
    await Rollout.objects.acreate(
        model=MODEL, source_version=other, candidate=other, baseline=current, status="canary", canary_share=1
    )
    await sync_to_async(draft_plans.refresh)()
    assert await _complete(account) == (OTHER_TEXT[:9], OTHER)


async def test_a_session_in_flight_finishes_on_its_draft_when_another_is_promoted(account, two_drafts):
    gated = GatedEngine(free_tokens=2)
    two_drafts.speculative = gated  # the current draft's engine, held at a gate mid-stream
    current, other = await sync_to_async(_versions)()
    rollout = await Rollout.objects.acreate(
        model=MODEL, source_version=other, candidate=other, baseline=current, status="canary", canary_share=0.001
    )
    await sync_to_async(draft_plans.refresh)()
    draft_plans._random.seed(1)  # 0.13...: above the share, so this session gets the current draft
    principal = await gateway.authenticate_api_key(account.raw_key)
    stream = await gateway.start(principal, gateway.CompletionCall(model=MODEL, prompt="Hi", max_tokens=6))
    await asyncio.to_thread(gated.blocked.wait, 5)
    await sync_to_async(services.rollout_promote)(rollout=rollout, by=account.user)
    await sync_to_async(draft_plans.refresh)()  # as the TTL would, in this process
    _, new_version = await _complete(account)  # a new session: the promoted draft
    gated.gate.release(100)
    deltas = [d async for d in stream]
    old = await UsageRecord.objects.aget(request_id=stream.request_id)
    assert new_version == OTHER
    assert old.draft_version == CURRENT and old.outcome == "completed" and len(deltas) == 6
    assert await ModelVersion.objects.filter(version=OTHER, status="current").aexists()
