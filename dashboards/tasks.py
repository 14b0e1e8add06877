"""Periodic upkeep of the dashboards (Celery beat runs it; see CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

from celery import shared_task

from dashboards import services


@shared_task(name="dashboards.rollups_refresh")
def rollups_refresh() -> dict[str, int]:
    """Roll up the ledger's newly closed windows and rebuild the last few (``dashboards.services``)."""
    return services.rollups_refresh()
