"""The OpenAI-compatible API fuzzed against its OpenAPI schema, in-process (``inference.fuzz_api``; the long run: make fuzz)."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
from django.db.models import Sum

from config.asgi import application
from inference.fuzz_api import Report, Target, fuzz, load_schema
from inference.openapi import openapi_schema
from tenants.models import Budget, Reservation, UsageRecord
from tenants.services import budget_set

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "tandem-test"
CASES = 300  # about 20 s on two busy cores; make fuzz runs thousands against a live server
SEED = 11


def ledger_state(tenant) -> tuple:
    """What a request could have charged: ledger rows, open reservations, the budget's counters."""
    budgets = Budget.objects.filter(tenant=tenant).aggregate(spent=Sum("spent"), reserved=Sum("reserved"))
    return UsageRecord.objects.count(), Reservation.objects.count(), budgets["spent"], budgets["reserved"]


def test_fuzzed_requests_get_documented_answers_no_5xx_and_refusals_charge_nothing(account):
    budget_set(tenant=account.tenant, period="day", hard_limit=Decimal("1000"), soft_limit=None)
    schema = load_schema(openapi_schema(), app=application)
    before: list[tuple] = []

    def send(case, headers):
        before[:] = [ledger_state(account.tenant)]
        return case.call(headers=headers)

    def refusal_charged_nothing(case, response) -> str | None:
        if response.status_code < 400:
            return None
        after = ledger_state(account.tenant)
        if after != before[0]:
            return f"a refused request ({response.status_code}) moved the ledger: {before[0]} -> {after}"
        return None

    target = Target(send=send, key=account.raw_key, model=MODEL, max_tokens=8, extra_check=refusal_charged_nothing)
    started = time.monotonic()
    report = fuzz(schema, target, CASES, seed=SEED)
    figures = report.as_dict()
    summary = json.dumps(figures, indent=2)
    brief = {k: v for k, v in figures.items() if k != "endpoints"} | {
        name: endpoint["statuses"] for name, endpoint in figures["endpoints"].items()
    }
    print(f"fuzzed in {time.monotonic() - started:.1f} s: {json.dumps(brief)}")

    assert figures["cases"] >= CASES * 0.8, summary
    assert set(figures["endpoints"]) == {
        op.ok().method.upper() + " " + op.ok().path for op in schema.get_all_operations()
    }
    assert figures["server_errors"] == 0, summary
    assert figures["violations"] == 0, summary
    assert figures["transport_errors"] == 0, summary
    assert_exercised(report)


def assert_exercised(report: Report) -> None:
    """The run reached the engine and the refusals alike: 200s and 400s on both completions, 404s, 405s."""
    for name in ("POST /v1/chat/completions", "POST /v1/completions"):
        statuses = report.endpoints[name].statuses
        assert statuses[200] > 0 and statuses[400] > 0, (name, statuses)
    assert report.endpoints["GET /v1/models/{model_id}"].statuses[404] > 0
    assert all(figures.statuses[405] > 0 for figures in report.endpoints.values()), "every path refuses other methods"
