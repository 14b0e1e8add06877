"""Benchmark: how long the dashboards' pages take over a big ledger (``python -m dashboards.bench_pages``).

Prints one JSON object: for each page (the cost page by day over 30 days, by hour over
24 hours, split by user; its CSV; the API; the SLO page at ``/slo/`` when that URL
exists) the median and every load's time in ms, through Django's test client signed in
as a member of the tenant (the whole view, template and middleware; no socket).

The database is ``DATABASE_URL`` when given (PostgreSQL), else a SQLite file of its own
(``var/bench-dashboards.sqlite3``, never the platform's), migrated, and seeded with
``--rows`` ledger rows and as many SLO samples (``dashboards_seed``) when the tenant has
fewer. The rollups are brought up to date before the timing, as the periodic task keeps
them; the open hours read the ledger itself.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tenant", default="bench-costs")
    parser.add_argument("--loads", type=int, default=7, help="timed loads per page (after one warm-up)")
    parser.add_argument("--no-slo", action="store_true", help="leave out the SLO page (another app's) and its rollups")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    if not os.environ.get("DATABASE_URL"):
        # The settings' own SQLite set-up (WAL, timeouts), on a file of its own: the settings module
        # shares this dict with config.settings.local, which Django reads at setup.
        # imported by name: the settings module is not the type checker's to follow
        base = importlib.import_module("config.settings.base")
        base.DATABASES["default"]["NAME"] = str(base.VAR_DIR / "bench-dashboards.sqlite3")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command, get_commands
    from django.db import connection
    from django.test import Client
    from django.urls import NoReverseMatch, reverse

    from dashboards.services import rollups_refresh
    from tenants.models import Membership, PriceBook, Tenant, UsageRecord

    call_command("migrate", verbosity=0, interactive=False)
    if not PriceBook.objects.filter(is_active=True).exists():
        # its credentials go to stderr: stdout is the JSON alone
        call_command("tandem_demo", "--password", "bench-pass-123456", "--models", "tandem-demo", stdout=sys.stderr)
    tenant = Tenant.objects.filter(slug=args.tenant).first()
    have = UsageRecord.objects.filter(tenant=tenant).count() if tenant else 0
    seeded_s = None
    if have < args.rows:
        started = time.perf_counter()
        call_command(
            "dashboards_seed",
            "--rows",
            str(args.rows - have),
            "--tenant",
            args.tenant,
            "--no-rollup",
            stdout=sys.stderr,
        )
        seeded_s = round(time.perf_counter() - started, 1)
        tenant = Tenant.objects.get(slug=args.tenant)
    started = time.perf_counter()
    rolled = rollups_refresh()
    rollup_s = round(time.perf_counter() - started, 1)
    slo_rollup: str | None = None
    if (
        "slo_rollup" in get_commands() and not args.no_slo
    ):  # the SLO page's own rollups (app slo), as its periodic task keeps them
        started = time.perf_counter()
        try:
            call_command("slo_rollup", "--rebuild", stdout=sys.stderr)
            slo_rollup = f"rebuilt in {time.perf_counter() - started:.1f} s"
        except Exception as exc:  # noqa: BLE001 - another app's command: reported in the output, the pages still timed
            slo_rollup = f"failed: {exc!r}"

    # The tenant's owner: a member of it alone, so the console's current tenant is this one.
    membership = Membership.objects.filter(tenant=tenant).select_related("user").order_by("pk").first()
    assert membership is not None
    user = get_user_model().objects.get(pk=membership.user_id)
    client = Client()
    client.force_login(user)

    pages = {
        "cost_30d_by_day": reverse("frontend:costs") + "?range=30d&granularity=day",
        "cost_24h_by_hour": reverse("frontend:costs") + "?range=24h&granularity=hour",
        "cost_30d_by_user": reverse("frontend:costs") + "?range=30d&granularity=day&split=user",
        "cost_30d_by_tag": reverse("frontend:costs") + "?range=30d&granularity=day&split=tag",
        "csv_30d_by_day": reverse("frontend:costs-csv") + "?range=30d&granularity=day",
        "api_30d_by_day": "/api/dashboards/cost/?range=30d&granularity=day&split=model",
    }
    try:
        if not args.no_slo:
            pages["slo"] = reverse("frontend:slo")
    except NoReverseMatch:
        pass
    results = {}
    for name, url in pages.items():
        response = client.get(url)  # warm-up: connections, templates, caches
        times = []
        # the SLO page is another app's: timed fewer times, so a slow one cannot hold the benchmark up
        for _ in range(args.loads if name != "slo" else min(args.loads, 3)):
            started = time.perf_counter()
            response = client.get(url)
            if hasattr(response, "streaming_content"):
                b"".join(response.streaming_content)
            times.append((time.perf_counter() - started) * 1e3)
        results[name] = {
            "url": url,
            "status": response.status_code,
            "median_ms": round(statistics.median(times), 1),
            "loads_ms": [round(t, 1) for t in times],
        }
    print(
        json.dumps(
            {
                "database": connection.vendor,
                "ledger_rows": UsageRecord.objects.filter(tenant=tenant).count(),
                "seeded_s": seeded_s,
                "rollups": {**rolled, "seconds": rollup_s},
                "slo_rollup": slo_rollup,
                "pages": results,
            },
            indent=2,
        )
    )
    if any(r["status"] != 200 for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
