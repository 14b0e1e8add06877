"""``manage.py dashboards_seed``: ledger rows and SLO samples as the platform writes them, rolled up."""

from __future__ import annotations

import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.utils import timezone

from dashboards import selectors
from dashboards.models import CostRollup
from inference.models import SloSample
from tenants.models import UsageRecord

pytestmark = pytest.mark.django_db


def test_seed_writes_ledger_rows_and_slo_samples_that_the_report_adds_up(account):
    out = io.StringIO()
    call_command("dashboards_seed", "--rows", "600", "--tenant", account.tenant.slug, "--days", "3", stdout=out)
    assert "seeded 600 ledger rows" in out.getvalue()
    rows = UsageRecord.objects.filter(tenant=account.tenant)
    assert rows.count() == 600 and SloSample.objects.filter(tenant=account.tenant).count() == 600
    # the ledger's own cost function: buckets add up to the total; caches carry their saving
    for edge, verifier, cloud, total in rows.values_list("cost_edge", "cost_verifier", "cost_cloud", "cost_total"):
        assert edge + verifier + cloud == total
    assert rows.filter(source="exact_cache").exists() and rows.filter(route_tier="speculative").exists()
    assert set(SloSample.objects.values_list("latency_class", flat=True)) <= {"interactive", "batch"}
    assert SloSample.objects.filter(queued_ms__gt=0).exists()
    assert CostRollup.objects.filter(tenant=account.tenant).exists()  # rolled up after seeding
    now = timezone.now()
    report = selectors.cost_report(
        tenant=account.tenant.pk, start=now - timedelta(days=4), end=now, granularity="day", split="tag"
    )
    assert report.totals["requests"] == 600
    assert report.totals["cost_total"] == sum(rows.values_list("cost_total", flat=True), Decimal(0))
