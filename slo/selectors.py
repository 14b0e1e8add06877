"""Reads of SLO data: a tenant's objectives, windows of counts (rollups plus the open window's raw samples), the
SLO dashboard's figures and series, the conditions the alert rules fire on, and the alerts themselves.

Where a window's counts come from: hourly rollups up to the hourly watermark, 5-minute
rollups from there up to theirs, raw samples after that (the open window, never rolled up
yet); and, where the window starts inside a bucket, raw samples and 5-minute rollups up
to the next boundaries. So a window counts exactly the samples created in it, and the
database adds rollups up (one SUM query a source): a 28-day window costs the same
whatever the traffic was, plus a few minutes of samples.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import F, QuerySet, Sum

from inference.models import SloSample
from slo.counts import CACHE_SOURCES, COLUMNS, SAMPLE_FIELDS, Counts, total
from slo.models import Alert, AlertWebhook, SloObjective, SloRollup, SloRollupWatermark
from slo.objectives import BURN_WINDOWS, FAST_BURN, SLOW_BURN, LatencyClass, Objective, default_objectives
from tenants.models import Budget

FIVE_MINUTES = 300
HOUR = 3600
TIERS = ("edge", "speculative", "cloud")
# Tier down: a tier's failure share over the last 5 minutes (with at least this many requests)
# and over the last 30 minutes, from the tenant's samples on it.
TIER_DOWN_MIN_REQUESTS = 3
TIER_DOWN_SHARE_5M = 0.5
TIER_DOWN_SHARE_30M = 0.25


def floor_time(moment: datetime, seconds: int) -> datetime:
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, tz=UTC)


# objectives ---------------------------------------------------------------------------------
def objectives_for(*, tenant_id: int) -> list[Objective]:
    """The tenant's objectives: its own where it set one, the platform default elsewhere."""
    return objectives_for_tenants(tenant_ids=[tenant_id])[tenant_id]


def objectives_for_tenants(*, tenant_ids: Iterable[int]) -> dict[int, list[Objective]]:
    ids = list(tenant_ids)
    own: dict[tuple[int, str, str], SloObjective] = {
        (o.tenant_id, o.latency_class, o.kind): o for o in SloObjective.objects.filter(tenant_id__in=ids)
    }
    out: dict[int, list[Objective]] = {}
    for tenant_id in ids:
        objectives = []
        for default in default_objectives():
            row = own.get((tenant_id, default.latency_class, default.kind))
            objectives.append(
                default
                if row is None
                else Objective(
                    latency_class=row.latency_class,
                    kind=row.kind,
                    threshold_ms=row.threshold_ms,
                    target=row.target,
                    window_days=row.window_days,
                    is_default=False,
                )
            )
        out[tenant_id] = objectives
    return out


# windows of counts --------------------------------------------------------------------------
Key = tuple[int, str, str] | tuple[int, str, str, datetime]  # (tenant, class, tier), and the hour for series


def watermarks() -> dict[int, datetime]:
    return dict(SloRollupWatermark.objects.values_list("resolution_s", "closed_until"))


def ceil_time(moment: datetime, seconds: int) -> datetime:
    floor = floor_time(moment, seconds)
    return floor if floor == moment else floor + timedelta(seconds=seconds)


Span = tuple[int | None, datetime, datetime]  # (rollup resolution, or None: raw samples; from; until)


def _spans(since: datetime, now: datetime, fine: bool) -> list[Span]:
    """The window's sources end to end, so that it counts exactly the samples created in [since, now].

    Raw samples up to the next 5-minute boundary, 5-minute rollups up to the next hour,
    hourly rollups up to their watermark (not when ``fine``), 5-minute rollups up to
    theirs, raw samples after it.
    """
    marks = watermarks()
    five = marks.get(FIVE_MINUTES)
    hour = marks.get(HOUR) if not fine else None
    spans: list[Span] = []
    at = since
    if five is not None and at < five:
        use_hour = hour is not None and hour > at  # hourly rollups cover part of the window
        head_end = hour if use_hour and hour is not None else five
        until = min(ceil_time(at, FIVE_MINUTES), head_end)  # raw samples up to the next 5-minute boundary
        if at < until:
            spans.append((None, at, until))
            at = until
        if use_hour and hour is not None:
            until = min(ceil_time(at, HOUR), hour)  # 5-minute rollups up to the next hour
            if at < until:
                spans.append((FIVE_MINUTES, at, until))
                at = until
            if at < hour:
                spans.append((HOUR, at, hour))
                at = hour
        if at < five:
            spans.append((FIVE_MINUTES, at, five))
            at = five
    spans.append((None, at, now))
    return spans


