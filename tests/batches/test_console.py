"""The console's Batches page (frontend.batches): the tenant's batches, their progress as JSON, their files."""

from __future__ import annotations

import pytest
from django.test import Client

from batches import services
from batches.tasks import batch_run
from tests.batches.test_runs import make_batch

pytestmark = pytest.mark.django_db(transaction=True)


def member(account) -> Client:
    client = Client()
    client.force_login(account.user)
    return client


def test_a_member_sees_the_tenants_batches_with_progress_cost_and_downloads(account):
    batch = make_batch(account, 2)
    batch_run.delay(batch.pk)
    batch.refresh_from_db()
    page = member(account).get("/batches/")
    assert page.status_code == 200 and batch.public_id.encode() in page.content
    progress = member(account).get("/batches/progress.json").json()["batches"]
    assert [(b["id"], b["status"], b["done"], b["total"]) for b in progress] == [(batch.public_id, "completed", 2, 2)]
    assert progress[0]["cost"] != "0" and progress[0]["output_file_id"] == batch.output_file.public_id
    download = member(account).get(f"/batches/files/{batch.output_file.public_id}/")
    assert download.status_code == 200 and download.content.count(b"\n") == 2


def test_a_running_batch_reports_partial_progress(account):
    batch = make_batch(account, 3)
    services.batch_claim(batch_pk=batch.pk, runner="elsewhere")  # a worker holds it; nothing ran yet
    progress = member(account).get("/batches/progress.json").json()["batches"][0]
    assert (progress["status"], progress["running"], progress["done"], progress["percent"]) == (
        "in_progress",
        True,
        0,
        0,
    )


def test_another_tenants_member_sees_none_of_its_batches_or_files(account, other_account):
    batch = make_batch(account, 1)
    other = member(other_account)
    assert other.get("/batches/progress.json").json() == {"batches": []}
    assert batch.public_id.encode() not in other.get("/batches/").content
    assert other.get(f"/batches/files/{batch.input_file.public_id}/").status_code == 404
