"""The one path every completion takes: websocket, OpenAI API and batch jobs all call ``start``.

    principal = await authenticate_api_key(raw) | await principal_for_user(user, tenant_id)
    stream = await start(principal, call)   # validate, admit, route, hold money, first token
    async for delta in stream: ...          # token deltas with provenance
    stream.usage                            # settled: tokens, cost breakdown, stats
    await stream.aclose()                   # a client went away: stop and settle what was delivered
    await stream.settled()                  # the ledger row is written (it may lag the last frame)

Each step has its own module: ``principals`` (who is asking), ``admission`` (may it start
now), ``router`` (which tier, and where to go when it fails), ``holds`` (the worst case,
held before the engine runs), ``stream`` (the completion in flight), ``handoff`` (engine
events to the event loop), ``settlement`` (the charge for exactly what was delivered, the
ledger and SLO writes) and ``runtime`` (the threads all this runs on). ``start`` waits
for the first token before it returns, so an error before any output (bad input, no
budget, engine busy) reaches the adapter as a plain error with a status code and charges
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable

from django.conf import settings

from inference.admission import validate
from inference.cache import CACHED_TIERS, ReplayEngine, cache_key, cacheable, exact_cache, in_flight, key_material
from inference.completion import (
    MINTED_ID_PREFIX,
    CompletionCall,
    TokenDelta,
    UsageSummary,
    new_request_id,
)
from inference.engines import Engine, aget_engines, arequest_for, draft_chooser, serving_entry
from inference.errors import AuthenticationFailed, GatewayError
from inference.holds import hold_worst_case, price_for
from inference.limits import default_limits, limiter
from inference.principals import (
    Principal,
    authenticate_api_key,
    authorize_completion,
    principal_for_api_key_id,
    principal_for_user,
)
from inference.queueing import Slot, scheduler
from inference.redaction import serving_call
from inference.router import Route, decide, spill
from inference.runtime import db_read_once
from inference.selectors import routing_policy_cached, routing_policy_for
from inference.semantic_cache import SemanticLookup, content_words, semantic_cache
from inference.settlement import leases, ledger_writes_flush
from inference.shared_streams import shared_streams
from inference.signals import assess
from inference.stream import MAX_DELTAS_AT_ONCE, GatewayStream
from tenants.tiers import Tier

log = logging.getLogger(__name__)

__all__ = [
    "AuthenticationFailed",
    "GatewayError",
    "MAX_DELTAS_AT_ONCE",
    "MINTED_ID_PREFIX",
    "CompletionCall",
    "GatewayStream",
    "Principal",
    "TokenDelta",
    "UsageSummary",
    "authenticate_api_key",
    "collect",
    "ledger_writes_flush",
    "leases",
    "new_request_id",
    "principal_for_api_key_id",
    "principal_for_user",
    "start",
]


async def start(
    principal: Principal, call: CompletionCall, on_queued: Callable[[int], None] | None = None
) -> GatewayStream:
    """Admit, route, hold money for and start a completion; return once its first token is ready.

    Where its tier's engines are all busy it waits its turn (``inference.queueing``);
    ``on_queued(position)`` hears where it stands, now and then, until it starts.

    Raises a :class:`~inference.errors.GatewayError` (and charges nothing) when the request
    is invalid, the principal may not spend, the model is unknown, a limit is reached or
    every tier that may serve it fails before producing anything.
    """
    authorize_completion(principal)
    validate(call)
    engines = await aget_engines()
    entry = engines.get(call.model)
    if engines.upstreams is not None and engines.upstreams.stale():
        await db_read_once(("upstreams", id(engines.upstreams)), engines.upstreams.refresh)
    tenant_id = principal.tenant_id
    chooser = draft_chooser()
    if chooser is not None and chooser.stale():
        await db_read_once(("draft plans", id(chooser)), chooser.refresh)
    entry = serving_entry(entry, tenant_id)  # its draft version: current, a canary's candidate or the tenant's pin
    policy = routing_policy_cached(tenant_id=tenant_id)
    if policy is None:
        policy = await db_read_once(("routing policy", tenant_id), routing_policy_for, tenant_id=tenant_id)
    signals = await assess(call, policy, entry.tokenizer, entry.serves(Tier.CLOUD, tenant_id))
    route = decide(entry, signals, policy, tenant_id)
    if policy.at_capacity == "spill" and _busy(entry, route.tier):
        route = spill(entry, route, lambda tier: _busy(entry, tier), tenant_id, policy) or route
    redacted = serving_call(call, route.redact, signals.pii)
    if redacted is None:  # PII that cannot be cut out cleanly stays off the cloud
        route = decide(entry, signals, dataclasses.replace(policy, pii_action="keep_off_cloud"), tenant_id)
        redacted = (call, None)
    served, redaction = redacted
    if policy.escalation and route.tier is Tier.EDGE and served.logprobs is None:
        served = dataclasses.replace(served, logprobs=0)  # the edge answer's confidence is judged from them
    key = hit = leader = semantic = None
    reason = "exact_cache"
    if _may_cache(call, route, policy, signals):
        key = cache_key(tenant_id, call, entry, policy)
        hit = await exact_cache.get(key)
        if hit is None and policy.semantic_cache:  # a request close enough in meaning, answered before?
            semantic = await _semantic_lookup(tenant_id, call, entry, policy)
            if semantic is not None and semantic.match is not None:
                hit = await exact_cache.get(semantic.match.key)
                reason = "semantic_cache" if hit is not None else reason
        if hit is None:
            leader, leads = in_flight.lead_or_follow(key)
            if not leads:  # the same request is generating now: wait for its answer instead of generating it again
                await _follow(leader, call.latency_class)
                hit, leader, reason = await exact_cache.get(key), None, "collapsed"
                if hit is None:  # its leader stored nothing (failed, cancelled, personal data): generate after all
                    leader, leads = in_flight.lead_or_follow(key)
                    leader = leader if leads else None
    if hit is not None:  # the same request answered moments ago: replayed, no engine, at the cache rate
        signals_seen = dict(route.signals)
        if reason == "semantic_cache" and semantic is not None and semantic.match is not None:
            signals_seen["similarity"] = round(semantic.match.similarity, 4)
        route = Route(Tier(hit.tier), reason, policy.version, None, signals_seen)
        _, request = await arequest_for(entry, route.tier, call, tenant_id)
        engine: Engine = ReplayEngine(hit, entry.tokenizer, entry.context_length)
    else:
        engine, request = await arequest_for(entry, route.tier, served, tenant_id)
    rate_tokens = len(request.prompt_ids) + request.max_tokens  # held against tokens per minute; corrected at the end
    await limiter.admit(principal, rate_tokens)
    slot: Slot | None = None
    try:
        if hit is None:  # a replay takes no engine slot
            slot = await _slot(principal, entry, route.tier, call.latency_class, on_queued)
        stream = GatewayStream(principal, call, entry, route, policy, redaction, signals.pii, slot)
    except BaseException:
        if slot is not None:
            slot.release()
        limiter.give_back_soon(principal, rate_tokens)
        if leader is not None and key is not None:
            in_flight.done(key, leader)
        raise
    stream.rate_tokens = rate_tokens
    stream.use_cache(key, hit, leader, semantic if hit is None else None, reason)
    try:
        stream.prompt_tokens = len(request.prompt_ids)
        stream.price = await price_for(model=entry.name, tier=route.tier.value)
        await hold_worst_case(
            stream.hold,
            leases=leases,
            principal=principal,
            request_id=stream.request_id,
            request_id_fresh=call.request_id_fresh,
            price=stream.price,
            prompt_tokens=stream.prompt_tokens,
            max_tokens=request.max_tokens,
            replay=hit is not None,
        )
        stream.launch(engine, request)
        await stream.first()  # fails over to another tier when this one fails before its first token
    except BaseException:
        stream._stop()
        await stream._settle("error")  # a no-op when the failure already settled it
        raise
    return stream


async def _follow(leader, latency_class: str) -> None:
    """Wait for a leader's answer (at most the class's queue deadline: then generate after all)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.shield(asyncio.wrap_future(leader)), settings.TANDEM_QUEUE_DEADLINE_S[latency_class]
        )


