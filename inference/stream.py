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
import collections
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from django.conf import settings

from inference import settlement
from inference.arrivals import arrived
from inference.breakers import BreakerState
from inference.cache import CACHED_TIERS, CachedAnswer, exact_cache, in_flight
from inference.cloud import CloudEngine, CloudRequest, CloudTokenEvent
from inference.completion import CompletionCall, TokenDelta, UsageSummary
from inference.engines import Engine, ModelEntry, arequest_for
from inference.errors import ContextTooLong, GatewayError, Overloaded, UpstreamFailed
from inference.handoff import END, pump_on_loop, pump_on_thread
from inference.holds import Hold, hold_more, price_in_pinned_book, worst_case
from inference.journal import JournalState
from inference.limits import limiter
from inference.principals import Principal
from inference.queueing import Slot
from inference.redaction import Restoring, serving_call
from inference.router import BUILTIN_POLICY, Policy, Route, escalate, fail_over
from inference.runtime import db
from inference.semantic_cache import SemanticLookup, semantic_cache
from speculative import errors as core_errors
from speculative.completion import CompletionRequest
from speculative.types import CompletionStats, Provenance, TokenEvent, TokenRun
from tenants.tiers import Tier

if TYPE_CHECKING:
    from inference.pii import PiiReport, Redaction
    from tenants.models import Price

log = logging.getLogger(__name__)

# A token below this log-probability (p < 0.1) counts as unlikely when an edge answer's confidence is judged.
LOW_PROBABILITY_LOGPROB = math.log(0.1)
# The most tokens an adapter takes for one frame or one write (``take_at_hand``): a client
# far behind a fast engine still gets frames of a bounded size.
MAX_DELTAS_AT_ONCE = 64


@dataclass
class Tally:
    """What the client has been handed so far by one leg: the counts the settlement charges it."""

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    delivered: int = 0
    accepted: int = 0
    rejections: int = 0  # rounds whose draft the verifier cut short (its token carries the rejected drafts)
    gpu_ms: float = 0.0
    drafted: float = 0.0
    texts: list[str] = field(default_factory=list)  # each delivered token's text (a cloud tier counts them)

    def count(self, event: TokenEvent) -> None:
        """One more token handed over (or, for an escalation leg, generated and held back)."""
        self.delivered += 1
        self.gpu_ms += event.gpu_ms
        self.drafted += event.drafted
        self.texts.append(event.text)
        if event.provenance is Provenance.DRAFTED:
            self.accepted += 1
        elif event.drafted and event.provenance is Provenance.VERIFIER:
            self.rejections += 1

    def count_run(self, run: TokenRun) -> None:
        """A run's tokens handed over, each counted as ``count`` counts its event."""
        self.delivered += len(run.token_ids)
        for share in run.gpu_shares():  # one by one, in order: the same sum as the events' to the last bit
            self.gpu_ms += share
        if run.drafted is not None:  # a drafting run's (a plain run's tokens drafted nothing)
            for drafted, provenance in zip(run.drafted, run.provenances(), strict=True):
                self.drafted += drafted
                if provenance is Provenance.DRAFTED:
                    self.accepted += 1
                elif drafted and provenance is Provenance.VERIFIER:
                    self.rejections += 1
        self.texts += run.texts()


@dataclass
class Leg:
    """A part of a request served by one tier: the whole request, unless a tier failed mid-stream (or it escalated).

    A finished leg keeps what it delivered and how it ended; the settlement charges each
    leg for what it produced, in one ledger row of its own.
    """

    route: Route
    price: Price
    prompt_tokens: int
    tally: Tally
    completion: object | None
    outcome: str = ""  # how it ended, once it has: "error" (its tier failed), "escalated"
    error: str = ""
    escalation: bool = False  # its output was held back and replaced by a higher tier's


_storing: set[asyncio.Future] = set()  # answers on their way into the result cache


