"""Which tier serves a request, and where it goes when that tier fails: every decision with its reason.

``decide(entry, call)`` picks the first tier of the policy's preference that the model
serves and whose breaker lets traffic through; a tier the client requested (the
``tier`` extension) comes first when the policy allows it, and is refused (400) when it
does not. ``fail_over(entry, route, ...)`` picks the next tier after a failure, so a
failover is a routing decision like any other: the same policy, the same health, a
reason in the ledger. A route is *degraded* when a failure put it below the tier the
policy chose.

The per-tenant, versioned policies (PII, difficulty, confidence) plug in here: the
builtin policy below is what every tenant gets until then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inference.engines import ModelEntry
from inference.errors import InvalidRequest, Overloaded
from tenants.tiers import Tier

POLICY_VERSION = "builtin-2"
# The ledger's reason when a tier's breaker is open (``verifier_down`` predates the cloud tier).
DOWN_REASON = {Tier.SPECULATIVE: "verifier_down", Tier.EDGE: "edge_down", Tier.CLOUD: "cloud_down"}
# Quality order: a route below the tier its policy chose is degraded.
TIER_RANK = {Tier.EDGE: 0, Tier.SPECULATIVE: 1, Tier.CLOUD: 2}


@dataclass(frozen=True)
class Route:
    tier: Tier
    reason: str
    policy_version: str = POLICY_VERSION
    chosen: Tier | None = None  # the tier the policy chose, when a failure moved the request off it

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


@dataclass(frozen=True)
class RoutingPolicy:
    version: str = POLICY_VERSION
    preference: tuple[Tier, ...] = (Tier.SPECULATIVE, Tier.EDGE, Tier.CLOUD)  # when nothing else decides
    allowed: frozenset[Tier] = frozenset(Tier)
    allow_requested_tier: bool = True
    # where a failed tier's requests go next, in order
    failover: dict[Tier, tuple[Tier, ...]] = field(
        default_factory=lambda: {
            Tier.SPECULATIVE: (Tier.EDGE, Tier.CLOUD),
            Tier.CLOUD: (Tier.SPECULATIVE, Tier.EDGE),
            Tier.EDGE: (Tier.SPECULATIVE, Tier.CLOUD),
        }
    )


BUILTIN_POLICY = RoutingPolicy()


def _requested(policy: RoutingPolicy, requested: str | None) -> Tier | None:
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
    requested_tier: str | None = None,
    tenant_id: int | None = None,
    policy: RoutingPolicy = BUILTIN_POLICY,
) -> Route:
    """The tier that serves a new request for ``entry``; raises Overloaded (503) when none is available."""
    requested = _requested(policy, requested_tier)
    if requested is not None:
        if not entry.serves(requested, tenant_id):
            raise InvalidRequest(
                f"the model {entry.name!r} is not served on the {requested} tier for this tenant", param="tier"
            )
        if entry.available(requested, tenant_id):
            return Route(requested, "requested", policy.version)
        return _fallback(entry, policy, requested, DOWN_REASON[requested], policy.failover[requested], tenant_id)
    chosen = next((t for t in policy.preference if t in policy.allowed and entry.serves(t, tenant_id)), None)
    if chosen is None:
        raise Overloaded(f"no tier this tenant may use serves the model {entry.name!r}")
    if entry.available(chosen, tenant_id):
        return Route(chosen, "default", policy.version)
    return _fallback(entry, policy, chosen, DOWN_REASON[chosen], policy.failover[chosen], tenant_id)


def fail_over(
    entry: ModelEntry,
    route: Route,
    tenant_id: int | None = None,
    policy: RoutingPolicy = BUILTIN_POLICY,
    tried: frozenset[Tier] = frozenset(),
) -> Route | None:
    """Where a request goes after ``route``'s tier failed; None when no other tier may serve it."""
    chosen = route.chosen or route.tier
    order = tuple(t for t in policy.failover[route.tier] if t not in tried and t is not route.tier)
    try:
        return _fallback(entry, policy, chosen, DOWN_REASON[route.tier], order, tenant_id)
    except Overloaded:
        return None


def _fallback(
    entry: ModelEntry,
    policy: RoutingPolicy,
    chosen: Tier,
    reason: str,
    order: tuple[Tier, ...],
    tenant_id: int | None,
) -> Route:
    for tier in order:
        if tier in policy.allowed and entry.available(tier, tenant_id):
            return Route(tier, reason, policy.version, chosen=chosen)
    raise Overloaded(f"the {chosen} tier of {entry.name!r} is down and no other tier may serve it; retry shortly")
