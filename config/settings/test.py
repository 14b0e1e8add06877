"""Tests: fast password hashing, eager Celery, a trivial engine unless a test asks for the real pair."""

from config.settings.base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
CELERY_TASK_ALWAYS_EAGER = True
TANDEM_ENGINES = "inference.engines.load_test_engines"
