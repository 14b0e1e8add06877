"""Rollups of the ledger: rollups of closed windows + the open window's raw rows == the raw sums, for every split."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from django.test import override_settings

from dashboards import selectors, services
from dashboards.models import MEASURES, CostRollup, Granularity
from dashboards.windows import floor_day, floor_hour
from tenants.services import api_key_create
from tests.dashboards.ledger import expected_sums, insert, make_row

DIMENSIONS = ("total", "model", "api_key", "user", "tag")
NOW = datetime(2026, 11, 20, 10, 20, 7, tzinfo=UTC)  # the margin (300 s) has passed 10:00: hours up to 10:00 closed


@pytest.fixture
def ledger(account, other_account, price_book):
    """Rows of two tenants over the 60 hours before NOW, some of them in the open hour."""
    rng = random.Random(7)
    second_key, _ = api_key_create(tenant=account.tenant, created_by=account.user, name="second")
    rows = []
    for _ in range(300):
        at = NOW - timedelta(seconds=rng.uniform(0, 60 * 3600))
        rows.append(
            make_row(
                rng,
                tenant=account.tenant,
                at=at,
                price_book=price_book,
                users=[account.user],
                keys=[account.api_key, second_key],
            )
        )
    for _ in range(80):
        at = NOW - timedelta(seconds=rng.uniform(0, 60 * 3600))
        rows.append(
            make_row(
                rng,
                tenant=other_account.tenant,
                at=at,
                price_book=price_book,
                users=[other_account.user],
                keys=[other_account.api_key],
            )
        )
    insert(rows)
    return rows


def _read(tenant, start, end, granularity, dimension) -> dict:
    """The report's cells over the whole range (buckets summed), as the figures people read."""
    cells = selectors.cost_cells(tenant=tenant, start=start, end=end, granularity=granularity, dimension=dimension)
    summed: dict = defaultdict(lambda: [0] * len(MEASURES))
    for (_bucket, value, tier, source), sums in cells.items():
        for i, v in enumerate(sums):
            summed[(None, value, tier, source)][i] += v
    return {key: selectors.measures_out(sums) for key, sums in summed.items()}


def _assert_equal_to_raw(rows, tenant_id, start, end, granularity, by_bucket=False):
    mine = [r for r in rows if r["tenant_id"] == tenant_id and start <= r["created_at"] < end]
    assert mine, "the range holds rows"
    for dimension in DIMENSIONS:
        if by_bucket:
            got = {
                (b, v, t, s): selectors.measures_out(sums)
                for (b, v, t, s), sums in selectors.cost_cells(
                    tenant=tenant_id, start=start, end=end, granularity=granularity, dimension=dimension
                ).items()
            }
            want = expected_sums(mine, dimension, bucket=lambda at: selectors.bucket_of(at, granularity))
        else:
            got = _read(tenant_id, start, end, granularity, dimension)
            want = expected_sums(mine, dimension)
        assert got.keys() == want.keys(), dimension
        for key, sums in want.items():
            for field, value in sums.items():
                assert got[key][field] == value, (dimension, key, field)


def test_rollups_plus_open_window_equal_raw_sums_for_every_dimension(ledger, account):
    services.rollups_refresh(now=NOW)
    assert selectors.rollup_mark(Granularity.HOUR) == datetime(2026, 11, 20, 10, tzinfo=UTC)
    assert selectors.rollup_mark(Granularity.DAY) == datetime(2026, 11, 20, tzinfo=UTC)
    # ragged ends: raw rows at both ends, hour rollups, whole days from the day rollups
    start, end = NOW - timedelta(hours=59, minutes=17), NOW + timedelta(minutes=1)
    plan = selectors.read_plan(
        start, end, "day", selectors.rollup_mark(Granularity.HOUR), selectors.rollup_mark(Granularity.DAY)
    )
    assert {p[0] for p in plan} == {"raw", "hour", "day"}
    _assert_equal_to_raw(ledger, account.tenant.pk, start, end, "day")
    _assert_equal_to_raw(ledger, account.tenant.pk, start, end, "day", by_bucket=True)
    _assert_equal_to_raw(ledger, account.tenant.pk, start, end, "hour", by_bucket=True)
    _assert_equal_to_raw(ledger, account.tenant.pk, start, end, "month", by_bucket=True)


def test_all_tenants_is_the_sum_of_every_tenant(ledger):
    services.rollups_refresh(now=NOW)
    start, end = NOW - timedelta(hours=61), NOW + timedelta(minutes=1)
    got = _read(selectors.ALL_TENANTS, start, end, "day", "total")
    want = expected_sums(ledger, "total")
    assert {k: v["cost_total"] for k, v in got.items()} == {k: v["cost_total"] for k, v in want.items()}


