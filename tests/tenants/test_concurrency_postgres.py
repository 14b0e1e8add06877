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
from tenants.leases import LeasePool
from tenants.models import ApiKey, Budget, BudgetLease, Reservation, UsageRecord
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


# budget leases ------------------------------------------------------------------------------------
def _worst_usage(price, request_id: str):
    """A request that uses all it may (max_tokens, 16 drafts a token, the GPU cap): it costs its worst case."""
    return usage_for(
        None,
        request_id=request_id,
        prompt_tokens=1000,
        completion_tokens=200,
        drafted_tokens=Decimal(16 * 200),
        gpu_ms=price.max_gpu_ms_per_token * 1200,
    )


def _lease_settings(settings) -> None:
    settings.TANDEM_LEASE_REQUESTS = 6
    settings.TANDEM_LEASE_MIN_REQUESTS = 2
    settings.TANDEM_LEASE_HEADROOM_SHARE = 0.25
    settings.TANDEM_LEASE_BATCH = 3


def _request_on(pool, tenant, price, held: Decimal, request_id: str, api_key=None) -> str:
    """What the gateway does: the process's lease, else a new lease, else a reservation; then settle."""
    key_id = api_key.pk if api_key is not None else None
    hold = pool.admit(tenant_id=tenant.pk, api_key_id=key_id, amount=held) or pool.open(
        tenant_id=tenant.pk, api_key_id=key_id, amount=held
    )
    usage = _worst_usage(price, request_id)
    if hold is not None:
        pool.settle(hold, services.LeaseCharge(usage=usage, price=price, held=held))
        pool.tick()  # this thread writes whatever batch is due, racing the other threads' writes
        return "lease"
    reservation = services.budget_reserve(
        tenant=tenant, api_key=api_key, amount=held, request_id=request_id, price=price
    )
    services.usage_settle(reservation=reservation, usage=usage, price=price)
    return "reserved"


def _assert_books_exact(tenant, limit: Decimal) -> None:
    rows = UsageRecord.objects.filter(tenant=tenant)
    for budget in Budget.objects.filter(tenant=tenant):
        applies = rows if budget.api_key_id is None else rows.filter(api_key_id=budget.api_key_id)
        assert budget.reserved == 0, "every lease was returned and every reservation settled"
        assert budget.spent == sum((r.cost_total for r in applies), Decimal(0))
    for lease in BudgetLease.objects.all():
        assert lease.status == "closed"
        assert lease.charged == sum((r.cost_total for r in lease.usage.all()), Decimal(0)) <= lease.amount


@pytest.mark.parametrize("processes", [1, 3])
def test_leases_under_concurrency_never_overspend_a_hard_budget_and_charge_exactly(tenant, price, settings, processes):
    """Many threads in ``processes`` lease pools (one per process), one hard budget; each request costs its worst case."""
    _lease_settings(settings)
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    limit = held * 20
    services.budget_set(tenant=tenant, period="month", hard_limit=limit, soft_limit=None)
    pools = [LeasePool(keeper=False) for _ in range(processes)]
    for pool in pools:  # each process starts with a lease (so the race is over leases, not who opens first)
        pool.release(pool.open(tenant_id=tenant.pk, api_key_id=None, amount=held))

    def requests_of(thread: int) -> Callable[[], object]:
        def run() -> list[str]:
            outcomes = []
            for n in range(3):
                try:
                    outcomes.append(_request_on(pools[thread % processes], tenant, price, held, f"t{thread}-{n}"))
                except errors.BudgetExceeded:
                    outcomes.append("refused")
            return outcomes

        return run

    results = _run_at_once([requests_of(i) for i in range(THREADS)])
    assert all(isinstance(r, list) for r in results), [r for r in results if not isinstance(r, list)]
    for pool in pools:
        pool.close_all(on_this_thread=True)
    connections.close_all()

    served = UsageRecord.objects.filter(tenant=tenant)
    assert sum(outcome != "refused" for r in results for outcome in r) == served.count()
    assert all(row.cost_total == held for row in served)  # each charged exactly its (worst-case) usage
    budget = Budget.objects.get(tenant=tenant)
    assert budget.spent == held * served.count() <= limit
    assert served.filter(lease__isnull=False).count() >= 1
    _assert_books_exact(tenant, limit)


def test_leases_on_a_key_never_overspend_the_keys_budget_or_the_tenants(tenant, owner, price, settings):
    _lease_settings(settings)
    api_key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    services.budget_set(tenant=tenant, period="month", hard_limit=held * 16, soft_limit=None)
    services.budget_set(tenant=tenant, api_key=api_key, period="day", hard_limit=held * 6, soft_limit=None)
    pools = [LeasePool(keeper=False) for _ in range(2)]

    def request(i: int) -> Callable[[], object]:
        def run() -> str:
            try:
                key = api_key if i % 2 else None
                return _request_on(pools[i % 2], tenant, price, held, f"r{i}", api_key=key)
            except errors.BudgetExceeded:
                return "refused"

        return run

    results = _run_at_once([request(i) for i in range(THREADS)])
    assert all(isinstance(r, str) for r in results), results
    for pool in pools:
        pool.close_all(on_this_thread=True)
    connections.close_all()
    tenant_wide = Budget.objects.get(tenant=tenant, api_key=None)
    per_key = Budget.objects.get(tenant=tenant, api_key=api_key)
    assert tenant_wide.spent <= held * 16 and per_key.spent <= held * 6
    assert per_key.spent == held * UsageRecord.objects.filter(api_key=api_key).count()
    _assert_books_exact(tenant, held * 16)
