"""Periodic upkeep of the books (Celery beat runs it; see CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from tenants import services


@shared_task(name="tenants.release_stale_reservations")
def release_stale_reservations() -> int:
    """Give back money held by requests whose process died before settling them."""
    older_than = timezone.now() - timedelta(seconds=settings.TANDEM_RESERVATION_TTL_S)
    return services.reservations_release_stale(older_than=older_than)
