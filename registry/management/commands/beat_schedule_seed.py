"""``manage.py beat_schedule_seed``: write CELERY_BEAT_SCHEDULE's missing entries to beat's database schedule."""

from django.core.management.base import BaseCommand

from registry.beat_schedule import beat_schedule_seed


class Command(BaseCommand):
    help = "Seed beat's database schedule from CELERY_BEAT_SCHEDULE; entries already there are left as they are."

    def handle(self, *args, **options) -> None:
        added = beat_schedule_seed()
        self.stdout.write(f"beat schedule: {len(added)} added" + (f" ({', '.join(added)})" if added else ""))
