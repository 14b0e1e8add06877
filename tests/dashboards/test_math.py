"""The dashboard's derived figures: budgets' burn-down projection, savings against the alternatives, acceptance."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from dashboards.params import InvalidParams, report_params
from dashboards.selectors import (
    ModelTraffic,
    acceptance_figures,
    budget_projection,
    period_bounds,
    read_plan,
    savings_estimate,
)
from tenants.models import Price

START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)  # a 30-day period


def test_burn_down_projects_the_period_at_the_rate_so_far():
    now = START + timedelta(days=10)
    p = budget_projection(
        spent=Decimal("20"),
        reserved=Decimal("0"),
        hard_limit=Decimal("100"),
        period_start=START,
        period_end=END,
        now=now,
    )
    assert p["rate_per_day"] == Decimal("2")
    assert p["projected"] == Decimal("60")  # 20 + 2/day x 20 days
    assert p["limit_reached_at"] is None  # 60 < 100: not this period


def test_burn_down_says_when_the_hard_limit_is_met_counting_what_is_reserved():
    now = START + timedelta(days=10)
    p = budget_projection(
        spent=Decimal("20"),
        reserved=Decimal("4"),
        hard_limit=Decimal("40"),
        period_start=START,
        period_end=END,
        now=now,
    )
    # headroom 40 - 20 - 4 = 16 at 2/day: 8 days from now
    assert p["limit_reached_at"] == now + timedelta(days=8)
    assert p["projected"] == Decimal("60")


def test_burn_down_of_a_spent_budget_is_now_and_of_an_idle_one_is_never():
    now = START + timedelta(days=3)
    spent = budget_projection(
        spent=Decimal("50"),
        reserved=Decimal("1"),
        hard_limit=Decimal("50"),
        period_start=START,
        period_end=END,
        now=now,
    )
    assert spent["limit_reached_at"] == now
    idle = budget_projection(
        spent=Decimal("0"), reserved=Decimal("0"), hard_limit=Decimal("5"), period_start=START, period_end=END, now=now
    )
    assert idle == {"rate_per_day": Decimal("0E-9"), "projected": Decimal("0E-9"), "limit_reached_at": None}
    unlimited = budget_projection(
        spent=Decimal("9"), reserved=Decimal("0"), hard_limit=None, period_start=START, period_end=END, now=now
    )
    assert unlimited["limit_reached_at"] is None and unlimited["projected"] == Decimal("90")


def test_period_bounds_of_a_month_and_a_day():
    assert period_bounds("month", datetime(2026, 12, 1).date()) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert period_bounds("day", datetime(2026, 11, 30).date())[1] == datetime(2026, 12, 1, tzinfo=UTC)


def _price(tier: str, **rates) -> Price:
    base = {
        "prompt_per_mtok": Decimal(0),
        "completion_per_mtok": Decimal(0),
        "draft_per_mtok": Decimal(0),
        "gpu_per_hour": Decimal(0),
        "max_gpu_ms_per_token": Decimal(0),
        "cache_per_mtok": Decimal(0),
    }
    return Price(model="m", tier=tier, **{**base, **rates})


def test_savings_price_the_same_tokens_all_on_the_cloud_and_all_on_the_verifier():
    prices = {
        ("m", "cloud"): _price("cloud", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("3")),
        ("m", "speculative"): _price(
            "speculative",
            prompt_per_mtok=Decimal("0.5"),
            completion_per_mtok=Decimal("1"),
            gpu_per_hour=Decimal("3.6"),  # 0.000001 per ms
            max_gpu_ms_per_token=Decimal("100"),
        ),
    }
    traffic = [
        ModelTraffic(
            model="m",
            prompt_tokens=1_000_000,
            completion_tokens=2_000_000,
            cost_total=Decimal("2.5"),
            spec_completion_tokens=1_000_000,
            spec_accepted_tokens=600_000,  # 400k passes
            spec_gpu_ms=Decimal("4000000"),  # 10 ms a pass
        )
    ]
    s = savings_estimate(traffic=traffic, prices=prices)
    assert s["all_cloud"] == Decimal("7")  # 1 x 1 + 2 x 3
    # verifier alone: 0.5 + 2 = 2.5 for tokens, GPU 2M tokens x 10 ms = 20M ms x 1e-6 = 20
    assert s["models"][0]["verifier_gpu_ms"] == Decimal("20000000.000")
    assert s["all_verifier"] == Decimal("22.5")
    assert s["saved_vs_cloud"] == Decimal("4.5") and s["saved_vs_verifier"] == Decimal("20")
    assert s["unpriced"] == {"cloud": [], "verifier": []}


def test_savings_without_a_measured_pace_use_the_price_cap_and_say_so_and_an_unpriced_model_is_listed():
    prices = {
        ("m", "speculative"): _price("speculative", gpu_per_hour=Decimal("3.6"), max_gpu_ms_per_token=Decimal("5"))
    }
    traffic = [ModelTraffic(model="m", prompt_tokens=0, completion_tokens=1000, cost_total=Decimal("0.001"))]
    s = savings_estimate(traffic=traffic, prices=prices)
    assert s["models"][0]["gpu_from_cap"] is True
    assert s["models"][0]["verifier_gpu_ms"] == Decimal("5000.000")
    assert s["all_verifier"] == Decimal("0.005")
    assert s["unpriced"]["cloud"] == ["m"] and s["saved_vs_cloud"] is None


def test_acceptance_rate_and_verifier_time_saved():
    a = acceptance_figures(
        drafted_tokens=Decimal("1000"), accepted_tokens=600, completion_tokens=800, gpu_ms=Decimal("4000")
    )
    assert a["rate"] == Decimal("0.6")
    assert a["verifier_passes"] == 200  # 800 emitted, 600 of them accepted drafts
    assert a["ms_per_pass"] == Decimal("20")
    assert a["verifier_ms_saved"] == Decimal("12000")  # 600 passes not run, 20 ms each
    none = acceptance_figures(drafted_tokens=Decimal(0), accepted_tokens=0, completion_tokens=0, gpu_ms=Decimal(0))
    assert none["rate"] is None and none["ms_per_pass"] is None and none["verifier_ms_saved"] == 0


def test_read_plan_covers_the_range_once_in_order():
    start = datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    end = datetime(2026, 11, 4, 7, 45, tzinfo=UTC)
    plan = read_plan(start, end, "day", hour_mark=datetime(2026, 11, 4, 6, tzinfo=UTC), day_mark=END)
    assert plan == [
        ("day", datetime(2026, 11, 2, tzinfo=UTC), datetime(2026, 11, 4, tzinfo=UTC)),
        ("raw", start, datetime(2026, 11, 1, 6, tzinfo=UTC)),
        ("hour", datetime(2026, 11, 1, 6, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)),
        ("hour", datetime(2026, 11, 4, tzinfo=UTC), datetime(2026, 11, 4, 6, tzinfo=UTC)),
        ("raw", datetime(2026, 11, 4, 6, tzinfo=UTC), end),
    ]
    assert read_plan(start, end, "hour", hour_mark=None, day_mark=None) == [("raw", start, end)]


NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"start": "yesterday"}, "start"),
        ({"end": "2026-11-01"}, "start"),
        ({"start": "2026-11-10", "end": "2026-11-01"}, "end"),
        ({"start": "2024-01-01", "end": "2026-11-01"}, "start"),
        ({"range": "90d"}, "range"),
        ({"range": "7d", "start": "2026-11-01"}, "range"),
        ({"granularity": "week"}, "granularity"),
        ({"range": "30d", "granularity": "hour", "start": ""}, None),
        ({"start": "2026-01-01", "end": "2026-11-01", "granularity": "hour"}, "granularity"),
        ({"split": "colour"}, "split"),
        ({"split": "model:x"}, "split"),
    ],
)
def test_bad_parameters_name_the_parameter(query, param):
    if param is None:
        assert report_params(query, NOW).granularity == "hour"  # 720 hours: allowed
        return
    with pytest.raises(InvalidParams) as err:
        report_params(query, NOW)
    assert err.value.param == param and err.value.message


def test_parameters_default_to_the_last_seven_days_and_an_end_date_is_inclusive():
    p = report_params({}, NOW)
    assert (p.start, p.end, p.granularity, p.split, p.preset) == (NOW - timedelta(days=7), NOW, "day", "none", "7d")
    # a preset starts on the hour
    assert report_params({"range": "24h"}, NOW + timedelta(minutes=42)).start == NOW - timedelta(hours=24)
    p = report_params({"start": "2026-11-01", "end": "2026-11-02", "split": "tag:team"}, NOW)
    assert p.end == datetime(2026, 11, 3, tzinfo=UTC) and (p.split, p.tag_key) == ("tag", "team")
