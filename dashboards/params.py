"""The cost report's parameters, parsed once for the console page, its CSV and the API: a range, a granularity, a split.

``report_params`` turns query parameters into a ``ReportParams`` or raises
``InvalidParams`` naming the parameter and saying what is wrong, which the adapters
show (the page) or answer with 400 (the API). Times are UTC; a date means its midnight,
and an ``end`` date is inclusive (``end=2026-11-30`` reads through the 30th). A preset range
(``24h``, ``7d``, ``30d``) starts on the hour.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from django.utils.dateparse import parse_date, parse_datetime

from dashboards.selectors import MAX_BUCKETS, MAX_RANGE, REPORT_GRANULARITIES, SPLITS, buckets_between
from dashboards.windows import floor_hour

# The range picker's presets: how far back from now, and the granularity that suits it.
PRESETS: dict[str, tuple[timedelta, str]] = {
    "24h": (timedelta(hours=24), "hour"),
    "7d": (timedelta(days=7), "day"),
    "30d": (timedelta(days=30), "day"),
}
DEFAULT_PRESET = "7d"


class InvalidParams(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True)
class ReportParams:
    start: datetime
    end: datetime
    granularity: str
    split: str  # none, model, api_key, user or tag
    tag_key: str  # with split=tag: only this tag's pairs ("" = every tag)
    preset: str  # 24h, 7d, 30d or custom


def _when(raw: str, param: str, *, end: bool) -> datetime:
    value = raw.strip()
    parsed = None
    try:
        # a date first: parse_datetime also reads "2026-11-02" (as its midnight), which would make an end date exclusive
        if (day := parse_date(value)) is not None:
            parsed = datetime.combine(day + timedelta(days=1) if end else day, datetime.min.time())
        else:
            parsed = parse_datetime(value)
    except ValueError:
        parsed = None
    if parsed is None:
        raise InvalidParams(param, f"{raw!r} is not a date (YYYY-MM-DD) or an ISO 8601 date-time")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def report_params(query: Mapping[str, str], now: datetime) -> ReportParams:
    """Parse ``start``, ``end``, ``range``, ``granularity`` and ``split`` (all optional: the last 7 days by day)."""
    preset = (query.get("range") or "").strip()
    start_raw, end_raw = (query.get("start") or "").strip(), (query.get("end") or "").strip()
    if start_raw or end_raw:
        if preset and preset != "custom":
            raise InvalidParams("range", "give either a range preset or start/end, not both")
        if not start_raw:
            raise InvalidParams("start", "required with end")
        start = _when(start_raw, "start", end=False)
        end = _when(end_raw, "end", end=True) if end_raw else now
        preset, default_granularity = "custom", "day"
    else:
        preset = preset or DEFAULT_PRESET
        if preset not in PRESETS:
            raise InvalidParams("range", f"must be one of {', '.join(PRESETS)} or custom (with start and end)")
        span, default_granularity = PRESETS[preset]
        # A preset starts on the hour (the last 24 h: from the hour 24 h ago), so it reads rollups from its first
        # hour on, and the ledger's raw rows only for the open hour.
        start, end = floor_hour(now - span), now
    if start >= end:
        raise InvalidParams("end", "must be after start")
    if end - start > MAX_RANGE:
        raise InvalidParams("start", f"a range spans at most {MAX_RANGE.days} days")
    granularity = (query.get("granularity") or default_granularity).strip()
    if granularity not in REPORT_GRANULARITIES:
        raise InvalidParams("granularity", f"must be one of {', '.join(REPORT_GRANULARITIES)}")
    if len(buckets_between(start, end, granularity)) > MAX_BUCKETS:
        raise InvalidParams("granularity", f"{granularity} gives more than {MAX_BUCKETS} points over this range")
    split, _, tag_key = (query.get("split") or "none").strip().partition(":")
    if split not in SPLITS:
        raise InvalidParams("split", f"must be one of {', '.join(SPLITS)}, or tag:<key>")
    if tag_key and split != "tag":
        raise InvalidParams("split", "only the tag split takes a key (tag:<key>)")
    return ReportParams(start, end, granularity, split, tag_key, preset)


def date_of(t: datetime) -> date:
    return t.astimezone(UTC).date()
