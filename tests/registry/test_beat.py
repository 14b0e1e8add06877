"""Beat's schedule in the database: seeded from the settings once, then the operator's to change."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.management import call_command
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from config.celery_app import app
from registry.beat_schedule import SeededDatabaseScheduler, beat_schedule_seed

pytestmark = pytest.mark.django_db


def test_every_periodic_task_of_the_settings_is_seeded_into_the_database_once():
    added = beat_schedule_seed()
    assert sorted(added) == sorted(settings.CELERY_BEAT_SCHEDULE)
    rows = {row.name: row for row in PeriodicTask.objects.select_related("interval")}
    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        assert rows[name].task == entry["task"] and rows[name].enabled
        assert (
            rows[name].interval.every * {"seconds": 1, "minutes": 60}[rows[name].interval.period] == entry["schedule"]
        )
    assert beat_schedule_seed() == []  # idempotent
    assert PeriodicTask.objects.filter(name__in=list(settings.CELERY_BEAT_SCHEDULE)).count() == len(rows)


def test_the_registrys_canary_check_is_on_the_schedule():
    assert settings.CELERY_BEAT_SCHEDULE["registry-canaries"]["task"] == "registry.canaries_check"
    assert app.conf.beat_scheduler == "registry.beat_schedule:SeededDatabaseScheduler"


@pytest.mark.django_db(transaction=True)  # beat commits and closes the connection as it reads the schedule
def test_an_operators_change_to_a_periodic_task_survives_beat_starting_again():
    call_command("beat_schedule_seed", verbosity=0)
    row = PeriodicTask.objects.get(name="slo-rollups")
    row.interval, _ = IntervalSchedule.objects.get_or_create(every=999, period=IntervalSchedule.SECONDS)
    row.enabled = False
    row.save()
    SeededDatabaseScheduler(app=app)  # beat's start: sets the schedule up from the settings and the database
    row.refresh_from_db()
    assert (row.interval.every, row.enabled) == (999, False)
