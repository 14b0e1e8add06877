"""Celery tasks of a rollout: thin over ``registry.services``, taking the rollout's id.

``rollout_chain(id)`` is convert -> validate -> evaluate -> canary start; each step ends
the chain early (returns False to the next, which then does nothing) when the rollout
failed or was rolled back meanwhile. The canary's decision comes from ``canaries_check``,
which beat runs on its schedule (``registry-canaries``), since it waits on live traffic.
"""

from __future__ import annotations

from celery import chain, shared_task

from registry import services


@shared_task(name="registry.rollout_convert")
def rollout_convert(rollout_id: int) -> bool:
    return services.rollout_convert(rollout_id=rollout_id)


@shared_task(name="registry.rollout_validate")
def rollout_validate(rollout_id: int) -> bool:
    return services.rollout_validate(rollout_id=rollout_id)


@shared_task(name="registry.rollout_evaluate")
def rollout_evaluate(rollout_id: int) -> bool:
    return services.rollout_evaluate(rollout_id=rollout_id)


@shared_task(name="registry.rollout_canary_start")
def rollout_canary_start(rollout_id: int) -> bool:
    return services.rollout_canary_start(rollout_id=rollout_id)


@shared_task(name="registry.canaries_check")
def canaries_check() -> dict[str, str]:
    return {str(k): v for k, v in services.canaries_check().items()}


def rollout_chain(rollout_id: int):
    """The steps as one Celery chain (immutable signatures: each step re-reads the rollout)."""
    return chain(
        rollout_convert.si(rollout_id),
        rollout_validate.si(rollout_id),
        rollout_evaluate.si(rollout_id),
        rollout_canary_start.si(rollout_id),
    )
