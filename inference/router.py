"""Which tier serves a request, and where it goes when that tier fails: every decision with its reason and signals.

``decide(entry, signals, policy, tenant_id)`` applies the tenant's routing policy to the
request's signals (``inference.signals``), in precedence order:

1. the tiers the policy allows (and the model serves for this tenant);
2. PII, a hard constraint: kept off the cloud, redacted for it, or refused (400);
3. a tier the client asked for (the ``tier`` extension), if the policy allows it;
4. the prompt's difficulty: routine -> edge, hard for a strong open model -> speculative,
   needing a frontier model -> cloud (the policy's thresholds);
5. the output budget and prompt length: a long answer or prompt skips the edge;
6. the latency class and queue depth: an interactive request spills up from a saturated
   edge; a batch one waits its turn there;
7. tier health: a tier whose breaker is open is skipped for the next in the failover order.

``fail_over(entry, route, ...)`` picks the next tier after a failure, so a failover is a
routing decision like any other: the same policy, the same health, a reason in the
ledger. A route is *degraded* when a failure put it below the tier the policy chose.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inference.engines import ModelEntry
from inference.errors import InvalidRequest, Overloaded
from inference.models import SEMANTIC_THRESHOLD_DEFAULT
from tenants.tiers import Tier

if TYPE_CHECKING:
    from inference.signals import Signals

POLICY_VERSION = "builtin-2"
# The ledger's reason when a tier's breaker is open (``verifier_down`` predates the cloud tier).
DOWN_REASON = {Tier.SPECULATIVE: "verifier_down", Tier.EDGE: "edge_down", Tier.CLOUD: "cloud_down"}
# Quality order: a route below the tier its policy chose is degraded.
TIER_RANK = {Tier.EDGE: 0, Tier.SPECULATIVE: 1, Tier.CLOUD: 2}
# Where each difficulty goes when its tier may not serve it, in order.
DIFFICULTY_TIERS = {
    "routine": (Tier.EDGE, Tier.SPECULATIVE, Tier.CLOUD),
    "hard_open": (Tier.SPECULATIVE, Tier.CLOUD, Tier.EDGE),
    "hard_frontier": (Tier.CLOUD, Tier.SPECULATIVE, Tier.EDGE),
}
PII_ACTIONS = ("keep_off_cloud", "redact_then_cloud", "refuse")


class PiiRefused(InvalidRequest):
    code = "pii_detected"


@dataclass(frozen=True)
class Route:
    tier: Tier
    reason: str
    policy_version: str = POLICY_VERSION
    chosen: Tier | None = None  # the tier the policy chose, when a failure moved the request off it
    signals: Mapping[str, Any] = field(default_factory=dict, compare=False)  # what the policy decided from
    redact: bool = field(default=False, compare=False)  # PII goes to this (cloud) tier redacted

    @property
    def degraded(self) -> bool:
        """True when a failure put this request below the tier its policy chose (an edge route it chose is not)."""
        return self.chosen is not None and TIER_RANK[self.tier] < TIER_RANK[self.chosen]

    def as_dict(self) -> dict:
        return {
            "tier": self.tier.value,
            "reason": self.reason,
            "degraded": self.degraded,
            "policy_version": self.policy_version,
        }


def _default_failover() -> dict[Tier, tuple[Tier, ...]]:
    return {
        Tier.SPECULATIVE: (Tier.EDGE, Tier.CLOUD),
        Tier.CLOUD: (Tier.SPECULATIVE, Tier.EDGE),
        Tier.EDGE: (Tier.SPECULATIVE, Tier.CLOUD),
    }


@dataclass(frozen=True)
class Policy:
    """A routing policy as the router applies it (a published ``RoutingPolicy`` row, or the builtin one)."""

    version: str = POLICY_VERSION
    allowed: frozenset[Tier] = frozenset(Tier)
    allow_requested_tier: bool = True
    pii_action: str = "keep_off_cloud"
    difficulty_routing: bool = True
    cloud_threshold: float | None = None  # None: the classifier's committed default
    hard_threshold: float | None = None
    edge_max_output_tokens: int = 1024
    edge_max_prompt_tokens: int = 4096
    edge_max_streams: int = 16
    at_capacity: str = "wait"  # or "spill": the chosen tier's engines all busy, another allowed tier takes it
    cache_ttl_s: int = 3600  # exact result cache: how long an answer is kept (0: off); inference.cache
    cache_sampled: bool = False  # cache sampled requests too (greedy ones only by default)
    cache_pii: bool = False  # cache requests in which the router found personal data
    semantic_cache: bool = False  # replay the answer of a prompt close in meaning (inference.semantic_cache)
    semantic_threshold: float = SEMANTIC_THRESHOLD_DEFAULT  # cosine similarity a stored prompt needs
    escalation: bool = False
    escalation_min_mean_logprob: float = -2.5
    escalation_max_low_share: float = 0.3
    escalation_hold_tokens: int = 16
    preference: tuple[Tier, ...] = (Tier.SPECULATIVE, Tier.EDGE, Tier.CLOUD)  # when difficulty does not decide
    failover: dict[Tier, tuple[Tier, ...]] = field(default_factory=_default_failover)

    @classmethod
    def from_row(cls, row) -> Policy:
        return cls(
            version=row.label,
            allowed=frozenset(Tier(t) for t in row.allowed_tiers),
            allow_requested_tier=row.allow_requested_tier,
            pii_action=row.pii_action,
            difficulty_routing=row.difficulty_routing,
            cloud_threshold=row.cloud_threshold,
            hard_threshold=row.hard_threshold,
            edge_max_output_tokens=row.edge_max_output_tokens,
            edge_max_prompt_tokens=row.edge_max_prompt_tokens,
            edge_max_streams=row.edge_max_streams,
            at_capacity=row.at_capacity,
            cache_ttl_s=row.cache_ttl_s,
            cache_sampled=row.cache_sampled,
            cache_pii=row.cache_pii,
            semantic_cache=row.semantic_cache,
            semantic_threshold=row.semantic_threshold,
            escalation=row.escalation,
            escalation_min_mean_logprob=row.escalation_min_mean_logprob,
            escalation_max_low_share=row.escalation_max_low_share,
            escalation_hold_tokens=row.escalation_hold_tokens,
        )


BUILTIN_POLICY = Policy()


def _requested(policy: Policy, requested: str | None) -> Tier | None:
    if requested is None:
        return None
    try:
        tier = Tier(requested)
    except ValueError:
        raise InvalidRequest(
            f"unknown tier {requested!r}: one of {', '.join(t.value for t in Tier)}", param="tier"
        ) from None
    if not policy.allow_requested_tier or tier not in policy.allowed:
        raise InvalidRequest(f"this tenant's routing policy does not allow the {tier} tier", param="tier")
    return tier


def decide(
    entry: ModelEntry,
    signals: Signals | None = None,
    policy: Policy = BUILTIN_POLICY,
    tenant_id: int | None = None,
) -> Route:
    """The tier that serves a new request for ``entry``; raises InvalidRequest (400) or Overloaded (503)."""
    from inference.signals import Signals

    signals = signals or Signals()
    recorded = signals.as_dict()

    def route(tier: Tier, reason: str, chosen: Tier | None = None) -> Route:
        redact = tier is Tier.CLOUD and bool(signals.pii_kinds) and policy.pii_action == "redact_then_cloud"
        return Route(tier, reason, policy.version, chosen, recorded, redact)

    # 1. what this tenant may use at all
    candidates = [t for t in Tier if t in policy.allowed and entry.serves(t, tenant_id)]
    if not signals.pii_scanned and Tier.CLOUD in candidates:
        candidates.remove(Tier.CLOUD)  # a cloud upstream appeared after the checks ran: the prompt was not scanned
    # 2. PII: a hard constraint
    pii_reason = ""
    if signals.pii_kinds:
        kinds = ", ".join(signals.pii_kinds)
        if policy.pii_action == "refuse":
            raise PiiRefused(
                f"the prompt contains personal data or secrets ({kinds}) and this tenant's routing policy refuses "
                "such requests; remove them and retry",
                param="prompt",
            )
        if policy.pii_action == "keep_off_cloud" and Tier.CLOUD in candidates:
            candidates.remove(Tier.CLOUD)
            pii_reason = "pii"
    # logprobs name the tokens the serving model read and wrote: an upstream that read placeholders for
    # the personal data would name tokens the client never sees, so a redacted prompt's logprobs stay here
    if signals.logprobs and signals.pii_kinds and Tier.CLOUD in candidates:
        candidates.remove(Tier.CLOUD)
        if signals.requested_tier == Tier.CLOUD.value:
            raise InvalidRequest(
                "logprobs of a prompt with personal data are not served by the cloud tier (it reads the prompt "
                "redacted); ask for another tier or without logprobs",
                param="logprobs",
            )
    # 3. a tier the client asked for
    requested = _requested(policy, signals.requested_tier)
    if requested is not None:
        if requested not in candidates:
            if pii_reason and requested is Tier.CLOUD:
                raise PiiRefused(
                    f"the prompt contains personal data or secrets ({', '.join(signals.pii_kinds)}) and this "
                    "tenant's routing policy keeps them off the cloud tier you asked for",
                    param="tier",
                )
            raise InvalidRequest(
                f"the model {entry.name!r} is not served on the {requested} tier for this tenant", param="tier"
            )
        return _healthy(entry, policy, route, requested, "requested", tenant_id)
    if not candidates:
        raise Overloaded(f"no tier this tenant may use serves the model {entry.name!r}")
    # 4. difficulty (or the policy's plain preference)
    if signals.difficulty is not None:
        order = DIFFICULTY_TIERS[signals.difficulty]
        tier = next(t for t in (*order, *candidates) if t in candidates)
        reason = signals.difficulty
        if pii_reason and order[0] is Tier.CLOUD:
            reason = pii_reason  # it would have gone to the cloud, but for the personal data
    else:
        tier = next(t for t in (*policy.preference, *candidates) if t in candidates)
        reason = pii_reason or "default"
    # 5. the output budget and prompt length; 6. the latency class and the edge's queue
    if tier is Tier.EDGE:
        above = next((t for t in (Tier.SPECULATIVE, Tier.CLOUD) if t in candidates), None)
        if above is not None:
            if signals.max_tokens > policy.edge_max_output_tokens:
                tier, reason = above, "long_output"
            elif signals.prompt_tokens > policy.edge_max_prompt_tokens:
                tier, reason = above, "long_prompt"
            elif signals.latency_class == "interactive" and entry.in_flight(Tier.EDGE) >= policy.edge_max_streams:
                tier, reason = above, "edge_saturated"
    # 7. health
    return _healthy(entry, policy, route, tier, reason, tenant_id)


def _healthy(entry: ModelEntry, policy: Policy, route, tier: Tier, reason: str, tenant_id: int | None) -> Route:
    if entry.available(tier, tenant_id):
        return route(tier, reason)
    for other in policy.failover[tier]:
        if other in policy.allowed and entry.available(other, tenant_id):
            return route(other, DOWN_REASON[tier], tier)
    raise Overloaded(f"the {tier} tier of {entry.name!r} is down and no other tier may serve it; retry shortly")


def fail_over(
    entry: ModelEntry,
    route: Route,
    tenant_id: int | None = None,
    policy: Policy = BUILTIN_POLICY,
    tried: frozenset[Tier] = frozenset(),
) -> Route | None:
    """Where a request goes after ``route``'s tier failed; None when no other tier may serve it.

    The same policy decides: a tier it does not allow, or the cloud for a prompt whose
    personal data it keeps off the cloud, is never a failover target.
    """
    chosen = route.chosen or route.tier
    for tier in policy.failover[route.tier]:
        if tier in tried or tier is route.tier:
            continue
        if _may_take(entry, policy, route, tier, tenant_id):
            redact = tier is Tier.CLOUD and bool(route.signals.get("pii"))
            return Route(tier, DOWN_REASON[route.tier], policy.version, chosen, route.signals, redact)
    return None


def spill(
    entry: ModelEntry,
    route: Route,
    busy: Callable[[Tier], bool],
    tenant_id: int | None = None,
    policy: Policy = BUILTIN_POLICY,
) -> Route | None:
    """Another tier for ``route``'s request when its own engines are all ``busy`` (a policy with ``at_capacity`` spill).

    The first tier of the policy's failover order that may take the request (the same
    constraints as a failover: allowed, up, PII kept off the cloud) and is not busy
    itself; None when there is none, and the request waits its turn instead.
    """
    for tier in policy.failover[route.tier]:
        if tier is not route.tier and not busy(tier) and _may_take(entry, policy, route, tier, tenant_id):
            redact = tier is Tier.CLOUD and bool(route.signals.get("pii"))
            return Route(tier, "at_capacity", policy.version, route.tier, route.signals, redact)
    return None


def _may_take(entry: ModelEntry, policy: Policy, route: Route, tier: Tier, tenant_id: int | None) -> bool:
    """Whether ``tier`` may take over ``route``'s request: the policy allows it, and it is up.

    The cloud never takes a prompt whose PII the policy keeps off it, one never scanned for
    PII (no cloud could serve it when it started), nor a redacted one's request for logprobs
    (the upstream would name placeholder tokens), whatever brings the request there.
    """
    if tier not in policy.allowed:
        return False
    if tier is Tier.CLOUD and (
        (route.signals.get("pii") and policy.pii_action != "redact_then_cloud")
        or (route.signals.get("logprobs") and route.signals.get("pii"))
        or route.signals.get("pii_unscanned")
    ):
        return False
    return entry.available(tier, tenant_id)


def escalate(
    entry: ModelEntry, route: Route, tenant_id: int | None = None, policy: Policy = BUILTIN_POLICY
) -> Route | None:
    """The tier a low-confidence answer goes up to from ``route``'s (edge -> speculative, else cloud); None if none may.

    The same constraints as any route: the policy's tiers, PII kept off the cloud, a
    redacted prompt's request for logprobs off the cloud, and health.
    """
    for tier in sorted(Tier, key=TIER_RANK.__getitem__):
        if TIER_RANK[tier] > TIER_RANK[route.tier] and _may_take(entry, policy, route, tier, tenant_id):
            redact = tier is Tier.CLOUD and bool(route.signals.get("pii"))
            return Route(tier, "escalated", policy.version, None, route.signals, redact)
    return None
