"""Tests: fast password hashing, eager Celery, a trivial engine unless a test asks for the real pair."""

import tempfile
from pathlib import Path

from config.env import as_bool, get_env
from config.settings.base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
CELERY_TASK_ALWAYS_EAGER = get_env("TANDEM_CELERY_EAGER", True, as_bool)  # a real worker: set 0
# The trivial engine; the platform benchmark's server names its own set (instant and paced).
TANDEM_ENGINES = get_env("TANDEM_ENGINES", "inference.engines.load_test_engines")
# Tests read the ledger right after a stream's last frame, so by default the row is written
# before that frame; the write-behind tests (and the benchmark) turn it on.
TANDEM_SETTLE_AFTER_REPLY = get_env("TANDEM_SETTLE_AFTER_REPLY", False, as_bool)
# Tests also change key rows behind the ORM's back (queryset updates, as another process
# would) and expect the next use to see it: no key cache unless a test turns it on.
TANDEM_API_KEY_CACHE_TTL_S = get_env("TANDEM_API_KEY_CACHE_TTL_S", 0.0, float)
# Budget leases hold money past a request's end (and in memory across tests): off unless a
# test turns them on (tests/inference/test_leases.py, the PostgreSQL concurrency tests).
TANDEM_BUDGET_LEASES = get_env("TANDEM_BUDGET_LEASES", False, as_bool)

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    # A file, not Django's default in-memory test database: that one is shared between
    # threads in SQLite's shared-cache mode, where a reader meeting another connection's
    # write gets "database table is locked" at once instead of waiting (seen: 2 runs in
    # 50 of the consumer tests). A file in WAL mode behaves as production does.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}  # noqa: F405
# Routing: the builtin policy prefers the speculative tier, as the platform tests expect; the
# routing tests publish policies (or turn difficulty routing on) themselves, and policies are
# read fresh for every request (tests publish and expect the next request to see it).
TANDEM_ROUTE_BY_DIFFICULTY = get_env("TANDEM_ROUTE_BY_DIFFICULTY", False, as_bool)
TANDEM_POLICY_CACHE_TTL_S = get_env("TANDEM_POLICY_CACHE_TTL_S", 0.0, float)
# The exact result cache is off in the builtin policy: the platform tests repeat identical requests and expect
# each to be generated; the cache tests turn it on (a published policy has it on by default).
TANDEM_CACHE_TTL_S = get_env("TANDEM_CACHE_TTL_S", 0, int)

# Each test process journals to a folder of its own, never the var dir's: streams a test leaves unsettled must
# not be found (and charged) by the next `make run`'s recovery, against another database.
# (A server the benchmarks or `make faults` start names its own, beside its var dir: server_env.)
if not get_env("TANDEM_JOURNAL_DIR", ""):
    TANDEM_JOURNAL_DIR = Path(tempfile.mkdtemp(prefix="tandem-test-journal-"))
