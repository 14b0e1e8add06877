"""Reads of the registry: versions, rollouts with their steps, the serving plan, the canary's live figures."""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import Avg, Count, Q, QuerySet, Sum

from registry.models import ModelRole, ModelVersion, Rollout, RolloutStatus, TenantModelPin, VersionStatus
from tenants.models import UsageRecord

ACTIVE_ROLLOUT = (RolloutStatus.RUNNING, RolloutStatus.CANARY, RolloutStatus.PAUSED)


@dataclass(frozen=True)
class DraftPlan:
    """Which draft serves a model's new sessions: a tenant's pin, else the canary's share, else the current one."""

    current: str | None
    candidate: str | None = None
    share: float = 0.0  # of new sessions (without a pin) that get the candidate
    pins: dict[int, str] = field(default_factory=dict)  # tenant id -> version
    sources: dict[str, str] = field(default_factory=dict)  # version -> GGUF path, for loading it


def current_version(*, model: str, role: str) -> ModelVersion | None:
    return ModelVersion.objects.filter(model=model, role=role, status=VersionStatus.CURRENT).first()


def versions_list(*, model: str | None = None) -> QuerySet[ModelVersion]:
    rows = ModelVersion.objects.select_related("parent", "created_by")
    return rows.filter(model=model) if model is not None else rows


def rollouts_list(*, limit: int = 20) -> list[Rollout]:
    rows = Rollout.objects.select_related("candidate", "baseline", "source_version").prefetch_related("steps")
    return list(rows[:limit])


def pins_for_tenant(*, tenant_id: int) -> dict[str, ModelVersion]:
    return {
        pin.model: pin.version for pin in TenantModelPin.objects.filter(tenant_id=tenant_id).select_related("version")
    }


def draft_plans_read() -> dict[str, DraftPlan]:
    """Every model's draft plan, from the registry's rows (three small queries)."""
    current: dict[str, ModelVersion] = {
        v.model: v for v in ModelVersion.objects.filter(role=ModelRole.DRAFT, status=VersionStatus.CURRENT)
    }
    canaries = {
        r.model: r
        for r in Rollout.objects.filter(status=RolloutStatus.CANARY, candidate__isnull=False).select_related(
            "candidate"
        )
    }
    pins: dict[str, dict[int, ModelVersion]] = {}
    for pin in TenantModelPin.objects.select_related("version"):
        pins.setdefault(pin.model, {})[pin.tenant_id] = pin.version
    plans = {}
    for model in set(current) | set(canaries) | set(pins):
        named = [current.get(model), *pins.get(model, {}).values()]
        rollout = canaries.get(model)
        if rollout is not None:
            named.append(rollout.candidate)
        plans[model] = DraftPlan(
            current=current[model].version if model in current else None,
            candidate=rollout.candidate.version if rollout is not None and rollout.candidate is not None else None,
            share=float(rollout.canary_share) if rollout is not None else 0.0,
            pins={tenant: v.version for tenant, v in pins.get(model, {}).items()},
            sources={v.version: v.source for v in named if v is not None and v.format == "gguf"},
        )
    return plans


@dataclass(frozen=True)
class ServingFigures:
    """One draft version's live completions on the speculative tier over a window (from the ledger)."""

    version: str
    completions: int
    # per-token acceptance: accepted / (accepted + rejections), each round's draft counting its
    # accepted tokens and, where the verifier cut it short, one rejection. Unlike accepted / drafted,
    # it does not fall when the controller drafts longer (its lengths follow the machine's timings)
    acceptance: float | None
    error_rate: float | None
    ttft_ms: float | None  # mean
    tokens: int

    def as_dict(self) -> dict:
        return {
            "version": self.version,
            "completions": self.completions,
            "acceptance": None if self.acceptance is None else round(self.acceptance, 4),
            "error_rate": None if self.error_rate is None else round(self.error_rate, 4),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 2),
            "tokens": self.tokens,
        }


def serving_figures(*, model: str, version: str, since=None, before=None, last: int | None = None) -> ServingFigures:
    """The ledger's figures for ``version`` of ``model`` on the speculative tier: since ``since``, or its last ``last``
    completions before ``before`` (the baseline's recent past, when the canary leaves it no traffic)."""
    rows = UsageRecord.objects.filter(model=model, draft_version=version, route_tier="speculative", source="generation")
    if since is not None:
        rows = rows.filter(created_at__gte=since)
    if before is not None:
        rows = rows.filter(created_at__lt=before)
    if last is not None:
        ids = list(rows.order_by("-created_at").values_list("id", flat=True)[:last])
        rows = UsageRecord.objects.filter(id__in=ids)
    agg = rows.aggregate(
        n=Count("id"),
        errors=Count("id", filter=Q(outcome="error")),
        accepted=Sum("accepted_tokens"),
        rejections=Sum("draft_rejections"),
        ttft=Avg("ttft_ms"),
        tokens=Sum("completion_tokens"),
    )
    n = agg["n"] or 0
    accepted = agg["accepted"] or 0
    trials = accepted + (agg["rejections"] or 0)
    return ServingFigures(
        version=version,
        completions=n,
        acceptance=accepted / trials if trials else None,
        error_rate=(agg["errors"] / n) if n else None,
        ttft_ms=agg["ttft"],
        tokens=agg["tokens"] or 0,
    )
