"""Running batches (batches.runner, batches.tasks): cancel, expiry, a run interrupted and run again, the discount."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from batches import runner, services, storage
from batches.models import Batch, BatchFile, BatchLine
from batches.runner import run_batch
from batches.tasks import batch_run
from inference.runtime import db
from tenants import errors as tenant_errors
from tenants.models import UsageRecord
from tenants.services import price_book_publish
from tests.conftest import TEST_MODELS, TEST_RATES, TIERS

pytestmark = [pytest.mark.django_db(transaction=True)]


def make_batch(account, count: int, **body) -> Batch:
    rows = [
        {
            "custom_id": f"r{n}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tandem-test", "prompt": f"Hi {n}", "max_tokens": 4, **body},
        }
        for n in range(count)
    ]
    content = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    uploaded = services.file_upload(tenant_id=account.tenant.pk, filename="in.jsonl", content=content, purpose="batch")
    return services.batch_create(
        tenant_id=account.tenant.pk,
        api_key_id=account.api_key.pk,
        input_file_id=uploaded.public_id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata=None,
    )


def error_codes(batch: Batch) -> list[str]:
    content = storage.read(batch.error_file.storage_name).decode()
    return [json.loads(row)["error"]["code"] for row in content.splitlines()]


def test_a_batch_cancelled_before_it_ran_runs_nothing_and_charges_nothing(account):
    batch = make_batch(account, 3)
    services.batch_cancel(tenant_id=account.tenant.pk, batch_id=batch.public_id)
    batch_run.delay(batch.pk)
    batch.refresh_from_db()
    assert batch.status == "cancelled" and batch.output_file is None
    assert error_codes(batch) == ["batch_cancelled"] * 3
    assert not UsageRecord.objects.exists()


@pytest.mark.asyncio
async def test_cancel_mid_run_stops_starting_lines_and_charges_what_ran(account, settings, monkeypatch):
    settings.TANDEM_BATCH_CONCURRENCY = 1
    monkeypatch.setattr(runner, "STOP_CHECK_S", 0.0)  # the runner sees the cancel at its next line, not up to 0.2 s on
    batch = await db(make_batch)(account, 5)

    async def cancel_after_two(line: BatchLine) -> None:
        if line.number == 1:
            await db(services.batch_cancel)(tenant_id=account.tenant.pk, batch_id=batch.public_id)

    ended = await run_batch(batch.pk, on_line_done=cancel_after_two)
    assert ended is not None and ended.status == "cancelled"
    assert (ended.completed, ended.failed) == (2, 3)
    assert await UsageRecord.objects.filter(tags__batch_id=batch.public_id).acount() == 2


class Crash(Exception):
    pass


@pytest.mark.asyncio
async def test_running_a_half_done_batch_again_charges_each_line_exactly_once(account, settings):
    settings.TANDEM_BATCH_CONCURRENCY = 1
    batch = await db(make_batch)(account, 6)

    async def die_after_three(line: BatchLine) -> None:
        if line.number == 2:
            raise Crash  # the runner stops here, as a killed worker would: its heartbeat goes silent

    with pytest.raises(Crash):
        await run_batch(batch.pk, on_line_done=die_after_three)
    assert await UsageRecord.objects.acount() == 3
    # a line the dead runner had claimed but not started (nothing held, nothing charged) is run again
    await BatchLine.objects.filter(batch=batch, number=3).aupdate(status="running", attempts=1)
    await Batch.objects.filter(pk=batch.pk).aupdate(heartbeat_at=timezone.now() - timedelta(minutes=5))
    ended = await run_batch(batch.pk)
    assert ended is not None and ended.status == "completed" and (ended.completed, ended.failed) == (6, 0)
    ids = [r async for r in UsageRecord.objects.values_list("request_id", flat=True)]
    assert len(ids) == 6 == len(set(ids))
    assert await run_batch(batch.pk) is None  # ended: a third delivery does nothing
    assert await UsageRecord.objects.acount() == 6


@pytest.mark.asyncio
async def test_a_lines_answer_commits_with_its_ledger_row(account):
    batch = await db(make_batch)(account, 1)
    await db(services.batch_claim)(batch_pk=batch.pk, runner="test")
    first = await BatchLine.objects.aget(batch=batch)
    line = await db(services.line_claim)(line_pk=first.pk, batch=batch)
    body, recorded = await runner._complete(batch, line, "/v1/completions", line.request_id)
    stored = await BatchLine.objects.aget(pk=line.pk)
    assert recorded and stored.status == "completed" and stored.body == body
    assert await UsageRecord.objects.filter(request_id=line.request_id).aexists()


def test_a_line_charged_before_its_runner_died_is_never_run_or_charged_again(account):
    batch = make_batch(account, 2)
    batch_run.delay(batch.pk)
    line = BatchLine.objects.get(batch=batch, number=0)
    # as if the runner died between the ledger's commit and the line's: charged, its answer not saved
    BatchLine.objects.filter(pk=line.pk).update(status="running", body=None, status_code=None)
    Batch.objects.filter(pk=batch.pk).update(status="in_progress", completed=1)
    batch_run.delay(batch.pk)
    batch.refresh_from_db()
    assert batch.status == "completed" and error_codes(batch) == ["output_lost"]
    assert UsageRecord.objects.count() == 2


def test_a_second_delivery_leaves_a_batch_with_a_live_runner_alone(account):
    batch = make_batch(account, 1)
    assert services.batch_claim(batch_pk=batch.pk, runner="first") is not None
    assert services.batch_claim(batch_pk=batch.pk, runner="second") is None


def test_a_batch_past_its_completion_window_expires_its_unrun_lines(account):
    batch = make_batch(account, 2)
    Batch.objects.filter(pk=batch.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    batch_run.delay(batch.pk)
    batch.refresh_from_db()
    assert batch.status == "expired" and error_codes(batch) == ["batch_expired"] * 2
    assert not UsageRecord.objects.exists()


def test_batch_lines_are_charged_at_the_price_books_batch_discount(db, account):
    prices = [{"model": m, "tier": t, **TEST_RATES, "batch_discount": "50"} for m in TEST_MODELS for t in TIERS]
    price_book_publish(version=2, prices=prices, note="half price for batches")
    batch = make_batch(account, 1, temperature=0)
    batch_run.delay(batch.pk)
    from inference.tasks import complete

    alone = complete.delay(
        api_key_id=account.api_key.pk,
        tenant_id=account.tenant.pk,
        call={"model": "tandem-test", "prompt": "Hi 0", "max_tokens": 4, "latency_class": "interactive"},
    ).get()
    charged = UsageRecord.objects.get(tags__batch_id=batch.public_id)
    full = Decimal(alone["usage"]["cost"]["total"])
    assert full > 0 and charged.cost_total == (full / 2).quantize(Decimal("1e-9"))


def test_a_batch_discount_above_100_percent_is_refused(db):
    prices = [{"model": "tandem-test", "tier": "edge", **TEST_RATES, "batch_discount": "101"}]
    with pytest.raises(tenant_errors.InvalidInput, match="batch_discount"):
        price_book_publish(version=1, prices=prices)


def test_past_the_retention_period_files_and_ended_batches_lines_are_deleted_and_running_inputs_kept(account, settings):
    settings.TANDEM_BATCH_RETENTION_DAYS = 30
    ended = make_batch(account, 2)
    asyncio.run(run_batch(ended.pk))
    ended.refresh_from_db()
    running = make_batch(account, 1)  # not run: still waiting for its worker
    old = timezone.now() - timedelta(days=31)
    BatchFile.objects.update(created_at=old)
    Batch.objects.update(created_at=old)
    figures = services.retention_apply()
    assert figures == {"files": 2, "lines": 2}  # the ended batch's input and output; its two lines
    ended_files = BatchFile.objects.filter(pk__in=[ended.input_file_id, ended.output_file_id])
    assert all(f.deleted_at is not None and not storage.batch_storage().exists(f.storage_name) for f in ended_files)
    assert BatchFile.objects.get(pk=running.input_file_id).deleted_at is None  # its runner may still read it
    assert BatchLine.objects.filter(batch=running).count() == 1
    assert Batch.objects.get(pk=ended.pk).completed == 2  # the batch's row and counts stay
    assert services.retention_apply() == {"files": 0, "lines": 0}
