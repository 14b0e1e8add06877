"""Celery tasks: completions run as background jobs, through the same gateway as every other adapter."""

from __future__ import annotations

import asyncio
import logging

from celery import shared_task

from inference import gateway
from inference.errors import GatewayError

log = logging.getLogger(__name__)


@shared_task(name="inference.complete")
def complete(*, api_key_id: int, tenant_id: int, call: dict) -> dict:
    """Run one completion for an API key of a tenant; return its text and usage (or its error).

    Takes ids and JSON, never model instances: the key is re-checked when the task runs,
    so a key revoked while the job waited spends nothing.
    """
    return asyncio.run(_complete(api_key_id=api_key_id, tenant_id=tenant_id, call=call))


async def _complete(*, api_key_id: int, tenant_id: int, call: dict) -> dict:
    try:
        principal = await gateway.principal_for_api_key_id(api_key_id, tenant_id)
        fields = {"latency_class": "batch", "stream": False, **_call_fields(call)}  # a job waits for the whole answer
        stream = await gateway.start(principal, gateway.CompletionCall(**fields))
        text, _ = await gateway.collect(stream)
    except GatewayError as exc:
        log.info("batch completion refused: %s", exc.message)
        return {"error": exc.as_dict(), "status": exc.status}
    assert stream.usage is not None
    return {"text": text, "usage": stream.usage.as_dict()}


def _call_fields(call: dict) -> dict:
    fields = dict(call)
    if "stop" in fields:
        fields["stop"] = tuple(fields["stop"])
    return fields


@shared_task(name="inference.settle_dead_processes")
def settle_dead_processes() -> dict:
    """The stale-hold sweep: charge what dead processes' clients received (their journals), then give back the rest.

    In this order: a hold given back first could no longer be charged for what its
    request had delivered.
    """
    from django.conf import settings

    from inference import journal, settlement
    from tenants.tasks import release_stale_reservations

    recovered = journal.recover(settings.TANDEM_JOURNAL_DIR, skip=[settlement.journal.path])
    return {"journal": recovered.as_dict(), "released": release_stale_reservations()}