def counts_by(
    *,
    tenant_id: int | None,
    since: datetime,
    now: datetime,
    fine: bool,
    hourly: bool = False,
    by_tier: bool = True,
    latency_class: str | None = None,
    columns: tuple[str, ...] = COLUMNS,
) -> dict[Key, Counts]:
    """The counts of the tenant's (None: every tenant's) samples from ``since`` to ``now``, by (tenant, class, tier).

    ``fine``: 5-minute rollups and raw samples only (burn-rate windows, aligned to 5
    minutes); otherwise hourly rollups where they exist. ``hourly``: by hour too (charts).
    ``by_tier`` False: every tier together (the key's tier is ""). ``columns``: the rollup
    columns to add up (the others read 0 where rollups were read). Rollups are added up
    by the database (one SUM query a source).
    """
    parts: dict[Key, list[Counts]] = defaultdict(list)
    for resolution, start, until in _spans(since, now, fine):
        if resolution is None:
            found = _raw_counts(tenant_id, start, until, until == now, hourly, by_tier, latency_class)
        else:
            found = rollup_counts(tenant_id, resolution, start, until, hourly, by_tier, latency_class, columns)
        for key, counts in found:
            parts[key].append(counts)
    return {key: counts[0] if len(counts) == 1 else total(counts) for key, counts in parts.items()}


def _scoped(queryset: QuerySet, tenant_id: int | None, latency_class: str | None) -> QuerySet:
    if tenant_id is not None:
        queryset = queryset.filter(tenant_id=tenant_id)
    return queryset if latency_class is None else queryset.filter(latency_class=latency_class)


def rollup_counts(
    tenant_id: int | None,
    resolution_s: int,
    since: datetime,
    until: datetime,
    hourly: bool = False,
    by_tier: bool = True,
    latency_class: str | None = None,
    columns: tuple[str, ...] = COLUMNS,
) -> list[tuple[Key, Counts]]:
    """The sums of the rollups of one resolution starting in [since, until), by (tenant, class, tier[, hour])."""
    if since >= until:
        return []
    group = (
        "tenant_id",
        "latency_class",
        *(("route_tier",) if by_tier else ()),
        *(("bucket_start",) if hourly else ()),
    )
    queryset = _scoped(SloRollup.objects, tenant_id, latency_class).filter(
        resolution_s=resolution_s, bucket_start__gte=since, bucket_start__lt=until
    )
    sums = queryset.values(*group).annotate(**{f"sum_{c}": Sum(c) for c in columns}).order_by()
    out: list[tuple[Key, Counts]] = []
    for row in sums:
        key: Key = (row["tenant_id"], row["latency_class"], row["route_tier"] if by_tier else "")
        if hourly:
            key = (*key, floor_time(row["bucket_start"], HOUR))
        out.append((key, Counts.from_columns(row.get(f"sum_{c}") for c in COLUMNS)))
    return out


def _raw_counts(
    tenant_id: int | None,
    since: datetime,
    until: datetime,
    inclusive: bool,
    hourly: bool,
    by_tier: bool,
    latency_class: str | None,
) -> list[tuple[Key, Counts]]:
    """Samples folded: the open window (minutes, as long as the rollup task runs), or a window's head (< 5 min)."""
    folded: dict[Key, Counts] = defaultdict(Counts)
    end = {"created_at__lte": until} if inclusive else {"created_at__lt": until}
    queryset = _scoped(SloSample.objects, tenant_id, latency_class).filter(created_at__gte=since, **end)
    values = queryset.values_list("tenant_id", "latency_class", "route_tier", "created_at", *SAMPLE_FIELDS)
    for tenant, cls, tier, created_at, *sample in values.iterator(chunk_size=2000):
        tier = tier if by_tier else ""
        key: Key = (tenant, cls, tier, floor_time(created_at, HOUR)) if hourly else (tenant, cls, tier)
        folded[key].add_sample(*sample)
    return list(folded.items())


def pick(counts: dict[Key, Counts], *, tenant_id: int | None = None, **match: str) -> Counts:
    """The sum of the counts whose tenant, ``latency_class`` and ``route_tier`` match."""
    positions = {"latency_class": 1, "route_tier": 2}
    return total(
        c
        for key, c in counts.items()
        if (tenant_id is None or key[0] == tenant_id) and all(key[positions[k]] == v for k, v in match.items())
    )


