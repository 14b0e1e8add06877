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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from inference import metrics
from inference.completion import UsageSummary
from inference.holds import gpu_pace
from inference.journal import Journal
from inference.runtime import db_from_thread
from tenants import errors as tenant_errors
from tenants import services as tenant_services
from tenants.leases import LeasePool
from tenants.tiers import Tier

if TYPE_CHECKING:
    from inference.stream import GatewayStream, Leg
    from tenants.models import Price, Reservation

log = logging.getLogger(__name__)

# A later leg's ledger id: the request's id, this, the leg's number. No client id has it
# (``X-Request-Id`` allows letters, digits and ``_.:-``; the gateway refuses it in any id).
LEG_ID_SEPARATOR = "~"


@dataclass(frozen=True)
class Charge:
    summary: UsageSummary
    write: Callable[[], None] | None  # the ledger write (sync, in a DB thread); None when nothing is owed
    batched: concurrent.futures.Future | None = None  # or: the lease batch that will write the row


def charge(stream: GatewayStream, outcome: str, error: str) -> Charge:
    """What ``stream`` delivered and costs, worked out in memory; and the write that records it.

    Money: each leg's cost is ``settlement_costs`` at the price pinned when the money was
    held and the held amount, the same inputs ``usage_settle_legs`` (or the lease batch)
    reads back, so the figure sent to the client is the figure the ledger gets. Nothing
    here touches the database, so the final frame need not wait for a commit.
    """
    now = time.perf_counter()
    hold = stream.hold
    legs: list[Leg] = []
    outcomes: list[tuple[str, str]] = []
    if hold.held:  # else refused before anything was held (the price may not even be known): nothing to charge
        *done, current = stream.legs()
        # A leg that ended before the request is owed for what it produced (delivered, or held back
        # for an escalation); the last one also when it completed empty (it still read its prompt).
        legs = [leg for leg in done if leg.tally.delivered]
        outcomes = [(leg.outcome, leg.error) for leg in legs]
        if current.tally.delivered or outcome == "completed":
            legs.append(current)
            outcomes.append((outcome, error))
    usages = [leg_usage(stream, leg, index, *outcomes[index]) for index, leg in enumerate(legs)]
    priced = [(leg.price, usage) for leg, usage in zip(legs, usages, strict=True)]
    costs = tenant_services.settlement_costs(legs=priced, held=hold.amount) if legs else []
    for usage in usages:  # the pace the next requests' holds count on
        if usage.completion_tokens and usage.gpu_ms:
            gpu_pace.record(usage.model, usage.route_tier, usage.gpu_ms, usage.prompt_tokens + usage.completion_tokens)
    summary = _summary(stream, outcome, usages, costs, now)

    write: Callable[[], None] | None = None
    if not hold.held:
        pass  # refused before anything was held: nothing to settle
    elif not legs:  # nothing delivered (nor generated for an escalation): nothing owed
        if hold.lease_hold is not None:
            leases.release(hold.lease_hold)  # the worst case goes back to the lease
        else:
            assert hold.reservation is not None
            write = functools.partial(tenant_services.reservation_release, reservation=hold.reservation)
        if outcome == "error" and error:  # its tiers failed before a first token (``_fail``; a cancel has no error)
            write = _with_failure_sample(write, slo_sample(stream, now, outcome))
    else:
        slo = slo_sample(stream, now, outcome)
        _observe_soon(slo, summary)
        charges, left = [], hold.amount
        for (price, usage), cost in zip(priced, costs, strict=True):
            charges.append(tenant_services.LeaseCharge(usage=usage, price=price, held=left))
            left -= cost.total
        # On disk before it is counted: a process that dies before the row is written is charged by the journal.
        journal.settling(stream, charges, slo)
        if hold.lease_hold is not None:  # counted against the lease now; written with the lease's next batch
            return Charge(summary, None, leases.settle(hold.lease_hold, charges, slo))
        assert hold.reservation is not None
        total = sum((cost.total for cost in costs), Decimal(0))
        write = functools.partial(_settle_write, hold.reservation, [(u, p) for p, u in priced], total, slo)
    return Charge(summary, write)


