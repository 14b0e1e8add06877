"""Budgets under concurrent requests, on PostgreSQL (where select_for_update really locks rows).

Run with ``DATABASE_URL=postgres://postgres@127.0.0.1:5432/test``; on any other database
these tests skip with a reason. Each thread opens its own connection (Django's are
per thread) and closes it at the end, so the test database can be dropped afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from decimal import Decimal

import pytest
from django.db import connection, connections

from tenants import errors, services
from tenants.models import ApiKey, Budget, Reservation, UsageRecord
from tests.tenants.factories import usage_for

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="needs PostgreSQL (DATABASE_URL=postgres://postgres@127.0.0.1:5432/test): only it locks rows",
    ),
]

THREADS = 24


def _run_at_once(calls: list[Callable[[], object]]) -> list[object]:
    """Run every call in its own thread, all released together; each result or the exception it raised."""
    start = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - the test inspects every outcome
            results[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck (deadlock?)"
    return results


def _reserve(tenant, amount: Decimal, request_id: str, api_key=None) -> Callable[[], object]:
    return lambda: services.budget_reserve(tenant=tenant, api_key=api_key, amount=amount, request_id=request_id)


def test_concurrent_requests_never_overspend_a_hard_budget(tenant):
    limit, amount = Decimal(10), Decimal("0.7")
    services.budget_set(tenant=tenant, period="month", hard_limit=limit, soft_limit=None)
    results = _run_at_once([_reserve(tenant, amount, f"r{i}") for i in range(THREADS)])

    held = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if isinstance(r, errors.BudgetExceeded)]
    assert len(held) + len(refused) == THREADS, [r for r in results if isinstance(r, Exception)]
    assert len(held) == int(limit / amount) == 14
    budget = Budget.objects.get(tenant=tenant)
    assert budget.reserved == amount * len(held) <= limit
    assert Reservation.objects.count() == len(held)


def _key_and_tenant_race(tenant, owner, tenant_limit: Decimal, key_limit: Decimal) -> tuple[Budget, Budget, ApiKey]:
    """Half the threads reserve 1 through a key (both budgets apply), half without (the tenant's only)."""
    api_key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.budget_set(tenant=tenant, period="month", hard_limit=tenant_limit, soft_limit=None)
    services.budget_set(tenant=tenant, api_key=api_key, period="day", hard_limit=key_limit, soft_limit=None)
    calls = [_reserve(tenant, Decimal(1), f"k{i}", api_key=api_key) for i in range(THREADS // 2)]
    calls += [_reserve(tenant, Decimal(1), f"t{i}") for i in range(THREADS // 2)]
    results = _run_at_once(calls)
    assert all(isinstance(r, Reservation | errors.BudgetExceeded) for r in results), results
    tenant_wide = Budget.objects.get(tenant=tenant, api_key=None)
    per_key = Budget.objects.get(tenant=tenant, api_key=api_key)
    return tenant_wide, per_key, api_key


def test_concurrent_requests_on_a_key_never_overspend_the_keys_budget(tenant, owner):
    # the tenant's budget has room for everyone: only the key's (4) binds, whatever the order
    tenant_wide, per_key, api_key = _key_and_tenant_race(tenant, owner, Decimal(100), Decimal(4))
    assert per_key.reserved == Decimal(4) == Reservation.objects.filter(api_key=api_key).count()
    assert tenant_wide.reserved == Decimal(4 + THREADS // 2) == Reservation.objects.count()


def test_concurrent_requests_on_a_key_never_overspend_either_budget(tenant, owner):
    # both bind: the tenant's (10) fills up, and how many of its 10 went through the key
    # depends on the order the threads ran in, never more than the key's 4
    tenant_wide, per_key, api_key = _key_and_tenant_race(tenant, owner, Decimal(10), Decimal(4))
    assert tenant_wide.reserved == Decimal(10) == Reservation.objects.count()
    assert per_key.reserved == Reservation.objects.filter(api_key=api_key).count() <= Decimal(4)


def test_concurrent_settlements_and_reservations_keep_the_books_exact(tenant, price):
    limit, amount = Decimal("0.1"), Decimal("0.005")
    services.budget_set(tenant=tenant, period="month", hard_limit=limit, soft_limit=None)
    in_flight = [
        services.budget_reserve(tenant=tenant, api_key=None, amount=amount, request_id=f"s{i}", price=price)
        for i in range(THREADS // 2)
    ]
    # Each settlement charges 0.001816 of its 0.005 and frees the rest while new requests reserve.
    calls: list[Callable[[], object]] = [
        (lambda r=r: services.usage_settle(reservation=r, usage=usage_for(r))) for r in in_flight
    ]
    calls += [_reserve(tenant, amount, f"n{i}") for i in range(THREADS)]
    results = _run_at_once(calls)

    assert all(isinstance(r, UsageRecord) for r in results[: len(in_flight)]), results
    assert all(isinstance(r, Reservation | errors.BudgetExceeded) for r in results[len(in_flight) :]), results
    budget = Budget.objects.get(tenant=tenant)
    held = Reservation.objects.filter(status=Reservation.Status.HELD)
    assert budget.reserved == sum((r.amount for r in held), Decimal(0))
    assert budget.spent == sum((r.cost_total for r in UsageRecord.objects.all()), Decimal(0))
    assert budget.spent + budget.reserved <= limit
    # Settled money leaves room: at least as many new requests fit as the limit allowed before any settled.
    assert held.count() >= int((limit - amount * len(in_flight)) / amount)


def test_a_reservation_settled_twice_at_once_is_charged_once(tenant, price):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    reservation = services.budget_reserve(
        tenant=tenant, api_key=None, amount=Decimal("0.5"), request_id="r1", price=price
    )
    results = _run_at_once([lambda: services.usage_settle(reservation=reservation, usage=usage_for(reservation))] * 8)

    assert sum(isinstance(r, UsageRecord) for r in results) == 1
    assert sum(isinstance(r, errors.AlreadySettled) for r in results) == 7, results
    budget = Budget.objects.get(tenant=tenant)
    assert (budget.spent, budget.reserved) == (Decimal("0.001816"), 0)
