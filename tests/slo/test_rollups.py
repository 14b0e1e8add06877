"""Rollups of SLO samples: closed buckets only, counts equal to the raw samples', and windows that add up."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db.models import Q
from django.utils import timezone

from inference.models import SloSample
from slo import selectors, services
from slo.counts import COLUMNS, EDGES, Counts, total
from slo.management.commands.slo_seed import seed_samples
from slo.models import SloRollup, SloRollupWatermark
from slo.selectors import FIVE_MINUTES, HOUR, floor_time
from tests.slo.conftest import sample

pytestmark = pytest.mark.django_db

# what each histogram counts, as a filter on the raw samples (slo.counts' definitions)
HIST_SCOPE = {
    "ttft": ("ttft_ms", Q(ttft_ms__isnull=False)),
    "itl": ("inter_token_ms", Q(inter_token_ms__isnull=False)),
    "e2e": ("e2e_ms", Q(outcome="completed")),
    "queued": ("queued_ms", Q()),
}


def raw_counts(queryset) -> dict:
    out = {
        "requests": queryset.count(),
        "failures": queryset.filter(outcome="error").count(),
        "fallbacks": queryset.filter(fallback=True).count(),
        "fallback_successes": queryset.filter(fallback=True, outcome="completed").count(),
        "exact_cache": queryset.filter(source="exact_cache").count(),
        "semantic_cache": queryset.filter(source="semantic_cache").count(),
        "queued_ms": sum(round(ms) for ms in queryset.values_list("queued_ms", flat=True)),
    }
    for metric, (column, scope) in HIST_SCOPE.items():
        scoped = queryset.filter(scope)
        out[f"n_{metric}"] = scoped.count()
        out[f"hist_{metric}"] = [scoped.filter(**{f"{column}__lte": edge}).count() for edge in EDGES[metric]]
    return out


def as_raw(counts: Counts) -> dict:
    out = {
        name: getattr(counts, name)
        for name in (
            "requests",
            "failures",
            "fallbacks",
            "fallback_successes",
            "exact_cache",
            "semantic_cache",
            "queued_ms",
        )
    }
    for metric in EDGES:
        out[f"n_{metric}"] = counts.n[metric]
        out[f"hist_{metric}"] = counts.hist[metric]
    return out


def rollup_counts(resolution_s: int, **match) -> Counts:
    """The rollup rows' own values, added up here (not by the selectors' SUM queries)."""
    rows = SloRollup.objects.filter(resolution_s=resolution_s, **match).values_list(*COLUMNS)
    return total(Counts.from_columns(values) for values in rows)


@pytest.fixture
def seeded(account, other_account):
    now = timezone.now()
    seed_samples(tenant_id=account.tenant.pk, count=800, days=2, now=now, failure_share=0.05, seed=3)
    seed_samples(tenant_id=other_account.tenant.pk, count=300, days=2, now=now, failure_share=0.2, seed=4)
    return now


def test_rollup_counts_equal_the_raw_samples_counts_per_tenant_class_and_tier(seeded, account, other_account):
    now = seeded
    services.rollups_compute(now=now)
    marks = selectors.watermarks()
    assert marks[FIVE_MINUTES] == floor_time(now - timedelta(minutes=2), FIVE_MINUTES)  # closed buckets only
    assert marks[HOUR] == floor_time(marks[FIVE_MINUTES], HOUR)
    for tenant in (account.tenant, other_account.tenant):
        for cls in ("interactive", "batch"):
            for tier in ("edge", "speculative", "cloud"):
                raw = SloSample.objects.filter(tenant=tenant, latency_class=cls, route_tier=tier)
                match = {"tenant": tenant, "latency_class": cls, "route_tier": tier}
                five = rollup_counts(FIVE_MINUTES, **match)
                assert as_raw(five) == raw_counts(raw.filter(created_at__lt=marks[FIVE_MINUTES]))
                hourly = rollup_counts(HOUR, **match)
                assert as_raw(hourly) == raw_counts(raw.filter(created_at__lt=marks[HOUR]))
                assert five.requests > 0


@pytest.mark.parametrize("lag_minutes", [0, 30, 95])  # how far the rollups lag behind (the open window grows)
def test_a_window_of_rollups_and_raw_samples_counts_exactly_the_samples_in_it(seeded, account, lag_minutes):
    now = seeded
    services.rollups_compute(now=now - timedelta(minutes=lag_minutes))
    since = now - timedelta(days=1, minutes=17, seconds=3)  # inside an hour and a 5-minute bucket
    found = selectors.counts_by(tenant_id=account.tenant.pk, since=since, now=now, fine=False)
    raw = SloSample.objects.filter(tenant=account.tenant, created_at__gte=since)
    assert as_raw(total(found.values())) == raw_counts(raw)
    hourly = selectors.counts_by(tenant_id=account.tenant.pk, since=since, now=now, fine=False, hourly=True)
    assert as_raw(total(hourly.values())) == raw_counts(raw)
    fine_since = now - timedelta(hours=6, minutes=2, seconds=30)
    fine = selectors.counts_by(tenant_id=account.tenant.pk, since=fine_since, now=now, fine=True)
    assert as_raw(total(fine.values())) == raw_counts(raw.filter(created_at__gte=fine_since))
    assert (
        selectors.pick(fine, latency_class="batch").requests
        == raw.filter(created_at__gte=fine_since, latency_class="batch").count()
    )


def test_rolling_up_again_or_rebuilding_never_counts_twice(seeded, account):
    now = seeded
    services.rollups_compute(now=now)
    before = as_raw(rollup_counts(FIVE_MINUTES, tenant=account.tenant))
    assert services.rollups_compute(now=now) == 0  # nothing closed since
    services.rollups_compute(now=now, rebuild=True)
    assert as_raw(rollup_counts(FIVE_MINUTES, tenant=account.tenant)) == before
    assert SloRollupWatermark.objects.count() == 2


def test_later_buckets_are_rolled_up_as_they_close(account, samples):
    now = floor_time(timezone.now(), HOUR) - timedelta(hours=2)
    samples([sample(account.tenant.pk, now + timedelta(minutes=1))])
    services.rollups_compute(now=now + timedelta(minutes=4))  # the 0-5 min bucket is still open
    assert not SloRollup.objects.exists()
    services.rollups_compute(now=now + timedelta(minutes=7, seconds=1))  # closed 2 minutes after its end
    assert list(SloRollup.objects.values_list("resolution_s", "requests")) == [(FIVE_MINUTES, 1)]
    samples([sample(account.tenant.pk, now + timedelta(minutes=20))])
    services.rollups_compute(now=now + timedelta(hours=1, minutes=3))
    assert sorted(SloRollup.objects.values_list("resolution_s", "requests")) == [
        (FIVE_MINUTES, 1),
        (FIVE_MINUTES, 1),
        (HOUR, 2),
    ]


def test_samples_inserted_late_with_an_earlier_time_are_rolled_up_at_the_next_run(seeded, account):
    now = seeded
    services.rollups_compute(now=now)
    seed_samples(tenant_id=account.tenant.pk, count=300, days=1.5, now=now - timedelta(hours=3), seed=9)  # a backfill
    services.rollups_compute(now=now)
    marks = selectors.watermarks()
    assert marks[FIVE_MINUTES] == floor_time(now - timedelta(minutes=2), FIVE_MINUTES)
    raw = SloSample.objects.filter(tenant=account.tenant)
    assert as_raw(rollup_counts(FIVE_MINUTES, tenant=account.tenant)) == raw_counts(
        raw.filter(created_at__lt=marks[FIVE_MINUTES])
    )
    assert as_raw(rollup_counts(HOUR, tenant=account.tenant)) == raw_counts(raw.filter(created_at__lt=marks[HOUR]))


def test_the_mean_queue_depth_is_the_total_wait_over_the_window():
    counts = Counts()
    for queued_ms in (1_800_000.0, 1_800_000.0, 0.0):  # two requests waited half an hour each, one not at all
        counts.add_sample("completed", False, "generation", 10.0, 5.0, 100.0, queued_ms)
    assert counts.queued_ms == 3_600_000 and counts.mean_waiting(HOUR * 1e3) == 1.0
    assert Counts.from_columns(counts.as_columns().values()).queued_ms == counts.queued_ms
