"""Money held for a request before its engine runs: the worst case at the pinned price, on a budget lease or a reservation.

``hold_worst_case`` prices the worst case (``max_tokens``, the price's GPU ceiling) and
holds it, so no pattern of concurrent requests can overspend a hard budget. The price is
pinned with the hold: the settlement charges with the same price book, so a book
published mid-request cannot make the charge exceed what was held. A request that fails
over to another tier before its first token is re-priced from the same book
(``price_in_pinned_book``), and ``hold_more`` holds the difference when that tier is dearer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from decimal import ROUND_UP, Decimal
from typing import TYPE_CHECKING

from django.conf import settings

from inference.errors import BudgetExceeded, GatewayError, RequestIdConflict
from inference.principals import Principal
from inference.runtime import db, db_read_once
from tenants import errors as tenant_errors
from tenants import selectors as tenant_selectors
from tenants import services as tenant_services
from tenants.leases import LeaseHold, LeasePool

if TYPE_CHECKING:
    from tenants.models import Price, Reservation


class GpuPace:
    """GPU milliseconds per token of this process's recent completions, per model and tier.

    A hold prices GPU time at the slowest of the last ``PACE_SAMPLES`` completions plus
    ``PACE_MARGIN``, not at the price's loose ceiling (100 ms a token in the demo book,
    some 40 times what the demo pair takes): a tenant near its hard limit is then refused
    only when what is left would not pay for the request. Until ``PACE_MIN_SAMPLES`` have
    been seen, the ceiling holds.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], deque[Decimal]] = {}

    def record(self, model: str, tier: str, gpu_ms: Decimal, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            seen = self._seen.setdefault((model, tier), deque(maxlen=PACE_SAMPLES))
            seen.append(gpu_ms / tokens)

    def per_token(self, model: str, tier: str) -> Decimal | None:
        """The GPU time per token a hold counts on, or None (too few seen: the price's ceiling)."""
        if not settings.TANDEM_HOLD_GPU_FROM_PACE:
            return None
        with self._lock:
            seen = self._seen.get((model, tier))
            if seen is None or len(seen) < PACE_MIN_SAMPLES:
                return None
            slowest = max(seen)
        return (slowest * PACE_MARGIN).quantize(Decimal("0.001"), ROUND_UP)

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()


PACE_SAMPLES = 512
PACE_MIN_SAMPLES = 32
PACE_MARGIN = Decimal("1.25")
gpu_pace = GpuPace()


def worst_case(*, price: Price, prompt_tokens: int, max_tokens: int) -> Decimal:
    """What a request on ``price`` holds: its worst case, GPU time at the measured pace (``GpuPace``)."""
    return tenant_services.cost_estimate_max(
        price=price,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        gpu_ms_per_token=gpu_pace.per_token(price.model, price.tier),
    )


@dataclass
class Hold:
    """What one request holds: on a lease (in memory) or a reservation row, never both."""

    lease_hold: LeaseHold | None = None
    reservation: Reservation | None = None

    @property
    def amount(self) -> Decimal:
        if self.lease_hold is not None:
            return self.lease_hold.amount
        assert self.reservation is not None
        return self.reservation.amount

    @property
    def held(self) -> bool:
        return self.lease_hold is not None or self.reservation is not None


async def price_for(*, model: str, tier: str) -> Price:
    """The active price of ``model`` on ``tier``: from this process's cache, else the database."""
    price = tenant_selectors.price_active_cached(model=model, tier=tier)
    if price is not None:
        return price
    try:
        return await db_read_once(("price", model, tier), tenant_selectors.price_active, model=model, tier=tier)
    except tenant_errors.PriceNotFound as exc:
        raise GatewayError(f"{exc}: the operator must publish a price before this model can be served") from None


async def hold_worst_case(
    hold: Hold,
    *,
    leases: LeasePool,
    principal: Principal,
    request_id: str,
    request_id_fresh: bool,
    price: Price,
    prompt_tokens: int,
    max_tokens: int,
    replay: bool = False,
) -> None:
    """Hold the worst case on ``hold``: against this process's budget lease when it can, else a reservation.

    ``replay``: the answer comes from the result cache, whose worst case is its tokens at the cache rate.

    The lease path needs no database round trip (the price is cached, admission is in
    memory). A reservation is made when leases are off, when the client chose the
    request id (its uniqueness is checked by the reservation row), when the budget is
    too near its hard limit for a lease (refusals then happen exactly at the limit), or
    while another request is opening this key's lease. Raises ``BudgetExceeded`` (402)
    or ``RequestIdConflict`` (409) and holds nothing when it cannot.
    """
    if replay:
        amount = tenant_services.cache_cost_max(price=price, prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    else:
        amount = worst_case(price=price, prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    if settings.TANDEM_BUDGET_LEASES and request_id_fresh:
        tenant_id, api_key_id = principal.tenant_id, principal.api_key_id
        hold.lease_hold = leases.admit(tenant_id=tenant_id, api_key_id=api_key_id, amount=amount)
        if hold.lease_hold is None:
            hold.lease_hold = await db(leases.open)(tenant_id=tenant_id, api_key_id=api_key_id, amount=amount)
        if hold.lease_hold is not None:
            return
    hold.reservation = await _reserve_waiting(principal, request_id, amount, price)


async def _reserve_waiting(principal: Principal, request_id: str, amount: Decimal, price: Price) -> Reservation:
    """A reservation; refused for a budget that in-flight requests hold, it waits (briefly) for them to settle.

    Near a hard limit most of what is left may be held by requests still running, each
    for its worst case; they settle for less and give the rest back. Refusing at once
    would leave that money unspent, so the request retries, backing off, for up to
    ``TANDEM_BUDGET_WAIT_S``; it is refused at once when even the end of every hold
    would not leave room.
    """
    deadline = time.monotonic() + settings.TANDEM_BUDGET_WAIT_S
    pause = BUDGET_RETRY_FIRST_S
    while True:
        try:
            return await db(_reserve)(principal, request_id, amount, price)
        except BudgetExceeded as refused:
            if not refused.may_fit_later or time.monotonic() + pause > deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, BUDGET_RETRY_MAX_S)


BUDGET_RETRY_FIRST_S = 0.02
BUDGET_RETRY_MAX_S = 0.25


def _reserve(principal: Principal, request_id: str, amount: Decimal, price: Price) -> Reservation:
    """Hold the worst case on the tenant's budgets with a reservation row (sync: runs in a DB thread)."""
    from tenants.models import ApiKey, Tenant

    # the principal was resolved from the database moments ago: ids are all the services
    # need, and two fewer queries on every request's critical path
    tenant = Tenant(pk=principal.tenant_id)
    key = ApiKey(pk=principal.api_key_id, tenant_id=tenant.pk) if principal.api_key_id else None
    try:
        return tenant_services.budget_reserve(
            tenant=tenant, api_key=key, amount=amount, request_id=request_id, price=price
        )
    except tenant_errors.BudgetExceeded as exc:
        refused = BudgetExceeded(str(exc))
        refused.may_fit_later = exc.may_fit_later
        raise refused from None
    except tenant_errors.InvalidInput:  # the request id was used before (by any tenant)
        raise RequestIdConflict("this request id was already used; send a new X-Request-Id") from None


async def hold_more(
    hold: Hold,
    *,
    leases: LeasePool,
    principal: Principal,
    request_id: str,
    amount: Decimal,
    price: Price,
    delivered: bool = False,
) -> None:
    """Hold at least ``amount`` in all (a request moving to a dearer tier), or raise ``BudgetExceeded`` (402).

    Only the difference is asked for: from the same lease when it has room; else, for a
    request that has delivered nothing yet, its lease hold is given back and the whole
    amount reserved instead (its id is the server's, never reserved before). A request
    that has ``delivered`` tokens keeps its lease hold (what it owes is counted there), so
    a lease without room refuses.
    """
    extra = amount - hold.amount
    if extra <= 0:
        return
    if hold.lease_hold is not None:
        if leases.extend(hold.lease_hold, extra):
            return
        if delivered:
            raise BudgetExceeded("the budget lease has no room for the next tier's worst case; the answer ends here")
        leases.release(hold.lease_hold)
        hold.lease_hold = None
        hold.reservation = await db(_reserve)(principal, request_id, amount, price)
        return
    assert hold.reservation is not None

    def extend() -> None:
        try:
            tenant_services.reservation_extend(reservation=hold.reservation, amount=extra)
        except tenant_errors.BudgetExceeded as exc:
            raise BudgetExceeded(str(exc)) from None

    await db(extend)()


async def price_in_pinned_book(*, pinned: Price, model: str, tier: str) -> Price | None:
    """``model`` on ``tier`` in the book ``pinned`` came from: the settlement prices every leg with that book."""
    try:
        return await db(tenant_selectors.price_in_book)(book_id=pinned.book_id, model=model, tier=tier)
    except tenant_errors.PriceNotFound:
        return None
