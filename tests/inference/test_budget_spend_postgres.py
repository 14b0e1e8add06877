"""A tenant near its hard limit spends what it budgeted, and never more (on PostgreSQL, through the gateway).

The issue's scenario: waves of concurrent 32-token requests against a small budget. Each
request holds its worst case before it runs; held at the price's GPU ceiling that was
about 12 times (here 40 times) what it costs, so most requests were refused while most of
the money stayed unspent. Holds now count GPU time at the measured pace, and a request
refused while others' holds are in flight waits for them to settle.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from inference import gateway
from inference.errors import BudgetExceeded
from tenants.models import Budget, UsageRecord
from tenants.services import budget_set

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.asyncio,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="needs PostgreSQL (DATABASE_URL=postgres://postgres@127.0.0.1:5432/test): only it locks rows",
    ),
]

WAVES = 6
CONCURRENT = 60
MAX_TOKENS = 32


def call() -> gateway.CompletionCall:
    return gateway.CompletionCall(model="tandem-test", prompt="Tell me something", max_tokens=MAX_TOKENS)


async def run(principal) -> tuple[str, float, Decimal]:
    """(outcome, when it ended, what it cost)."""
    try:
        stream = await gateway.start(principal, call())
        await gateway.collect(stream)
    except BudgetExceeded:
        return "402", time.monotonic(), Decimal(0)
    assert stream.usage is not None
    return "ok", time.monotonic(), stream.usage.cost["total"]


async def test_a_tenant_near_its_hard_limit_spends_most_of_what_is_left_and_never_more(
    account, other_account, settings
):
    settings.TANDEM_BUDGET_WAIT_S = 5.0
    # The model's pace is known from earlier traffic (another tenant's: the pace is the model's, not a tenant's).
    warm = await gateway.authenticate_api_key(other_account.raw_key)
    for _ in range(40):
        await run(warm)
    one = await UsageRecord.objects.filter(tenant=other_account.tenant).alatest("created_at")
    limit = one.cost_total * 200  # room for about 200 of the 360 requests below
    await sync_to_async(budget_set)(tenant=account.tenant, period="day", hard_limit=limit, soft_limit=None)

    principal = await gateway.authenticate_api_key(account.raw_key)
    outcomes: list[tuple[str, float, Decimal]] = []
    for _ in range(WAVES):
        outcomes += await asyncio.gather(*(run(principal) for _ in range(CONCURRENT)))

    refused_at = [when for outcome, when, _ in outcomes if outcome == "402"]
    assert refused_at, "the budget should run out within the run"
    budget = await Budget.objects.aget(tenant=account.tenant)
    rows = [r async for r in UsageRecord.objects.filter(tenant=account.tenant)]
    assert budget.reserved == 0 and budget.spent == sum((r.cost_total for r in rows), Decimal(0))
    assert budget.spent <= limit  # never past the hard limit
    answered = sum(outcome == "ok" for outcome, _, _ in outcomes)
    assert answered == len(rows)
    # the requests answered before the first refusal alone spent at least 80% of what was left
    first_refusal = min(refused_at)
    spent_before = sum(
        (cost for outcome, when, cost in outcomes if outcome == "ok" and when <= first_refusal), Decimal(0)
    )
    assert spent_before >= Decimal("0.8") * limit, (spent_before / limit, answered, budget.spent / limit)
