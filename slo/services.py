"""Writes of SLO data: objectives and the alert webhook (set in the console), rollups of closed buckets, alert
transitions, and the webhook posts.

When a bucket is closed: a sample's ``created_at`` is set when it is inserted (one request's
settlement, or a lease batch's insert), and its transaction commits right after. So no
sample can still arrive in a bucket once ``TANDEM_SLO_ROLLUP_MARGIN_S`` (2 minutes by
default: far longer than a settlement's commit) has passed after its end. ``rollups_compute``
rolls up every bucket closed by that rule and not rolled up yet (the watermark says where
it got), 5-minute buckets from the samples and hours from the 5-minute rollups; a page reads
raw samples after the watermark. Samples inserted later with an earlier ``created_at`` (a
seed, a restore) are found by id at the next run, which rolls their buckets up again.

Alerts: each evaluation fires what should fire and has no open alert, and resolves open
alerts whose condition is gone; a database constraint keeps one open alert per (tenant,
kind, key), so an alert fires once and resolves once however often rules are evaluated.
Each transition is posted once to the webhook; a failed post (logged) is tried again at the
next evaluation until it goes through.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import IntegrityError, transaction
from django.db.models import Max, Min
from django.utils import timezone

from inference.models import SloSample
from slo import errors, selectors
from slo.counts import EDGES, SAMPLE_FIELDS, Counts
from slo.models import Alert, AlertWebhook, SloObjective, SloRollup, SloRollupWatermark
from slo.objectives import LATENCY_KINDS, LatencyClass, ObjectiveKind
from slo.selectors import FIVE_MINUTES, HOUR, floor_time
from tenants.models import Tenant

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT_S = 3.0
# Samples are rolled up this much at a time (one transaction each): a catch-up after a long
# pause (or a rebuild) never holds one huge transaction.
FIVE_MINUTE_CHUNK = timedelta(hours=1)
HOUR_CHUNK = timedelta(days=1)


# objectives and the webhook -----------------------------------------------------------------
def objective_set(
    *,
    tenant: Tenant,
    latency_class: str,
    kind: str,
    threshold_ms: int | None,
    target: float,
    window_days: int,
    by: Any = None,
) -> SloObjective:
    """Set the tenant's objective of one class and kind (replacing its default)."""
    if latency_class not in LatencyClass.values or kind not in ObjectiveKind.values:
        raise errors.InvalidInput("unknown latency class or objective kind")
    if kind in LATENCY_KINDS:
        if threshold_ms not in EDGES[kind]:
            edges = ", ".join(str(e) for e in EDGES[kind])
            raise errors.InvalidInput(f"the threshold must be one of {edges} ms")
    else:
        threshold_ms = None
    if not 0 < target < 1:
        raise errors.InvalidInput("the target is a share between 0 and 1, e.g. 0.99")
    if not 1 <= window_days <= 90:
        raise errors.InvalidInput("the window is 1 to 90 days")
    objective, _ = SloObjective.objects.update_or_create(
        tenant=tenant,
        latency_class=latency_class,
        kind=kind,
        defaults={"threshold_ms": threshold_ms, "target": target, "window_days": window_days, "updated_by": by},
    )
    return objective


def objective_reset(*, tenant: Tenant, latency_class: str, kind: str) -> None:
    """Drop the tenant's own objective: the platform default applies again."""
    SloObjective.objects.filter(tenant=tenant, latency_class=latency_class, kind=kind).delete()


def alert_webhook_set(*, tenant: Tenant, url: str) -> AlertWebhook:
    """Set where the tenant's alerts are posted ("" : the platform's webhook).

    The platform's workers make the request, so a tenant may not aim it at the platform's
    own network: an address that is loopback, private, link-local or reserved (or
    ``localhost``) is refused. A host name is not resolved here (DNS may change later):
    deployments that need more put the workers behind an egress proxy.
    """
    url = url.strip()
    if url:
        try:
            URLValidator(schemes=["http", "https"])(url)
        except ValidationError:
            raise errors.InvalidInput("the webhook must be an http(s) URL") from None
        if _internal_host(httpx.URL(url).host):
            raise errors.InvalidInput("the webhook may not point at a local or private address")
    webhook, _ = AlertWebhook.objects.update_or_create(tenant=tenant, defaults={"url": url})
    return webhook


def _internal_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name
    return (
        address.is_loopback or address.is_private or address.is_link_local or address.is_reserved
    ) or address.is_unspecified


# rollups ------------------------------------------------------------------------------------
def rollups_compute(*, now: datetime | None = None, rebuild: bool = False) -> int:
    """Roll up every closed bucket not rolled up yet; returns how many 5-minute rollup rows were written."""
    now = now or timezone.now()
    if rebuild:
        with transaction.atomic():
            SloRollupWatermark.objects.all().delete()
            SloRollup.objects.all().delete()
    closed_until = floor_time(now - timedelta(seconds=settings.TANDEM_SLO_ROLLUP_MARGIN_S), FIVE_MINUTES)
    _late_samples_rewind()
    written = 0
    while (chunk := _five_minute_chunk(closed_until)) is not None:
        written += chunk
    while _hour_chunk():
        pass
    return written


