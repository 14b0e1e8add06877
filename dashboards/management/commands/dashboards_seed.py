"""``manage.py dashboards_seed --rows 1000000 --tenant demo``: a tenant's ledger and SLO samples, made up, fast.

For the dashboards' benchmark and for trying the pages: ``--rows`` ledger rows and as
many SLO samples, spread evenly over the last ``--days`` days (newest a minute ago),
over the tenant's models (those of the active price book), tiers, cache sources, API
keys (``--keys``, created when the tenant has fewer), users and tags. Costs are the
ledger's own (``tenants.services.generation_cost`` / ``cache_cost`` at the active book),
computed once per usage profile and reused, and rows go in as ``rows_insert`` writes
them (one ``executemany`` per batch of 10,000, each value through its field's
``get_db_prep_save``, a profile's values prepared once), so a million rows (and a million
SLO samples, with latency class, source, fallback and queue time) take about 3 minutes on
SQLite. Budgets are left alone: their counters belong to the money path. Then, unless
``--no-rollup``, the rollups are brought up to date (``rollups_refresh``).
"""

from __future__ import annotations

import random
import secrets
import time
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import connections, router, transaction
from django.utils import timezone

from dashboards import services as dashboards_services
from inference.models import SloSample
from tenants import services as tenant_services
from tenants.models import ApiKey, Membership, Price, Tenant, UsageRecord, UsageSource

BATCH = 10_000
PROFILES = 4_000  # distinct usage shapes, each priced once
TAGS = {"team": ("search", "support", "research", "ads"), "env": ("prod", "staging"), "feature": ("chat", "summarise")}