def burn_windows(*, tenant_id: int | None, now: datetime, by_tier: bool = True) -> dict[timedelta, dict[Key, Counts]]:
    """The counts over each burn-rate window (5 min, 30 min, 1 h, 6 h)."""
    return {
        span: counts_by(tenant_id=tenant_id, since=now - span, now=now, fine=True, by_tier=by_tier)
        for span in BURN_WINDOWS
    }


def burn_rates(
    objective: Objective, windows: dict[timedelta, dict[Key, Counts]], tenant_id: int
) -> dict[timedelta, float]:
    return {
        span: objective.burn_rate(pick(by_key, tenant_id=tenant_id, latency_class=objective.latency_class))
        for span, by_key in windows.items()
    }


def burning(burn: dict[timedelta, float]) -> dict[str, bool]:
    """Whether the fast and the slow multiwindow rules hold."""
    return {
        kind: burn[long] >= factor and burn[short] >= factor
        for kind, (long, short, factor) in (("fast_burn", FAST_BURN), ("slow_burn", SLOW_BURN))
    }


# the dashboard ------------------------------------------------------------------------------
def dashboard(*, tenant_id: int, now: datetime, latency_class: str, chart_days: int) -> dict[str, Any]:
    """Everything the SLO page shows of one tenant: objectives with attainment, budget and burn; chart series."""
    objectives = objectives_for(tenant_id=tenant_id)
    windows = {
        days: counts_by(tenant_id=tenant_id, since=now - timedelta(days=days), now=now, fine=False, by_tier=False)
        for days in {o.window_days for o in objectives}
    }
    burns = burn_windows(tenant_id=tenant_id, now=now, by_tier=False)
    cards = []
    for objective in objectives:
        counts = pick(windows[objective.window_days], latency_class=objective.latency_class)
        good, counted = objective.good_total(counts)
        burn = burn_rates(objective, burns, tenant_id)
        cards.append(
            {
                "objective": objective,
                "good": good,
                "total": counted,
                "attainment": objective.attainment(counts),
                "budget_left": objective.budget_left(counts),
                "burn": [{"window": _span_label(span), "rate": rate} for span, rate in burn.items()],
                **burning(burn),
            }
        )
    return {
        "objectives": cards,
        "series": series(tenant_id=tenant_id, now=now, days=chart_days, latency_class=latency_class),
    }


