"""Settings come from the environment: embedded defaults, scale-out by env vars, loud failures in production."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRINT_SETTINGS = """
import json, django
from django.conf import settings
django.setup()
db = settings.DATABASES["default"]
print(json.dumps({
    "db_engine": db["ENGINE"], "conn_max_age": db.get("CONN_MAX_AGE"), "pool": "pool" in db.get("OPTIONS", {}),
    "layer": settings.CHANNEL_LAYERS["default"]["BACKEND"], "broker": settings.CELERY_BROKER_URL,
    "results": settings.CELERY_RESULT_BACKEND, "cache": settings.CACHES["default"]["BACKEND"],
}))
"""


def settings_with(tmp_path: Path, module: str = "config.settings.local", **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "DATABASE_URL", "REDIS_URL"))}
    clean.update({"DJANGO_SETTINGS_MODULE": module, "TANDEM_VAR_DIR": str(tmp_path), **env})
    return subprocess.run([sys.executable, "-c", PRINT_SETTINGS], cwd=REPO, env=clean, capture_output=True, text=True)


def test_the_embedded_default_needs_no_server(tmp_path):
    out = json.loads(settings_with(tmp_path).stdout)
    assert out["db_engine"] == "django.db.backends.sqlite3"
    assert out["layer"] == "channels.layers.InMemoryChannelLayer"
    assert out["broker"] == "filesystem://" and out["results"].startswith("file://")
    assert out["cache"].endswith("LocMemCache")
    assert (tmp_path / "secret_key").read_text().strip()  # generated once, outside the code


def test_redis_url_moves_the_channel_layer_celery_and_the_cache_to_redis(tmp_path):
    out = json.loads(settings_with(tmp_path, REDIS_URL="redis://cache.internal:6379/0").stdout)
    assert out["layer"] == "channels_redis.core.RedisChannelLayer"
    assert out["broker"] == out["results"] == "redis://cache.internal:6379/0"
    assert out["cache"] == "django.core.cache.backends.redis.RedisCache"


def test_a_postgres_database_url_uses_a_connection_pool(tmp_path):
    out = json.loads(settings_with(tmp_path, DATABASE_URL="postgres://u:p@db.internal:5432/tandem").stdout)
    assert out["db_engine"] == "django.db.backends.postgresql"
    assert out["pool"] is True and out["conn_max_age"] == 0


def test_production_refuses_to_start_without_its_secrets(tmp_path):
    result = settings_with(tmp_path, module="config.settings.production", DATABASE_URL="postgres://u:p@db/tandem")
    assert result.returncode != 0 and "TANDEM_SECRET_KEY is required" in result.stderr


def test_a_malformed_setting_fails_loudly_with_its_name(tmp_path):
    result = settings_with(tmp_path, TANDEM_MAX_STREAMS_PER_TENANT="many")
    assert result.returncode != 0 and "TANDEM_MAX_STREAMS_PER_TENANT='many' is not valid" in result.stderr
