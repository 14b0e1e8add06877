"""Beat's schedule kept in the database (django-celery-beat), seeded from ``CELERY_BEAT_SCHEDULE``.

The settings' schedule holds the defaults: each entry is written to the database once,
when no periodic task of that name exists; after that the row is the operator's to change
(interval, enabled) in the admin, and neither ``manage.py beat_schedule_seed`` nor beat's
start overwrites it. django-celery-beat's own scheduler would (it ``update_or_create``s
every settings entry each time beat starts), hence :class:`SeededDatabaseScheduler`.
"""

from __future__ import annotations

from django.conf import settings
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler


def beat_schedule_seed(schedule: dict | None = None) -> list[str]:
    """Write each entry of ``schedule`` (default: CELERY_BEAT_SCHEDULE) missing from the database; return their names."""
    from celery import current_app

    schedule = settings.CELERY_BEAT_SCHEDULE if schedule is None else schedule
    existing = set(PeriodicTask.objects.filter(name__in=list(schedule)).values_list("name", flat=True))
    added = []
    for name, entry in schedule.items():
        if name in existing:
            continue
        DatabaseScheduler.Entry.from_entry(name, app=current_app, **entry)
        added.append(name)
    return added


class SeededDatabaseScheduler(DatabaseScheduler):
    """django-celery-beat's scheduler, but the settings' entries only seed the database: an operator's change stays."""

    def setup_schedule(self) -> None:
        self.install_default_entries(self.schedule)
        beat_schedule_seed(self.app.conf.beat_schedule)