async def _semantic_lookup(tenant_id: int, call: CompletionCall, entry, policy) -> SemanticLookup | None:
    """The prompt's embedding, its bucket, and the nearest stored prompt at or above the policy's threshold."""
    try:
        vector = await asyncio.to_thread(semantic_cache.embedder.embed, call.prompt)
        bucket = semantic_cache.bucket(key_material(call, entry, policy), tenant_id, call.prompt)
        lookup = SemanticLookup(bucket, vector, content_words(call.prompt))
    except Exception:  # noqa: BLE001 - no embedding is a miss (logged), never a failed request
        log.exception("semantic cache: the prompt could not be embedded; answered without it")
        return None
    return dataclasses.replace(lookup, match=await semantic_cache.nearest(lookup, policy.semantic_threshold))


def _may_cache(call: CompletionCall, route, policy, signals) -> bool:
    """Whether this request may be answered from (and its answer stored in) the exact result cache."""
    if route.tier not in CACHED_TIERS or route.redact:
        return False
    if policy.escalation and route.tier is Tier.EDGE:
        return False  # an edge answer is judged (and maybe sent up) as it is generated
    return cacheable(call, policy, bool(signals.pii_kinds))


def _busy(entry, tier: Tier) -> bool:
    """Whether ``tier``'s engines have no free slot for a new request now."""
    return scheduler.pool(*entry.pool(tier)).busy()


