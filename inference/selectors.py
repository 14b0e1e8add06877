"""Reads of the inference app: the routing policy in force for a tenant (cached in this process for a few seconds)."""

from __future__ import annotations

import threading
import time

from django.conf import settings

from inference.models import RoutingPolicy
from inference.router import Policy


def builtin_policy() -> Policy:
    """What a tenant gets when neither it nor the platform has published a policy."""
    return Policy(difficulty_routing=settings.TANDEM_ROUTE_BY_DIFFICULTY, cache_ttl_s=settings.TANDEM_CACHE_TTL_S)


class _PolicyCache:
    """tenant id -> (Policy, read at); a published policy is seen by this process within ``ttl_s``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int | None, tuple[Policy, float]] = {}

    def get(self, tenant_id: int | None, ttl_s: float) -> Policy | None:
        with self._lock:
            hit = self._entries.get(tenant_id)
        if hit is None or time.monotonic() - hit[1] >= ttl_s:
            return None
        return hit[0]

    def put(self, tenant_id: int | None, policy: Policy) -> None:
        with self._lock:
            self._entries[tenant_id] = (policy, time.monotonic())

    def forget(self) -> None:
        with self._lock:
            self._entries.clear()


policy_cache = _PolicyCache()


def routing_policy_cached(*, tenant_id: int | None) -> Policy | None:
    """The tenant's policy from this process's cache, or None when it must be read (``routing_policy_for``)."""
    return policy_cache.get(tenant_id, settings.TANDEM_POLICY_CACHE_TTL_S)


def routing_policy_for(*, tenant_id: int | None) -> Policy:
    """The policy in force for ``tenant_id``: its active version, else the platform's default, else the builtin one."""
    rows = RoutingPolicy.objects.filter(is_active=True)
    row = rows.filter(tenant_id=tenant_id).first() if tenant_id is not None else None
    if row is None:
        row = rows.filter(tenant__isnull=True).first()
    policy = Policy.from_row(row) if row is not None else builtin_policy()
    policy_cache.put(tenant_id, policy)
    return policy


def routing_policies_of(*, tenant_id: int | None):
    """Every published version for ``tenant_id`` (None: the platform's default), newest first."""
    if tenant_id is None:
        return RoutingPolicy.objects.filter(tenant__isnull=True).order_by("-version")
    return RoutingPolicy.objects.filter(tenant_id=tenant_id).order_by("-version")
