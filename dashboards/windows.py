"""Time windows of the rollups and the aggregation of ledger rows into rollup cells: one definition of each.

``cells_add`` is the one place that turns ledger rows into sums: the rollup task uses it
for a closed window, the selectors for the open one, so the two can never disagree on
what a sum means. Everything is UTC (``TIME_ZONE = "UTC"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from dashboards.models import MEASURES, Dimension, Granularity

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
NANO = 9  # money: nano-units, the ledger's decimal_places
MILLI = 3  # drafted tokens and GPU ms: thousandths, the ledger's decimal_places

# The ledger fields ``cells_add`` reads, in the order of the tuples it expects.
LEDGER_FIELDS: tuple[str, ...] = (
    "tenant_id",
    "created_at",
    "route_tier",
    "source",
    "model",
    "verifier_version",
    "draft_version",
    "api_key_id",
    "user_id",
    "tags",
    "prompt_tokens",
    "completion_tokens",
    "drafted_tokens",
    "accepted_tokens",
    "gpu_ms",
    "cost_edge",
    "cost_verifier",
    "cost_cloud",
    "cost_total",
    "saving",
)

# A cell: (tenant_id, bucket, dimension, value, route_tier, source) -> the MEASURES as ints.
CellKey = tuple[int, datetime, str, str, str, str]
Cells = dict[CellKey, list[int]]


def floor_hour(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def floor_day(t: datetime) -> datetime:
    return floor_hour(t).replace(hour=0)


def floor_month(t: datetime) -> datetime:
    return floor_day(t).replace(day=1)


def next_month(t: datetime) -> datetime:
    start = floor_month(t)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def ceil_to(t: datetime, floor) -> datetime:
    """The first boundary at or after ``t`` (``floor`` is ``floor_hour`` or ``floor_day``)."""
    start = floor(t)
    if start == t:
        return t
    return start + (HOUR if floor is floor_hour else DAY)


def window_length(granularity: str) -> timedelta:
    return HOUR if granularity == Granularity.HOUR else DAY


def bucket_of(t: datetime, granularity: str) -> datetime:
    """The start of the report bucket (hour, day or month) ``t`` falls in."""
    if granularity == "hour":
        return floor_hour(t)
    if granularity == "day":
        return floor_day(t)
    return floor_month(t)


def units(amount: Decimal, exponent: int) -> int:
    """``amount`` in integer units of 10**-exponent; exact, since the ledger keeps no more decimals than that."""
    scaled = Decimal(amount).scaleb(exponent)
    whole = int(scaled)
    if whole != scaled:
        raise ValueError(f"{amount} has more than {exponent} decimals")
    return whole


def model_value(model: str, verifier_version: str, draft_version: str) -> str:
    """The ``model`` dimension's value: the model and the versions that served it."""
    return f"{model}|{verifier_version}|{draft_version}"


def split_values(row: tuple[Any, ...]) -> list[tuple[str, str]]:
    """Every (dimension, value) one ledger row (in ``LEDGER_FIELDS`` order) counts under."""
    tags = row[9] or {}
    return [
        (Dimension.TOTAL, ""),
        (Dimension.MODEL, model_value(row[4], row[5], row[6])),
        (Dimension.API_KEY, "" if row[7] is None else str(row[7])),
        (Dimension.USER, "" if row[8] is None else str(row[8])),
        *((Dimension.TAG, f"{k}={v}") for k, v in sorted(tags.items())),
    ]


def row_measures(row: tuple[Any, ...]) -> list[int]:
    """One ledger row's MEASURES, as integers."""
    return [
        1,
        row[10],
        row[11],
        units(row[12], MILLI),
        row[13],
        units(row[14], MILLI),
        units(row[15], NANO),
        units(row[16], NANO),
        units(row[17], NANO),
        units(row[18], NANO),
        units(row[19], NANO),
    ]


def cells_add(
    cells: Cells,
    rows: Iterable[tuple[Any, ...]],
    granularity: str,
    dimensions: frozenset[str] | None = None,
) -> Cells:
    """Add ledger ``rows`` (``LEDGER_FIELDS`` tuples) to ``cells``, bucketed by ``granularity``; return ``cells``.

    ``dimensions`` limits which splits are counted (None: all of them).
    """
    width = len(MEASURES)
    for row in rows:
        measures = row_measures(row)
        bucket = bucket_of(row[1], granularity)
        for dimension, value in split_values(row):
            if dimensions is not None and dimension not in dimensions:
                continue
            key = (row[0], bucket, dimension, value, row[2], row[3])
            cell = cells.get(key)
            if cell is None:
                cells[key] = list(measures)
            else:
                for i in range(width):
                    cell[i] += measures[i]
    return cells