def _late_samples_rewind() -> None:
    """Samples inserted since the last run with a ``created_at`` already rolled up (a seed, a restore): roll again.

    Settled requests never do this (``created_at`` is their insert time); a backfill would
    otherwise be missing from every page. The watermarks go back to the earliest such
    sample, so the next chunks recompute (replace) every bucket from there.
    """
    with transaction.atomic():
        five = _watermark_locked(FIVE_MINUTES)
        highest = SloSample.objects.aggregate(highest=Max("pk"))["highest"] or 0
        if five is None:
            return
        late = SloSample.objects.filter(pk__gt=five.seen_sample_id, created_at__lt=five.closed_until)
        earliest = late.aggregate(earliest=Min("created_at"))["earliest"]
        if earliest is not None:
            log.info("SLO samples inserted late, from %s: rolling up again from there", earliest)
            five.closed_until = floor_time(earliest, FIVE_MINUTES)
            SloRollupWatermark.objects.filter(resolution_s=HOUR, closed_until__gt=earliest).update(
                closed_until=floor_time(earliest, HOUR)
            )
        five.seen_sample_id = highest
        five.save(update_fields=["closed_until", "seen_sample_id"])


def _watermark_locked(resolution_s: int) -> SloRollupWatermark | None:
    return SloRollupWatermark.objects.select_for_update().filter(resolution_s=resolution_s).first()


def _five_minute_chunk(closed_until: datetime) -> int | None:
    """Roll up the next chunk of closed 5-minute buckets; None when none is left."""
    with transaction.atomic():
        mark = _watermark_locked(FIVE_MINUTES)
        if mark is None:
            first = SloSample.objects.order_by("created_at").values_list("created_at", flat=True).first()
            start = floor_time(first, FIVE_MINUTES) if first is not None else closed_until
            highest = SloSample.objects.aggregate(highest=Max("pk"))["highest"] or 0
            mark = SloRollupWatermark.objects.create(
                resolution_s=FIVE_MINUTES, closed_until=start, seen_sample_id=highest
            )
        start = mark.closed_until
        if start >= closed_until:
            return None
        end = min(start + FIVE_MINUTE_CHUNK, closed_until)
        buckets: dict[tuple[int, str, str, datetime], Counts] = defaultdict(Counts)
        samples = SloSample.objects.filter(created_at__gte=start, created_at__lt=end).values_list(
            "tenant_id", "latency_class", "route_tier", "created_at", *SAMPLE_FIELDS
        )
        for tenant_id, cls, tier, created_at, *sample in samples.iterator(chunk_size=5000):
            buckets[(tenant_id, cls, tier, floor_time(created_at, FIVE_MINUTES))].add_sample(*sample)
        _replace(FIVE_MINUTES, start, end, buckets)
        mark.closed_until = end
        mark.save(update_fields=["closed_until"])
        return len(buckets)


def _hour_chunk() -> bool:
    """Roll up the next chunk of hours whose 5-minute buckets are all rolled up; False when none is left."""
    with transaction.atomic():
        five = _watermark_locked(FIVE_MINUTES)
        if five is None:
            return False
        closed_until = floor_time(five.closed_until, HOUR)
        mark = _watermark_locked(HOUR)
        if mark is None:
            first = (
                SloRollup.objects.filter(resolution_s=FIVE_MINUTES)
                .order_by("bucket_start")
                .values_list("bucket_start", flat=True)
                .first()
            )
            start = floor_time(first, HOUR) if first is not None else closed_until
            mark = SloRollupWatermark.objects.create(resolution_s=HOUR, closed_until=start)
        start = mark.closed_until
        if start >= closed_until:
            return False
        end = min(start + HOUR_CHUNK, closed_until)
        # the database adds up each hour's 5-minute rollups (per tenant, class, tier and 5-minute start)
        buckets: dict[tuple[int, str, str, datetime], Counts] = defaultdict(Counts)
        for key, counts in selectors.rollup_counts(None, FIVE_MINUTES, start, end, hourly=True):
            buckets[key].merge(counts)  # type: ignore[index]
        _replace(HOUR, start, end, buckets)
        mark.closed_until = end
        mark.save(update_fields=["closed_until"])
        return True


