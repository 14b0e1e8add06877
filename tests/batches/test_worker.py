"""A real Celery worker on Redis runs a batch (the longer proof, SIGKILL included, is ``make batch-proof``).

The worker gets a copy of this test's database (SQLite's backup API: migrated, with the
account and prices already in), so no second ``migrate`` runs; the task goes to Redis
through a Celery app of the test's own, as the web process would send it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from celery import Celery
from django.db import connection

from batches.proof import redis_unreachable
from tests.batches.test_runs import make_batch
from tests.conftest import celery_worker, worker_env

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("TANDEM_TEST_BATCH_REDIS_URL", "redis://127.0.0.1:6379/11")


def _redis_down() -> str | None:
    why = redis_unreachable(REDIS_URL)
    return None if why is None else f"{why}; make batch-proof runs where one answers"


def _database_copy(target: Path) -> None:
    if connection.vendor != "sqlite":
        pytest.skip("the worker gets a copy of the test database: SQLite only")
    connection.ensure_connection()
    with sqlite3.connect(target) as copy:
        connection.connection.backup(copy)


def _batch_row(database: Path, batch_pk: int) -> tuple[str, int, int, int]:
    with sqlite3.connect(database, timeout=5) as db:
        status, completed, failed, public_id = db.execute(
            "select status, completed, failed, public_id from batches_batch where id = ?", (batch_pk,)
        ).fetchone()
        charges = db.execute(
            "select count(*) from tenants_usagerecord where json_extract(tags, '$.batch_id') = ?", (public_id,)
        ).fetchone()[0]
    return status, completed, failed, charges


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(_redis_down() is not None, reason=str(_redis_down()))
def test_a_worker_on_redis_runs_a_batch_and_charges_each_line_once(account, tmp_path):
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()  # this test's own database number: no stale messages
    batch = make_batch(account, 4)
    database = tmp_path / "worker.sqlite3"
    _database_copy(database)
    with celery_worker(worker_env(tmp_path, database, REDIS_URL=REDIS_URL)) as worker:
        # not this process's current app: the tests after it in this process (eager tasks) would send to it
        Celery(broker=REDIS_URL, set_as_current=False).send_task("batches.run", args=[batch.pk])
        deadline = time.monotonic() + 120
        while (row := _batch_row(database, batch.pk))[0] != "completed":
            assert time.monotonic() < deadline and worker.poll() is None, row
            time.sleep(0.1)
    assert row == ("completed", 4, 0, 4)