def _observe_soon(slo: dict, summary: UsageSummary) -> None:
    """The request's metrics, on the event loop's next turn: after its reply, which the caller sends on this one.

    Its SLO figures are fixed already (``now`` was taken at its end); only counting them waits, which took
    0.06 ms of every request's way to its reply (demo pair, one session, timed in the server). Off the loop
    (nothing to wait for), now. ``metrics.observe_settled`` never raises: a failing metric fails no request.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        metrics.observe_settled(slo, summary)
        return
    loop.call_soon(metrics.observe_settled, slo, summary)


def leg_costs(stream: GatewayStream, legs: list[Leg]) -> list[tenant_services.CostBreakdown]:
    """What ``legs`` (ended with their own outcomes) cost so far, against what the stream holds."""
    usages = [leg_usage(stream, leg, index, leg.outcome or "cancelled", leg.error) for index, leg in enumerate(legs)]
    priced = [(leg.price, usage) for leg, usage in zip(legs, usages, strict=True)]
    return tenant_services.settlement_costs(legs=priced, held=stream.hold.amount)


def leg_usage(stream: GatewayStream, leg: Leg, index: int, outcome: str, error: str) -> tenant_services.Usage:
    from inference.stream import leg_token_counts

    tally, route, entry = leg.tally, leg.route, stream.entry
    stats = getattr(leg.completion, "stats", None)
    finish = getattr(stats, "finish_reason", None)
    prompt_tokens, completion_tokens = leg_token_counts(leg, outcome)
    first = tally.first_token_at
    return tenant_services.Usage(
        request_id=stream.request_id if index == 0 else f"{stream.request_id}{LEG_ID_SEPARATOR}{index}",
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
        draft_rejections=tally.rejections,
        gpu_ms=Decimal(str(round(tally.gpu_ms, 3))),
        outcome=outcome,
        finish_reason=finish.value if outcome == "completed" and finish is not None else "",
        error=error,
        ttft_ms=(first - tally.started) * 1e3 if first is not None else None,
        duration_ms=(time.perf_counter() - tally.started) * 1e3,
        leg=index,
        leg_of=stream.request_id,
        escalation=leg.escalation,
        route_signals=dict(route.signals),
        upstream=getattr(stats, "upstream", "") or "",
        source=stream.source,
        replayed_cost=_replayed_cost(stream, leg.price, prompt_tokens, completion_tokens),
        latency_class=stream.call.latency_class,
    )


def _replayed_cost(stream: GatewayStream, price, prompt_tokens: int, completion_tokens: int) -> Decimal | None:
    """What generating the replayed part of a cached answer again would cost (its saving is the difference)."""
    answer = stream.replayed
    if answer is None or price is None:
        return None
    share = Decimal(completion_tokens) / Decimal(max(len(answer.token_ids), 1))
    return tenant_services.generation_cost(
        price=price,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        drafted_tokens=Decimal(answer.drafted_tokens) * share,
        gpu_ms=Decimal(answer.gpu_ms) * share,
    ).total


def _summary(
    stream: GatewayStream,
    outcome: str,
    usages: list[tenant_services.Usage],
    costs: list[tenant_services.CostBreakdown],
    now: float,
) -> UsageSummary:
    zero = Decimal(0)
    cost = {
        "edge": sum((c.edge for c in costs), zero),
        "verifier": sum((c.verifier for c in costs), zero),
        "cloud": sum((c.cloud for c in costs), zero),
        "total": sum((c.total for c in costs), zero),
    }
    first = stream.first_token_at
    legs: tuple[dict, ...] = ()
    if len(usages) > 1:
        legs = tuple(
            {
                "request_id": u.request_id,
                "route": {"tier": u.route_tier, "reason": u.route_reason},
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "outcome": u.outcome,
                "escalation": u.escalation,
                "cost": format(c.total, "f"),
            }
            for u, c in zip(usages, costs, strict=True)
        )
    return UsageSummary(
        request_id=stream.request_id,
        prompt_tokens=sum(u.prompt_tokens for u in usages) if usages else stream.prompt_tokens,
        completion_tokens=sum(u.completion_tokens for u in usages),
        drafted_tokens=sum((u.drafted_tokens for u in usages), zero),
        accepted_tokens=sum(u.accepted_tokens for u in usages),
        gpu_ms=sum((u.gpu_ms for u in usages), zero),
        cost=cost,
        outcome=outcome,
        finish_reason=usages[-1].finish_reason if usages else "",
        ttft_ms=(first - stream.started) * 1e3 if first is not None else None,
        duration_ms=(now - stream.started) * 1e3,
        route=stream.route,
        legs=legs,
    )


def _settle_write(
    reservation: Reservation,
    legs: list[tuple[tenant_services.Usage, Price]],
    total: Decimal,
    slo: dict,
) -> None:
    """The ledger rows (one per leg) and the SLO sample, in one commit."""
    from inference.models import SloSample

    with transaction.atomic():
        records = tenant_services.usage_settle_legs(reservation=reservation, legs=list(legs))
        charged = sum((r.cost_total for r in records), Decimal(0))
        if charged != total:  # one function computed both: this would be a bug, and a loud one
            log.error(
                "request %s: the ledger charged %s but the client was told %s",
                reservation.request_id,
                charged,
                total,
            )
        SloSample.objects.create(**slo)


def slo_sample(stream: GatewayStream, now: float, outcome: str) -> dict:
    """The request's SLO sample (one that failed before its first token has no TTFT and no tokens)."""
    first = stream.first_token_at
    delivered = stream.delivered
    return {
        "request_id": stream.request_id,
        "tenant_id": stream.principal.tenant_id,
        "model": stream.entry.name,
        "route_tier": stream.route.tier.value,
        "ttft_ms": (first - stream.started) * 1e3 if first is not None else None,
        "inter_token_ms": (now - first) * 1e3 / (delivered - 1) if first and delivered > 1 else None,
        "e2e_ms": (now - stream.started) * 1e3,
        "tokens": delivered,
        "outcome": outcome,
        "latency_class": stream.call.latency_class,
        "source": stream.source,
        "fallback": stream.failed_over,
        "queued_ms": stream.slot.waited_s * 1e3 if stream.slot is not None else 0.0,
    }


