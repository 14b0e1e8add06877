"""A real Celery worker process runs a batch completion: on the embedded filesystem broker, and on Redis.

Both use a SQLite file the test and the worker share (the worker is another process),
bootstrapped with ``manage.py tandem_demo`` as ``make run`` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batches.proof import redis_unreachable
from inference.bench import prepare_database
from tests.conftest import celery_worker, worker_env
from tests.inference.conftest import worker_redis_url

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("TANDEM_TEST_REDIS_URL", worker_redis_url(15))
NO_REDIS = redis_unreachable(REDIS_URL)

SCRIPT = """
import django, json, sys
django.setup()
from tenants.models import ApiKey
from inference.tasks import complete
assert not complete.app.conf.task_always_eager, "this test needs a real worker"
key = ApiKey.objects.get()
call = {"model": "tandem-test", "prompt": "Hi", "max_tokens": 9}
result = complete.delay(api_key_id=key.pk, tenant_id=key.tenant_id, call=call).get(timeout=60)
print(json.dumps(result))
"""


def run_with_worker(tmp_path: Path, extra_env: dict[str, str]) -> dict:
    import json

    env = worker_env(tmp_path, tmp_path / "worker.sqlite3", **extra_env)
    prepare_database(env, "tandem-test")  # migrated, the demo tenant and its key: one Django process
    with celery_worker(env):
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=120
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_worker_on_the_embedded_filesystem_broker_runs_a_batch_completion(tmp_path):
    result = run_with_worker(tmp_path, {})
    assert result["text"] == "Tandem dr" and result["usage"]["completion_tokens"] == 9


@pytest.mark.skipif(NO_REDIS is not None, reason=str(NO_REDIS))
def test_a_worker_on_redis_runs_a_batch_completion(tmp_path):
    result = run_with_worker(tmp_path, {"REDIS_URL": REDIS_URL})
    assert result["text"] == "Tandem dr" and result["usage"]["outcome"] == "completed"
