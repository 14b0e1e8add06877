"""The in-process side of budget leases: admit requests against a slice of a budget this process holds, in memory.

    hold = pool.admit(tenant_id=..., api_key_id=..., amount=worst_case)        # memory; None: no lease with room
    hold = hold or pool.open(tenant_id=..., api_key_id=..., amount=...)       # a DB thread; None: reserve instead
    ... stream ...
    future = pool.settle(hold, charge, payload)   # memory: the cost is known; the ledger row is written in a batch
    pool.release(hold)                            # or: nothing was delivered, nothing owed

Money (see ``services.budget_lease_open`` for the database half of the proof): a lease of
``amount`` is held on the budgets before any request is admitted against it. In memory,
under one lock, ``committed`` (settled costs, written or pending) plus ``in_flight`` (the
worst cases of admitted requests still running) never exceeds ``amount``: a request is
admitted only if its worst case fits in what is left, and when it settles its worst case
leaves ``in_flight`` and its cost, which is at most that worst case, joins ``committed``.
So the batches written against a lease can never charge more than the lease holds.

A keeper thread writes pending charges in batches (``TANDEM_LEASE_BATCH`` requests, or
every ``TANDEM_LEASE_FLUSH_S``), retires a lease after ``TANDEM_LEASE_TTL_S`` (it takes no
new requests) and returns its unused part once its last request has settled; an idle
lease is returned after ``TANDEM_LEASE_IDLE_S``. At exit the pool writes what is pending
and returns every lease (``close_all``); the leases of a process that died without that
are returned by the stale-reservation task. A failed batch write is logged as an error
and kept to be tried again: a charge is never dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from django.conf import settings
from django.db import transaction

from tenants import errors, services
from tenants.models import ApiKey, BudgetLease, Tenant

log = logging.getLogger(__name__)

T = TypeVar("T")
# After a budget refused a lease (too near its hard limit), its requests reserve one by one
# for this long before a lease is asked for again: one transaction a request, not two.
LEASE_RETRY_S = 5.0
LeaseKey = tuple[int, int | None]  # (tenant id, API key id or None)
OPENING_WAIT_S = 2.0  # the longest a request waits for another's lease opening before it reserves on its own


@dataclass
class _Pending:
    charges: list[services.LeaseCharge]  # one per leg of the request
    payload: Any  # written with the batch by the pool's ``on_flush`` (the gateway's SLO sample)
    future: Future
    at: float


@dataclass
class _Lease:
    row: BudgetLease
    amount: Decimal
    opened_at: float
    committed: Decimal  # charged in the database + settled in memory, not yet written
    in_flight: Decimal = Decimal(0)  # worst cases of admitted requests that have not settled
    requests: int = 0  # admitted requests that have not settled
    last_used: float = 0.0
    retired: bool = False  # takes no new requests; returned once drained
    pending: list[_Pending] = field(default_factory=list)
    writing: int = 0  # batches taken from ``pending`` whose write has not finished

    def drained(self) -> bool:
        # Nothing running, nothing pending, and no batch being written: only then may it close
        # (a batch written after the close would be refused, and its charges never land).
        return self.requests == 0 and not self.pending and self.writing == 0

    def room(self) -> Decimal:
        return self.amount - self.committed - self.in_flight


@dataclass
class LeaseHold:
    """One request admitted against a lease, until it settles or is released."""

    lease: _Lease
    amount: Decimal  # its worst case, counted in the lease's in_flight
    done: bool = False


class LeasePool:
    """This process's budget leases, one active per (tenant, API key), and the keeper that settles and returns them."""

    def __init__(
        self,
        *,
        run_db: Callable[[Callable[[], T]], T] | None = None,
        on_flush: Callable[[list[Any]], None] | None = None,
        on_open: Callable[[Any], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        keeper: bool = True,
    ) -> None:
        self._run_db: Callable[[Callable[[], Any]], Any] = run_db or (lambda fn: fn())
        self._on_flush = on_flush
        self._on_open = (
            on_open  # told each new lease's id (the gateway's journal: a dead process's leases close at once)
        )
        self._clock = clock
        self._lock = threading.Lock()
        self._opened = threading.Condition(self._lock)  # an opening ended (``open``)
        self._active: dict[LeaseKey, _Lease] = {}
        self._retired: list[_Lease] = []
        self._opening: set[LeaseKey] = set()
        self._refused: dict[LeaseKey, float] = {}  # when a lease was last refused (budget near its limit)
        self._wake = threading.Event()
        self._keeper: threading.Thread | None = None
        self._use_keeper = keeper  # False: whoever owns the pool calls tick() (tests)
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        # Money: a forked child (a pre-forking server, Celery's prefork pool) must not
        # admit against the leases it inherited in memory: the parent still admits against
        # them, and two processes spending one slice could spend it twice. The child
        # forgets them and opens its own; the parent remains their holder.
        pool = weakref.ref(self)  # the hook must not keep a pool alive (tests make many)

        def forget_in_child() -> None:
            inherited = pool()
            if inherited is not None:
                inherited._forget_in_child()

        os.register_at_fork(after_in_child=forget_in_child)

    # admission --------------------------------------------------------------------------
    def admit(self, *, tenant_id: int, api_key_id: int | None, amount: Decimal) -> LeaseHold | None:
        """Admit a request of worst case ``amount`` against this process's lease, in memory; None if it has no room."""
        now = self._clock()
        with self._lock:
            return self._admit((tenant_id, api_key_id), amount, now)

    def _admit(self, key: LeaseKey, amount: Decimal, now: float) -> LeaseHold | None:
        # caller holds self._lock
        lease = self._active.get(key)
        if lease is None:
            return None
        if now - lease.opened_at >= settings.TANDEM_LEASE_TTL_S or lease.room() < amount:
            self._retire(key)  # expired or too full: a new lease takes over
            return None
        return self._hold(lease, amount, now)

    def open(self, *, tenant_id: int, api_key_id: int | None, amount: Decimal) -> LeaseHold | None:
        """Open a lease sized for many requests like this one and admit it (sync: a DB thread); None: reserve instead.

        A request that found no room (``admit``) while another of its key was opening a lease, or
        that comes here once one opened, is admitted against that lease: a wave of requests
        meeting a used-up lease used to open one each, one after another on the DB thread (each
        retiring the last: 16 opens of ~1.7 ms at a wave of 16, demo pair, 2026-12-04), or to
        reserve one by one where two DB threads ran. It waits for the opening at most
        ``OPENING_WAIT_S``. None when the budgets are too near their limits for a lease of at
        least ``TANDEM_LEASE_MIN_REQUESTS`` such requests (and, for ``LEASE_RETRY_S``, after).
        """
        key = (tenant_id, api_key_id)
        with self._opened:
            if not self._opened.wait_for(lambda: key not in self._opening, OPENING_WAIT_S):
                return None  # the opening takes too long: reserve
            now = self._clock()
            hold = self._admit(key, amount, now)  # opened meanwhile, with room for this one too
            if hold is not None:
                return hold
            if now - self._refused.get(key, float("-inf")) < LEASE_RETRY_S:
                return None  # near its limit a moment ago: reserve, without asking again
            self._opening.add(key)
        try:  # the key stays "opening" until its lease is in place: a request woken then finds it
            row = services.budget_lease_open(
                tenant=Tenant(pk=tenant_id),
                api_key=ApiKey(pk=api_key_id, tenant_id=tenant_id) if api_key_id is not None else None,
                amount=amount * settings.TANDEM_LEASE_REQUESTS,
                min_amount=amount * settings.TANDEM_LEASE_MIN_REQUESTS,
                headroom_share=Decimal(str(settings.TANDEM_LEASE_HEADROOM_SHARE)),
                holder=self.holder,
            )
            if row is None:
                with self._lock:
                    self._refused[key] = now
                return None
            if self._on_open is not None:
                self._on_open(row.pk)
            now = self._clock()
            lease = _Lease(row=row, amount=row.amount, opened_at=now, committed=Decimal(0), last_used=now)
            with self._lock:
                if key in self._active:
                    self._retire(key)
                self._active[key] = lease
                hold = self._hold(lease, amount, now)
        finally:
            with self._opened:
                self._opening.discard(key)
                self._opened.notify_all()
        self._start_keeper()
        return hold

    def _hold(self, lease: _Lease, amount: Decimal, now: float) -> LeaseHold | None:
        # caller holds self._lock
        if lease.room() < amount:
            return None
        lease.in_flight += amount
        lease.requests += 1
        lease.last_used = now
        return LeaseHold(lease, amount)

    def extend(self, hold: LeaseHold, extra: Decimal) -> bool:
        """Hold ``extra`` more for an admitted request (a move to a dearer tier) if its lease has room; else False."""
        with self._lock:
            lease = hold.lease
            if hold.done or lease.retired or lease.room() < extra:
                return False
            lease.in_flight += extra
            hold.amount += extra
            return True

    def _retire(self, key: LeaseKey) -> None:
        # caller holds self._lock
        lease = self._active.pop(key)
        lease.retired = True
        self._retired.append(lease)
        self._wake.set()

    # settlement ----------------------------------------------------------------------------
    def settle(
        self, hold: LeaseHold, charge: services.LeaseCharge | list[services.LeaseCharge], payload: Any = None
    ) -> Future:
        """Count the request's exact cost against its lease now; its ledger rows are written with the next batch.

        ``charge`` is one charge, or one per leg of a request served by several tiers in
        turn. The first's ``held`` must be the hold's amount and each later leg's what the
        legs before it left of it: the costs (``settlement_costs``) then add up to at most
        what was counted in flight. Returns a future that completes once the rows are committed.
        """
        charges = charge if isinstance(charge, list) else [charge]
        assert charges and charges[0].held == hold.amount, (
            "a lease charge is capped at the worst case it was admitted with"
        )
        costs = services.settlement_costs(legs=[(c.price, c.usage) for c in charges], held=hold.amount)
        for later, cost_before, held_before in zip(charges[1:], costs, [c.held for c in charges], strict=False):
            assert later.held == held_before - cost_before.total, (
                "a later leg is capped at what the legs before it left"
            )
        future: Future = Future()
        now = self._clock()
        with self._lock:
            self._finish(hold, now)
            hold.lease.committed += sum((cost.total for cost in costs), Decimal(0))
            hold.lease.pending.append(_Pending(charges, payload, future, now))
            if len(hold.lease.pending) >= settings.TANDEM_LEASE_BATCH:
                self._wake.set()
        return future

    def release(self, hold: LeaseHold) -> None:
        """The request delivered nothing: its worst case goes back to the lease, nothing is owed."""
        with self._lock:
            self._finish(hold, self._clock())

    def _finish(self, hold: LeaseHold, now: float) -> None:
        # caller holds self._lock
        if hold.done:
            raise errors.AlreadySettled("this lease hold was already settled or released")
        hold.done = True
        hold.lease.in_flight -= hold.amount
        hold.lease.requests -= 1
        hold.lease.last_used = now

    def flush_soon(self) -> None:
        """Write pending charges now rather than at the next tick (someone waits for a row)."""
        with self._lock:
            for lease in [*self._active.values(), *self._retired]:
                for pending in lease.pending:
                    pending.at = float("-inf")
        self._wake.set()

    # the keeper ------------------------------------------------------------------------------
    def _start_keeper(self) -> None:
        if not self._use_keeper:
            return
        with self._lock:
            if self._keeper is not None and self._keeper.is_alive():
                return
            self._keeper = threading.Thread(target=self._keep, name="budget-leases", daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        while True:
            self._wake.wait(settings.TANDEM_LEASE_FLUSH_S)
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the keeper must outlive one bad tick; each failure is logged
                log.exception("budget lease keeper: a tick failed; pending charges are kept and retried")

    def tick(self, *, force: bool = False, run_db: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        """Write due batches; retire expired leases; return drained and idle ones. ``force``: write and return all.

        A lease whose write fails is logged and kept for the next tick; the others go on.
        With ``force`` the first failure is raised once all were tried.
        """
        run = run_db or self._run_db
        now = self._clock()
        with self._lock:
            for key, lease in list(self._active.items()):
                expired = now - lease.opened_at >= settings.TANDEM_LEASE_TTL_S
                idle = lease.requests == 0 and now - lease.last_used >= settings.TANDEM_LEASE_IDLE_S
                if force or expired or idle:
                    self._retire(key)
            leases = [*self._active.values(), *self._retired]
        failure: Exception | None = None
        for lease in leases:
            due = lease.pending and (
                force
                or lease.retired
                or len(lease.pending) >= settings.TANDEM_LEASE_BATCH
                or now - lease.pending[0].at >= settings.TANDEM_LEASE_FLUSH_S
            )
            if due:
                try:
                    self._flush(lease, run)
                except Exception as exc:  # noqa: BLE001 - logged in _flush, kept for the next tick
                    failure = failure or exc
        with self._lock:
            drained = [lease for lease in self._retired if lease.drained()]
            self._retired = [lease for lease in self._retired if lease not in drained]
        for lease in drained:
            try:
                self._close(lease, run)
            except Exception as exc:  # noqa: BLE001 - logged in _close, kept for the next tick
                failure = failure or exc
        if force and failure is not None:
            raise failure

    def _flush(self, lease: _Lease, run: Callable[[Callable[[], Any]], Any]) -> None:
        with self._lock:
            batch, lease.pending = lease.pending, []
            if not batch:
                return
            lease.writing += 1

        def write() -> None:
            with transaction.atomic():
                services.budget_lease_settle(lease=lease.row, charges=[c for p in batch for c in p.charges])
                if self._on_flush is not None:
                    self._on_flush([p.payload for p in batch])

        try:
            run(write)
        except Exception:
            with self._lock:
                lease.pending[:0] = batch
                lease.writing -= 1
            # Never dropped: the batch goes back in front of what came since, to be tried
            # again next tick. Its costs stay counted in the lease, so nothing is admitted
            # against money these requests already spent.
            log.exception(
                "budget lease %s: writing a batch of %d ledger rows failed; retrying",
                lease.row.pk,
                len(batch),
                extra={"request_ids": [c.usage.request_id for p in batch for c in p.charges]},
            )
            raise
        with self._lock:
            lease.writing -= 1
        for pending in batch:
            pending.future.set_result(None)

    def _close(self, lease: _Lease, run: Callable[[Callable[[], Any]], Any]) -> None:
        try:
            run(lambda: services.budget_lease_close(lease=lease.row))
        except errors.AlreadySettled:
            log.error("budget lease %s was closed by someone else (the stale-lease task?)", lease.row.pk)
        except Exception:
            log.exception("budget lease %s: returning it failed; retrying", lease.row.pk)
            with self._lock:
                self._retired.append(lease)
            raise

    # shutdown and tests ------------------------------------------------------------------------
    def write_pending(self) -> None:
        """Write every pending charge now, keeping the leases (tests; whoever must see the rows). Raises if one fails."""
        for lease in self.leases():
            if lease.pending:
                self._flush(lease, self._run_db)

    def close_all(self, *, on_this_thread: bool = False) -> None:
        """Write every pending charge and return every lease (shutdown, tests). Raises if a write fails.

        ``on_this_thread``: run the database work here, not through ``run_db`` (at exit,
        the DB thread's executor no longer takes work).
        """
        self.tick(force=True, run_db=(lambda fn: fn()) if on_this_thread else None)

    def _forget_in_child(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held by another thread at the fork
        self._opened = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._keeper = None
        self._active, self._retired, self._opening, self._refused = {}, [], set(), {}
        self.holder = f"{socket.gethostname()}:{os.getpid()}"

    def forget_all(self) -> None:
        """Drop every lease from memory without touching the database (tests whose database was emptied)."""
        with self._lock:
            for lease in [*self._active.values(), *self._retired]:
                for pending in lease.pending:
                    pending.future.cancel()
            self._active.clear()
            self._retired.clear()
            self._opening.clear()
            self._refused.clear()

    def leases(self) -> list[_Lease]:
        with self._lock:
            return [*self._active.values(), *self._retired]
