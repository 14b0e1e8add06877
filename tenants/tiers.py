"""Where a request runs: the one definition of a tier, imported by the price book, the ledger, the router and the engines.

A plain ``StrEnum`` (no Django), so typed code sees real members; the models store its
``value`` and keep to ``TIER_VALUES`` with a check constraint.
"""

from __future__ import annotations

import enum


class Tier(enum.StrEnum):
    """The draft alone (edge), draft + verifier (speculative), or an upstream cloud model."""

    EDGE = "edge"
    SPECULATIVE = "speculative"
    CLOUD = "cloud"


TIER_VALUES: tuple[str, ...] = tuple(t.value for t in Tier)
TIER_CHOICES: list[tuple[str, str]] = [(t.value, t.value.capitalize()) for t in Tier]