def _with_failure_sample(write: Callable[[], None] | None, sample: dict) -> Callable[[], None]:
    """``write`` (the release of the held money, if any) and the failure's SLO sample, in one commit."""

    def both() -> None:
        from inference.models import SloSample

        with transaction.atomic():
            if write is not None:
                write()
            SloSample.objects.create(**sample)

    return both


# Ledger writes still in flight (write-behind): referenced here so none is garbage-collected
# half-way, and so shutdown and tests can wait for them (``ledger_writes_flush``).
_ledger_writes: set[asyncio.Future] = set()


LEDGER_RETRY_S = 60.0  # a ledger write the database refused (restarting, failing over) is tried again this long


async def _write_retrying(request_id: str, write: Callable[[], Awaitable[None]]) -> None:
    """``write()``, tried again while the database cannot be reached (a restart): the row is not lost.

    A write whose commit went through before the connection broke is found settled on the
    next try (``AlreadySettled``): done, never charged twice.
    """
    from django.db import InterfaceError, OperationalError

    deadline = time.monotonic() + LEDGER_RETRY_S
    pause = 0.1
    while True:
        try:
            await write()
            return
        except tenant_errors.AlreadySettled:
            return
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("request %s: the ledger write failed (%s); trying again in %.1f s", request_id, exc, pause)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)


def ledger_write(request_id: str, write: Callable[[], Awaitable[None]]) -> asyncio.Future:
    future = asyncio.ensure_future(_write_retrying(request_id, write))
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


# This process's settlement journal (the charges a dead process still owes) and budget leases,
# whose DB work runs where the rest of the gateway's does.
journal = Journal(settings.TANDEM_JOURNAL_DIR)
leases = LeasePool(run_db=db_from_thread, on_flush=_slo_samples_write, on_open=journal.lease_opened)


@atexit.register
def _leases_return_at_exit() -> None:
    """Write what is pending and give back every lease's unused part when the process ends normally."""
    try:
        leases.close_all(on_this_thread=True)
    except Exception:  # noqa: BLE001 - at exit: said loudly; the stale-reservation task returns the rest
        log.exception("budget leases: returning them at exit failed")
