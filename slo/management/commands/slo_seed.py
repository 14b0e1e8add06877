"""``manage.py slo_seed --tenant <slug> --samples N --days D``: insert synthetic SLO samples (demos, tests, load checks).

Deterministic under ``--seed``. Samples get ``created_at`` spread over the last ``--days``;
the next rollup run finds them (late samples) and rolls their buckets up again;
``--rollup`` rebuilds the rollups at once.
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from inference.models import SloSample
from slo import services
from tenants.models import Tenant
from tenants.services import rows_insert

BATCH = 5000


def synthetic_sample(rng: random.Random, *, tenant_id: int, created_at: datetime, failure_share: float) -> dict:
    """One plausible sample: mostly interactive, mixed tiers and cache sources, some waits, some failures."""
    roll = rng.random()
    outcome = "error" if roll < failure_share else "cancelled" if roll < failure_share + 0.02 else "completed"
    tokens = 0 if outcome == "error" and rng.random() < 0.5 else rng.randint(1, 400)
    ttft = None if tokens == 0 else rng.lognormvariate(5.6, 0.6)  # median ~270 ms
    itl = None if tokens < 2 else rng.lognormvariate(3.3, 0.5)  # median ~27 ms
    e2e = (ttft or rng.uniform(50, 2000)) + (itl or 0) * max(tokens - 1, 0)
    return {
        "request_id": f"seed_{uuid.UUID(int=rng.getrandbits(128)).hex}",
        "tenant_id": tenant_id,
        "model": "tandem-demo",
        "route_tier": rng.choices(("edge", "speculative", "cloud"), weights=(4, 4.5, 1.5))[0],
        "ttft_ms": ttft,
        "inter_token_ms": itl,
        "e2e_ms": e2e,
        "tokens": tokens,
        "outcome": outcome,
        "latency_class": "interactive" if rng.random() < 0.8 else "batch",
        "source": rng.choices(("generation", "exact_cache", "semantic_cache"), weights=(85, 10, 5))[0],
        "fallback": rng.random() < 0.03,
        "queued_ms": 0.0 if rng.random() < 0.8 else rng.expovariate(1 / 500),
        "created_at": created_at,
    }


def seed_samples(
    *, tenant_id: int, count: int, days: float, now: datetime, failure_share: float = 0.005, seed: int = 1
) -> None:
    rng = random.Random(seed)
    span = timedelta(days=days).total_seconds()
    for start in range(0, count, BATCH):
        rows = [
            synthetic_sample(
                rng,
                tenant_id=tenant_id,
                created_at=now - timedelta(seconds=rng.uniform(0, span)),
                failure_share=failure_share,
            )
            for _ in range(min(BATCH, count - start))
        ]
        with transaction.atomic():
            rows_insert(model=SloSample, rows=rows)


class Command(BaseCommand):
    help = "Insert synthetic SLO samples for a tenant (then --rollup to roll them up)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--tenant", required=True, help="the tenant's slug")
        parser.add_argument("--samples", type=int, default=10_000)
        parser.add_argument("--days", type=float, default=28)
        parser.add_argument("--failure-share", type=float, default=0.005)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--rollup", action="store_true", help="rebuild the rollups afterwards")

    def handle(self, *args, **options) -> None:
        tenant = Tenant.objects.filter(slug=options["tenant"]).first()
        if tenant is None:
            raise CommandError(f"no tenant {options['tenant']!r}")
        seed_samples(
            tenant_id=tenant.pk,
            count=options["samples"],
            days=options["days"],
            now=timezone.now(),
            failure_share=options["failure_share"],
            seed=options["seed"],
        )
        if options["rollup"]:
            services.rollups_compute(rebuild=True)
        self.stdout.write(f"seeded {options['samples']} SLO samples for {tenant.slug}")
