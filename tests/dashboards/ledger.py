"""Made-up ledger rows for the dashboards' tests, with the sums they should add up to, worked out independently."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

from tenants import services as tenant_services
from tenants.models import UsageRecord

MONEY_FIELDS = ("cost_edge", "cost_verifier", "cost_cloud", "cost_total", "saving")
COUNT_FIELDS = ("prompt_tokens", "completion_tokens", "accepted_tokens")
MILLI_FIELDS = ("drafted_tokens", "gpu_ms")
TAG_CHOICES = {"team": ("a", "b", "c"), "env": ("prod", "dev")}

_defaults: dict[str, Any] | None = None
_counter = 0


def _row_defaults() -> dict[str, Any]:
    global _defaults
    if _defaults is None:
        _defaults = {f.attname: f.get_default() for f in UsageRecord._meta.concrete_fields if not f.primary_key}
    return dict(_defaults)


def _nanos(rng: random.Random) -> Decimal:
    return Decimal(rng.randint(0, 5_000_000_000)).scaleb(-9)


def make_row(rng: random.Random, *, tenant, at: datetime, price_book, users, keys, **over) -> dict[str, Any]:
    global _counter
    _counter += 1
    tier = rng.choice(["edge", "speculative", "cloud"])
    edge, verifier, cloud = _nanos(rng), _nanos(rng), _nanos(rng)
    completion = rng.randint(1, 400)
    row = {
        **_row_defaults(),
        "request_id": f"t-{_counter}",
        "leg_of": f"t-{_counter}",
        "tenant_id": tenant.pk,
        "user_id": rng.choice(users).pk if rng.random() < 0.9 else None,
        "api_key_id": rng.choice(keys).pk if rng.random() < 0.7 else None,
        "tags": {k: rng.choice(v) for k, v in TAG_CHOICES.items() if rng.random() < 0.6},
        "route_tier": tier,
        "source": rng.choices(["generation", "exact_cache", "semantic_cache"], [8, 1, 1])[0],
        "saving": _nanos(rng),
        "model": rng.choice(["tandem-test", "tandem-test-broken"]),
        "verifier_version": rng.choice(["v1", "v2"]) if tier == "speculative" else "",
        "draft_version": "d1" if tier != "cloud" else "",
        "price_book_id": price_book.pk,
        "prompt_tokens": rng.randint(1, 2000),
        "completion_tokens": completion,
        "drafted_tokens": Decimal(rng.randint(0, 4_000_000)).scaleb(-3),
        "accepted_tokens": rng.randint(0, completion - 1) if completion > 1 else 0,
        "gpu_ms": Decimal(rng.randint(0, 9_000_000)).scaleb(-3),
        "cost_edge": edge,
        "cost_verifier": verifier,
        "cost_cloud": cloud,
        "cost_total": edge + verifier + cloud,
        "outcome": "completed",
        "created_at": at,
    }
    row.update(over)
    return row


def insert(rows: list[dict[str, Any]]) -> None:
    tenant_services.rows_insert(model=UsageRecord, rows=rows)


def dimension_values(row: dict[str, Any], dimension: str) -> list[str]:
    """What the dashboards should file ``row`` under, stated independently of dashboards.windows."""
    if dimension == "total":
        return [""]
    if dimension == "model":
        return [f"{row['model']}|{row['verifier_version']}|{row['draft_version']}"]
    if dimension == "api_key":
        return ["" if row["api_key_id"] is None else str(row["api_key_id"])]
    if dimension == "user":
        return ["" if row["user_id"] is None else str(row["user_id"])]
    return [f"{k}={v}" for k, v in row["tags"].items()]


def expected_sums(rows: list[dict[str, Any]], dimension: str, bucket=None) -> dict[tuple, dict[str, Any]]:
    """(bucket or None, value, tier, source) -> sums of the measures, as Decimals and ints."""
    out: dict[tuple, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, **{f: 0 for f in COUNT_FIELDS}, **{f: Decimal(0) for f in MILLI_FIELDS + MONEY_FIELDS}}
    )
    for row in rows:
        for value in dimension_values(row, dimension):
            cell = out[(bucket(row["created_at"]) if bucket else None, value, row["route_tier"], row["source"])]
            cell["requests"] += 1
            for f in COUNT_FIELDS + MILLI_FIELDS + MONEY_FIELDS:
                cell[f] += row[f]
    return dict(out)
