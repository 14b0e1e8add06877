"""The one path every completion takes: websocket, OpenAI API and batch jobs all call ``start``.

    principal = await authenticate_api_key(raw) | await principal_for_user(user, tenant_id)
    stream = await start(principal, call)   # validate, admit, route, reserve, first token
    async for delta in stream: ...          # token deltas with provenance
    stream.usage                            # settled: tokens, cost breakdown, stats
    await stream.aclose()                   # a client went away: stop and settle what was delivered
    await stream.settled()                  # the ledger row is written (it may lag the last frame)

Money: the worst case (``max_tokens``, the price's GPU ceiling) is reserved before the
engine runs, so no pattern of concurrent requests can overspend a hard budget; the
settlement charges exactly the tokens handed to the adapter, each carrying its share of
the verifier time and drafted tokens of its round (``TokenEvent.gpu_ms``/``drafted``).
``start`` waits for the first token before it returns, so an error before any output
(bad input, no budget, engine busy) reaches the adapter as a plain error with a status
code and charges nothing. The engine runs on a worker thread (its calls block); tokens
cross to the event loop through an asyncio queue.

Write-behind (``TANDEM_SETTLE_AFTER_REPLY``): the usage and its cost are worked out in
memory, from the price pinned at reservation, and set on ``stream.usage`` at once, so the
adapter sends the final frame without waiting for a commit; the ledger row (written once,
with exactly that cost) and the SLO sample follow on a DB thread. A failed write is logged
as an error and leaves the reservation held, never freed as if it had been paid.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from channels.db import DatabaseSyncToAsync
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from inference.engines import ModelEntry, aget_engines
from inference.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    ContextTooLong,
    GatewayError,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RateLimited,
    RequestIdConflict,
    UpstreamFailed,
)
from inference.router import Route, Tier, decide
from speculative import errors as core_errors
from speculative.types import Provenance, SamplingParams, TokenEvent
from tenants import errors as tenant_errors
from tenants import selectors as tenant_selectors
from tenants import services as tenant_services
from tenants.leases import LeaseHold, LeasePool

if TYPE_CHECKING:
    from speculative.engine import TokenStream
    from tenants.models import Price, Reservation

log = logging.getLogger(__name__)

MAX_TAGS = 16
COMPLETIONS_SCOPE = "completions"
MAX_STREAMS = 64  # streams this process runs at once (engine threads); 503 past it
INLINE_TOKENIZE_CHARS = 2048  # longer prompts are tokenised on a thread, off the event loop
# The most tokens an adapter takes for one frame or one write (``take_at_hand``): a client
# far behind a fast engine still gets frames of a bounded size.
MAX_DELTAS_AT_ONCE = 64
_END = object()


@dataclass(frozen=True)
class Principal:
    """Who is asking, resolved once: the tenant is fixed here and nowhere else."""

    tenant_id: int
    user_id: int | None
    api_key_id: int | None
    scopes: tuple[str, ...] = ()  # an API key's scopes; () = every scope
    role: str | None = None  # a console user's role in the tenant
    can_complete: bool = True  # False for roles that may only read (Membership.can_complete)

    def may(self, scope: str) -> bool:
        return not self.scopes or scope in self.scopes


@dataclass(frozen=True)
class CompletionCall:
    """One completion request, already parsed by an adapter."""

    model: str
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""  # "" = mint a fresh one
    # True only for an id minted here (or by an adapter with ``new_request_id``): unique by
    # construction, so the request may skip the reservation row, whose unique request id is
    # what catches an id used twice (a budget lease admits it in memory instead).
    request_id_fresh: bool = False

    def __post_init__(self) -> None:
        if not self.request_id:
            object.__setattr__(self, "request_id", new_request_id())
            object.__setattr__(self, "request_id_fresh", True)


MINTED_ID_PREFIX = "req_"


def new_request_id() -> str:
    """A request id no client can have chosen: clients' ids never start with ``MINTED_ID_PREFIX``."""
    return f"{MINTED_ID_PREFIX}{uuid.uuid4().hex}"


@dataclass(frozen=True)
class TokenDelta:
    index: int
    text: str
    token_id: int
    provenance: Provenance


