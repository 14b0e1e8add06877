"""Reads of the dashboards app: the cost report (rollups of closed windows + raw rows of the open ones), budgets'
burn-down, and what the same traffic would have cost elsewhere.

Every read is scoped: ``tenant`` is one tenant's id, or ``ALL_TENANTS`` (operators only:
the adapters decide who may pass it; there is no default, so a forgotten scope is an
error, never every tenant's numbers).

How a range is read (``read_plan``): whole days before the day mark from the day
rollups (not for an hourly report), whole hours before the hour mark from the hour
rollups, and whatever is left (the open hours, a range's ragged ends) from the ledger's
raw rows, through the same aggregation the rollups were built with
(``dashboards.windows.cells_add``). Sums are integers in fixed units, exact; money turns
back into ``Decimal`` only at the edge (``money``).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any, Final, Literal

from django.contrib.auth import get_user_model
from django.db.models import F, QuerySet, Sum
from django.db.models.functions import Trunc
from django.utils import timezone

from dashboards.models import MEASURES, CostRollup, Dimension, Granularity, RollupMark
from dashboards.windows import (
    DAY,
    HOUR,
    LEDGER_FIELDS,
    MILLI,
    NANO,
    Cells,
    bucket_of,
    ceil_to,
    cells_add,
    floor_day,
    floor_hour,
    next_month,
)
from tenants import selectors as tenant_selectors
from tenants import services as tenant_services
from tenants.models import ApiKey, Budget, Price, Tenant, UsageRecord, UsageSource
from tenants.tiers import TIER_VALUES, Tier

ALL_TENANTS: Final = "all"
TenantScope = int | Literal["all"]

REPORT_GRANULARITIES = ("hour", "day", "month")
SPLITS = ("none", "model", "api_key", "user", "tag")
MAX_BUCKETS = 800  # an hourly report spans a month at most: a chart with more bars says nothing
MAX_RANGE = timedelta(days=400)
CHART_SERIES = 8  # split values charted one by one; the rest are summed as "other"
MONEY_QUANTUM = Decimal("0.000000001")

# The dashboard's stacks: each tier's generated answers, and cache hits apart (whatever tier they replay).
STACKS: tuple[str, ...] = (*TIER_VALUES, str(UsageSource.EXACT_CACHE), str(UsageSource.SEMANTIC_CACHE))
STACK_LABELS = {
    "edge": "edge",
    "speculative": "speculative",
    "cloud": "cloud",
    "exact_cache": "cache hit (exact)",
    "semantic_cache": "cache hit (semantic)",
}

# (bucket, value, route_tier, source) -> MEASURES as ints, summed over the scope's tenants.
ReportKey = tuple[datetime, str, str, str]
ReportCells = dict[ReportKey, list[int]]

_I = {m: i for i, m in enumerate(MEASURES)}


def money(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-NANO)


def milli(value: int) -> Decimal:
    return Decimal(value).scaleb(-MILLI)


def stack_of(route_tier: str, source: str) -> str:
    return route_tier if source == UsageSource.GENERATION else source


def rollup_mark(granularity: str) -> datetime | None:
    """How far the rollups of ``granularity`` reach (None: never run)."""
    return RollupMark.objects.filter(granularity=granularity).values_list("rolled_until", flat=True).first()


# --- reading a range ------------------------------------------------------------------------------


def read_plan(
    start: datetime, end: datetime, granularity: str, hour_mark: datetime | None, day_mark: datetime | None
) -> list[tuple[str, datetime, datetime]]:
    """Which source answers each part of ``[start, end)``: ``("day"|"hour"|"raw", from, to)``, in order, no overlap."""
    plan: list[tuple[str, datetime, datetime]] = []
    rest = [(start, end)]
    if granularity != "hour" and day_mark is not None:
        d0, d1 = ceil_to(start, floor_day), min(floor_day(end), day_mark)
        if d0 < d1:
            plan.append(("day", d0, d1))
            rest = [(start, d0), (d1, end)]
    for a, b in rest:
        if a >= b:
            continue
        h0 = ceil_to(a, floor_hour)
        h1 = min(floor_hour(b), hour_mark) if hour_mark is not None else h0
        if h0 < h1:
            plan += [("raw", a, h0), ("hour", h0, h1), ("raw", h1, b)]
        else:
            plan.append(("raw", a, b))
    return [p for p in plan if p[1] < p[2]]


def _scoped(qs, tenant: TenantScope, field: str = "tenant_id"):
    if tenant == ALL_TENANTS:
        return qs
    if not isinstance(tenant, int) or isinstance(tenant, bool):
        raise TypeError(f"a tenant id or ALL_TENANTS, not {tenant!r}")  # fail closed
    return qs.filter(**{field: tenant})


TENANTS_PER_QUERY = 500


def ledger_between(tenant: TenantScope, start: datetime, end: datetime) -> Iterator[QuerySet[UsageRecord]]:
    """The ledger rows of ``tenant`` (or every tenant's) stamped in ``[start, end)``, as querysets to read in turn.

    Always by tenant: the ledger's only time index is ``(tenant, created_at)``
    (``usage_tenant_created``), so a time range alone scans the whole table; naming the
    tenants (in batches, under the databases' limits on parameters) makes it seeks.
    """
    window = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
    if tenant != ALL_TENANTS:
        yield _scoped(window, tenant)
        return
    ids = list(Tenant.objects.order_by("pk").values_list("pk", flat=True))
    for i in range(0, len(ids), TENANTS_PER_QUERY):
        yield window.filter(tenant_id__in=ids[i : i + TENANTS_PER_QUERY])


def cost_cells(*, tenant: TenantScope, start: datetime, end: datetime, granularity: str, dimension: str) -> ReportCells:
    """The ledger's sums over ``[start, end)`` by report bucket, ``dimension`` value, tier and source."""
    return cost_cells_many(tenant=tenant, start=start, end=end, granularity=granularity, dimensions=(dimension,))[
        dimension
    ]


def cost_cells_many(
    *, tenant: TenantScope, start: datetime, end: datetime, granularity: str, dimensions: tuple[str, ...]
) -> dict[str, ReportCells]:
    """``cost_cells`` for several dimensions at once: one query per part of the plan, the raw rows read once."""
    width = len(MEASURES)
    cells: dict[str, dict[ReportKey, list[int]]] = {d: {} for d in dimensions}
    plan = read_plan(start, end, granularity, rollup_mark(Granularity.HOUR), rollup_mark(Granularity.DAY))
    for source, a, b in plan:
        if source == "raw":
            raw: Cells = {}
            for rows in ledger_between(tenant, a, b):
                cells_add(
                    raw, rows.order_by().values_list(*LEDGER_FIELDS).iterator(), granularity, frozenset(dimensions)
                )
            parts: Iterable[tuple[str, ReportKey, Any]] = (
                (dim, (bucket, value, tier, src), sums) for (_, bucket, dim, value, tier, src), sums in raw.items()
            )
        else:
            rollups = _scoped(
                CostRollup.objects.filter(granularity=source, dimension__in=dimensions, bucket__gte=a, bucket__lt=b),
                tenant,
            )
            # Summed to the report's bucket in SQL: a day report over hour rollups reads a row per day, not 24.
            bucket = F("bucket") if source == granularity else Trunc("bucket", granularity, tzinfo=UTC)
            parts = (
                (r[0], (bucket_of(r[1], granularity), r[2], r[3], r[4]), r[5:])
                for r in rollups.annotate(report_bucket=bucket)
                .values_list("dimension", "report_bucket", "value", "route_tier", "source")
                .annotate(*[Sum(m) for m in MEASURES])
                .order_by()
            )
        for dim, key, sums in parts:
            into = cells[dim].get(key)
            if into is None:
                cells[dim][key] = list(sums)
            else:
                for i in range(width):
                    into[i] += sums[i]
    return cells


def _add(into: list[int], sums: Iterable[int]) -> None:
    for i, v in enumerate(sums):
        into[i] += v


def buckets_between(start: datetime, end: datetime, granularity: str) -> list[datetime]:
    """Every report bucket that ``[start, end)`` touches, in order."""
    out = []
    cursor = bucket_of(start, granularity)
    while cursor < end:
        out.append(cursor)
        cursor = next_month(cursor) if granularity == "month" else cursor + (HOUR if granularity == "hour" else DAY)
    return out


# --- the report -----------------------------------------------------------------------------------


def measures_out(sums: list[int]) -> dict[str, Any]:
    """Integer sums as the figures people read: counts as ints, amounts as exact Decimals."""
    return {
        "requests": sums[_I["requests"]],
        "prompt_tokens": sums[_I["prompt_tokens"]],
        "completion_tokens": sums[_I["completion_tokens"]],
        "drafted_tokens": milli(sums[_I["drafted_milli"]]),
        "accepted_tokens": sums[_I["accepted_tokens"]],
        "gpu_ms": milli(sums[_I["gpu_milli"]]),
        "cost_edge": money(sums[_I["cost_edge_nanos"]]),
        "cost_verifier": money(sums[_I["cost_verifier_nanos"]]),
        "cost_cloud": money(sums[_I["cost_cloud_nanos"]]),
        "cost_total": money(sums[_I["cost_total_nanos"]]),
        "saving": money(sums[_I["saving_nanos"]]),
    }


@dataclass
class CostReport:
    tenant: TenantScope
    start: datetime
    end: datetime
    granularity: str
    split: str
    tag_key: str
    buckets: list[datetime]
    totals: dict[str, Any]
    by_stack: list[dict[str, Any]]
    by_split: list[dict[str, Any]]
    chart: dict[str, Any]
    acceptance: dict[str, Any]
    savings: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    split_cells: ReportCells = field(default_factory=dict, repr=False)

    @functools.cached_property
    def rows(self) -> list[dict[str, Any]]:
        """One per (bucket, split value, tier, source): what the CSV and the API list (the page does not)."""
        if self.split == "none":
            return _rows_without_split(self.split_cells)
        return [
            {
                "bucket": bucket,
                "value": value,
                "label": self.labels.get(value, ""),
                "route_tier": tier,
                "source": source,
                **measures_out(sums),
            }
            for (bucket, value, tier, source), sums in sorted(self.split_cells.items())
        ]


def cost_report(
    *,
    tenant: TenantScope,
    start: datetime,
    end: datetime,
    granularity: str,
    split: str = "none",
    tag_key: str = "",
) -> CostReport:
    """Everything the cost dashboard shows for ``tenant`` over ``[start, end)``: one read per dimension it needs."""
    if granularity not in REPORT_GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(REPORT_GRANULARITIES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}")
    # The model split partitions the ledger (every row has one model), so its cells give the totals,
    # the tiers, the acceptance and the savings as well; a second read only for another split.
    dimensions = (Dimension.MODEL,) if split in ("none", "model") else (Dimension.MODEL, split)
    read = cost_cells_many(tenant=tenant, start=start, end=end, granularity=granularity, dimensions=dimensions)
    model_cells = read[Dimension.MODEL]
    if split in ("none", "model"):
        split_cells = model_cells
    else:
        split_cells = read[split]
        if split == "tag" and tag_key:
            split_cells = {k: v for k, v in split_cells.items() if k[1].split("=", 1)[0] == tag_key}
    buckets = buckets_between(start, end, granularity)
    labels = split_labels(split, {k[1] for k in split_cells}, tenant) if split != "none" else {}

    total = [0] * len(MEASURES)
    stacks: dict[str, list[int]] = {s: [0] * len(MEASURES) for s in STACKS}
    stack_series: dict[str, dict[datetime, int]] = {s: defaultdict(int) for s in STACKS}
    for (bucket, _value, tier, source), sums in model_cells.items():
        _add(total, sums)
        stack = stack_of(tier, source)
        _add(stacks[stack], sums)
        stack_series[stack][bucket] += sums[_I["cost_total_nanos"]]

    by_value: dict[str, dict[str, Any]] = {}
    value_series: dict[str, dict[datetime, int]] = defaultdict(lambda: defaultdict(int))
    for (bucket, value, tier, source), sums in split_cells.items() if split != "none" else ():
        entry = by_value.setdefault(value, {"sums": [0] * len(MEASURES), "stacks": defaultdict(int)})
        _add(entry["sums"], sums)
        entry["stacks"][stack_of(tier, source)] += sums[_I["cost_total_nanos"]]
        value_series[value][bucket] += sums[_I["cost_total_nanos"]]

    by_split = sorted(
        (
            {
                "value": value,
                "label": labels.get(value, value),
                **measures_out(entry["sums"]),
                "stacks": {s: money(entry["stacks"].get(s, 0)) for s in STACKS},
            }
            for value, entry in by_value.items()
        ),
        key=lambda e: (-e["cost_total"], e["label"]),
    )
    chart = _chart(buckets, granularity, split, stack_series, by_split, value_series, stacks)
    return CostReport(
        tenant=tenant,
        start=start,
        end=end,
        granularity=granularity,
        split=split,
        tag_key=tag_key,
        buckets=buckets,
        totals=measures_out(total),
        by_stack=[{"stack": s, "label": STACK_LABELS[s], **measures_out(stacks[s])} for s in STACKS],
        by_split=by_split,
        chart=chart,
        acceptance=acceptance_of(model_cells),
        savings=savings_of(model_cells),
        labels=labels,
        split_cells=split_cells,
    )


def _rows_without_split(cells: ReportCells) -> list[dict[str, Any]]:
    merged: dict[tuple[datetime, str, str], list[int]] = defaultdict(lambda: [0] * len(MEASURES))
    for (bucket, _value, tier, source), sums in cells.items():
        _add(merged[(bucket, tier, source)], sums)
    return [
        {"bucket": b, "value": "", "label": "", "route_tier": t, "source": s, **measures_out(sums)}
        for (b, t, s), sums in sorted(merged.items())
    ]


def _label_of(bucket: datetime, granularity: str) -> str:
    if granularity == "hour":
        return bucket.strftime("%Y-%m-%d %H:00")
    return bucket.strftime("%Y-%m-%d" if granularity == "day" else "%Y-%m")


def _chart(buckets, granularity, split, stack_series, by_split, value_series, stacks) -> dict[str, Any]:
    """The charts' data (JSON-ready: amounts as strings of exact decimals; Chart.js parses them)."""
    labels = [_label_of(b, granularity) for b in buckets]
    if split == "none":
        series = [
            {"key": s, "label": STACK_LABELS[s], "data": [str(money(stack_series[s].get(b, 0))) for b in buckets]}
            for s in STACKS
            if stacks[s][_I["requests"]]
        ]
    else:
        shown = by_split[:CHART_SERIES]
        series = [
            {
                "key": e["value"],
                "label": e["label"],
                "data": [str(money(value_series[e["value"]].get(b, 0))) for b in buckets],
            }
            for e in shown
        ]
        rest = [e["value"] for e in by_split[CHART_SERIES:]]
        if rest and split != "tag":  # tag values overlap (a row has several tags): an "other" sum would mislead
            series.append(
                {
                    "key": "__other__",
                    "label": f"other ({len(rest)})",
                    "data": [str(money(sum(value_series[v].get(b, 0) for v in rest))) for b in buckets],
                }
            )
    tokens = {
        "labels": [STACK_LABELS[s] for s in STACKS],
        "prompt": [stacks[s][_I["prompt_tokens"]] for s in STACKS],
        "completion": [stacks[s][_I["completion_tokens"]] for s in STACKS],
    }
    return {"labels": labels, "series": series, "tokens": tokens}


def split_labels(split: str, values: set[str], tenant: TenantScope) -> dict[str, str]:
    """What people call each split value: a key's prefix and name, a user's name, a model and its versions."""
    if split == "model":
        out = {}
        for v in values:
            model, verifier, draft = (v.split("|") + ["", ""])[:3]
            versions = ", ".join(
                p for p in (f"verifier {verifier}" if verifier else "", f"draft {draft}" if draft else "") if p
            )
            out[v] = f"{model} ({versions})" if versions else model
        return out
    ids = [int(v) for v in values if v.isdigit()]
    if split == "api_key":
        keys = _scoped(ApiKey.objects.filter(pk__in=ids), tenant).values_list("pk", "prefix", "name")
        out = {str(pk): f"{prefix} ({name})" for pk, prefix, name in keys}
        return {v: out.get(v, "console (no key)" if v == "" else f"key #{v}") for v in values}
    if split == "user":
        users = get_user_model().objects.filter(pk__in=ids).values_list("pk", "username")
        out = {str(pk): name for pk, name in users}
        return {v: out.get(v, "no user" if v == "" else f"user #{v}") for v in values}
    return {v: v for v in values}


# --- acceptance and savings -----------------------------------------------------------------------


def acceptance_by_hour(*, tenant: TenantScope, start: datetime, end: datetime) -> dict[datetime, float | None]:
    """Each hour's speculative acceptance rate in ``[start, end)``: accepted / drafted tokens (None: nothing drafted)."""
    drafted: dict[datetime, int] = defaultdict(int)
    accepted: dict[datetime, int] = defaultdict(int)
    cells = cost_cells(tenant=tenant, start=start, end=end, granularity="hour", dimension=Dimension.TOTAL)
    for (bucket, _all, _tier, _source), sums in cells.items():
        drafted[bucket] += sums[_I["drafted_milli"]]
        accepted[bucket] += sums[_I["accepted_tokens"]]
    return {
        bucket: round(accepted[bucket] * 10**MILLI / drafted[bucket], 4) if drafted[bucket] else None
        for bucket in buckets_between(start, end, "hour")
    }


def acceptance_of(model_cells: ReportCells) -> dict[str, Any]:
    """The speculative tier's acceptance and the verifier time its drafts saved.

    Over generated (not replayed) speculative rows:
    - acceptance rate = accepted tokens / drafted tokens;
    - verifier passes = completion tokens - accepted tokens (each pass emits its accepted
      drafts plus one token of its own);
    - ms per pass = GPU ms / passes;
    - verifier time saved = accepted tokens x ms per pass: the verifier alone decodes one
      token per pass, so each accepted draft is a pass it did not run. It assumes a pass
      over k + 1 positions costs what a one-token pass does (decoding is memory-bound).
    """
    drafted = accepted = completion = gpu = 0
    for (_b, _v, tier, source), sums in model_cells.items():
        if tier == Tier.SPECULATIVE and source == UsageSource.GENERATION:
            drafted += sums[_I["drafted_milli"]]
            accepted += sums[_I["accepted_tokens"]]
            completion += sums[_I["completion_tokens"]]
            gpu += sums[_I["gpu_milli"]]
    return acceptance_figures(
        drafted_tokens=milli(drafted), accepted_tokens=accepted, completion_tokens=completion, gpu_ms=milli(gpu)
    )


def acceptance_figures(
    *, drafted_tokens: Decimal, accepted_tokens: int, completion_tokens: int, gpu_ms: Decimal
) -> dict[str, Any]:
    """``acceptance_of``'s formulas on plain sums (None where a figure is undefined: nothing drafted, no pass)."""
    passes = completion_tokens - accepted_tokens
    ms_per_pass = (gpu_ms / passes).quantize(Decimal("0.001"), ROUND_HALF_UP) if passes > 0 else None
    return {
        "drafted_tokens": drafted_tokens,
        "accepted_tokens": accepted_tokens,
        "rate": (Decimal(accepted_tokens) / drafted_tokens).quantize(Decimal("0.0001"), ROUND_HALF_UP)
        if drafted_tokens
        else None,
        "verifier_passes": max(passes, 0),
        "gpu_ms": gpu_ms,
        "ms_per_pass": ms_per_pass,
        "verifier_ms_saved": (ms_per_pass * accepted_tokens).quantize(Decimal("0.001")) if ms_per_pass else Decimal(0),
    }


@dataclass(frozen=True)
class ModelTraffic:
    """One model's traffic over a range: all of it, and its generated speculative part (for the verifier's pace)."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_total: Decimal
    spec_completion_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_gpu_ms: Decimal = Decimal(0)


def savings_of(model_cells: ReportCells) -> dict[str, Any]:
    traffic: dict[str, list[Any]] = {}
    for (_b, value, tier, source), sums in model_cells.items():
        t = traffic.setdefault(value.split("|", 1)[0], [0, 0, 0, 0, 0, 0])
        t[0] += sums[_I["prompt_tokens"]]
        t[1] += sums[_I["completion_tokens"]]
        t[2] += sums[_I["cost_total_nanos"]]
        if tier == Tier.SPECULATIVE and source == UsageSource.GENERATION:
            t[3] += sums[_I["completion_tokens"]]
            t[4] += sums[_I["accepted_tokens"]]
            t[5] += sums[_I["gpu_milli"]]
    models = [ModelTraffic(m, t[0], t[1], money(t[2]), t[3], t[4], milli(t[5])) for m, t in sorted(traffic.items())]
    prices = {
        (p.model, p.tier): p
        for p in Price.objects.filter(book__is_active=True, model__in=[m.model for m in models]).select_related("book")
    }
    return savings_estimate(traffic=models, prices=prices)


def savings_estimate(*, traffic: list[ModelTraffic], prices: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """What the same traffic would have cost all on the cloud, and all on the verifier alone, against what it cost.

    Method, per model, at the active price book's rates (``tenants.services.cost_compute``,
    the ledger's own cost function), with every request's prompt and completion tokens
    (cache hits counted as generated: without the platform there is no cache):
    - all on the cloud: the model's cloud price for those tokens, nothing else;
    - all on the verifier alone: its speculative price for those tokens with no drafts,
      and GPU time = completion tokens x the verifier's measured ms per pass over the
      range (``acceptance_of``): one pass per token without drafts; capped per token as a
      charge is (``generation_cost``). Without a measurement the price's cap per token is
      used, and the model is marked ``gpu_from_cap``.
    A model without the needed price is left out of that total and listed in ``unpriced``.
    """
    zero = Decimal(0)
    rows = []
    totals = {"actual": zero, "all_cloud": zero, "all_verifier": zero}
    unpriced: dict[str, list[str]] = {"cloud": [], "verifier": []}
    for t in traffic:
        row: dict[str, Any] = {"model": t.model, "actual": t.cost_total, "all_cloud": None, "all_verifier": None}
        totals["actual"] += t.cost_total
        cloud = prices.get((t.model, Tier.CLOUD))
        if cloud is not None:
            row["all_cloud"] = tenant_services.cost_compute(
                price=cloud,
                prompt_tokens=t.prompt_tokens,
                completion_tokens=t.completion_tokens,
                drafted_tokens=zero,
                gpu_ms=zero,
            ).total
            totals["all_cloud"] += row["all_cloud"]
        else:
            unpriced["cloud"].append(t.model)
        spec = prices.get((t.model, Tier.SPECULATIVE))
        if spec is not None:
            passes = t.spec_completion_tokens - t.spec_accepted_tokens
            row["gpu_from_cap"] = passes <= 0
            with localcontext() as ctx:
                ctx.prec = 60
                per_token = t.spec_gpu_ms / passes if passes > 0 else spec.max_gpu_ms_per_token
                gpu = min(
                    per_token * t.completion_tokens, spec.max_gpu_ms_per_token * (t.prompt_tokens + t.completion_tokens)
                )
            row["verifier_gpu_ms"] = gpu.quantize(Decimal("0.001"), ROUND_HALF_UP)
            row["all_verifier"] = tenant_services.cost_compute(
                price=spec,
                prompt_tokens=t.prompt_tokens,
                completion_tokens=t.completion_tokens,
                drafted_tokens=zero,
                gpu_ms=row["verifier_gpu_ms"],
            ).total
            totals["all_verifier"] += row["all_verifier"]
        else:
            unpriced["verifier"].append(t.model)
        rows.append(row)
    return {
        "models": rows,
        **totals,
        "saved_vs_cloud": totals["all_cloud"] - totals["actual"] if not unpriced["cloud"] else None,
        "saved_vs_verifier": totals["all_verifier"] - totals["actual"] if not unpriced["verifier"] else None,
        "unpriced": unpriced,
    }


# --- budgets --------------------------------------------------------------------------------------


def period_bounds(period: str, period_start: date) -> tuple[datetime, datetime]:
    start = datetime.combine(period_start, time(0), tzinfo=UTC)
    return start, (start + DAY if period == Budget.Period.DAY else next_month(start))


def budget_projection(
    *,
    spent: Decimal,
    reserved: Decimal,
    hard_limit: Decimal | None,
    period_start: datetime,
    period_end: datetime,
    now: datetime,
) -> dict[str, Any]:
    """A budget's burn-down at ``now``: its rate so far, where it ends the period, when it meets its hard limit.

    - rate = spent / time elapsed in the period (per day in the output);
    - projected = spent + rate x time left in the period;
    - the hard limit is met when spent + reserved + rate x t reaches it (``reserved`` is
      counted as the admission check counts it: held money is not spendable). Already
      met: ``now``; not met before the period ends (or no rate, or no limit): None.
    """
    elapsed = max((now - period_start).total_seconds(), 0.0)
    left = max((period_end - now).total_seconds(), 0.0)
    with localcontext() as ctx:
        ctx.prec = 40
        rate = spent / Decimal(repr(elapsed)) if elapsed > 0 else Decimal(0)  # per second
        projected = (spent + rate * Decimal(repr(left))).quantize(MONEY_QUANTUM, ROUND_HALF_UP)
        limit_at = None
        if hard_limit is not None:
            headroom = hard_limit - spent - reserved
            if headroom <= 0:
                limit_at = now
            elif rate > 0:
                reach = now + timedelta(seconds=float(headroom / rate))
                limit_at = reach if reach < period_end else None
        per_day = (rate * 86400).quantize(MONEY_QUANTUM, ROUND_HALF_UP)
    return {"rate_per_day": per_day, "projected": projected, "limit_reached_at": limit_at}


def budget_burn_down(*, tenant: TenantScope, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every budget in scope with its burn-down (``budget_projection``) and, for one tenant, its daily spend so far."""
    now = now or timezone.now()
    tenants = list(_scoped(Tenant.objects.all(), tenant, "pk").order_by("name")[:50])
    out = []
    for t in tenants:
        for b in tenant_selectors.budget_status(tenant=t):
            start, end = period_bounds(b["period"], b["period_start"])
            entry = {
                **b,
                "tenant": t.name,
                "tenant_id": t.pk,
                "period_end": end,
                **budget_projection(
                    spent=b["spent"],
                    reserved=b["reserved"],
                    hard_limit=b["hard_limit"],
                    period_start=start,
                    period_end=end,
                    now=now,
                ),
            }
            if tenant != ALL_TENANTS:
                entry["daily"] = _budget_daily(t.pk, b["api_key_id"], start, min(now, end))
            out.append(entry)
    return out


def _budget_daily(tenant_id: int, api_key_id: int | None, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """The cumulative ledger spend of a budget's scope by day of its period (the burn-down chart's line)."""
    granularity = "hour" if end - start <= DAY else "day"
    dimension = Dimension.API_KEY if api_key_id else Dimension.TOTAL
    cells = cost_cells(tenant=tenant_id, start=start, end=end, granularity=granularity, dimension=dimension)
    by_bucket: dict[datetime, int] = defaultdict(int)
    for (bucket, value, _t, _s), sums in cells.items():
        if api_key_id is None or value == str(api_key_id):
            by_bucket[bucket] += sums[_I["cost_total_nanos"]]
    running = 0
    series = []
    for bucket in buckets_between(start, end, granularity):
        running += by_bucket.get(bucket, 0)
        series.append({"bucket": _label_of(bucket, granularity), "spent": money(running)})
    return series
