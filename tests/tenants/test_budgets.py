"""Budgets: hard limits refuse before anything is held, settlements charge what was used, periods roll over."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from tenants import errors, services
from tenants.models import Budget, Reservation, UsageRecord
from tests.tenants.factories import MODEL, PRICES, usage_for

pytestmark = pytest.mark.django_db

# The default usage (1000 prompt, 200 completion, 800 drafted, 1500 GPU ms) at the test prices.
USAGE_COST = Decimal("0.001816")


def _reserve(tenant, amount, request_id="r1", api_key=None, price=None):
    return services.budget_reserve(
        tenant=tenant, api_key=api_key, amount=Decimal(amount), request_id=request_id, price=price
    )


def _budget(tenant, api_key=None) -> Budget:
    return Budget.objects.get(tenant=tenant, api_key=api_key)


def test_without_a_budget_there_is_no_limit(tenant):
    reservation = _reserve(tenant, "1000000")
    assert reservation.status == Reservation.Status.HELD
    assert list(reservation.budgets.all()) == []


def test_a_reservation_holds_its_amount_on_the_tenant_budget(tenant):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    reservation = _reserve(tenant, "0.25")
    budget = _budget(tenant)
    assert budget.reserved == Decimal("0.25") and budget.spent == 0
    assert list(reservation.budgets.all()) == [budget]


def test_reserving_up_to_the_hard_limit_exactly_is_allowed(tenant):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    _reserve(tenant, "0.6", "r1")
    _reserve(tenant, "0.4", "r2")
    assert _budget(tenant).reserved == Decimal(1)


def test_past_the_hard_limit_a_reservation_is_refused_and_nothing_is_held(tenant):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    _reserve(tenant, "0.7", "r1")
    with pytest.raises(errors.BudgetExceeded) as refused:
        _reserve(tenant, "0.5", "r2")
    assert refused.value.limit == Decimal(1)
    assert refused.value.left == Decimal("0.3")
    assert refused.value.requested == Decimal("0.5")
    assert _budget(tenant).reserved == Decimal("0.7")
    assert not Reservation.objects.filter(request_id="r2").exists()


def test_the_refusal_says_which_budget_its_limit_and_what_is_left(tenant):
    services.budget_set(tenant=tenant, period="day", hard_limit=Decimal("2.5"), soft_limit=None)
    _reserve(tenant, "2", "r1")
    with pytest.raises(errors.BudgetExceeded) as refused:
        _reserve(tenant, "1", "r2")
    assert refused.value.message == (
        "this request would exceed the tenant day budget: hard limit 2.5, 0.5 left, and the request may cost up to 1"
    )


def test_held_money_of_requests_in_flight_counts_against_the_limit(tenant):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    _reserve(tenant, "1", "r1")
    with pytest.raises(errors.BudgetExceeded):
        _reserve(tenant, "0.000000001", "r2")


def test_a_key_budget_limits_that_key_only(tenant, owner):
    limited, _ = services.api_key_create(tenant=tenant, created_by=owner, name="limited")
    free, _ = services.api_key_create(tenant=tenant, created_by=owner, name="free")
    services.budget_set(tenant=tenant, api_key=limited, period="day", hard_limit=Decimal(1), soft_limit=None)
    with pytest.raises(errors.BudgetExceeded, match=f"API key {limited.prefix} day budget"):
        _reserve(tenant, "2", "r1", api_key=limited)
    _reserve(tenant, "2", "r2", api_key=free)


def test_a_key_reservation_counts_against_the_tenant_budget_too(tenant, owner):
    api_key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(10), soft_limit=None)
    services.budget_set(tenant=tenant, api_key=api_key, period="month", hard_limit=Decimal(5), soft_limit=None)
    reservation = _reserve(tenant, "3", api_key=api_key)
    assert _budget(tenant).reserved == Decimal(3)
    assert _budget(tenant, api_key).reserved == Decimal(3)
    assert reservation.budgets.count() == 2


def test_a_key_of_another_tenant_cannot_reserve(tenant, other_tenant):
    foreign, _ = services.api_key_create(tenant=other_tenant, created_by=None, name="theirs")
    with pytest.raises(errors.InvalidInput, match="another tenant"):
        _reserve(tenant, "1", api_key=foreign)


def test_one_tenants_spend_never_touches_another_tenants_budget(tenant, other_tenant, price):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    services.budget_set(tenant=other_tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    reservation = _reserve(tenant, "0.5", price=price)
    services.usage_settle(reservation=reservation, usage=usage_for(reservation))
    other = _budget(other_tenant)
    assert other.spent == 0 and other.reserved == 0
    assert not UsageRecord.objects.filter(tenant=other_tenant).exists()


def test_a_settlement_charges_what_was_used_and_frees_the_rest(tenant, price):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    reservation = _reserve(tenant, "0.5", price=price)
    record = services.usage_settle(reservation=reservation, usage=usage_for(reservation))
    budget = _budget(tenant)
    assert budget.reserved == 0
    assert budget.spent == USAGE_COST == record.cost_total
    assert reservation.status == Reservation.Status.SETTLED and reservation.settled_at is not None


def test_a_settlement_writes_one_ledger_row_with_route_versions_and_costs(tenant, owner, price):
    api_key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    reservation = _reserve(tenant, "0.5", api_key=api_key, price=price)
    usage = usage_for(reservation, user_id=owner.pk, tags={"team": "search"}, gpu_ms=Decimal("1500.0004"))
    record = services.usage_settle(reservation=reservation, usage=usage)
    record.refresh_from_db()
    assert (record.tenant, record.api_key, record.user, record.reservation) == (tenant, api_key, owner, reservation)
    assert (record.route_tier, record.route_reason, record.policy_version) == ("speculative", "default", "p1")
    assert (record.model, record.verifier_version, record.draft_version) == (MODEL, "v1", "d1")
    assert record.price_book == price.book
    assert record.gpu_ms == Decimal("1500.000")
    assert (record.cost_edge, record.cost_verifier, record.cost_cloud) == (
        Decimal("0.000016"),
        Decimal("0.0018"),
        Decimal(0),
    )
    assert record.tags == {"team": "search"}


def test_releasing_returns_the_money_and_writes_no_ledger_row(tenant):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    reservation = _reserve(tenant, "0.5")
    services.reservation_release(reservation=reservation)
    budget = _budget(tenant)
    assert budget.reserved == 0 and budget.spent == 0
    assert reservation.status == Reservation.Status.RELEASED
    assert not UsageRecord.objects.exists()


def test_settling_twice_is_refused(tenant, price):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    reservation = _reserve(tenant, "0.5", price=price)
    services.usage_settle(reservation=reservation, usage=usage_for(reservation))
    stale_copy = Reservation.objects.get(pk=reservation.pk)
    stale_copy.status = Reservation.Status.HELD  # a caller's stale object proves nothing: the row is checked
    with pytest.raises(errors.AlreadySettled, match="already settled"):
        services.usage_settle(reservation=stale_copy, usage=usage_for(reservation))
    assert _budget(tenant).spent == USAGE_COST
    assert UsageRecord.objects.count() == 1


def test_a_released_reservation_cannot_be_settled(tenant, price):
    reservation = _reserve(tenant, "0.5", price=price)
    services.reservation_release(reservation=reservation)
    with pytest.raises(errors.AlreadySettled, match="already released"):
        services.usage_settle(reservation=reservation, usage=usage_for(reservation))


def test_a_settled_reservation_cannot_be_released(tenant, price):
    reservation = _reserve(tenant, "0.5", price=price)
    services.usage_settle(reservation=reservation, usage=usage_for(reservation))
    with pytest.raises(errors.AlreadySettled):
        services.reservation_release(reservation=reservation)


def test_usage_of_another_request_cannot_settle_a_reservation(tenant, price):
    reservation = _reserve(tenant, "0.5", price=price)
    with pytest.raises(errors.InvalidInput):
        services.usage_settle(reservation=reservation, usage=usage_for(reservation, request_id="someone-else"))


def test_a_request_id_is_reserved_once(tenant):
    _reserve(tenant, "0.1", "same")
    with pytest.raises(errors.InvalidInput, match="already has a reservation"):
        _reserve(tenant, "0.1", "same")


def test_float_amounts_are_refused(tenant):
    with pytest.raises(errors.InvalidInput, match="float"):
        services.budget_reserve(tenant=tenant, api_key=None, amount=0.1, request_id="r1")


def test_the_soft_limit_alerts_once_per_period(tenant, price, caplog, django_capture_on_commit_callbacks):
    services.budget_set(tenant=tenant, period="month", hard_limit=None, soft_limit=Decimal("0.003"))
    with caplog.at_level(logging.WARNING, logger="tenants.services"):
        for n in range(4):  # 0.001816 each: crosses 0.003 on the second
            reservation = _reserve(tenant, "0.01", f"r{n}", price=price)
            with django_capture_on_commit_callbacks(execute=True):
                services.usage_settle(reservation=reservation, usage=usage_for(reservation))
            if n == 0:
                assert _budget(tenant).soft_alerted_at is None
    alerts = [r for r in caplog.records if "soft limit reached" in r.getMessage()]
    assert len(alerts) == 1
    assert alerts[0].request_id == "r1"
    assert _budget(tenant).soft_alerted_at is not None


def test_a_new_period_starts_spent_from_zero_and_keeps_held_money(tenant):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=Decimal("0.5"))
    last_month = (datetime.now(UTC).date().replace(day=1) - timedelta(days=1)).replace(day=1)
    Budget.objects.filter(tenant=tenant).update(
        period_start=last_month, spent=Decimal("0.9"), reserved=Decimal("0.05"), soft_alerted_at=datetime.now(UTC)
    )
    _reserve(tenant, "0.9")  # refused last month (0.9 + 0.05 + 0.9 > 1); a new month has room
    budget = _budget(tenant)
    assert budget.period_start == datetime.now(UTC).date().replace(day=1)
    assert budget.spent == 0
    assert budget.reserved == Decimal("0.95")
    assert budget.soft_alerted_at is None


def test_a_settlement_after_the_period_turned_charges_the_new_period(tenant, price):
    services.budget_set(tenant=tenant, period="day", hard_limit=Decimal(1), soft_limit=None)
    reservation = _reserve(tenant, "0.5", price=price)
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    Budget.objects.filter(tenant=tenant).update(period_start=yesterday, spent=Decimal("0.3"))
    services.usage_settle(reservation=reservation, usage=usage_for(reservation))
    budget = _budget(tenant)
    assert budget.period_start == datetime.now(UTC).date()
    assert (budget.spent, budget.reserved) == (USAGE_COST, 0)


@pytest.mark.parametrize(
    ("period", "now", "start"),
    [
        ("day", datetime(2025, 3, 31, 23, 59, tzinfo=UTC), date(2025, 3, 31)),
        ("month", datetime(2025, 3, 31, 23, 59, tzinfo=UTC), date(2025, 3, 1)),
        ("month", datetime(2025, 4, 1, 0, 0, tzinfo=UTC), date(2025, 4, 1)),
        # periods turn at UTC midnight, whatever zone the caller's time is in
        ("day", datetime(2025, 4, 1, 1, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=-5))), date(2025, 4, 1)),
    ],
)
def test_periods_start_at_utc_midnight(period, now, start):
    assert Budget(period=period).current_period_start(now) == start


def test_a_settlement_prices_with_the_book_pinned_at_reservation(tenant, price):
    reservation = _reserve(tenant, "0.5", price=price)
    dearer = [{**p, "prompt_per_mtok": Decimal(100), "completion_per_mtok": Decimal(100)} for p in PRICES]
    services.price_book_publish(version=2, prices=dearer)
    record = services.usage_settle(reservation=reservation, usage=usage_for(reservation))
    assert record.price_book == price.book
    assert record.cost_total == USAGE_COST


def test_a_failover_is_priced_at_the_tier_that_served(tenant, price):
    reservation = _reserve(tenant, "0.5", price=price)
    record = services.usage_settle(
        reservation=reservation,
        usage=usage_for(reservation, route_tier="edge", drafted_tokens=Decimal(0), gpu_ms=Decimal(0)),
    )
    assert record.cost_edge == Decimal("0.00007")  # (1000 * 0.05 + 200 * 0.10) / 1e6
    assert record.cost_verifier == 0


def test_a_charge_above_its_reservation_is_clamped_and_logged(tenant, price, caplog):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    reservation = _reserve(tenant, "0.001", price=price)  # less than the usage costs (0.001816)
    with caplog.at_level(logging.INFO, logger="tenants.services"):
        record = services.usage_settle(reservation=reservation, usage=usage_for(reservation))
    assert record.cost_total == Decimal("0.001")
    assert record.cost_edge + record.cost_verifier + record.cost_cloud == record.cost_total
    assert _budget(tenant).spent == Decimal("0.001")
    assert any("above its hold" in r.getMessage() for r in caplog.records)


def test_setting_a_budget_again_changes_its_limits_and_keeps_its_counters(tenant):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    _reserve(tenant, "0.5")
    budget = services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(2), soft_limit=Decimal(1))
    assert (budget.hard_limit, budget.soft_limit, budget.reserved) == (Decimal(2), Decimal(1), Decimal("0.5"))
    assert Budget.objects.filter(tenant=tenant).count() == 1


@pytest.mark.parametrize(
    ("hard", "soft", "message"),
    [
        (Decimal(1), Decimal(2), "above the hard limit"),
        (Decimal(-1), None, ">= 0"),
        (1.5, None, "float"),
    ],
)
def test_invalid_limits_are_refused(tenant, hard, soft, message):
    with pytest.raises(errors.InvalidInput, match=message):
        services.budget_set(tenant=tenant, period="month", hard_limit=hard, soft_limit=soft)


def test_a_budget_for_another_tenants_key_is_refused(tenant, other_tenant):
    foreign, _ = services.api_key_create(tenant=other_tenant, created_by=None, name="theirs")
    with pytest.raises(errors.InvalidInput, match="another tenant"):
        services.budget_set(tenant=tenant, api_key=foreign, period="day", hard_limit=Decimal(1), soft_limit=None)


def test_stale_reservations_are_released_and_fresh_or_settled_ones_are_left_alone(tenant, price):
    from django.utils import timezone as django_timezone

    from tenants.tasks import release_stale_reservations

    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(100), soft_limit=None)
    stale = services.budget_reserve(tenant=tenant, api_key=None, amount=Decimal(3), request_id="stale")
    fresh = services.budget_reserve(tenant=tenant, api_key=None, amount=Decimal(2), request_id="fresh")
    Reservation.objects.filter(pk=stale.pk).update(created_at=django_timezone.now() - timedelta(hours=2))
    assert release_stale_reservations.delay().get() == 1
    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert stale.status == "released" and fresh.status == "held"
    assert Budget.objects.get(tenant=tenant).reserved == Decimal(2)
    assert release_stale_reservations.delay().get() == 0  # nothing is released twice