class GatewayStream:
    """An admitted, paid-for completion in flight. Iterate for :class:`TokenDelta`; ``usage`` at the end.

    The current leg's state lives on the stream (``route``, ``price``, ``tally``,
    ``prompt_tokens``); legs that ended before the request did are in ``legs_done``.
    """

    def __init__(
        self,
        principal: Principal,
        call: CompletionCall,
        entry: ModelEntry,
        route: Route,
        policy: Policy = BUILTIN_POLICY,
        redaction: Redaction | None = None,
        pii: PiiReport | None = None,
        slot: Slot | None = None,
    ):
        self.principal, self.call, self.entry, self.route = principal, call, entry, route
        self.slot = slot  # its place on the engines (inference.queueing): given back when it settles
        self.rate_tokens = 0  # held against its tenant's tokens per minute (inference.limits)
        self.source = "generation"  # or "exact_cache" / "semantic_cache": a replay of a stored answer (inference.cache)
        self.replayed: CachedAnswer | None = None
        self._cache_key: str | None = None  # where its answer is stored once generated
        self._recorded: list[tuple[int, str]] | None = None  # its tokens, as they go out, for the cache
        self._leader = None  # identical requests wait on this until its answer is stored (inference.cache.InFlight)
        self._semantic: SemanticLookup | None = None  # where its answer is indexed by meaning once stored
        self.policy = policy  # pinned: failovers and escalations of this request follow the same version
        self._redaction = redaction  # PII sent to the cloud as placeholders: put back in its answer
        self._pii = pii  # the prompt's PII scan: a later route onto the cloud redacts with it too
        self.request_id = call.request_id
        self.model = entry.name
        self.created = int(time.time())
        self.usage: UsageSummary | None = None
        self.prompt_tokens = 0
        self.hold = Hold()
        self.price: Price | None = None  # pinned when the money was held
        self.tally = Tally()
        self.legs_done: list[Leg] = []
        self.delivered = 0  # tokens handed to the client over every leg: the next delta's index
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self._announce_route = False  # the next delta carries the route: this leg took over mid-stream
        self._tried: set[Tier] = {route.tier}
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()  # stops the current leg's engine
        self._closed = False  # no more tokens are delivered (client gone, failure, the end)
        # items taken from the queue early (by first(), ready(), or held back while an edge answer's
        # confidence was judged), read before the queue
        self._ahead: collections.deque[object] = collections.deque()
        self._ready: collections.deque[TokenDelta] = collections.deque()  # a run's tokens, delivered, not yet taken
        self._completion: object | None = None  # the engine's stream (its stats, once it ends)
        self._pump: asyncio.Task | None = None  # an async engine's pump
        self._settlement: asyncio.Future | None = None
        self._ledger: asyncio.Future | None = None  # the ledger write, once scheduled
        self._probe = False  # this request holds its tier's half-open probe
        self._in_tier: Tier | None = None  # the tier this stream is counted on in ``entry.in_flight``
        self.journaled: JournalState | None = None  # what the settlement journal has of it (inference.journal)

    @property
    def failed_over(self) -> bool:
        """Whether another tier took over from the one it started on (a failover or an escalation)."""
        return len(self._tried) > 1

    # set-up, from gateway.start() -----------------------------------------------------------
    def use_cache(
        self,
        key: str | None,
        hit: CachedAnswer | None,
        leader=None,
        semantic: SemanticLookup | None = None,
        reason: str = "exact_cache",
    ) -> None:
        """Replay ``hit``; or, with a ``key`` and no hit, store this answer under it once generated.

        ``leader``: identical requests arriving meanwhile wait for this one's answer (``in_flight``).
        ``semantic``: where the answer is indexed by meaning too (the policy opted in). ``reason``:
        how the hit was found (a semantic match is recorded as such; a collapsed follower's and an
        exact hit's source is the exact cache).
        """
        if hit is not None:
            source = "semantic_cache" if reason == "semantic_cache" else "exact_cache"
            self.source, self.replayed = source, hit
        elif key is not None:
            self._cache_key, self._recorded, self._leader = key, [], leader
            self._semantic = semantic

    def _store_answer(self, outcome: str) -> None:
        """A generated answer that may be replayed: one leg, completed, on a cached tier. Followers go on after."""
        if not self._keep_answer(outcome):
            self._release_followers()
            return
        assert self._recorded is not None and self._cache_key is not None
        finish = getattr(self.completion_stats(), "finish_reason", None)
        assert finish is not None
        ids, provenance = zip(*self._recorded, strict=True)
        answer = CachedAnswer(
            tier=self.route.tier.value,
            token_ids=tuple(ids),
            provenance=tuple(provenance),
            drafted_tokens=str(self.tally.drafted),
            gpu_ms=str(self.tally.gpu_ms),
            finish_reason=finish.value,
            created=time.time(),
        )
        unscanned = bool(self.route.signals.get("pii_unscanned")) and not self.policy.cache_pii
        task = asyncio.ensure_future(self._store(self._cache_key, answer, unscanned))
        _storing.add(task)
        task.add_done_callback(_storing.discard)

    def _keep_answer(self, outcome: str) -> bool:
        if self._recorded is None or self._cache_key is None or outcome != "completed" or self.legs_done:
            return False
        finish = getattr(self.completion_stats(), "finish_reason", None)
        return self.route.tier in CACHED_TIERS and finish is not None and bool(self._recorded)

    def _release_followers(self) -> None:
        if self._leader is not None and self._cache_key is not None:
            in_flight.done(self._cache_key, self._leader)
            self._leader = None

    async def _store(self, key: str, answer: CachedAnswer, scan_first: bool) -> None:
        # A prompt the router did not scan for personal data (no cloud could serve it) is scanned
        # now, off the reply's path: one with personal data is never kept unless the policy opts in.
        from inference.pii import scan  # loaded on first use, as the router's checks do

        try:
            if scan_first and (await asyncio.to_thread(scan, self.call.prompt)).findings:
                return
            await exact_cache.put(key, answer, self.policy.cache_ttl_s)
            if self._semantic is not None:
                await semantic_cache.add(self._semantic, key, self.policy.cache_ttl_s)
        finally:
            self._release_followers()

    def launch(self, engine: Engine, request: CompletionRequest | CloudRequest) -> None:
        """Start ``engine`` on ``request``; its events arrive on this stream's queue."""
        breaker = self.entry.breaker(self.route.tier)
        # A half-open breaker lets one request probe its tier; this one holds that right until its tier answers.
        self._probe = breaker is not None and breaker.state is BreakerState.HALF_OPEN and breaker.acquire()
        self._leave_tier()
        self.entry.enter(self.route.tier)
        self._in_tier = self.route.tier
        if isinstance(engine, CloudEngine):  # async: pumped on the loop, no thread
            assert isinstance(request, CloudRequest)
            cloud = engine.astream(request)
            completion = Restoring(cloud, self._redaction) if self._redaction is not None else cloud
            self._completion = completion
            self._pump = pump_on_loop(completion, self._queue, self._cancel)
            arrived()
            return
        assert isinstance(request, CompletionRequest)
        kwargs = {
            "max_tokens": request.max_tokens,
            "sampling": request.sampling,
            "stop": request.stop,
            "logprobs": request.logprobs,
        }
        local = engine.stream(request.prompt_ids, **kwargs)
        self._completion = local
        # a client that takes the answer whole is sent nothing before the end: no need to wake the loop per token
        # (unless an escalation judges the answer as it comes: it reads the tokens, and may end the leg early)
        lazy = not self.call.stream and not self._may_escalate()
        pump_on_thread(local, self._queue, self._cancel, f"stream-{self.request_id}", lazy=lazy)
        arrived()  # its session is queued to open: a burst's others may be waited for (``speculative.arrivals``)

    def _leave_tier(self) -> None:
        """This stream no longer runs on the tier it was counted on (queue depth, for routing)."""
        if self._in_tier is not None:
            self.entry.leave(self._in_tier)
            self._in_tier = None

    async def first(self) -> None:
        """Wait for the first item; fail over before it if the tier fails; raise if nothing can serve."""
        first = await self._queue.get()
        while isinstance(first, BaseException) and _tier_failure(first):
            self._record(first)
            route = fail_over(
                self.entry, self.route, self.principal.tenant_id, self.policy, tried=frozenset(self._tried)
            )
            if route is None or not await self._switch_to(route):
                break
            log.warning("request %s: %s failed (%s), served from %s", self.request_id, self._tried, first, route.tier)
            self._tried.add(route.tier)
            first = await self._queue.get()
        if isinstance(first, BaseException):
            raise await self._fail(first)
        if isinstance(first, TokenEvent | TokenRun):
            self._record(None)
        self._ahead.append(first)
        if isinstance(first, TokenEvent) and self._may_escalate():
            await self._judge_confidence()

    def _may_escalate(self) -> bool:
        """The policy sends low-confidence edge answers up a tier, and this request is on the edge with one above."""
        return (
            self.policy.escalation
            and self.route.tier is Tier.EDGE
            and self.route.reason != "requested"  # a client that asked for the edge gets the edge
            and escalate(self.entry, self.route, self.principal.tenant_id, self.policy) is not None
        )

    async def _judge_confidence(self) -> None:
        """Hold back the edge answer's first tokens, judge its confidence, and keep it or send the request up a tier.

        Up to ``escalation_hold_tokens`` tokens are held (nothing is sent meanwhile). The
        answer is kept when their mean log-probability is at least the policy's floor and
        the share of tokens below p = 0.1 at most its ceiling; then the held tokens are
        delivered as usual. Otherwise the edge leg is stopped and charged for what it
        generated (an escalation leg: the tenant's policy chose to pay for it), and the
        request starts again on the tier above, which holds the difference first.
        """
        held: list[TokenEvent] = [e for e in self._ahead if isinstance(e, TokenEvent)]
        ended = False
        while len(held) < self.policy.escalation_hold_tokens:
            item = await self._queue.get()
            self._ahead.append(item)
            if not isinstance(item, TokenEvent):
                ended = True  # the answer ended (or failed) within the window: judge what there is
                break
            held.append(item)
        logprobs = [e.logprob for e in held if e.logprob is not None]
        if not logprobs:
            return  # no confidence to judge: the answer stands
        mean = sum(logprobs) / len(logprobs)
        low_share = sum(lp < LOW_PROBABILITY_LOGPROB for lp in logprobs) / len(logprobs)
        confidence = {"mean_logprob": round(mean, 4), "low_share": round(low_share, 4), "tokens": len(logprobs)}
        confident = (
            mean >= self.policy.escalation_min_mean_logprob and low_share <= self.policy.escalation_max_low_share
        )
        if confident:
            self.route = dataclasses.replace(self.route, signals={**self.route.signals, "confidence": confidence})
            return
        target = escalate(self.entry, self.route, self.principal.tenant_id, self.policy)
        assert target is not None
        self._cancel.set()  # stop the edge: what it generated so far is charged, never sent
        leg = self._current_leg()
        leg.tally = _tally_of(held)
        leg.outcome, leg.escalation = "cancelled", True
        leg.error = f"escalated: mean logprob {mean:.2f}, {low_share:.0%} of tokens below p=0.1"
        if not ended:
            log.info(
                "request %s: low-confidence edge answer (%s), sent up to %s", self.request_id, confidence, target.tier
            )
        served = await self._request_for(target, self.call)
        if served is None:
            raise GatewayError(f"the request's personal data cannot be redacted for the {target.tier} tier")
        engine, request = served
        assert self.price is not None
        price = await price_in_pinned_book(pinned=self.price, model=self.entry.name, tier=target.tier.value)
        if price is None:
            raise GatewayError(f"no price for {self.entry.name!r} on the {target.tier} tier: it cannot be escalated to")
        self.legs_done.append(leg)
        await self._hold_for_next_leg(self.legs_done, price, request)
        self.route = dataclasses.replace(target, signals={**target.signals, "confidence": confidence})
        self.price, self.prompt_tokens, self.tally = price, len(request.prompt_ids), Tally()
        self._tried.add(target.tier)
        self._ahead.clear()
        self._queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.launch(engine, request)
        first = await self._queue.get()
        if isinstance(first, BaseException):
            raise await self._fail(first)
        self._ahead.append(first)

    async def _hold_for_next_leg(
        self, legs: list[Leg], price: Price, request: CompletionRequest | CloudRequest
    ) -> None:
        """Hold what ``legs`` cost so far plus the next leg's worst case (raises BudgetExceeded when it cannot).

        The legs before keep their hold (what they produced is owed), so only the
        difference is asked for, from the same lease or reservation.
        """
        spent = sum((c.total for c in settlement.leg_costs(self, legs)), Decimal(0))
        worst = worst_case(price=price, prompt_tokens=len(request.prompt_ids), max_tokens=request.max_tokens)
        await hold_more(
            self.hold,
            leases=settlement.leases,
            principal=self.principal,
            request_id=self.request_id,
            amount=spent + worst,
            price=price,
            delivered=True,
        )

    async def _switch_to(self, route: Route) -> bool:
        """Serve this request from ``route`` instead; nothing was delivered. False when that tier has no price.

        The new tier is priced from the book pinned when the money was held, and what is
        held grows to its worst case when that is dearer (``hold_more``; a refusal raises
        BudgetExceeded, which ends the request with nothing charged).
        """
        served = await self._request_for(route, self.call)
        if served is None:
            return False
        engine, request = served
        assert self.price is not None
        price = await price_in_pinned_book(pinned=self.price, model=self.entry.name, tier=route.tier.value)
        if price is None:
            return False
        prompt_tokens = len(request.prompt_ids)
        worst = worst_case(price=price, prompt_tokens=prompt_tokens, max_tokens=request.max_tokens)
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

    async def _request_for(
        self, route: Route, call: CompletionCall
    ) -> tuple[Engine, CompletionRequest | CloudRequest] | None:
        """``call`` as ``route``'s engine request, its PII redacted where the route says so; None if it cannot be."""
        served = serving_call(call, route.redact, self._pii)
        if served is None:
            return None
        call, redaction = served
        if redaction is not None:
            self._redaction = redaction  # the cloud leg's answer gets the originals put back
        return await arequest_for(self.entry, route.tier, call, self.principal.tenant_id)

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
        while True:
            if self.usage is not None:
                raise StopAsyncIteration
            if self._ready:
                return self._ready.popleft()
            if self._ahead:
                item = self._ahead.popleft()
            else:
                item = await self._queue.get()
                if self._closed:  # closed while this read waited: nothing more is delivered
                    raise StopAsyncIteration
            if item is END:
                await self._settle("completed")
                raise StopAsyncIteration
            if isinstance(item, BaseException):
                if self.delivered and _tier_failure(item):
                    try:
                        if await self._continue_elsewhere(item):
                            continue  # the next tier goes on from the text already delivered
                    except GatewayError as refusal:  # the budget cannot hold the next tier: end here
                        raise await self._fail(refusal) from item
                raise await self._fail(item)
            if type(item) is TokenRun:
                self._ready += self._deliver_run(item)
                continue
            assert isinstance(item, TokenEvent)
            return self._deliver(item)

    def _handing_over(self, n: int) -> Route | None:
        """``n`` tokens go to the client now (the caller counts them in the tally): the first token's times, the
        count, and the route to announce with the first of them (a leg that took over mid-stream), else None."""
        now = time.perf_counter()
        if self.tally.first_token_at is None:
            self.tally.first_token_at = now
        if self.first_token_at is None:
            self.first_token_at = now
        self.delivered += n
        if not self._announce_route:
            return None
        self._announce_route = False
        return self.route

    def _deliver(self, event: TokenEvent) -> TokenDelta:
        """The token goes to the client now: from here on it is charged."""
        route = self._handing_over(1)
        self.tally.count(event)
        if self._recorded is not None:
            self._recorded.append((event.token_id, event.provenance.value))
        if self.call.logprobs is None:  # asked for by the gateway itself (an escalation's judge): not the client's
            return TokenDelta(self.delivered - 1, event.text, event.token_id, event.provenance, route)
        return TokenDelta(
            self.delivered - 1,
            event.text,
            event.token_id,
            event.provenance,
            route,
            event.logprob,
            event.top_logprobs,
            event.named if isinstance(event, CloudTokenEvent) else (),
        )

    def _deliver_run(self, run: TokenRun) -> list[TokenDelta]:
        """A run's tokens go to the client now, each counted as ``_deliver`` counts its event: from here on charged.

        Only a client that takes the answer whole gets runs (``Completion.drive(whole=True)``), so
        nothing is sent before the end and the tokens are handed over together.
        """
        start, ids = self.delivered, run.token_ids
        route = self._handing_over(len(ids))
        self.tally.count_run(run)
        provenances = run.provenances()
        if self._recorded is not None:
            self._recorded += [(token_id, p.value) for token_id, p in zip(ids, provenances, strict=True)]
        return [
            TokenDelta(start + i, text, token_id, provenance, route if i == 0 else None)
            for i, (token_id, text, provenance) in enumerate(zip(ids, run.texts(), provenances, strict=True))
        ]

    def delivered_text(self) -> str:
        """Every token's text the client has been handed, over every leg."""
        return "".join(t for leg in (*self.legs_done, self._current_leg()) for t in leg.tally.texts)

    def _current_leg(self) -> Leg:
        assert self.price is not None
        return Leg(self.route, self.price, self.prompt_tokens, self.tally, self._completion)

    async def _continue_elsewhere(self, exc: BaseException) -> bool:
        """The tier failed mid-stream: go on from the text already delivered on the next tier the policy allows.

        Never repeats or retracts a token: the next tier reads the prompt and the delivered
        text (a chat: the conversation and the partial answer) and writes what follows. The
        failed leg is charged for what it delivered; what is held grows to cover it plus
        the next leg's worst case (a refusal ends the stream with a budget error, paying
        for what was delivered). False when no tier may take over.
        """
        self._record(exc)
        remaining = self.call.max_tokens - self.delivered
        route = fail_over(self.entry, self.route, self.principal.tenant_id, self.policy, tried=frozenset(self._tried))
        if route is None or remaining < 1:
            return False
        continuation = dataclasses.replace(self.call, max_tokens=remaining, continue_from=self.delivered_text())
        try:
            served = await self._request_for(route, continuation)
        except GatewayError as err:  # e.g. the prompt and the answer so far no longer fit the next tier's context
            log.warning("request %s: %s cannot take over: %s", self.request_id, route.tier, err.message)
            return False
        if served is None:
            return False
        engine, request = served
        assert self.price is not None
        price = await price_in_pinned_book(pinned=self.price, model=self.entry.name, tier=route.tier.value)
        if price is None or not _can_continue(engine, request):
            return False
        failed = self._current_leg()
        failed.outcome, failed.error = "error", f"{self.route.tier} failed mid-stream: {exc}"
        await self._hold_for_next_leg([*self.legs_done, failed], price, request)
        log.warning(
            "request %s: %s failed mid-stream (%s); %s goes on", self.request_id, self.route.tier, exc, route.tier
        )
        self.legs_done.append(failed)
        self._tried.add(route.tier)
        self.route, self.price, self.prompt_tokens, self.tally = route, price, len(request.prompt_ids), Tally()
        self._announce_route = True
        self._queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.launch(engine, request)
        return True

    def at_hand(self) -> bool:
        """Whether ``__anext__`` would return (or stop) without waiting for the engine.

        Adapters use it to skip their wait machinery (a task and a timer per token) when
        tokens arrive faster than they are sent; taking an item at hand cannot suspend
        before the token is handed over, so the charging rule of ``ready`` still holds.
        """
        return bool(self._ready or self._ahead) or self.usage is not None or not self._queue.empty()

    def take_at_hand(self, limit: int = MAX_DELTAS_AT_ONCE) -> list[TokenDelta]:
        """Every token already at hand (up to ``limit``), taken without waiting; ``[]`` if none is.

        For adapters that send several tokens in one frame or one write: a speculative
        round hands over its accepted tokens and the verifier's at once, and an engine ahead
        of a slow client queues more. Each token taken is charged, so the adapter sends the
        whole list at once, before it awaits anything. The end of the stream or a failure is
        left in place for ``__anext__``, which settles or raises.
        """
        taken: list[TokenDelta] = []
        if self.usage is not None or self._closed:
            return taken
        while len(taken) < limit:
            if self._ready:
                room = limit - len(taken)
                taken += [self._ready.popleft() for _ in range(min(room, len(self._ready)))]
                continue
            if self._ahead:
                item = self._ahead.popleft()
            elif not self._queue.empty():
                item = self._queue.get_nowait()
            else:
                break
            if type(item) is TokenRun:
                self._ready += self._deliver_run(item)
                continue
            if not isinstance(item, TokenEvent):  # the end, or the engine's error
                self._ahead.appendleft(item)
                break
            taken.append(self._deliver(item))
        return taken

    async def ready(self) -> None:
        """Wait until the next item is at hand, without taking it. Safe to cancel; charges nothing.

        Adapters wait on this with a timeout (keep-alives), then take the item with
        ``__anext__``, which then hands a token over without suspending: a client that goes
        away while the adapter waits is never charged for a token it was not sent.
        """
        if not self._ready and not self._ahead and self.usage is None:
            self._ahead.append(await self._queue.get())

    # the end ------------------------------------------------------------------------------
    async def aclose(self) -> UsageSummary | None:
        """Stop generating (client gone, cancel frame); settle exactly what was delivered."""
        self._stop()
        if self.usage is None:
            await self._settle("cancelled")
        return self.usage

    def _stop(self) -> None:
        self._closed = True
        self._cancel.set()
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        stop_driven = getattr(self._completion, "cancel", None)  # a driven completion: at its next round
        if stop_driven is not None:
            stop_driven()
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
            self._settlement = self._settle_once(outcome, error)
        await asyncio.shield(self._settlement)

    def _settle_once(self, outcome: str, error: str) -> asyncio.Future:
        """Charge now, on the caller's turn of the loop; a future done once ``usage`` is set (and, unless written
        behind the reply, the ledger holds the charge).

        Not a task: a task would first wait its turn behind every other ready one, and where many
        completions end together (sessions that started together) each reply then waited for all of
        their charges (demo pair, 16 sessions: the first reply 10 ms after the last step).
        """
        done = asyncio.get_running_loop().create_future()
        try:
            charge = settlement.charge(self, outcome, error)
        except BaseException as exc:
            self._release_followers()  # nothing will be stored: identical requests waiting for it generate
            if not isinstance(exc, Exception):
                raise
            done.set_exception(exc)  # every caller waiting on this settlement raises it
            return done
        finally:
            if self.slot is not None:
                self.slot.release()
            self._leave_tier()
        self.usage = charge.summary
        self._store_answer(outcome)
        if self.rate_tokens:  # tokens per minute: give back what was held for but not used
            used = charge.summary.prompt_tokens + charge.summary.completion_tokens
            limiter.give_back_soon(self.principal, self.rate_tokens - used)
        if charge.batched is not None:
            charge.batched.add_done_callback(self._journal_end)
            self._ledger = asyncio.wrap_future(charge.batched)
            if not settings.TANDEM_SETTLE_AFTER_REPLY:
                settlement.leases.flush_soon()
                return self._ledger
        elif charge.write is None:
            settlement.journal.ended(self.request_id)
        else:
            self._ledger = settlement.ledger_write(self.request_id, db(charge.write))
            self._ledger.add_done_callback(self._journal_end)
            if not settings.TANDEM_SETTLE_AFTER_REPLY:
                return self._ledger
        done.set_result(None)
        return done

    def _journal_end(self, written: asyncio.Future | concurrent.futures.Future) -> None:
        """Its ledger rows are committed: the journal owes nothing for it (a failed write stays owed there)."""
        if not written.cancelled() and written.exception() is None:
            settlement.journal.ended(self.request_id)

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

    def legs(self) -> list[Leg]:
        """Every leg of this request, the current one last."""
        return [*self.legs_done, self._current_leg()]


def _tally_of(events: list[TokenEvent]) -> Tally:
    """What ``events`` (generated, held back, never sent) count for: an escalation leg's charge."""
    tally = Tally()
    for event in events:
        tally.count(event)
    return tally


def leg_token_counts(leg: Leg, outcome: str) -> tuple[int, int]:
    """(prompt, completion) tokens to charge a leg: counted here, or as an upstream reported them (the cloud tier)."""
    counts = getattr(leg.completion, "token_counts", None)
    if counts is None:
        return leg.prompt_tokens, leg.tally.delivered
    return counts("".join(leg.tally.texts), leg.tally.delivered, outcome == "completed")


def _can_continue(engine: Engine, request: CompletionRequest | CloudRequest) -> bool:
    """Whether the engine can go on from a partial answer (a cloud upstream needs a way to continue a chat)."""
    if isinstance(engine, CloudEngine):
        assert isinstance(request, CloudRequest)
        return engine.can_continue(request)
    return True


def _tier_failure(exc: BaseException) -> bool:
    """A failure of the tier itself (worth another tier), not of the request (which any tier would refuse)."""
    return isinstance(exc, core_errors.VerifierUnavailableError | UpstreamFailed)