def test_a_late_row_is_counted_after_the_next_run_and_an_open_window_row_at_once(ledger, account, price_book):
    services.rollups_refresh(now=NOW)
    rng = random.Random(3)
    start, end = NOW - timedelta(hours=30), NOW + timedelta(minutes=1)
    # A row stamped in an hour already rolled up (its transaction outlived the margin) ...
    late = make_row(
        rng,
        tenant=account.tenant,
        at=NOW - timedelta(hours=2, minutes=10),
        price_book=price_book,
        users=[account.user],
        keys=[account.api_key],
    )
    # ... and one in the open hour, which the pages read raw.
    fresh = make_row(
        rng,
        tenant=account.tenant,
        at=NOW - timedelta(minutes=5),
        price_book=price_book,
        users=[account.user],
        keys=[account.api_key],
    )
    insert([late, fresh])
    total = _read(account.tenant.pk, start, end, "hour", "total")
    got_requests = sum(v["requests"] for v in total.values())
    in_range = [r for r in ledger if r["tenant_id"] == account.tenant.pk and start <= r["created_at"] < end]
    assert got_requests == len(in_range) + 1  # the open hour's row, not yet the late one
    services.rollups_refresh(now=NOW + timedelta(minutes=5))  # rebuilds the last hours
    _assert_equal_to_raw([*ledger, late, fresh], account.tenant.pk, start, end, "hour", by_bucket=True)
    _assert_equal_to_raw([*ledger, late, fresh], account.tenant.pk, start, end, "day")


def _snapshot() -> set[tuple]:
    return set(
        CostRollup.objects.values_list(
            "tenant_id",
            "granularity",
            "bucket",
            "dimension",
            "value",
            "route_tier",
            "source",
            "requests",
            "cost_total_nanos",
            "gpu_milli",
            "saving_nanos",
        )
    )


def test_rerunning_gives_the_same_rollups(ledger, account):
    services.rollups_refresh(now=NOW)
    first = _snapshot()
    assert first
    services.rollups_refresh(now=NOW)
    hour = floor_hour(NOW - timedelta(hours=5))
    services.rollup_window(granularity=Granularity.HOUR, start=hour)
    services.rollup_window(granularity=Granularity.DAY, start=floor_day(NOW - timedelta(days=1)))
    assert _snapshot() == first
    # from nothing again: the same rows
    CostRollup.objects.all().delete()
    for hour_start in sorted({b for (_, g, b, *_rest) in first if g == "hour"}):
        services.rollup_window(granularity=Granularity.HOUR, start=hour_start)
    for day_start in sorted({b for (_, g, b, *_rest) in first if g == "day"}):
        services.rollup_window(granularity=Granularity.DAY, start=day_start)
    assert _snapshot() == first


@override_settings(TANDEM_ROLLUP_MARGIN_S=300)
def test_a_window_closes_only_once_the_margin_has_passed_its_end():
    assert services.rollup_closed_until(datetime(2026, 11, 20, 10, 4, 59, tzinfo=UTC)) == datetime(
        2026, 11, 20, 9, tzinfo=UTC
    )
    assert services.rollup_closed_until(datetime(2026, 11, 20, 10, 5, tzinfo=UTC)) == datetime(
        2026, 11, 20, 10, tzinfo=UTC
    )


def test_a_window_must_start_on_its_boundary(db):
    with pytest.raises(ValueError):
        services.rollup_window(granularity=Granularity.HOUR, start=datetime(2026, 11, 20, 10, 30, tzinfo=UTC))


def test_the_periodic_task_rolls_up(ledger):
    from dashboards.tasks import rollups_refresh

    done = rollups_refresh.delay().get()
    assert done["hours"] > 0 and CostRollup.objects.exists()


def test_the_hourly_acceptance_rate_is_accepted_over_drafted_tokens_of_the_raw_rows(ledger, account):
    services.rollups_refresh(now=NOW)
    start, end = NOW - timedelta(hours=30), NOW
    rates = selectors.acceptance_by_hour(tenant=account.tenant.pk, start=start, end=end)
    mine = [r for r in ledger if r["tenant_id"] == account.tenant.pk and start <= r["created_at"] < end]
    assert mine, "the range holds rows"
    for hour, rate in rates.items():
        rows = [r for r in mine if hour <= r["created_at"] < hour + timedelta(hours=1)]
        drafted = sum(r["drafted_tokens"] for r in rows)
        want = round(float(sum(r["accepted_tokens"] for r in rows) / drafted), 4) if drafted else None
        assert rate == want, hour
    assert any(rate is not None for rate in rates.values())