def _span_label(span: timedelta) -> str:
    minutes = int(span.total_seconds() // 60)
    return f"{minutes // 60} h" if minutes >= 60 else f"{minutes} min"


def chart_hours(*, now: datetime, days: int) -> list[datetime]:
    """The hours the charts show: the last ``days`` days' whole hours, up to the one ``now`` is in."""
    start = floor_time(now - timedelta(days=days), HOUR) + timedelta(hours=1)
    return [start + timedelta(hours=i) for i in range(int((now - start).total_seconds() // HOUR) + 1)]


def series(*, tenant_id: int, now: datetime, days: int, latency_class: str) -> dict[str, Any]:
    """Hourly series of one class for the charts: latency percentiles, attainment, route mix, tier health, queue."""
    hours = chart_hours(now=now, days=days)
    start = hours[0]
    found = counts_by(
        tenant_id=tenant_id, since=start, now=now, fine=False, hourly=True, by_tier=False, latency_class=latency_class
    )
    by_hour = {key[-1]: counts for key, counts in found.items()}
    # per tier, only what tier health and the route mix read
    found = counts_by(
        tenant_id=tenant_id,
        since=start,
        now=now,
        fine=False,
        hourly=True,
        latency_class=latency_class,
        columns=("requests", "failures"),
    )
    by_tier = {(key[-1], key[2]): counts for key, counts in found.items()}
    mine = [o for o in objectives_for(tenant_id=tenant_id) if o.latency_class == latency_class]
    empty = Counts()

    def share(numerator: int, denominator: int) -> float | None:
        return round(numerator / denominator, 5) if denominator else None

    def finite(value: float | None) -> float | None:
        return None if value is None or value == float("inf") else value

    cells = [by_hour.get(h, empty) for h in hours]
    tiers = {tier: [by_tier.get((h, tier), empty) for h in hours] for tier in TIERS}
    return {
        "labels": [h.strftime("%m-%d %H:00") for h in hours],
        "latency": {
            f"{metric} p{int(q * 100)}": [finite(c.percentile(metric, q)) for c in cells]
            for metric, q in (("ttft", 0.5), ("ttft", 0.95), ("itl", 0.95), ("e2e", 0.95))
        },
        "attainment": {o.label: [_rounded(o.attainment(c)) for c in cells] for o in mine},
        "route_mix": {
            **{tier: [c.requests for c in tiers[tier]] for tier in TIERS},
            **{source: [getattr(c, source) for c in cells] for source in CACHE_SOURCES},
        },
        "tier_failure_rate": {tier: [share(c.failures, c.requests) for c in tiers[tier]] for tier in TIERS},
        "queue": {
            "requests waiting (mean)": [round(c.mean_waiting(HOUR * 1e3), 3) for c in cells],
            "waited share": [share(c.waited, c.n["queued"]) for c in cells],
            "queued p95 ms": [finite(c.percentile("queued", 0.95)) for c in cells],
        },
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


# alerts -------------------------------------------------------------------------------------
def alert_conditions(*, now: datetime) -> dict[int, dict[tuple[str, str], dict[str, Any]]]:
    """What should be firing now, per tenant: {(kind, key): details}."""
    wanted: dict[int, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
    for budget in Budget.objects.filter(soft_alerted_at__isnull=False).select_related("api_key"):
        if budget.is_stale_at(now):  # its period ended: the mark belongs to the last one
            continue
        key = f"budget:{budget.pk}:{budget.period_start.isoformat()}"
        wanted[budget.tenant_id][("soft_budget", key)] = {
            "scope": budget.scope_label,
            "period": budget.period,
            "spent": format(budget.spent, "f"),
            "soft_limit": format(budget.soft_limit, "f") if budget.soft_limit is not None else None,
            "since": budget.soft_alerted_at.isoformat() if budget.soft_alerted_at else None,
        }
    # every tenant's windows at once, then split by tenant (each tenant then reads only its own keys)
    per_tenant: dict[int, dict[timedelta, dict[Key, Counts]]] = defaultdict(lambda: defaultdict(dict))
    for span, by_key in burn_windows(tenant_id=None, now=now).items():
        for group, counts in by_key.items():
            per_tenant[group[0]][span][group] = counts
    objectives = objectives_for_tenants(tenant_ids=per_tenant)
    for tenant_id, burns in per_tenant.items():
        short, long = burns[timedelta(minutes=5)], burns[timedelta(minutes=30)]
        for objective in objectives[tenant_id]:
            burn = burn_rates(objective, burns, tenant_id)
            for kind, firing in burning(burn).items():
                if firing:
                    wanted[tenant_id][(kind, f"{objective.latency_class}:{objective.kind}")] = {
                        "objective": objective.label,
                        "latency_class": objective.latency_class,
                        "target": objective.target,
                        "burn_rates": {_span_label(span): round(rate, 3) for span, rate in burn.items()},
                    }
        for tier in TIERS:
            recent, longer = (
                pick(short, tenant_id=tenant_id, route_tier=tier),
                pick(long, tenant_id=tenant_id, route_tier=tier),
            )
            if (
                recent.requests >= TIER_DOWN_MIN_REQUESTS
                and recent.failures >= TIER_DOWN_SHARE_5M * recent.requests
                and longer.failures >= TIER_DOWN_SHARE_30M * longer.requests
            ):
                wanted[tenant_id][("tier_down", tier)] = {
                    "tier": tier,
                    "failures_5m": recent.failures,
                    "requests_5m": recent.requests,
                    "failures_30m": longer.failures,
                    "requests_30m": longer.requests,
                }
    return wanted


def alerts_for_tenant(*, tenant_id: int, limit: int = 50) -> list[Alert]:
    """The tenant's alerts, firing ones first, then the latest."""
    firing_first = F("resolved_at").desc(nulls_first=True)
    return list(Alert.objects.filter(tenant_id=tenant_id).order_by(firing_first, "-fired_at", "-pk")[:limit])


def firing_count(*, tenant_id: int) -> int:
    return Alert.objects.filter(tenant_id=tenant_id, resolved_at__isnull=True).count()


def webhook_url_for(*, tenant_id: int) -> str:
    """The tenant's own webhook, else the platform's; "" when neither is set."""
    from django.conf import settings

    own = AlertWebhook.objects.filter(tenant_id=tenant_id).values_list("url", flat=True).first()
    return own or settings.TANDEM_ALERT_WEBHOOK_URL


def latency_classes() -> list[str]:
    return list(LatencyClass.values)
