import sys

from django.apps import AppConfig


class BatchesConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "batches"
    verbose_name = "Batch jobs"

    def ready(self) -> None:
        from celery.signals import worker_ready
        from django.db.models.signals import post_save

        from tenants.models import UsageRecord

        worker_ready.connect(_resume_after_start, weak=False)
        # a batch line's answer commits with its ledger row (batches.runner.record_with_charge)
        post_save.connect(
            _record_with_charge, sender=UsageRecord, weak=False, dispatch_uid="batches.record_with_charge"
        )


def _record_with_charge(sender, **kwargs: object) -> None:
    """``batches.runner.record_with_charge`` where the runner runs: only a process that imported it has lines in flight.

    Importing the runner here would import the engines, and torch, into every Django process
    (``manage.py`` commands, servers, workers): about 2.5 s of each start on this machine.
    """
    runner = sys.modules.get("batches.runner")
    if runner is not None:
        runner.record_with_charge(sender, **kwargs)


def _resume_after_start(**_: object) -> None:
    """A worker that starts (after a crash, say) resumes the batches whose runner died, once they are silent long enough."""
    from django.conf import settings

    from batches.tasks import batches_resume_stalled

    batches_resume_stalled.apply_async(countdown=settings.TANDEM_BATCH_STALE_S + 1)
