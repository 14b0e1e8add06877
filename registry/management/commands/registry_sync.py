"""``manage.py registry_sync``: register the served pair's versions (idempotent; ``make run`` runs it)."""

from django.core.management.base import BaseCommand

from registry.services import registry_sync


class Command(BaseCommand):
    help = "Register the verifier and draft this platform serves (TANDEM_VERIFIER/TANDEM_DRAFT or the demo pair)."

    def handle(self, *args, **options) -> None:
        for row in registry_sync():
            self.stdout.write(f"{row.model} {row.role}: {row.version} ({row.status})")
