"""Celery tasks (periodic, CELERY_BEAT_SCHEDULE): roll up closed buckets of SLO samples; evaluate and send alerts."""

from __future__ import annotations

from celery import shared_task

from slo import services


@shared_task(name="slo.rollups_compute")
def rollups_compute() -> int:
    return services.rollups_compute()


@shared_task(name="slo.alerts_evaluate")
def alerts_evaluate() -> dict:
    """Evaluate the rules, then post the transitions not posted yet (this one's and earlier failed ones)."""
    fired, resolved = services.alerts_evaluate()
    sent = services.alerts_send()
    return {"fired": len(fired), "resolved": len(resolved), "sent": sent}
