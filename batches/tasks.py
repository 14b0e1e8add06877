"""Celery tasks of the batch app: run a batch (re-entrant, acknowledged late), and resume batches whose worker died."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from batches.models import Batch
from batches.runner import run_batch
from batches.services import RUNNABLE

log = logging.getLogger(__name__)


# acks_late + reject_on_worker_lost: a worker killed mid-batch leaves the message to be delivered again;
# running it again is safe (batches.services.batch_claim, line_claim, line_recover).
@shared_task(name="batches.run", acks_late=True, reject_on_worker_lost=True)
def batch_run(batch_pk: int) -> str | None:
    batch = asyncio.run(run_batch(batch_pk))
    return None if batch is None else batch.status


def batch_enqueue(batch_pk: int) -> None:
    """Queue a batch's run (call it after the batch's rows are committed)."""
    batch_run.delay(batch_pk)


@shared_task(name="batches.resume_stalled")
def batches_resume_stalled() -> int:
    """Queue every batch that should be running and whose runner is silent (its worker died); return how many."""
    stale = timezone.now() - timedelta(seconds=settings.TANDEM_BATCH_STALE_S)
    silent = Q(runner="") | Q(heartbeat_at__lt=stale) | Q(heartbeat_at=None)
    pks = list(Batch.objects.filter(silent, status__in=RUNNABLE).values_list("pk", flat=True))
    for pk in pks:
        batch_run.delay(pk)
    if pks:
        log.info("resumed %d stalled batches", len(pks))
    return len(pks)


@shared_task(name="batches.retention_apply")
def batches_retention_apply() -> dict[str, int]:
    """Delete batch files and ended batches' lines older than ``TANDEM_BATCH_RETENTION_DAYS`` (beat, hourly)."""
    from batches.services import retention_apply

    return retention_apply()
