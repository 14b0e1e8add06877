"""Values the tenants tests build: the test price list, and Usage reports."""

from __future__ import annotations

from decimal import Decimal

from tenants import services
from tenants.models import Reservation

MODEL = "tandem-demo"
# Round numbers, so the expected costs in the tests can be worked out by hand.
PRICES = [
    {
        "model": MODEL,
        "tier": "speculative",
        "prompt_per_mtok": Decimal("0.50"),
        "completion_per_mtok": Decimal("1.50"),
        "draft_per_mtok": Decimal("0.02"),
        "gpu_per_hour": Decimal("2.40"),
        "max_gpu_ms_per_token": Decimal("5"),
    },
    {
        "model": MODEL,
        "tier": "edge",
        "prompt_per_mtok": Decimal("0.05"),
        "completion_per_mtok": Decimal("0.10"),
        "draft_per_mtok": Decimal("0.02"),
    },
    {"model": MODEL, "tier": "cloud", "prompt_per_mtok": Decimal("3"), "completion_per_mtok": Decimal("15")},
]


def usage_for(reservation: Reservation | None = None, **overrides) -> services.Usage:
    """A Usage for a reservation: a plain speculative completion unless told otherwise."""
    fields = {
        "request_id": reservation.request_id if reservation is not None else "req",
        "user_id": None,
        "tags": {},
        "route_tier": "speculative",
        "route_reason": "default",
        "policy_version": "p1",
        "model": MODEL,
        "verifier_version": "v1",
        "draft_version": "d1",
        "prompt_tokens": 1000,
        "completion_tokens": 200,
        "drafted_tokens": Decimal("800"),
        "accepted_tokens": 150,
        "gpu_ms": Decimal("1500"),
        "outcome": "completed",
        "finish_reason": "stop",
    }
    fields.update(overrides)
    return services.Usage(**fields)