class _PreparedRows:
    """``tenants.services.rows_insert`` for a million rows: what a usage profile holds is prepared once.

    Each value still goes through its field's ``get_db_prep_save``, as the ORM would send
    it; only the fields that differ row by row (``varying``) are prepared for every row.
    Every other concrete field takes its default unless the profile sets it.
    """

    def __init__(self, model, *, varying: tuple[str, ...]):
        self.model = model
        self.conn = connections[router.db_for_write(model)]
        self.fields = [f for f in model._meta.concrete_fields if not f.primary_key]
        self.varying = [(i, f) for i, f in enumerate(self.fields) if f.attname in varying]
        table = self.conn.ops.quote_name(model._meta.db_table)
        columns = ", ".join(self.conn.ops.quote_name(f.column) for f in self.fields)
        self.sql = f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * len(self.fields))})"

    def constant(self, values: dict[str, Any]) -> list[Any]:
        return [
            None
            if f.attname not in values and any(f is v for _, v in self.varying)
            else f.get_db_prep_save(values[f.attname] if f.attname in values else f.get_default(), self.conn)
            for f in self.fields
        ]

    def row(self, constant: list[Any], varying: dict[str, Any]) -> list[Any]:
        out = list(constant)
        for i, f in self.varying:
            out[i] = f.get_db_prep_save(varying[f.attname], self.conn)
        return out

    def insert(self, rows: list[list[Any]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(self.sql, rows)


class Command(BaseCommand):
    help = "Seed a tenant with made-up ledger rows and SLO samples (for the dashboards' benchmark)."

    def add_arguments(self, parser):
        parser.add_argument("--rows", type=int, default=100_000)
        parser.add_argument("--tenant", required=True, help="the tenant's slug (created, with an owner, if missing)")
        parser.add_argument("--days", type=int, default=30, help="spread the rows over this many days, up to now")
        parser.add_argument("--keys", type=int, default=4, help="API keys the traffic comes from (besides the console)")
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--no-rollup", action="store_true", help="leave the rollups for the periodic task")

    def handle(self, *args, **opts):
        rows, days = opts["rows"], opts["days"]
        if rows <= 0 or days <= 0:
            raise CommandError("--rows and --days must be positive")
        rng = random.Random(opts["seed"])
        tenant, users, keys = self._tenant(opts["tenant"], opts["keys"])
        prices = list(Price.objects.filter(book__is_active=True).select_related("book"))
        if not prices:
            raise CommandError("no active price book: run manage.py tandem_demo (or publish one) first")
        profiles = self._profiles(rng, prices)
        started = time.perf_counter()
        now = timezone.now() - timedelta(minutes=1)
        span = timedelta(days=days).total_seconds()
        run = secrets.token_hex(4)
        ledger_rows = _PreparedRows(
            UsageRecord, varying=("request_id", "leg_of", "user_id", "api_key_id", "tags", "created_at")
        )
        slo_rows = _PreparedRows(SloSample, varying=("request_id", "created_at"))
        for p in profiles:
            p["ledger"] = ledger_rows.constant({**p["ledger"], "tenant_id": tenant.pk})
            p["slo"] = slo_rows.constant({**p["slo"], "tenant_id": tenant.pk})
        for first in range(0, rows, BATCH):
            ledger, slo = [], []
            for i in range(first, min(first + BATCH, rows)):
                p = profiles[rng.randrange(len(profiles))]
                at = now - timedelta(seconds=span * (rows - i) / rows)
                request_id = f"seed-{run}-{i}"
                key = rng.choice(keys) if keys and rng.random() < 0.8 else None
                varying = {
                    "request_id": request_id,
                    "leg_of": request_id,
                    "user_id": rng.choice(users).pk,
                    "api_key_id": key.pk if key else None,
                    "tags": {k: rng.choice(v) for k, v in TAGS.items() if rng.random() < 0.7},
                    "created_at": at,
                }
                ledger.append(ledger_rows.row(p["ledger"], varying))
                slo.append(slo_rows.row(p["slo"], {"request_id": request_id, "created_at": at}))
            with transaction.atomic():
                ledger_rows.insert(ledger)
                slo_rows.insert(slo)
        seeded = time.perf_counter() - started
        self.stdout.write(f"seeded {rows} ledger rows and {rows} SLO samples for {tenant.slug} in {seeded:.1f} s")
        if not opts["no_rollup"]:
            started = time.perf_counter()
            done = dashboards_services.rollups_refresh()
            self.stdout.write(
                f"rolled up {done['hours']} hours and {done['days']} days in {time.perf_counter() - started:.1f} s"
            )

    def _tenant(self, slug: str, n_keys: int) -> tuple[Tenant, list, list[ApiKey]]:
        tenant = Tenant.objects.filter(slug=slug).first()
        User = get_user_model()
        if tenant is None:
            owner, _ = User.objects.get_or_create(username=f"{slug}-owner")
            tenant = tenant_services.tenant_create(name=slug.title(), owner=owner, slug=slug)
        users = [m.user for m in Membership.objects.filter(tenant=tenant).select_related("user")]
        keys = list(ApiKey.objects.filter(tenant=tenant, revoked_at__isnull=True))
        for i in range(len(keys), n_keys):
            key, _raw = tenant_services.api_key_create(tenant=tenant, created_by=users[0], name=f"seed key {i + 1}")
            keys.append(key)
        return tenant, users, keys[: max(n_keys, 0)]

    def _profiles(self, rng: random.Random, prices: list[Price]) -> list[dict[str, Any]]:
        """Usage shapes with their exact costs: tiers weighted as a speculative-first platform sees them."""
        out = []
        tier_weights = {"edge": 3, "speculative": 5, "cloud": 2}
        weighted = [p for p in prices for _ in range(tier_weights.get(p.tier, 1))]
        for _ in range(PROFILES):
            price = rng.choice(weighted)
            prompt, completion = rng.randint(20, 1500), rng.randint(1, 600)
            source = rng.choices(
                [UsageSource.GENERATION, UsageSource.EXACT_CACHE, UsageSource.SEMANTIC_CACHE], [85, 10, 5]
            )[0]
            drafted, accepted, gpu = Decimal(0), 0, Decimal(0)
            if price.tier == "speculative":
                # rounds of up to 8 drafts: most of them accepted, as a well-paired draft does
                accepted = min(completion - 1, int(completion * rng.uniform(0.55, 0.85))) if completion > 1 else 0
                drafted = Decimal(accepted + (completion - accepted) * rng.randint(1, 3))
                gpu = Decimal(str(round((completion - accepted) * rng.uniform(8, 20), 3)))
            if source == UsageSource.GENERATION:
                cost = tenant_services.generation_cost(
                    price=price, prompt_tokens=prompt, completion_tokens=completion, drafted_tokens=drafted, gpu_ms=gpu
                )
                saving = Decimal(0)
            else:
                cost = tenant_services.cache_cost(price=price, prompt_tokens=prompt, completion_tokens=completion)
                generated = tenant_services.generation_cost(
                    price=price, prompt_tokens=prompt, completion_tokens=completion, drafted_tokens=drafted, gpu_ms=gpu
                )
                saving = max(generated.total - cost.total, Decimal(0))
                drafted, accepted, gpu = Decimal(0), 0, Decimal(0)
            e2e = rng.uniform(80, 4000)
            out.append(
                {
                    "ledger": {
                        "route_tier": price.tier,
                        "source": source,
                        "saving": saving,
                        "route_reason": "seed",
                        "model": price.model,
                        "verifier_version": "seed-verifier-1" if price.tier == "speculative" else "",
                        "draft_version": "seed-draft-1" if price.tier != "cloud" else "",
                        "price_book_id": price.book_id,
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "drafted_tokens": drafted,
                        "accepted_tokens": accepted,
                        "gpu_ms": gpu,
                        "cost_edge": cost.edge,
                        "cost_verifier": cost.verifier,
                        "cost_cloud": cost.cloud,
                        "cost_total": cost.total,
                        "outcome": "completed",
                        "finish_reason": "stop",
                        "ttft_ms": e2e / 10,
                        "duration_ms": e2e,
                    },
                    "slo": {
                        "model": price.model,
                        "route_tier": price.tier,
                        "ttft_ms": e2e / 10,
                        "inter_token_ms": e2e / max(completion, 1),
                        "e2e_ms": e2e,
                        "tokens": completion,
                        "outcome": "completed",
                        "latency_class": rng.choices(["interactive", "batch"], [9, 1])[0],
                        "source": source,
                        "fallback": rng.random() < 0.02,
                        "queued_ms": rng.choice([0.0, 0.0, 0.0, rng.uniform(1, 500)]),
                    },
                }
            )
        return out
