"""``manage.py slo_rollup [--rebuild]``: roll up closed buckets of SLO samples now (what the periodic task does)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from slo import services


class Command(BaseCommand):
    help = "Roll up closed 5-minute and hourly buckets of SLO samples (--rebuild: from scratch, e.g. after a seed)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--rebuild", action="store_true", help="drop every rollup and roll up all samples again")

    def handle(self, *args, rebuild: bool = False, **options) -> None:
        rows = services.rollups_compute(rebuild=rebuild)
        self.stdout.write(f"rolled up: {rows} five-minute rows")