@dataclass(frozen=True)
class UsageSummary:
    """What a finished stream produced and cost (the ledger row, as adapters report it)."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    drafted_tokens: Decimal
    accepted_tokens: int
    gpu_ms: Decimal
    cost: Mapping[str, Decimal]  # edge, verifier, cloud, total
    outcome: str  # completed / cancelled / error
    finish_reason: str  # stop / length / "" (cancelled or failed)
    ttft_ms: float | None
    duration_ms: float
    route: Route

    @property
    def acceptance_rate(self) -> float:
        return float(self.accepted_tokens / self.drafted_tokens) if self.drafted_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / (self.duration_ms / 1e3) if self.duration_ms > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "request_id": self.request_id,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "drafted_tokens": format(self.drafted_tokens, "f"),
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "gpu_ms": format(self.gpu_ms, "f"),
            "cost": {k: format(v, "f") for k, v in self.cost.items()},
            "outcome": self.outcome,
            "finish_reason": self.finish_reason,
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 2),
            "duration_ms": round(self.duration_ms, 2),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "route": {"tier": self.route.tier.value, "reason": self.route.reason, "degraded": self.route.degraded},
        }


class _ReusedThreads:
    """Runs each job at once on a thread of its own: an idle one if there is one, else a new one.

    Each stream's engine loop blocks for the whole stream, so it needs a thread to itself,
    but starting a thread costs the event loop a wait until the new thread runs: measured
    at 0.1 ms on an idle machine and 2.6 ms on a busy one, per request. Finished threads
    wait ``idle_s`` for the next job, then end. Unlike a ThreadPoolExecutor, nothing ever
    queues behind a busy thread, and the threads are daemons: a stream still running
    never holds up the process's exit.
    """

    def __init__(self, name: str, idle_s: float = 60.0):
        self._name = name
        self._idle_s = idle_s
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a job; a job is only queued for one of them
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., object], *args: object) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put((fn, args))
                return
        threading.Thread(target=self._work, args=(fn, args), name=self._name, daemon=True).start()

    def _work(self, fn: Callable[..., object], args: tuple) -> None:
        while True:
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - a job's own handlers come first; this thread goes on
                log.exception("a job on a %s thread failed", self._name)
            threading.current_thread().name = self._name
            with self._lock:
                self._idle += 1
            try:
                fn, args = self._jobs.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:  # a job queued for this thread as it timed out is still taken
                    try:
                        fn, args = self._jobs.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        return


_stream_threads = _ReusedThreads("stream")

_db_executor: ThreadPoolExecutor | None = None
_db_executor_lock = threading.Lock()


def _db(func):
    """``func`` (ORM work) as a coroutine that runs off the event loop, on this process's DB threads.

    On SQLite that is one dedicated thread. SQLite has one writer at a time, and when
    connections of several threads contend, its busy handler sleeps in coarse steps (up to
    100 ms each): measured here, 8 concurrent requests had a p99 of 800 ms that way. One
    thread means one connection and writes queued in memory instead.

    Elsewhere it is a pool of as many threads as the connection pool holds, with row locks
    (``select_for_update``) doing the serialising where money moves. Not Django's default
    (the request's own thread, ``thread_sensitive``): that thread is created for each
    request and joined after it (a thread start and a join per request, measured at up to
    2 ms of the event loop's time on a busy machine), and a write-behind ledger write,
    which outlives its request, would get yet another. Each call here is a whole unit of
    work (its own transaction), so nothing needs the request's thread.
    """
    return DatabaseSyncToAsync(func, thread_sensitive=False, executor=_db_threads())


def _db_threads() -> ThreadPoolExecutor:
    global _db_executor
    if _db_executor is None:
        with _db_executor_lock:
            if _db_executor is None:
                if connection.vendor == "sqlite":
                    workers, name = 1, "sqlite"
                else:
                    pool = settings.DATABASES["default"].get("OPTIONS", {}).get("pool")
                    workers = pool.get("max_size", 20) if isinstance(pool, dict) else 20
                    name = "db"
                _db_executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    return _db_executor


def _db_from_thread(func: Callable[[], object]) -> object:
    """``func`` (ORM work) from a plain thread (the lease keeper): on SQLite's one DB thread, as ``_db`` does."""
    if connection.vendor == "sqlite":
        return _db_threads().submit(func).result()
    try:
        return func()
    finally:
        connection.close()  # back to the pool: the keeper wakes rarely


# authentication ---------------------------------------------------------------------------
async def authenticate_api_key(raw_key: str) -> Principal:
    # A key this process checked moments ago is checked again in memory (revocation and
    # expiry included: see tenants.services._ApiKeyCache), with no hop to a DB thread.
    key = tenant_services.api_key_authenticate_cached(raw_key=raw_key)
    if key is not None:
        return _key_principal(key)
    return await _db(_authenticate_api_key)(raw_key)


def _authenticate_api_key(raw_key: str) -> Principal:
    try:
        key = tenant_services.api_key_authenticate(raw_key=raw_key)
    except tenant_errors.InvalidApiKey as exc:
        raise AuthenticationFailed(str(exc)) from None
    return _key_principal(key)


def _key_principal(key) -> Principal:
    """What an API key may do: act in its own tenant, for its creator, within its scopes."""
    return Principal(tenant_id=key.tenant_id, user_id=key.created_by_id, api_key_id=key.pk, scopes=tuple(key.scopes))


async def principal_for_api_key_id(api_key_id: int, tenant_id: int) -> Principal:
    """A stored key acting again later (a batch job): refused if it was revoked, expired or moved."""
    return await _db(_principal_for_api_key_id)(api_key_id, tenant_id)


def _principal_for_api_key_id(api_key_id: int, tenant_id: int) -> Principal:
    from tenants.models import ApiKey

    key = ApiKey.objects.filter(pk=api_key_id, tenant_id=tenant_id).first()
    if key is None or not key.is_usable_at(timezone.now()):
        raise AuthenticationFailed("the API key of this job is no longer valid")
    return _key_principal(key)


async def principal_for_user(user, tenant_id: int | None) -> Principal:
    """A signed-in console user acting in one of their tenants (their first one when not given)."""
    return await _db(_principal_for_user)(user, tenant_id)


def _principal_for_user(user, tenant_id: int | None) -> Principal:
    if user is None or not user.is_authenticated:
        raise AuthenticationFailed("sign in first", code="not_authenticated")
    if tenant_id is None:
        membership = tenant_selectors.memberships_for_user(user=user).order_by("pk").first()
        if membership is None:
            raise PermissionDenied("you are not a member of any tenant")
    else:
        try:
            membership = tenant_selectors.membership_get(user=user, tenant_id=tenant_id)
        except tenant_errors.NotAMember:
            raise PermissionDenied(f"you are not a member of tenant {tenant_id}") from None
    return Principal(
        tenant_id=membership.tenant_id,
        user_id=user.pk,
        api_key_id=None,
        role=membership.role,
        can_complete=membership.can_complete,
    )


# admission ----------------------------------------------------------------------------------
class _Admission:
    """Streams in flight per tenant and in all; refuses past the limits (429 / 503)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_tenant: dict[int, int] = {}
        self._total = 0

    def enter(self, tenant_id: int) -> None:
        limit = settings.TANDEM_MAX_STREAMS_PER_TENANT
        with self._lock:
            if self._by_tenant.get(tenant_id, 0) >= limit:
                raise RateLimited(f"this tenant already runs {limit} streams at once; retry when one ends")
            if self._total >= MAX_STREAMS:
                raise Overloaded("the server is at capacity; retry shortly")
            self._by_tenant[tenant_id] = self._by_tenant.get(tenant_id, 0) + 1
            self._total += 1

    def leave(self, tenant_id: int) -> None:
        with self._lock:
            self._by_tenant[tenant_id] -= 1
            self._total -= 1


admission = _Admission()


# the stream -----------------------------------------------------------------------------------
def _validate(call: CompletionCall) -> None:
    if not call.request_id_fresh and call.request_id.startswith(MINTED_ID_PREFIX):
        # Minted ids may skip the reservation row's uniqueness check (budget leases): a
        # caller's own id must never be able to collide with one.
        raise InvalidRequest(f"request ids starting with {MINTED_ID_PREFIX!r} are the server's", param="request_id")
    if not isinstance(call.prompt, str) or not call.prompt:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if len(call.prompt) > settings.TANDEM_MAX_PROMPT_CHARS:
        raise ContextTooLong(
            f"the prompt has {len(call.prompt)} characters; at most {settings.TANDEM_MAX_PROMPT_CHARS} are accepted",
            param="prompt",
        )
    if isinstance(call.max_tokens, bool) or not isinstance(call.max_tokens, int) or call.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {call.max_tokens!r}", param="max_tokens")
    if len(call.tags) > MAX_TAGS or any(
        not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 256 for k, v in call.tags.items()
    ):
        raise InvalidRequest(f"tags must be at most {MAX_TAGS} string pairs (keys <= 64, values <= 256 chars)")


def _build(entry: ModelEntry, route: Route, call: CompletionCall):
    engine = entry.speculative if route.tier is Tier.SPECULATIVE else entry.edge
    assert engine is not None
    seed = call.seed if call.seed is not None else secrets.randbits(31)
    try:
        sampling = SamplingParams(call.temperature, call.top_k, call.top_p, seed)
        request = engine.request(call.prompt, max_tokens=call.max_tokens, sampling=sampling, stop=call.stop)
    except core_errors.ContextOverflowError as exc:
        raise ContextTooLong(str(exc), param="max_tokens") from None
    except core_errors.InvalidRequestError as exc:
        raise InvalidRequest(str(exc)) from None
    return engine, request


async def _abuild(entry: ModelEntry, route: Route, call: CompletionCall):
    """``_build`` from the event loop: a short prompt tokenises in microseconds, a long one on a thread."""
    if len(call.prompt) <= INLINE_TOKENIZE_CHARS:
        return _build(entry, route, call)
    return await asyncio.to_thread(_build, entry, route, call)


class GatewayStream:
    """An admitted, paid-for completion in flight. Iterate for :class:`TokenDelta`; ``usage`` at the end."""

    def __init__(self, principal: Principal, call: CompletionCall, entry: ModelEntry, route: Route):
        self.principal, self.call, self.entry, self.route = principal, call, entry, route
        self.request_id = call.request_id
        self.model = entry.name
        self.created = int(time.time())
        self.usage: UsageSummary | None = None
        self.prompt_tokens = 0
        self._reservation: Reservation | None = None
        self._lease_hold: LeaseHold | None = None
        self._price: Price | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        # Items from the engine thread not yet on the queue: the thread appends, and wakes the
        # loop only when the list was empty (each wake-up is a write to the loop's self-pipe
        # and a turn of the loop; a round's tokens, or an engine ahead of the client, share one).
        self._handoff: list[object] = []
        self._handoff_lock = threading.Lock()
        self._cancel = threading.Event()
        self._delivered = 0
        self._accepted = 0
        self._gpu_ms = 0.0
        self._drafted = 0.0
        self._started = time.perf_counter()
        self._first_token_at: float | None = None
        self._first: object | None = None  # the next item, taken from the queue early (by start() or ready())
        self._completion: TokenStream | None = None
        self._settlement: asyncio.Future | None = None
        self._ledger: asyncio.Future | None = None  # the ledger write, once scheduled

    # set-up, from start() -------------------------------------------------------------
    async def _hold(self, request) -> None:
        """Price the worst case and hold it: against this process's budget lease when it can, else a reservation.

        The lease path needs no database round trip (the price is cached, admission is in
        memory). A reservation is made when leases are off, when the client chose the
        request id (its uniqueness is checked by the reservation row), when the budget is
        too near its hard limit for a lease (refusals then happen exactly at the limit), or
        while another request is opening this key's lease.
        """
        self.prompt_tokens = len(request.prompt_ids)
        price = tenant_selectors.price_active_cached(model=self.entry.name, tier=self.route.tier.value)
        try:
            if price is None:
                price = await _db(tenant_selectors.price_active)(model=self.entry.name, tier=self.route.tier.value)
        except tenant_errors.PriceNotFound as exc:
            raise GatewayError(f"{exc}: the operator must publish a price before this model can be served") from None
        amount = tenant_services.cost_estimate_max(
            price=price, prompt_tokens=len(request.prompt_ids), max_tokens=request.max_tokens
        )
        self._price = price
        if settings.TANDEM_BUDGET_LEASES and self.call.request_id_fresh:
            tenant_id, api_key_id = self.principal.tenant_id, self.principal.api_key_id
            self._lease_hold = leases.admit(tenant_id=tenant_id, api_key_id=api_key_id, amount=amount)
            if self._lease_hold is None:
                self._lease_hold = await _db(leases.open)(tenant_id=tenant_id, api_key_id=api_key_id, amount=amount)
            if self._lease_hold is not None:
                return
        await _db(self._reserve)(amount)

    def _held_amount(self) -> Decimal:
        if self._lease_hold is not None:
            return self._lease_hold.amount
        assert self._reservation is not None
        return self._reservation.amount

    def _reserve(self, amount: Decimal) -> None:
        """Hold the worst case on the tenant's budgets with a reservation row (sync: runs in a DB thread)."""
        from tenants.models import ApiKey, Tenant

        # the principal was resolved from the database moments ago: ids are all the services
        # need, and two fewer queries on every request's critical path
        tenant = Tenant(pk=self.principal.tenant_id)
        key = ApiKey(pk=self.principal.api_key_id, tenant_id=tenant.pk) if self.principal.api_key_id else None
        try:
            self._reservation = tenant_services.budget_reserve(
                tenant=tenant, api_key=key, amount=amount, request_id=self.request_id, price=self._price
            )
        except tenant_errors.BudgetExceeded as exc:
            raise BudgetExceeded(str(exc)) from None
        except tenant_errors.InvalidInput:  # the request id was used before (by any tenant)
            raise RequestIdConflict("this request id was already used; send a new X-Request-Id") from None

    def _launch(self, engine, request) -> None:
        loop = asyncio.get_running_loop()
        self._completion = engine.stream(request.prompt_ids, **_request_kwargs(request))
        _stream_threads.run(self._pump, loop)

    def _pump(self, loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: run the engine, hand each event to the event loop."""
        completion = self._completion
        assert completion is not None
        threading.current_thread().name = f"stream-{self.request_id}"

        def put(item: object) -> None:
            with self._handoff_lock:
                self._handoff.append(item)
                if len(self._handoff) > 1:
                    return  # a hand-over is already on its way to the loop: it takes this one too
            try:
                loop.call_soon_threadsafe(self._take_handoff)  # one wake-up of the loop for a burst
            except RuntimeError:  # the loop is gone (the server is shutting down)
                self._cancel.set()

        try:
            for event in completion:
                if self._cancel.is_set():
                    break
                put(event)
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, raised there
            put(exc)
        finally:
            completion.close()  # releases the engine's sessions (draft sequence, verifier slot)

    def _take_handoff(self) -> None:
        """On the event loop: move what the engine thread handed over onto the stream's queue."""
        with self._handoff_lock:
            items, self._handoff = self._handoff, []
        for item in items:
            self._queue.put_nowait(item)

    async def _fail_over_to_edge(self, exc: BaseException, call: CompletionCall) -> object:
        """The verifier failed before the first token: serve this request from the edge instead.

        Nothing was delivered, so the client sees one request that took a little longer,
        marked degraded. The reservation stays (it was for the dearer tier): the edge's
        worst case must fit in it, or the request fails as it would have without failover.
        """
        self.entry.mark_verifier_down()
        route = Route(Tier.EDGE, "verifier_down")
        engine, request = await _abuild(self.entry, route, call)

        def edge_price_if_it_fits() -> Price | None:
            # The edge's price from the book pinned at reservation (the settlement prices
            # with that book), and its worst case must fit in what is already held.
            assert self._price is not None
            price = tenant_selectors.price_in_book(book_id=self._price.book_id, model=self.entry.name, tier="edge")
            worst = tenant_services.cost_estimate_max(
                price=price, prompt_tokens=len(request.prompt_ids), max_tokens=request.max_tokens
            )
            return price if worst <= self._held_amount() else None

        try:
            edge_price = await _db(edge_price_if_it_fits)()
        except tenant_errors.PriceNotFound:
            edge_price = None
        if edge_price is None:
            return exc
        self._price = edge_price
        log.warning("request %s: verifier unavailable (%s), served from the edge", self.request_id, exc)
        self.route = route
        self._launch(engine, request)
        return await self._queue.get()

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
        if item is _END:
            await self._settle("completed")
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise await self._fail(item)
        assert isinstance(item, TokenEvent)
        return self._deliver(item)

    def _deliver(self, event: TokenEvent) -> TokenDelta:
        """The token goes to the client now: from here on it is charged."""
        if self._first_token_at is None:
            self._first_token_at = time.perf_counter()
        self._delivered += 1
        self._gpu_ms += event.gpu_ms
        self._drafted += event.drafted
        if event.provenance is Provenance.DRAFTED:
            self._accepted += 1
        return TokenDelta(self._delivered - 1, event.text, event.token_id, event.provenance)

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

    async def aclose(self) -> UsageSummary | None:
        """Stop generating (client gone, cancel frame); settle exactly what was delivered."""
        self._cancel.set()
        if self.usage is None:
            await self._settle("cancelled")
        return self.usage

    async def _fail(self, exc: BaseException) -> GatewayError:
        """The engine failed: settle what was delivered, and say what went wrong."""
        self._cancel.set()
        if isinstance(exc, core_errors.VerifierUnavailableError):
            self.entry.mark_verifier_down()
            error: GatewayError = UpstreamFailed(f"the verifier became unavailable: {exc}; new requests go to the edge")
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
            charge = self._charge(outcome, error)
        finally:
            admission.leave(self.principal.tenant_id)
        self.usage = charge.summary
        if charge.batched is not None:
            self._ledger = asyncio.wrap_future(charge.batched)
            if not settings.TANDEM_SETTLE_AFTER_REPLY:
                leases.flush_soon()
                await asyncio.shield(self._ledger)
            return
        if charge.write is None:
            return
        self._ledger = _ledger_write(self.request_id, _db(charge.write)())
        if not settings.TANDEM_SETTLE_AFTER_REPLY:
            await asyncio.shield(self._ledger)

    async def settled(self) -> None:
        """Wait until the ledger holds this stream's charge; raises if writing it failed."""
        if self._settlement is not None:
            await asyncio.shield(self._settlement)
        if self._ledger is not None:
            if self._lease_hold is not None:
                leases.flush_soon()  # someone waits for this row: write the lease's batch now
            await asyncio.shield(self._ledger)

    def _charge(self, outcome: str, error: str) -> _Charge:
        """What the stream delivered and costs, worked out in memory; and the write that records it.

        Money: the cost is ``settlement_cost`` at the price pinned when the reservation was
        made and the reservation's amount, the same inputs ``usage_settle`` reads back from
        the reservation row, so the figure sent to the client is the figure the ledger gets.
        Nothing here touches the database, so the final frame need not wait for a commit.
        """
        stats = self._completion.stats if self._completion is not None else None
        now = time.perf_counter()
        first = self._first_token_at
        duration_ms = (now - self._started) * 1e3
        usage = tenant_services.Usage(
            request_id=self.request_id,
            user_id=self.principal.user_id,
            tags=dict(self.call.tags),
            route_tier=self.route.tier.value,
            route_reason=self.route.reason,
            policy_version=self.route.policy_version,
            model=self.entry.name,
            verifier_version=self.entry.verifier_version if self.route.tier is Tier.SPECULATIVE else "",
            draft_version=self.entry.draft_version,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self._delivered,
            drafted_tokens=Decimal(str(round(self._drafted, 3))),
            accepted_tokens=self._accepted,
            gpu_ms=Decimal(str(round(self._gpu_ms, 3))),
            outcome=outcome,
            finish_reason=stats.finish_reason.value if outcome == "completed" and stats and stats.finish_reason else "",
            error=error,
            ttft_ms=(first - self._started) * 1e3 if first is not None else None,
            duration_ms=duration_ms,
        )
        zero = Decimal(0)
        cost = {"edge": zero, "verifier": zero, "cloud": zero, "total": zero}

        def summary_of(cost: Mapping[str, Decimal]) -> UsageSummary:
            return UsageSummary(
                request_id=self.request_id,
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
                route=self.route,
            )

        reservation, hold, price = self._reservation, self._lease_hold, self._price
        write: Callable[[], None] | None = None
        if reservation is None and hold is None:
            pass  # refused before anything was held: nothing to settle
        elif self._delivered == 0 and outcome != "completed":
            if hold is not None:
                leases.release(hold)  # nothing owed: the worst case goes back to the lease
            else:
                assert reservation is not None
                write = functools.partial(tenant_services.reservation_release, reservation=reservation)
        else:
            assert price is not None
            charged = tenant_services.settlement_cost(price=price, usage=usage, held=self._held_amount())
            cost = {"edge": charged.edge, "verifier": charged.verifier, "cloud": charged.cloud, "total": charged.total}
            inter_token_ms = (now - first) * 1e3 / (self._delivered - 1) if first and self._delivered > 1 else None
            slo = {
                "request_id": self.request_id,
                "tenant_id": self.principal.tenant_id,
                "model": self.entry.name,
                "route_tier": self.route.tier.value,
                "ttft_ms": usage.ttft_ms,
                "inter_token_ms": inter_token_ms,
                "e2e_ms": duration_ms,
                "tokens": self._delivered,
                "outcome": outcome,
            }
            if hold is not None:
                # Counted against the lease now; written with the lease's next batch.
                charge = tenant_services.LeaseCharge(usage=usage, price=price, held=hold.amount)
                return _Charge(summary_of(cost), None, leases.settle(hold, charge, slo))
            assert reservation is not None
            write = functools.partial(_settle_write, reservation, usage, price, charged.total, slo)
        return _Charge(summary_of(cost), write)


@dataclass(frozen=True)
class _Charge:
    summary: UsageSummary
    write: Callable[[], None] | None  # the ledger write (sync, in a DB thread); None when nothing is owed
    batched: concurrent.futures.Future | None = None  # or: the lease batch that will write the row


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


def _ledger_write(request_id: str, write: Awaitable[None]) -> asyncio.Future:
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
leases = LeasePool(run_db=_db_from_thread, on_flush=_slo_samples_write)


@atexit.register
def _leases_return_at_exit() -> None:
    """Write what is pending and give back every lease's unused part when the process ends normally."""
    try:
        leases.close_all(on_this_thread=True)
    except Exception:  # noqa: BLE001 - at exit: said loudly; the stale-reservation task returns the rest
        log.exception("budget leases: returning them at exit failed")


def _request_kwargs(request) -> dict:
    return {"max_tokens": request.max_tokens, "sampling": request.sampling, "stop": request.stop}


async def start(principal: Principal, call: CompletionCall) -> GatewayStream:
    """Admit, route, reserve and start a completion; return once its first token is ready.

    Raises a :class:`GatewayError` (and charges nothing) when the request is invalid, the
    principal may not spend, the model is unknown, a limit is reached or the engine fails
    before producing anything.
    """
    if not principal.may(COMPLETIONS_SCOPE):
        raise PermissionDenied(f"this API key lacks the {COMPLETIONS_SCOPE!r} scope")
    if not principal.can_complete:
        raise PermissionDenied(f"a {principal.role} may not run completions")
    _validate(call)
    entry = (await aget_engines()).get(call.model)
    route = decide(entry)
    engine, request = await _abuild(entry, route, call)
    admission.enter(principal.tenant_id)
    stream = GatewayStream(principal, call, entry, route)
    try:
        await stream._hold(request)
        stream._launch(engine, request)
        first = await stream._queue.get()
    except BaseException:
        stream._cancel.set()
        await stream._settle("error")
        raise
    if isinstance(first, core_errors.VerifierUnavailableError) and entry.edge is not None:
        first = await stream._fail_over_to_edge(first, call)
    if isinstance(first, BaseException):
        raise await stream._fail(first)
    stream._first = first
    return stream


async def collect(stream: GatewayStream, *, ledger_written: bool = True) -> tuple[str, list[TokenDelta]]:
    """Run a stream to the end (non-streaming adapters); return its text and deltas.

    By default it returns once the ledger holds the charge (a batch job's process may end
    right after); the HTTP API, whose process lives on, passes ``ledger_written=False``.
    """
    deltas = [delta async for delta in stream]
    if ledger_written:
        await stream.settled()
    return "".join(d.text for d in deltas), deltas
