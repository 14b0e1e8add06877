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

from tests.inference.conftest import worker_redis_url

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("TANDEM_TEST_REDIS_URL", worker_redis_url(15))

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


def _redis_up() -> bool:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no Redis here"
        return False


def run_with_worker(tmp_path: Path, extra_env: dict[str, str]) -> dict:
    import json

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "TANDEM_CELERY_EAGER": "0",
        "TANDEM_VAR_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'worker.sqlite3'}",
        **extra_env,
    }
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput"], cwd=REPO, env=env, check=True, capture_output=True)
    subprocess.run(
        [*manage, "tandem_demo", "--models", "tandem-test"], cwd=REPO, env=env, check=True, capture_output=True
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config.celery_app", "worker", "--pool=solo", "--loglevel=warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=120
        )
    finally:
        worker.terminate()
        worker.wait(timeout=20)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_worker_on_the_embedded_filesystem_broker_runs_a_batch_completion(tmp_path):
    result = run_with_worker(tmp_path, {})
    assert result["text"] == "Tandem dr" and result["usage"]["completion_tokens"] == 9


@pytest.mark.skipif(not _redis_up(), reason=f"no Redis at {REDIS_URL}")
def test_a_worker_on_redis_runs_a_batch_completion(tmp_path):
    result = run_with_worker(tmp_path, {"REDIS_URL": REDIS_URL})
    assert result["text"] == "Tandem dr" and result["usage"]["outcome"] == "completed"
