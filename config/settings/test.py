"""Tests: fast password hashing, eager Celery, a trivial engine unless a test asks for the real pair."""

from config.env import as_bool, get_env
from config.settings.base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
CELERY_TASK_ALWAYS_EAGER = get_env("TANDEM_CELERY_EAGER", True, as_bool)  # a real worker: set 0
TANDEM_ENGINES = "inference.engines.load_test_engines"
