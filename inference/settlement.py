"""Settling a finished stream: the charge for exactly what was delivered, the ledger row, the SLO sample.

``charge(stream, outcome)`` works out in memory what the stream delivered and what it
costs, at the price pinned when its money was held, and returns the write that records
it (or the lease batch that will). This process's budget leases (``leases``) live here:
their batches write the ledger rows and SLO samples of the requests admitted against them.

Write-behind (``TANDEM_SETTLE_AFTER_REPLY``): the usage and its cost are set on
``stream.usage`` at once, so the adapter sends the final frame without waiting for a
commit; the ledger row (written once, with exactly that cost) and the SLO sample follow
on a DB thread. A failed write is logged as an error and leaves the reservation held,
never freed as if it had been paid.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from django.db import transaction
from django.utils import timezone

from inference.completion import UsageSummary
from inference.runtime import db_from_thread
from tenants import services as tenant_services
from tenants.leases import LeasePool
from tenants.tiers import Tier

if TYPE_CHECKING:
    from inference.stream import GatewayStream
    from tenants.models import Price, Reservation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Charge:
    summary: UsageSummary
    write: Callable[[], None] | None  # the ledger write (sync, in a DB thread); None when nothing is owed
    batched: concurrent.futures.Future | None = None  # or: the lease batch that will write the row


def charge(stream: GatewayStream, outcome: str, error: str) -> Charge:
    """What ``stream`` delivered and costs, worked out in memory; and the write that records it.

    Money: the cost is ``settlement_cost`` at the price pinned when the money was held and
    the held amount, the same inputs ``usage_settle`` reads back from the reservation row,
    so the figure sent to the client is the figure the ledger gets. Nothing here touches
    the database, so the final frame need not wait for a commit.
    """
    tally, route, entry = stream.tally, stream.route, stream.entry
    stats = stream.completion_stats()
    now = time.perf_counter()
    first = tally.first_token_at
    duration_ms = (now - tally.started) * 1e3
    prompt_tokens, completion_tokens = stream.token_counts(outcome)
    usage = tenant_services.Usage(
        request_id=stream.request_id,
        user_id=stream.principal.user_id,
        tags=dict(stream.call.tags),
        route_tier=route.tier.value,
        route_reason=route.reason,
        policy_version=route.policy_version,
        model=entry.name,
        verifier_version=entry.verifier_version if route.tier is Tier.SPECULATIVE else "",
        draft_version=entry.draft_version if route.tier is not Tier.CLOUD else "",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        drafted_tokens=Decimal(str(round(tally.drafted, 3))),
        accepted_tokens=tally.accepted,
        gpu_ms=Decimal(str(round(tally.gpu_ms, 3))),
        outcome=outcome,
        finish_reason=stats.finish_reason.value if outcome == "completed" and stats and stats.finish_reason else "",
        error=error,
        ttft_ms=(first - tally.started) * 1e3 if first is not None else None,
        duration_ms=duration_ms,
    )
    zero = Decimal(0)
    cost: Mapping[str, Decimal] = {"edge": zero, "verifier": zero, "cloud": zero, "total": zero}

    def summary_of(cost: Mapping[str, Decimal]) -> UsageSummary:
        return UsageSummary(
            request_id=stream.request_id,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            drafted_tokens=usage.drafted_tokens,
            accepted_tokens=usage.accepted_tokens,
            gpu_ms=usage.gpu_ms,
            cost=cost,
            outcome=outcome,
            finish_reason=usage.finish_reason,
            ttft_ms=usage.ttft_ms,
            duration_ms=duration_ms,
            route=route,
        )

    hold, price = stream.hold, stream.price
    write: Callable[[], None] | None = None
    if not hold.held:
        pass  # refused before anything was held: nothing to settle
    elif tally.delivered == 0 and outcome != "completed":
        if hold.lease_hold is not None:
            leases.release(hold.lease_hold)  # nothing owed: the worst case goes back to the lease
        else:
            assert hold.reservation is not None
            write = functools.partial(tenant_services.reservation_release, reservation=hold.reservation)
    else:
        assert price is not None
        charged = tenant_services.settlement_cost(price=price, usage=usage, held=hold.amount)
        cost = {"edge": charged.edge, "verifier": charged.verifier, "cloud": charged.cloud, "total": charged.total}
        inter_token_ms = (now - first) * 1e3 / (tally.delivered - 1) if first and tally.delivered > 1 else None
        slo = {
            "request_id": stream.request_id,
            "tenant_id": stream.principal.tenant_id,
            "model": entry.name,
            "route_tier": route.tier.value,
            "ttft_ms": usage.ttft_ms,
            "inter_token_ms": inter_token_ms,
            "e2e_ms": duration_ms,
            "tokens": tally.delivered,
            "outcome": outcome,
        }
        if hold.lease_hold is not None:
            # Counted against the lease now; written with the lease's next batch.
            lease_charge = tenant_services.LeaseCharge(usage=usage, price=price, held=hold.lease_hold.amount)
            return Charge(summary_of(cost), None, leases.settle(hold.lease_hold, lease_charge, slo))
        assert hold.reservation is not None
        write = functools.partial(_settle_write, hold.reservation, usage, price, charged.total, slo)
    return Charge(summary_of(cost), write)


def _settle_write(reservation: Reservation, usage: tenant_services.Usage, price: Price, total: Decimal, slo: dict):
    """The ledger row and the SLO sample, in one commit."""
    from inference.models import SloSample

    with transaction.atomic():
        record = tenant_services.usage_settle(reservation=reservation, usage=usage, price=price)
        if record.cost_total != total:  # one function computed both: this would be a bug, and a loud one
            log.error(
                "request %s: the ledger charged %s but the client was told %s",
                usage.request_id,
                record.cost_total,
                total,
            )
        SloSample.objects.create(**slo)


# Ledger writes still in flight (write-behind): referenced here so none is garbage-collected
# half-way, and so shutdown and tests can wait for them (``ledger_writes_flush``).
_ledger_writes: set[asyncio.Future] = set()


def ledger_write(request_id: str, write: Awaitable[None]) -> asyncio.Future:
    future = asyncio.ensure_future(write)
    _ledger_writes.add(future)

    def done(f: asyncio.Future) -> None:
        _ledger_writes.discard(f)
        if f.cancelled():
            log.error("request %s: the ledger write was cancelled; its reservation stays held", request_id)
        elif f.exception() is not None:
            # Never swallowed: the client was told a cost the ledger does not hold yet. The
            # reservation stays held (the money is never spent twice), and the stale-
            # reservation task gives it back after TANDEM_RESERVATION_TTL_S.
            log.error("request %s: the ledger write failed", request_id, exc_info=f.exception())

    future.add_done_callback(done)
    return future


async def ledger_writes_flush() -> None:
    """Wait for every ledger write this process has in flight, lease batches included (tests; a graceful shutdown)."""
    while _ledger_writes:
        await asyncio.gather(*list(_ledger_writes), return_exceptions=True)
    if leases.leases():
        await asyncio.to_thread(leases.write_pending)


def _slo_samples_write(samples: list[dict]) -> None:
    """The SLO samples of a lease batch, in the batch's commit (as ``_settle_write`` does for one request)."""
    from inference.models import SloSample

    now = timezone.now()
    tenant_services.rows_insert(model=SloSample, rows=[{**sample, "created_at": now} for sample in samples])


# This process's budget leases: their DB work runs where the rest of the gateway's does.
leases = LeasePool(run_db=db_from_thread, on_flush=_slo_samples_write)


@atexit.register
def _leases_return_at_exit() -> None:
    """Write what is pending and give back every lease's unused part when the process ends normally."""
    try:
        leases.close_all(on_this_thread=True)
    except Exception:  # noqa: BLE001 - at exit: said loudly; the stale-reservation task returns the rest
        log.exception("budget leases: returning them at exit failed")
