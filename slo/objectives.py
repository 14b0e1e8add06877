"""What an SLO objective is, the platform's default set, and the arithmetic of attainment, error budget and burn rate.

Pure (no database): ``Objective`` is the value both the stored rows and the defaults become;
the selectors feed it ``Counts``. The error budget of an objective with target ``t`` is the
share ``1 - t`` of requests allowed to be bad; the burn rate over a window is the bad share
there divided by that budget (1.0 spends the budget exactly over the SLO window). Alerting
follows the Google SRE workbook's multiwindow, multi-burn-rate rules (chapter "Alerting on
SLOs"): fast burn when both the 1 h and the 5 min burn rates are at least 14.4 (2 % of a
30-day budget in an hour), slow burn when both the 6 h and the 30 min ones are at least 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.db import models

from slo.counts import EDGES, Counts


class LatencyClass(models.TextChoices):
    INTERACTIVE = "interactive"
    BATCH = "batch"


class ObjectiveKind(models.TextChoices):
    TTFT = "ttft", "time to first token"
    ITL = "itl", "inter-token latency"
    E2E = "e2e", "end-to-end latency (completed requests)"
    AVAILABILITY = "availability", "availability (no server-side failure)"
    FALLBACK = "fallback", "fallback success (failed-over requests that completed)"


LATENCY_KINDS = {"ttft", "itl", "e2e"}
SHORT_LABELS = {
    "ttft": "TTFT",
    "itl": "inter-token",
    "e2e": "end to end",
    "availability": "availability",
    "fallback": "fallback success",
}

# (window, its short confirming window, burn-rate factor): the workbook's page and ticket rules.
FAST_BURN = (timedelta(hours=1), timedelta(minutes=5), 14.4)
SLOW_BURN = (timedelta(hours=6), timedelta(minutes=30), 6.0)
BURN_WINDOWS = (timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=1), timedelta(hours=6))


@dataclass(frozen=True)
class Objective:
    latency_class: str
    kind: str
    threshold_ms: int | None  # latency kinds only: one of ``EDGES[kind]``
    target: float  # the share of requests that must be good, e.g. 0.95
    window_days: int
    is_default: bool = True

    @property
    def budget(self) -> float:
        return 1.0 - self.target

    @property
    def label(self) -> str:
        """Short, for tables and chart legends (``ObjectiveKind``'s labels say what each counts)."""
        if self.kind in LATENCY_KINDS:
            return f"{SHORT_LABELS[self.kind]} <= {self.threshold_ms} ms"
        return SHORT_LABELS[self.kind]

    def good_total(self, counts: Counts) -> tuple[int, int]:
        """(good requests, requests counted) of ``counts`` for this objective."""
        if self.kind in LATENCY_KINDS:
            assert self.threshold_ms is not None
            return counts.good(self.kind, self.threshold_ms)
        if self.kind == "availability":
            return counts.requests - counts.failures, counts.requests
        return counts.fallback_successes, counts.fallbacks

    def attainment(self, counts: Counts) -> float | None:
        """The share of good requests; None when none was counted."""
        good, total = self.good_total(counts)
        return good / total if total else None

    def budget_left(self, counts: Counts) -> float | None:
        """The share of the error budget not spent (1.0: none spent; negative: overspent)."""
        attained = self.attainment(counts)
        if attained is None:
            return None
        return 1.0 - (1.0 - attained) / self.budget

    def burn_rate(self, counts: Counts) -> float:
        """The bad share over the budget: 0.0 without requests (nothing burns)."""
        attained = self.attainment(counts)
        return 0.0 if attained is None else (1.0 - attained) / self.budget


# The platform's default set: what a tenant that defined none is held to (one source of truth).
DEFAULT_WINDOW_DAYS = 28
DEFAULTS: dict[tuple[str, str], tuple[int | None, float]] = {
    ("interactive", "ttft"): (500, 0.95),
    ("interactive", "itl"): (50, 0.95),
    ("interactive", "e2e"): (10000, 0.95),
    ("interactive", "availability"): (None, 0.995),
    ("interactive", "fallback"): (None, 0.95),
    ("batch", "ttft"): (5000, 0.95),
    ("batch", "itl"): (100, 0.95),
    ("batch", "e2e"): (60000, 0.95),
    ("batch", "availability"): (None, 0.99),
    ("batch", "fallback"): (None, 0.95),
}


def default_objectives() -> list[Objective]:
    return [
        Objective(latency_class=cls, kind=kind, threshold_ms=threshold, target=target, window_days=DEFAULT_WINDOW_DAYS)
        for (cls, kind), (threshold, target) in DEFAULTS.items()
    ]


def threshold_choices(kind: str) -> tuple[int, ...]:
    """The thresholds a latency objective may use: its histogram's edges (so attainment is exact)."""
    return EDGES[kind]
