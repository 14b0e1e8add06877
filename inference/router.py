"""Which tier serves a request. Simple for now: speculative by default, the edge when the verifier is down.

The full routing layer (per-tenant versioned policies, PII constraints, confidence
escalation, cloud upstreams) is its own issue; it plugs in here, and every decision
already carries its reason and policy version into the ledger.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from inference.engines import ModelEntry
from inference.errors import Overloaded

POLICY_VERSION = "builtin-1"


class Tier(enum.StrEnum):
    EDGE = "edge"
    SPECULATIVE = "speculative"
    CLOUD = "cloud"


@dataclass(frozen=True)
class Route:
    tier: Tier
    reason: str
    policy_version: str = POLICY_VERSION

    @property
    def degraded(self) -> bool:
        """True when the answer is below the model's promised (verifier) quality."""
        return self.tier is Tier.EDGE and self.reason != "requested"


def decide(entry: ModelEntry) -> Route:
    if entry.verifier_up():
        return Route(Tier.SPECULATIVE, "default")
    if entry.edge is not None:
        return Route(Tier.EDGE, "verifier_down")
    raise Overloaded(f"the verifier of {entry.name!r} is down and it has no edge model to fall back to")
