"""An admitted, paid-for completion in flight: iterate it for token deltas; it settles exactly what was delivered.

``gateway.start`` builds a :class:`GatewayStream`, holds its money, launches its engine
and waits for the first token. The adapter then takes tokens (``__anext__``, or every
token at hand with ``take_at_hand``); a token taken is a token charged, so adapters
send what they take at once. ``aclose`` stops the engine and settles what was sent;
``settled`` waits for the ledger row. A failure before the first token fails over
through the router (``inference.router.fail_over``) to the next tier the policy allows.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.conf import settings

from inference import settlement
from inference.admission import admission
from inference.breakers import BreakerState
from inference.cloud import CloudEngine, CloudRequest
from inference.completion import CompletionCall, TokenDelta, UsageSummary
from inference.engines import Engine, ModelEntry, arequest_for
from inference.errors import ContextTooLong, GatewayError, Overloaded, UpstreamFailed
from inference.handoff import END, pump_on_loop, pump_on_thread
from inference.holds import Hold, hold_more, price_in_pinned_book
from inference.principals import Principal
from inference.router import Route, fail_over
from inference.runtime import db
from speculative import errors as core_errors
from speculative.engine import CompletionRequest
from speculative.types import CompletionStats, Provenance, TokenEvent
from tenants import services as tenant_services

if TYPE_CHECKING:
    from tenants.models import Price

log = logging.getLogger(__name__)

# The most tokens an adapter takes for one frame or one write (``take_at_hand``): a client
# far behind a fast engine still gets frames of a bounded size.
MAX_DELTAS_AT_ONCE = 64


@dataclass
class Tally:
    """What the client has been handed so far: the counts the settlement charges."""

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    delivered: int = 0
    accepted: int = 0
    gpu_ms: float = 0.0
    drafted: float = 0.0
    texts: list[str] = field(default_factory=list)  # each delivered token's text (a cloud tier counts them)


class GatewayStream:
    """An admitted, paid-for completion in flight. Iterate for :class:`TokenDelta`; ``usage`` at the end."""

    def __init__(self, principal: Principal, call: CompletionCall, entry: ModelEntry, route: Route):
        self.principal, self.call, self.entry, self.route = principal, call, entry, route
        self.request_id = call.request_id
        self.model = entry.name
        self.created = int(time.time())
        self.usage: UsageSummary | None = None
        self.prompt_tokens = 0
        self.hold = Hold()
        self.price: Price | None = None  # pinned when the money was held
        self.tally = Tally()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self._first: object | None = None  # the next item, taken from the queue early (by start() or ready())
        self._completion: object | None = None  # the engine's stream (its stats, once it ends)
        self._pump: asyncio.Task | None = None  # an async engine's pump
        self._settlement: asyncio.Future | None = None
        self._ledger: asyncio.Future | None = None  # the ledger write, once scheduled
        self._probe = False  # this request holds its tier's half-open probe

    # set-up, from gateway.start() -----------------------------------------------------------
    def launch(self, engine: Engine, request: CompletionRequest | CloudRequest) -> None:
        """Start ``engine`` on ``request``; its events arrive on this stream's queue."""
        breaker = self.entry.breaker(self.route.tier)
        # A half-open breaker lets one request probe its tier; this one holds that right until its tier answers.
        self._probe = breaker is not None and breaker.state is BreakerState.HALF_OPEN and breaker.acquire()
        if isinstance(engine, CloudEngine):  # async: pumped on the loop, no thread
            assert isinstance(request, CloudRequest)
            cloud = engine.astream(request)
            self._completion = cloud
            self._pump = pump_on_loop(cloud, self._queue, self._cancel)
            return
        assert isinstance(request, CompletionRequest)
        kwargs = {"max_tokens": request.max_tokens, "sampling": request.sampling, "stop": request.stop}
        local = engine.stream(request.prompt_ids, **kwargs)
        self._completion = local
        pump_on_thread(local, self._queue, self._cancel, f"stream-{self.request_id}")

    async def first(self) -> None:
        """Wait for the first item; fail over before it if the tier fails; raise if nothing can serve."""
        tried = {self.route.tier}
        first = await self._queue.get()
        while isinstance(first, BaseException) and _tier_failure(first):
            self._record(first)
            route = fail_over(self.entry, self.route, self.principal.tenant_id, tried=frozenset(tried))
            if route is None or not await self._switch_to(route):
                break
            log.warning("request %s: %s failed (%s), served from %s", self.request_id, tried, first, route.tier)
            tried.add(route.tier)
            first = await self._queue.get()
        if isinstance(first, BaseException):
            raise await self._fail(first)
        if isinstance(first, TokenEvent):
            self._record(None)
        self._first = first

    async def _switch_to(self, route: Route) -> bool:
        """Serve this request from ``route`` instead; nothing was delivered. False when that tier has no price.

        The new tier is priced from the book pinned when the money was held, and what is
        held grows to its worst case when that is dearer (``hold_more``; a refusal raises
        BudgetExceeded, which ends the request with nothing charged).
        """
        engine, request = await arequest_for(self.entry, route.tier, self.call, self.principal.tenant_id)
        assert self.price is not None
        price = await price_in_pinned_book(pinned=self.price, model=self.entry.name, tier=route.tier.value)
        if price is None:
            return False
        prompt_tokens = len(request.prompt_ids)
        worst = tenant_services.cost_estimate_max(
            price=price, prompt_tokens=prompt_tokens, max_tokens=request.max_tokens
        )
        await hold_more(
            self.hold,
            leases=settlement.leases,
            principal=self.principal,
            request_id=self.request_id,
            amount=worst,
            price=price,
        )
        self.price, self.route, self.prompt_tokens = price, route, prompt_tokens
        self.launch(engine, request)
        return True

    def _record(self, failure: BaseException | None) -> None:
        """Tell the route's breaker how its tier did: a refused connection trips it; a first token closes it."""
        breaker = self.entry.breaker(self.route.tier)
        if breaker is None:
            return
        if failure is None:
            breaker.record_success()
        elif isinstance(failure, core_errors.VerifierUnavailableError):
            breaker.trip(str(failure))
        else:
            breaker.record_failure(str(failure))
        self._probe = False

    # iteration --------------------------------------------------------------------------
    def __aiter__(self) -> GatewayStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self.usage is not None:
            raise StopAsyncIteration
        if self._first is not None:
            item, self._first = self._first, None
        else:
            item = await self._queue.get()
            if self._cancel.is_set():  # closed while this read waited: nothing more is delivered
                raise StopAsyncIteration
        if item is END:
            await self._settle("completed")
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise await self._fail(item)
        assert isinstance(item, TokenEvent)
        return self._deliver(item)

    def _deliver(self, event: TokenEvent) -> TokenDelta:
        """The token goes to the client now: from here on it is charged."""
        tally = self.tally
        if tally.first_token_at is None:
            tally.first_token_at = time.perf_counter()
        tally.delivered += 1
        tally.gpu_ms += event.gpu_ms
        tally.drafted += event.drafted
        tally.texts.append(event.text)
        if event.provenance is Provenance.DRAFTED:
            tally.accepted += 1
        return TokenDelta(tally.delivered - 1, event.text, event.token_id, event.provenance)

    def at_hand(self) -> bool:
        """Whether ``__anext__`` would return (or stop) without waiting for the engine.

        Adapters use it to skip their wait machinery (a task and a timer per token) when
        tokens arrive faster than they are sent; taking an item at hand cannot suspend
        before the token is handed over, so the charging rule of ``ready`` still holds.
        """
        return self._first is not None or self.usage is not None or not self._queue.empty()

    def take_at_hand(self, limit: int = MAX_DELTAS_AT_ONCE) -> list[TokenDelta]:
        """Every token already at hand (up to ``limit``), taken without waiting; ``[]`` if none is.

        For adapters that send several tokens in one frame or one write: a speculative
        round hands over its accepted tokens and the verifier's at once, and an engine ahead
        of a slow client queues more. Each token taken is charged, so the adapter sends the
        whole list at once, before it awaits anything. The end of the stream or a failure is
        left in place for ``__anext__``, which settles or raises.
        """
        taken: list[TokenDelta] = []
        if self.usage is not None or self._cancel.is_set():
            return taken
        while len(taken) < limit:
            if self._first is not None:
                item, self._first = self._first, None
            elif not self._queue.empty():
                item = self._queue.get_nowait()
            else:
                break
            if not isinstance(item, TokenEvent):  # the end, or the engine's error
                self._first = item
                break
            taken.append(self._deliver(item))
        return taken

    async def ready(self) -> None:
        """Wait until the next item is at hand, without taking it. Safe to cancel; charges nothing.

        Adapters wait on this with a timeout (keep-alives), then take the item with
        ``__anext__``, which then hands a token over without suspending: a client that goes
        away while the adapter waits is never charged for a token it was not sent.
        """
        if self._first is None and self.usage is None:
            self._first = await self._queue.get()

    # the end ------------------------------------------------------------------------------
    async def aclose(self) -> UsageSummary | None:
        """Stop generating (client gone, cancel frame); settle exactly what was delivered."""
        self._stop()
        if self.usage is None:
            await self._settle("cancelled")
        return self.usage

    def _stop(self) -> None:
        self._cancel.set()
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        if self._probe:  # stopped before its tier answered: the probe gave no verdict
            breaker = self.entry.breaker(self.route.tier)
            if breaker is not None:
                breaker.release()
            self._probe = False

    async def _fail(self, exc: BaseException) -> GatewayError:
        """The engine failed: settle what was delivered, and say what went wrong."""
        self._stop()
        if isinstance(exc, GatewayError):
            error = exc
        elif isinstance(exc, core_errors.VerifierUnavailableError):
            self._record(exc)
            error = UpstreamFailed(f"the verifier became unavailable: {exc}; new requests go to another tier")
        elif isinstance(exc, core_errors.VerifierBusyError | core_errors.DraftBusyError):
            error = Overloaded(str(exc))
        elif isinstance(exc, core_errors.ContextOverflowError):
            error = ContextTooLong(str(exc))
        else:
            log.error("request %s: engine failed", self.request_id, exc_info=exc)
            error = UpstreamFailed(f"the engine failed: {type(exc).__name__}")
        await self._settle("error", error=error.message)
        return error

    async def _settle(self, outcome: str, error: str = "") -> None:
        """Settle once (the first outcome wins); every caller waits for that one settlement.

        Shielded: a caller cancelled mid-settlement (its client went away) leaves it running,
        so the ``aclose()`` that follows waits for it instead of settling a second time.
        Returns once ``usage`` is set: with ``TANDEM_SETTLE_AFTER_REPLY`` the ledger row is
        written behind the reply (``settled()`` waits for it), else before this returns.
        """
        if self._settlement is None:
            self._settlement = asyncio.ensure_future(self._settle_once(outcome, error))
        await asyncio.shield(self._settlement)

    async def _settle_once(self, outcome: str, error: str) -> None:
        try:
            charge = settlement.charge(self, outcome, error)
        finally:
            admission.leave(self.principal.tenant_id)
        self.usage = charge.summary
        if charge.batched is not None:
            self._ledger = asyncio.wrap_future(charge.batched)
            if not settings.TANDEM_SETTLE_AFTER_REPLY:
                settlement.leases.flush_soon()
                await asyncio.shield(self._ledger)
            return
        if charge.write is None:
            return
        self._ledger = settlement.ledger_write(self.request_id, db(charge.write)())
        if not settings.TANDEM_SETTLE_AFTER_REPLY:
            await asyncio.shield(self._ledger)

    async def settled(self) -> None:
        """Wait until the ledger holds this stream's charge; raises if writing it failed."""
        if self._settlement is not None:
            await asyncio.shield(self._settlement)
        if self._ledger is not None:
            if self.hold.lease_hold is not None:
                settlement.leases.flush_soon()  # someone waits for this row: write the lease's batch now
            await asyncio.shield(self._ledger)

    def completion_stats(self) -> CompletionStats | None:
        """The engine's own stats of this completion (its finish reason), once it has run."""
        return getattr(self._completion, "stats", None)

    def token_counts(self, outcome: str) -> tuple[int, int]:
        """(prompt, completion) tokens to charge: counted here, or as an upstream reported them (the cloud tier)."""
        counts = getattr(self._completion, "token_counts", None)
        if counts is None:
            return self.prompt_tokens, self.tally.delivered
        return counts("".join(self.tally.texts), self.tally.delivered, outcome == "completed")


def _tier_failure(exc: BaseException) -> bool:
    """A failure of the tier itself (worth another tier), not of the request (which any tier would refuse)."""
    return isinstance(exc, core_errors.VerifierUnavailableError | UpstreamFailed)