async def _slot(principal: Principal, entry, tier: Tier, latency_class: str, on_queued) -> Slot:
    """A slot on the engines ``tier`` runs on, waiting for one where they are busy (inference.queueing)."""
    limits = principal.limits or default_limits()
    own = principal.key_limits
    key = None
    if own is not None and own.max_streams is not None and principal.api_key_id is not None:
        key = (principal.api_key_id, own.max_streams)
    pool_name, capacity = entry.pool(tier)
    assert limits.max_streams is not None
    # Across processes first (Redis): a request waiting for its tenant's streams elsewhere to end holds no slot here.
    owners = [(f"t{principal.tenant_id}", limits.max_streams)] + ([(f"k{key[0]}", key[1])] if key else [])
    claim = await shared_streams.claim(
        owners, settings.TANDEM_QUEUE_DEADLINE_S[latency_class], (lambda: on_queued(1)) if on_queued else None
    )
    try:
        slot = await scheduler.pool(pool_name, capacity).acquire(
            principal.tenant_id, limits.max_streams, latency_class, on_queued, key
        )
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    if claim is not None:
        slot.also = claim.release
    return slot


async def collect(stream: GatewayStream, *, ledger_written: bool = True) -> tuple[str, list[TokenDelta]]:
    """Run a stream to the end (non-streaming adapters); return its text and deltas.

    By default it returns once the ledger holds the charge (a batch job's process may end
    right after); the HTTP API, whose process lives on, passes ``ledger_written=False``.
    """
    deltas: list[TokenDelta] = []
    async for delta in stream:  # waits for the next item: a token, the end (settled) or a failure (raised)
        deltas.append(delta)
        # and takes the tokens already at hand with it: a whole answer's arrive together (64 tokens taken so:
        # about 13 us on the event loop, against 25 for a coroutine step each through ``__anext__``)
        deltas += stream.take_at_hand(limit=sys.maxsize)
    if ledger_written:
        await stream.settled()
    return "".join(d.text for d in deltas), deltas
