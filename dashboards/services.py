"""Writes of the dashboards app: the ledger's rollups, rebuilt one closed window at a time.

When a window is closed
-----------------------
A ledger row's ``created_at`` is the time its INSERT was prepared, never a time the
request reports: ``UsageRecord.created_at`` is ``auto_now_add`` for ``usage_settle_legs``
(a single request, written-behind or not: the row is created inside the settlement's
transaction, when that transaction runs), and ``tenants.services._usage_row`` stamps a
lease batch's rows with ``timezone.now()`` taken inside ``budget_lease_settle``'s
transaction, after its row locks (``inference.settlement`` queues the batch; nothing is
stamped while it waits in memory). So a row stamped ``t`` becomes visible when the
transaction that stamped it commits: later than ``t`` by at most that transaction's
duration (plus the clock difference between the web process and the rollup worker).

The rule: **a window ``[start, end)`` is closed once ``now - TANDEM_ROLLUP_MARGIN_S >= end``**,
where the margin bounds a ledger transaction's duration and the hosts' clock skew
(default 300 s: a settlement takes milliseconds; SQLite's lock wait is 20 s). After
that no row can still arrive for it, so its rollup is final. Each run also rebuilds the
last ``TANDEM_ROLLUP_RECOMPUTE_HOURS`` closed hours (and the days holding them): a row
that broke the margin (a stalled transaction, a skewed clock) is counted at the next
run instead of never.

Rebuilding a window deletes its rows and inserts them again from the ledger in one
transaction: running it twice, or concurrently with another run, gives the same rows.
Hour windows are summed from the ledger; day windows from their 24 hour windows (integer
sums, exact), once the hours' mark has passed the day's end.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Min, Sum
from django.utils import timezone

from dashboards.models import MEASURES, CostRollup, Granularity, RollupMark
from dashboards.selectors import ALL_TENANTS, ledger_between, rollup_mark
from dashboards.windows import DAY, HOUR, LEDGER_FIELDS, Cells, cells_add, floor_day, floor_hour
from tenants.models import Tenant, UsageRecord

logger = logging.getLogger(__name__)

INSERT_BATCH = 2000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # a mark created by a first run's first window: nothing rolled up yet


def rollup_closed_until(now: datetime) -> datetime:
    """The end of the last closed hour at ``now``: every hour window ending at or before it is closed."""
    return floor_hour(now - timedelta(seconds=settings.TANDEM_ROLLUP_MARGIN_S))


def _ledger_first_row() -> datetime | None:
    """When the ledger's first row was written: per tenant, so each lookup is one seek in (tenant, created_at)."""
    firsts = [
        UsageRecord.objects.filter(tenant_id=pk).aggregate(first=Min("created_at"))["first"]
        for pk in Tenant.objects.values_list("pk", flat=True)
    ]
    return min((f for f in firsts if f is not None), default=None)


def _lock_mark(granularity: str) -> RollupMark:
    """The granularity's mark, locked: two runs rebuilding the same window take turns (PostgreSQL; SQLite locks the file)."""
    mark, _ = RollupMark.objects.select_for_update().get_or_create(
        granularity=granularity, defaults={"rolled_until": EPOCH}
    )
    return mark


def _hour_cells(start: datetime) -> Cells:
    cells: Cells = {}
    for rows in ledger_between(ALL_TENANTS, start, start + HOUR):
        cells_add(cells, rows.order_by().values_list(*LEDGER_FIELDS).iterator(chunk_size=5000), Granularity.HOUR)
    return cells


def _day_cells(start: datetime) -> Cells:
    rows = (
        CostRollup.objects.filter(granularity=Granularity.HOUR, bucket__gte=start, bucket__lt=start + DAY)
        .values("tenant_id", "dimension", "value", "route_tier", "source")
        .annotate(**{f"sum_{m}": Sum(m) for m in MEASURES})
        .order_by()
    )
    return {
        (r["tenant_id"], start, r["dimension"], r["value"], r["route_tier"], r["source"]): [
            int(r[f"sum_{m}"]) for m in MEASURES
        ]
        for r in rows
    }


@transaction.atomic
def rollup_window(*, granularity: str, start: datetime) -> int:
    """Rebuild the rollup rows of one window (an hour from the ledger, a day from its hours); return how many.

    Delete + insert in one transaction: idempotent, and a reader sees the old rows or the
    new ones, never a half-written window.
    """
    if granularity not in Granularity.values:
        raise ValueError(f"unknown granularity {granularity!r}")
    floor = floor_hour if granularity == Granularity.HOUR else floor_day
    if floor(start) != start:
        raise ValueError(f"{start} is not the start of a {granularity} window")
    _lock_mark(granularity)
    cells = _hour_cells(start) if granularity == Granularity.HOUR else _day_cells(start)
    CostRollup.objects.filter(granularity=granularity, bucket=start).delete()
    objs = [
        CostRollup(
            tenant_id=tenant_id,
            granularity=granularity,
            bucket=bucket,
            dimension=dimension,
            value=value,
            route_tier=tier,
            source=source,
            **dict(zip(MEASURES, sums, strict=True)),
        )
        for (tenant_id, bucket, dimension, value, tier, source), sums in cells.items()
    ]
    CostRollup.objects.bulk_create(objs, batch_size=INSERT_BATCH)
    return len(objs)


def _mark_set(granularity: str, until: datetime) -> None:
    with transaction.atomic():
        mark = _lock_mark(granularity)
        if until > mark.rolled_until:  # only ever forward: a slow run cannot hide a faster one's windows
            mark.rolled_until = until
            mark.save(update_fields=["rolled_until", "updated_at"])


def rollups_refresh(*, now: datetime | None = None, max_hours: int | None = None) -> dict[str, int]:
    """Roll up every closed window not yet rolled up, and rebuild the last few; return the counts of windows done.

    The first run starts at the ledger's first row. ``max_hours`` bounds one run's work
    (the mark moves as far as it got; the next run goes on from there). Each window is
    its own transaction, so the ledger's writers never wait for a whole run.
    """
    now = now or timezone.now()
    closed = rollup_closed_until(now)
    hour_mark = rollup_mark(Granularity.HOUR)
    if hour_mark is None or hour_mark <= EPOCH:  # never run (or stopped in its first window): from the first row
        first = _ledger_first_row()
        start = floor_hour(first) if first is not None else closed
        hour_mark = None
    else:
        start = min(hour_mark, closed) - timedelta(hours=settings.TANDEM_ROLLUP_RECOMPUTE_HOURS)
    hours = 0
    cursor = start
    while cursor + HOUR <= closed and (max_hours is None or hours < max_hours):
        rollup_window(granularity=Granularity.HOUR, start=cursor)
        cursor += HOUR
        hours += 1
        # after each window: an interrupted first run over a long ledger keeps what it did
        _mark_set(Granularity.HOUR, cursor)
    hour_reach = cursor if hours or hour_mark is None else hour_mark

    # Days: every day whose hours are all rolled up and that a rebuilt hour touched (or that is new).
    days = 0
    day_mark = rollup_mark(Granularity.DAY)
    day = floor_day(start)
    if day_mark is not None:
        day = min(day, day_mark)
    day_closed = floor_day(hour_reach)
    while day + DAY <= day_closed:
        rollup_window(granularity=Granularity.DAY, start=day)
        day += DAY
        days += 1
        _mark_set(Granularity.DAY, day)
    logger.info("rollups refreshed", extra={"hours": hours, "days": days, "until": cursor.isoformat()})
    return {"hours": hours, "days": days}
