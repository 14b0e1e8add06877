"""Budget leases: a slice of a budget held by one process, requests admitted against it in memory, settled in batches."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import connections

from tenants import errors, services
from tenants.leases import LeasePool
from tenants.models import Budget, BudgetLease, UsageRecord
from tests.tenants.factories import usage_for

pytestmark = pytest.mark.django_db

SHARE = Decimal("0.25")


@pytest.fixture
def lease_settings(settings):
    settings.TANDEM_LEASE_REQUESTS = 10
    settings.TANDEM_LEASE_MIN_REQUESTS = 4
    settings.TANDEM_LEASE_HEADROOM_SHARE = 0.25
    settings.TANDEM_LEASE_TTL_S = 30.0
    settings.TANDEM_LEASE_IDLE_S = 10.0
    settings.TANDEM_LEASE_BATCH = 64
    settings.TANDEM_LEASE_FLUSH_S = 0.25
    return settings


@pytest.fixture
def clock():
    return [1000.0]


@pytest.fixture
def pool(lease_settings, clock):
    """A pool whose keeper is the test: it calls ``tick`` when time has moved."""
    return LeasePool(clock=lambda: clock[0], keeper=False)


def open_lease(tenant, amount, *, api_key=None, min_amount=Decimal(0)):
    return services.budget_lease_open(
        tenant=tenant, api_key=api_key, amount=Decimal(amount), min_amount=min_amount, headroom_share=SHARE
    )


def charge(price, request_id: str, held: Decimal, **overrides) -> services.LeaseCharge:
    return services.LeaseCharge(usage=usage_for(None, request_id=request_id, **overrides), price=price, held=held)


def budget(tenant) -> Budget:
    return Budget.objects.get(tenant=tenant, api_key__isnull=True)


# the database half ---------------------------------------------------------------------------------
def test_a_lease_holds_its_amount_on_the_tenants_and_the_keys_budgets(tenant, owner):
    api_key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1000), soft_limit=None)
    key_budget = services.budget_set(tenant=tenant, api_key=api_key, period="day", hard_limit=None, soft_limit=None)
    lease = open_lease(tenant, 10, api_key=api_key)
    assert lease is not None and lease.amount == 10 and lease.status == "active"
    assert budget(tenant).reserved == 10
    key_budget.refresh_from_db()
    assert key_budget.reserved == 10
    assert set(lease.budgets.values_list("id", flat=True)) == {budget(tenant).pk, key_budget.pk}


def test_a_lease_takes_at_most_a_share_of_what_the_hard_limit_has_left(tenant):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(100), soft_limit=None)
    first = open_lease(tenant, 1000)
    assert first.amount == 25  # a quarter of 100
    second = open_lease(tenant, 1000)
    assert second.amount == Decimal("18.75")  # a quarter of the 75 left
    assert budget(tenant).reserved == Decimal("43.75")


def test_no_lease_is_opened_for_a_budget_near_its_limit_and_nothing_is_held(tenant):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(10), soft_limit=None)
    assert open_lease(tenant, 100, min_amount=Decimal(4)) is None  # a quarter of 10 is less than 4
    assert budget(tenant).reserved == 0 and not BudgetLease.objects.exists()


def test_requests_that_cost_nothing_get_a_lease_of_nothing_and_an_exhausted_budget_none(tenant):
    assert open_lease(tenant, 0).amount == 0  # a free model: admitted in memory like any other
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(0), soft_limit=None)
    assert open_lease(tenant, 1) is None


def test_a_batch_charges_each_request_exactly_and_moves_its_total_from_reserved_to_spent(tenant, price):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1000), soft_limit=None)
    lease = open_lease(tenant, 10)
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    charges = [charge(price, "r1", held), charge(price, "r2", held, completion_tokens=50, outcome="cancelled")]
    services.budget_lease_settle(lease=lease, charges=charges)
    expected = [services.settlement_cost(price=price, usage=c.usage, held=held).total for c in charges]
    stored = {r.request_id: r for r in UsageRecord.objects.all()}
    assert stored["r1"].cost_total == expected[0] and stored["r2"].cost_total == expected[1]
    assert stored["r1"].lease_id == lease.pk and stored["r1"].reservation_id is None
    assert stored["r2"].completion_tokens == 50 and stored["r2"].outcome == "cancelled"
    assert stored["r1"].tags == {} and stored["r1"].price_book_id == price.book_id and stored["r1"].created_at
    lease.refresh_from_db()
    assert lease.charged == sum(expected)
    assert budget(tenant).spent == sum(expected) and budget(tenant).reserved == 10 - sum(expected)


def test_closing_a_lease_gives_back_its_unused_part_once(tenant, price):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1000), soft_limit=None)
    lease = open_lease(tenant, 10)
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    services.budget_lease_settle(lease=lease, charges=[charge(price, "r1", held)])
    spent = budget(tenant).spent
    assert services.budget_lease_close(lease=lease) == 10 - spent
    assert budget(tenant).reserved == 0 and budget(tenant).spent == spent
    with pytest.raises(errors.AlreadySettled):
        services.budget_lease_close(lease=lease)
    with pytest.raises(errors.AlreadySettled):
        services.budget_lease_settle(lease=lease, charges=[charge(price, "r2", held)])


def test_a_batch_that_would_pass_the_lease_amount_is_refused_whole(tenant, price):
    lease = open_lease(tenant, "0.0001")
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    with pytest.raises(errors.InvalidInput, match="past its amount"):
        services.budget_lease_settle(lease=lease, charges=[charge(price, "r1", held)])
    assert not UsageRecord.objects.exists()


def test_the_stale_reservation_task_returns_a_lease_left_by_a_dead_process(tenant):
    from datetime import timedelta

    from django.utils import timezone

    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1000), soft_limit=None)
    lease = open_lease(tenant, 10)
    assert services.reservations_release_stale(older_than=timezone.now() - timedelta(hours=1)) == 0
    assert services.reservations_release_stale(older_than=timezone.now() + timedelta(seconds=1)) == 1
    lease.refresh_from_db()
    assert lease.status == "closed" and budget(tenant).reserved == 0


# the in-memory half --------------------------------------------------------------------------------
def test_requests_are_admitted_in_memory_until_the_lease_is_used_up_then_none(tenant, price, pool):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1000), soft_limit=None)
    amount = Decimal("0.3")
    first = pool.open(tenant_id=tenant.pk, api_key_id=None, amount=amount)
    assert first is not None and first.lease.amount == 3  # TANDEM_LEASE_REQUESTS (10) worst cases
    holds = [first]
    while (hold := pool.admit(tenant_id=tenant.pk, api_key_id=None, amount=amount)) is not None:
        holds.append(hold)
    assert len(holds) == 10  # exactly what fits; the next one is not admitted
    assert pool.admit(tenant_id=tenant.pk, api_key_id=None, amount=amount) is None


def test_a_released_hold_gives_its_room_back_and_a_settled_one_only_what_it_did_not_cost(tenant, price, pool):
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    hold = pool.open(tenant_id=tenant.pk, api_key_id=None, amount=held)
    lease = hold.lease
    assert lease.room() == lease.amount - held
    pool.release(hold)
    assert lease.room() == lease.amount
    with pytest.raises(errors.AlreadySettled):
        pool.release(hold)
    hold = pool.admit(tenant_id=tenant.pk, api_key_id=None, amount=held)
    pool.settle(hold, charge(price, "r1", held, completion_tokens=20))
    cost = services.settlement_cost(price=price, usage=usage_for(None, completion_tokens=20), held=held).total
    assert lease.room() == lease.amount - cost


def test_settled_charges_are_written_in_one_batch_when_due(tenant, price, pool, clock, django_assert_num_queries):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1000), soft_limit=None)
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    futures = []
    for i in range(5):
        hold = pool.admit(tenant_id=tenant.pk, api_key_id=None, amount=held) or pool.open(
            tenant_id=tenant.pk, api_key_id=None, amount=held
        )
        futures.append(pool.settle(hold, charge(price, f"r{i}", held)))
    with django_assert_num_queries(0):  # not due yet: the charges wait in memory, no query at all
        pool.tick()
    assert not UsageRecord.objects.exists()
    clock[0] += 0.3
    # Due: the five charges go in one batch, one transaction of a fixed number of statements
    # whatever the batch's size: SAVEPOINT x2 (the flush's atomic and budget_lease_settle's,
    # inside the test's transaction), lock the lease, lock its budget, UPDATE the budget,
    # UPDATE the lease, one INSERT of all five ledger rows (one executemany), RELEASE x2.
    # Written row by row it would be 13; settled request by request, 5 transactions.
    with django_assert_num_queries(9) as captured:
        pool.tick()
    inserts = [q["sql"] for q in captured.captured_queries if "INSERT" in q["sql"]]
    assert len(inserts) == 1 and 'INTO "tenants_usagerecord"' in inserts[0], inserts
    assert all(f.done() for f in futures) and UsageRecord.objects.count() == 5
    assert budget(tenant).spent == sum(UsageRecord.objects.values_list("cost_total", flat=True))


def test_an_expired_lease_takes_no_new_request_and_is_returned_once_drained(tenant, price, pool, clock):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1000), soft_limit=None)
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    running = pool.open(tenant_id=tenant.pk, api_key_id=None, amount=held)
    clock[0] += 31  # past TANDEM_LEASE_TTL_S
    pool.tick()
    assert pool.admit(tenant_id=tenant.pk, api_key_id=None, amount=held) is None
    assert BudgetLease.objects.get().status == "active"  # a request still runs on it
    pool.settle(running, charge(price, "r1", held))
    pool.tick()
    lease = BudgetLease.objects.get()
    assert lease.status == "closed" and lease.charged == UsageRecord.objects.get().cost_total
    assert budget(tenant).reserved == 0 and budget(tenant).spent == lease.charged


def test_an_idle_lease_is_returned(tenant, price, pool, clock):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1000), soft_limit=None)
    pool.release(pool.open(tenant_id=tenant.pk, api_key_id=None, amount=Decimal(1)))
    clock[0] += 11  # past TANDEM_LEASE_IDLE_S
    pool.tick()
    assert BudgetLease.objects.get().status == "closed" and budget(tenant).reserved == 0
    assert pool.leases() == []


def test_shutdown_writes_what_is_pending_and_returns_every_lease(tenant, other_tenant, price, pool):
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    for t in (tenant, other_tenant):
        services.budget_set(tenant=t, period="month", hard_limit=Decimal(1000), soft_limit=None)
        pool.settle(pool.open(tenant_id=t.pk, api_key_id=None, amount=held), charge(price, f"r{t.pk}", held))
    pool.close_all(on_this_thread=True)
    assert UsageRecord.objects.count() == 2
    assert set(BudgetLease.objects.values_list("status", flat=True)) == {"closed"}
    for t in (tenant, other_tenant):
        assert budget(t).reserved == 0 and budget(t).spent == UsageRecord.objects.get(tenant=t).cost_total


def test_a_failed_batch_is_logged_kept_and_written_on_a_later_tick(tenant, price, pool, clock, monkeypatch, caplog):
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    future = pool.settle(pool.open(tenant_id=tenant.pk, api_key_id=None, amount=held), charge(price, "r1", held))
    original = services.budget_lease_settle

    def down(**kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(services, "budget_lease_settle", down)
    clock[0] += 1
    pool.tick()
    assert not future.done() and not UsageRecord.objects.exists()
    assert any(r.levelname == "ERROR" and "failed; retrying" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(services, "budget_lease_settle", original)
    pool.tick()
    assert future.done() and UsageRecord.objects.get().request_id == "r1"


@pytest.mark.django_db(transaction=True)
def test_a_lease_is_not_returned_while_a_batch_of_its_charges_is_being_written(tenant, price, lease_settings, clock):
    """A tick that finds a retired lease with nothing pending must still wait for a batch another thread is writing."""
    import threading

    writing, finish = threading.Event(), threading.Event()

    def slow_db(fn):
        if fn.__name__ == "write":
            writing.set()
            assert finish.wait(10)
        return fn()

    pool = LeasePool(clock=lambda: clock[0], keeper=False, run_db=slow_db)
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    pool.settle(pool.open(tenant_id=tenant.pk, api_key_id=None, amount=held), charge(price, "r1", held))
    clock[0] += 31  # expired: the next tick retires it and writes its batch

    def tick_and_close_connection() -> None:
        try:
            pool.tick()
        finally:
            connections.close_all()

    writer = threading.Thread(target=tick_and_close_connection)
    writer.start()
    assert writing.wait(10)
    pool.tick()  # meanwhile: retired, no request, nothing pending, but a batch in flight
    assert BudgetLease.objects.get().status == "active"
    finish.set()
    writer.join(10)
    pool.tick()
    lease = BudgetLease.objects.get()
    assert lease.status == "closed" and lease.charged == UsageRecord.objects.get().cost_total


def test_a_forked_child_does_not_admit_against_its_parents_leases(tenant, price, pool):
    import os

    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    pool.release(pool.open(tenant_id=tenant.pk, api_key_id=None, amount=held))
    assert pool.admit(tenant_id=tenant.pk, api_key_id=None, amount=held) is not None
    child = os.fork()
    if child == 0:  # no database here: only the pool's memory is looked at
        ok = pool.leases() == [] and pool.admit(tenant_id=tenant.pk, api_key_id=None, amount=held) is None
        os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(pool.leases()) == 1  # the parent keeps its lease


def test_after_a_refused_lease_the_next_requests_reserve_without_asking_again(tenant, pool, clock):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(10), soft_limit=None)
    amount = Decimal(1)  # 4 worst cases (TANDEM_LEASE_MIN_REQUESTS) are more than a quarter of 10
    assert pool.open(tenant_id=tenant.pk, api_key_id=None, amount=amount) is None
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1000), soft_limit=None)
    assert pool.open(tenant_id=tenant.pk, api_key_id=None, amount=amount) is None  # not asked again yet
    clock[0] += 5
    assert pool.open(tenant_id=tenant.pk, api_key_id=None, amount=amount) is not None


def test_requests_that_meet_a_used_up_lease_together_share_the_one_lease_opened_for_them(tenant, price, pool):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1000), soft_limit=None)
    held = services.cost_estimate_max(price=price, prompt_tokens=1000, max_tokens=200)
    # a wave found no room (``admit`` said None to each), then each asks for a lease, one after another
    holds = [pool.open(tenant_id=tenant.pk, api_key_id=None, amount=held) for _ in range(4)]
    assert all(h is not None for h in holds) and len({id(h.lease) for h in holds}) == 1
    assert BudgetLease.objects.count() == 1  # one lease opened, not one each (each retiring the last)
    for i, hold in enumerate(holds):
        pool.settle(hold, charge(price, f"r{i}", held))


def test_a_request_waits_for_its_keys_lease_being_opened_and_is_admitted_against_it(tenant, pool, monkeypatch):
    # no database here: two DB threads asking at once, the second while the first's lease is being opened
    import threading
    import time
    from types import SimpleNamespace

    opened: list[float] = []

    def slow_open(**kwargs):
        opened.append(time.monotonic())
        time.sleep(0.2)
        return SimpleNamespace(pk=7, amount=kwargs["amount"])

    monkeypatch.setattr(services, "budget_lease_open", slow_open)
    monkeypatch.setattr(pool, "_start_keeper", lambda: None)
    holds: list = []

    def ask() -> None:
        holds.append(pool.open(tenant_id=tenant.pk, api_key_id=None, amount=Decimal(1)))

    first = threading.Thread(target=ask)
    first.start()
    while not opened:
        time.sleep(0.005)
    ask()  # while the first's lease is being opened
    first.join()
    assert len(opened) == 1 and len(holds) == 2 and all(h is not None for h in holds)
    assert holds[0].lease is holds[1].lease and holds[0].lease.requests == 2