def _replace(
    resolution_s: int, start: datetime, end: datetime, buckets: dict[tuple[int, str, str, datetime], Counts]
) -> None:
    # Recomputing a range replaces it whole: running twice (a retried task) never counts twice.
    SloRollup.objects.filter(resolution_s=resolution_s, bucket_start__gte=start, bucket_start__lt=end).delete()
    SloRollup.objects.bulk_create(
        [
            SloRollup(
                tenant_id=tenant_id,
                resolution_s=resolution_s,
                bucket_start=bucket_start,
                latency_class=cls,
                route_tier=tier,
                **counts.as_columns(),
            )
            for (tenant_id, cls, tier, bucket_start), counts in buckets.items()
        ],
        batch_size=1000,
    )


# alerts -------------------------------------------------------------------------------------
def alerts_evaluate(*, now: datetime | None = None) -> tuple[list[Alert], list[Alert]]:
    """Fire what the rules say should fire and is not open, resolve what is open and should not be.

    Returns (fired, resolved).
    """
    now = now or timezone.now()
    wanted = selectors.alert_conditions(now=now)
    fired: list[Alert] = []
    resolved: list[Alert] = []
    open_keys: set[tuple[int, str, str]] = set()
    for alert in Alert.objects.filter(resolved_at__isnull=True):
        if (alert.kind, alert.key) in wanted.get(alert.tenant_id, {}):
            open_keys.add((alert.tenant_id, alert.kind, alert.key))
            continue
        # Only the evaluation that flips it resolves it (another one running at once finds it resolved).
        if Alert.objects.filter(pk=alert.pk, resolved_at__isnull=True).update(resolved_at=now):
            alert.resolved_at = now
            resolved.append(alert)
            log.info("alert resolved: tenant %s %s %s", alert.tenant_id, alert.kind, alert.key)
    for tenant_id, conditions in wanted.items():
        for (kind, key), details in conditions.items():
            if (tenant_id, kind, key) in open_keys:
                continue
            try:
                with transaction.atomic():
                    alert = Alert.objects.create(tenant_id=tenant_id, kind=kind, key=key, fired_at=now, details=details)
            except IntegrityError:  # another evaluation fired it meanwhile: one open alert per key
                continue
            fired.append(alert)
            log.warning("alert fired: tenant %s %s %s %s", tenant_id, kind, key, details)
    return fired, resolved


def alerts_send(*, client: httpx.Client | None = None, now: datetime | None = None) -> int:
    """Post each transition not posted yet (fired, then resolved) to its tenant's webhook; returns how many went.

    A transition with no webhook configured is marked sent (there is nowhere to send it, and
    setting one later must not replay the past). A failed post is logged and left for the
    next call. A post whose answer was lost may be delivered twice: receivers dedupe on
    ``alert_id`` and ``event``.
    """
    now = now or timezone.now()
    pending = Alert.objects.filter(fired_sent_at__isnull=True) | Alert.objects.filter(
        resolved_at__isnull=False, resolved_sent_at__isnull=True
    )
    sent = 0
    owns_client = client is None
    http = client or webhook_client()
    try:
        for pk in pending.order_by("pk").values_list("pk", flat=True):
            sent += _alert_send(pk, http, now)
    finally:
        if owns_client:
            http.close()
    return sent


def _alert_send(pk: int, http: httpx.Client, now: datetime) -> int:
    """Post the alert's unsent transitions in order; returns how many went."""
    sent = 0
    # Locked while posting (PostgreSQL: an evaluation running at once skips it), so no two
    # workers post the same transition. At most WEBHOOK_TIMEOUT_S a post.
    with transaction.atomic():
        alert = Alert.objects.select_for_update(skip_locked=True).select_related("tenant").filter(pk=pk).first()
        if alert is None:
            return 0
        url = selectors.webhook_url_for(tenant_id=alert.tenant_id)
        for event, field in (("fired", "fired_sent_at"), ("resolved", "resolved_sent_at")):
            if getattr(alert, field) is not None or (event == "resolved" and alert.resolved_at is None):
                continue
            if url:
                try:
                    response = http.post(url, json=_payload(alert, event), timeout=WEBHOOK_TIMEOUT_S)
                    response.raise_for_status()
                except httpx.HTTPError as exc:
                    log.warning("alert %s: posting %s to the webhook failed: %s", alert.pk, event, exc)
                    Alert.objects.filter(pk=alert.pk).update(send_error=str(exc)[:300])
                    break  # "resolved" never goes before "fired"
                sent += 1
            setattr(alert, field, now)
            Alert.objects.filter(pk=alert.pk).update(**{field: now, "send_error": ""})
    return sent


def webhook_client() -> httpx.Client:
    return httpx.Client(timeout=WEBHOOK_TIMEOUT_S)


def _payload(alert: Alert, event: str) -> dict[str, Any]:
    return {
        "event": event,
        "alert_id": alert.pk,
        "tenant": {"id": alert.tenant_id, "name": alert.tenant.name},
        "kind": alert.kind,
        "key": alert.key,
        "fired_at": alert.fired_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
        "details": alert.details,
    }
