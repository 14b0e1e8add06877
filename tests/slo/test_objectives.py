"""The arithmetic of objectives: good counts on histogram edges, attainment, error budget, burn rate, percentiles."""

from __future__ import annotations

import pytest

from slo.counts import Counts, total
from slo.objectives import Objective
from slo.selectors import burning


def counts(*ttfts: float | None, failures: int = 0) -> Counts:
    c = Counts()
    for ttft in ttfts:
        c.add_sample("completed", False, "generation", ttft, 20.0, 900.0, 0.0)
    for _ in range(failures):
        c.add_sample("error", False, "generation", None, None, 100.0, 0.0)
    return c


def test_good_counts_on_an_edge_are_exact_and_a_threshold_off_the_edges_is_refused():
    c = counts(100, 499.9, 500, 500.1, 9000, None)
    assert c.good("ttft", 500) == (3, 5)  # the sample without a first token is not counted
    with pytest.raises(ValueError):
        c.good("ttft", 450)


def test_attainment_budget_left_and_burn_rate():
    objective = Objective("interactive", "availability", None, target=0.99, window_days=28)
    c = counts(*([200.0] * 98), failures=2)
    assert objective.good_total(c) == (98, 100)
    assert objective.attainment(c) == pytest.approx(0.98)
    assert objective.burn_rate(c) == pytest.approx(2.0)  # twice the allowed 1 %
    assert objective.budget_left(c) == pytest.approx(-1.0)  # overspent by a whole budget
    assert objective.burn_rate(Counts()) == 0.0 and objective.attainment(Counts()) is None


def test_a_percentile_is_the_smallest_edge_at_or_above_it():
    c = counts(*([150.0] * 90), *([700.0] * 9), 20000.0)
    assert c.percentile("ttft", 0.5) == 200 and c.percentile("ttft", 0.95) == 800
    assert c.percentile("ttft", 1.0) == float("inf")  # past the last edge


def test_counts_add_up_as_the_samples_do():
    a, b = counts(100, 900, failures=1), counts(300, failures=2)
    assert total([a, b]).as_columns() == counts(100, 900, 300, failures=3).as_columns()


def test_the_multiwindow_rules_need_both_windows():
    from datetime import timedelta

    m = timedelta(minutes=1)
    quiet_now = {5 * m: 20.0, 30 * m: 1.0, 60 * m: 10.0, 360 * m: 1.0}  # a blip: the 1 h rate is under 14.4
    assert burning(quiet_now) == {"fast_burn": False, "slow_burn": False}
    both = {5 * m: 15.0, 30 * m: 7.0, 60 * m: 14.4, 360 * m: 6.0}
    assert burning(both) == {"fast_burn": True, "slow_burn": True}
