"""Security basics: the sign-in throttle, production's deploy checks and headers, and no secret in any log record."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from django.core.cache import cache
from django.db import connection
from django.urls import reverse

from config.asgi import application
from frontend.signin import CACHE_PREFIX
from inference.limits import limiter
from inference.queueing import scheduler
from tenants import selectors, services

REPO = Path(__file__).resolve().parents[1]
SIGNIN = "/signin/"
MAX_FAILURES = 5  # the defaults (config/settings/security.py); the tests pin them
MAX_FAILURES_PER_ADDRESS = 20
WINDOW_S = 300


@pytest.fixture(autouse=True)
def throttle_defaults(settings):
    """The throttle's defaults and an empty cache: other tests' failures (same address) never count here."""
    settings.TANDEM_SIGNIN_MAX_FAILURES = MAX_FAILURES
    settings.TANDEM_SIGNIN_MAX_FAILURES_PER_ADDRESS = MAX_FAILURES_PER_ADDRESS
    settings.TANDEM_SIGNIN_WINDOW_S = WINDOW_S
    cache.clear()
    yield
    cache.clear()


def sign_in(client, username: str, password: str, address: str = "127.0.0.1"):
    return client.post(SIGNIN, {"username": username, "password": password}, REMOTE_ADDR=address)


def fail(client, username: str, times: int, address: str = "127.0.0.1") -> None:
    for _ in range(times):
        response = sign_in(client, username, "not-the-password", address)
        assert response.status_code == 200 and b"correct username and password" in response.content


def later(monkeypatch, seconds: float) -> None:
    """Move the clock the throttle and the cache's expiry read (``time.time``) forward, without sleeping."""
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + seconds)


# the sign-in throttle ------------------------------------------------------------------------------
@pytest.mark.django_db
def test_five_failed_sign_ins_for_a_username_get_429_with_retry_after_even_with_the_right_password(client, account):
    fail(client, "acme", MAX_FAILURES)
    response = sign_in(client, "acme", account.password)
    assert response.status_code == 429
    assert 0 < int(response["Retry-After"]) <= WINDOW_S
    page = response.content.decode()
    assert "Too many failed sign-ins" in page and 'role="alert"' in page and 'value="acme"' in page
    assert "_auth_user_id" not in client.session  # not signed in


@pytest.mark.django_db
def test_a_throttled_user_signs_in_once_the_window_has_passed(client, account, monkeypatch):
    fail(client, "acme", MAX_FAILURES)
    assert sign_in(client, "acme", account.password).status_code == 429
    later(monkeypatch, WINDOW_S + 1)
    response = sign_in(client, "acme", account.password)
    assert response.status_code == 302 and response.url == reverse("frontend:playground")


@pytest.mark.django_db
def test_refused_attempts_do_not_extend_the_window(client, account, monkeypatch):
    fail(client, "acme", MAX_FAILURES)
    later(monkeypatch, WINDOW_S - 10)
    response = sign_in(client, "acme", "another-guess")
    assert response.status_code == 429 and int(response["Retry-After"]) <= 10
    later(monkeypatch, WINDOW_S + 1)
    assert sign_in(client, "acme", account.password).status_code == 302


@pytest.mark.django_db
def test_a_success_forgets_the_usernames_earlier_failures(client, account):
    fail(client, "acme", MAX_FAILURES - 1)
    assert sign_in(client, "acme", account.password).status_code == 302
    client.logout()
    fail(client, "acme", MAX_FAILURES - 1)
    assert sign_in(client, "acme", account.password).status_code == 302


@pytest.mark.django_db
def test_one_username_throttled_leaves_other_users_and_case_variants_counted_together(client, account, other_account):
    fail(client, "acme", 3)
    fail(client, "ACME", MAX_FAILURES - 3)  # the same person's username, cased differently
    assert sign_in(client, "acme", account.password).status_code == 429
    response = sign_in(client, "globex", other_account.password)
    assert response.status_code == 302  # another user at the same address is not locked out


@pytest.mark.django_db
def test_many_failures_from_one_address_refuse_it_but_not_other_addresses(client, account):
    for n in range(MAX_FAILURES_PER_ADDRESS):
        fail(client, f"guess-{n}", 1, address="203.0.113.7")  # a different username each time
    response = sign_in(client, "acme", account.password, address="203.0.113.7")
    assert response.status_code == 429 and int(response["Retry-After"]) <= WINDOW_S
    assert sign_in(client, "acme", account.password, address="198.51.100.2").status_code == 302


@pytest.mark.django_db
def test_the_admin_sign_in_is_throttled_too(client, django_user_model):
    django_user_model.objects.create_superuser(username="root", password="root-pass-123456")
    for _ in range(MAX_FAILURES):
        client.post("/admin/login/", {"username": "root", "password": "wrong"})
    response = client.post("/admin/login/", {"username": "root", "password": "root-pass-123456", "next": "/admin/"})
    assert response.status_code == 200 and "_auth_user_id" not in client.session  # refused, as a failed sign-in


@pytest.mark.django_db
def test_the_throttle_keeps_no_username_in_its_cache_keys(client, account):
    fail(client, "acme", 1)
    keys = list(cache._cache)  # LocMemCache's own store: the keys exactly as written
    ours = [k for k in keys if CACHE_PREFIX in k]
    assert ours and not any("acme" in k for k in ours)


# production settings ---------------------------------------------------------------------------------
PRODUCTION_ENV = {
    "DJANGO_SETTINGS_MODULE": "config.settings.production",
    "TANDEM_DEBUG": "0",
    "TANDEM_SECRET_KEY": "k" + secrets.token_urlsafe(64),
    "TANDEM_ALLOWED_HOSTS": "example.com",
    "DATABASE_URL": "postgres://tandem:unused@db.invalid:5432/tandem",  # never connected to by `check`
}
PRINT_SECURITY = """
import json, django
from django.conf import settings
django.setup()
names = ["DEBUG", "SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SECURE_HSTS_SECONDS",
         "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_HSTS_PRELOAD", "SECURE_PROXY_SSL_HEADER",
         "SECURE_CONTENT_TYPE_NOSNIFF", "SECURE_REFERRER_POLICY", "X_FRAME_OPTIONS", "SESSION_COOKIE_HTTPONLY"]
print(json.dumps({name: getattr(settings, name) for name in names}))
"""


def run_with(tmp_path: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "DATABASE_URL", "REDIS_URL"))}
    clean.update({"TANDEM_VAR_DIR": str(tmp_path), **env})
    return subprocess.run(argv, cwd=REPO, env=clean, capture_output=True, text=True, timeout=120)


def security_settings(tmp_path: Path, **env: str) -> dict:
    result = run_with(tmp_path, [sys.executable, "-c", PRINT_SECURITY], **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    result = run_with(
        tmp_path, [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], **PRODUCTION_ENV
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_defaults_to_https_everything(tmp_path):
    got = security_settings(tmp_path, **PRODUCTION_ENV)
    assert got["DEBUG"] is False and got["SECURE_SSL_REDIRECT"] is True
    assert got["SESSION_COOKIE_SECURE"] is True and got["CSRF_COOKIE_SECURE"] is True
    assert got["SECURE_HSTS_SECONDS"] == 31_536_000 and got["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is True
    assert got["SECURE_HSTS_PRELOAD"] is False
    assert got["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert got["SECURE_CONTENT_TYPE_NOSNIFF"] is True and got["SECURE_REFERRER_POLICY"] == "same-origin"
    assert got["X_FRAME_OPTIONS"] == "DENY" and got["SESSION_COOKIE_HTTPONLY"] is True


def test_production_settings_follow_their_environment_overrides(tmp_path):
    got = security_settings(
        tmp_path,
        **PRODUCTION_ENV,
        TANDEM_SSL_REDIRECT="0",
        TANDEM_HSTS_SECONDS="3600",
        TANDEM_HSTS_INCLUDE_SUBDOMAINS="0",
        TANDEM_PROXY_SSL_HEADER="none",
    )
    assert got["SECURE_SSL_REDIRECT"] is False and got["SESSION_COOKIE_SECURE"] is True
    assert got["SECURE_HSTS_SECONDS"] == 3600 and got["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is False
    assert got["SECURE_PROXY_SSL_HEADER"] is None


def test_the_local_run_over_plain_http_keeps_cookies_usable(tmp_path):
    """``make run`` (config.settings.local, http://127.0.0.1): no https redirect, no Secure cookies, no HSTS."""
    got = security_settings(tmp_path, DJANGO_SETTINGS_MODULE="config.settings.local")
    assert got["SECURE_SSL_REDIRECT"] is False
    assert got["SESSION_COOKIE_SECURE"] is False and got["CSRF_COOKIE_SECURE"] is False
    assert got["SECURE_HSTS_SECONDS"] == 0
    assert got["X_FRAME_OPTIONS"] == "DENY" and got["SECURE_CONTENT_TYPE_NOSNIFF"] is True
    https = security_settings(tmp_path, DJANGO_SETTINGS_MODULE="config.settings.local", TANDEM_HTTPS="1")
    assert https["SESSION_COOKIE_SECURE"] is True and https["SECURE_SSL_REDIRECT"] is True


def test_every_console_page_carries_the_security_headers(client, db):
    response = client.get(SIGNIN)
    assert response.status_code == 200
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Frame-Options"] == "DENY"


# no secret in any log record ----------------------------------------------------------------------------
def _all_loggers_at_debug(caplog) -> None:
    """Every logger (those configured with their own level, and those that do not propagate) into caplog at DEBUG."""
    caplog.set_level(logging.DEBUG)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            caplog.set_level(logging.DEBUG, logger=name)
            if not logger.propagate and caplog.handler not in logger.handlers:
                logger.addHandler(caplog.handler)


def _remove_caplog_handler(caplog) -> None:
    for logger in logging.root.manager.loggerDict.values():
        if isinstance(logger, logging.Logger) and caplog.handler in logger.handlers:
            logger.removeHandler(caplog.handler)


def _everything_in(record: logging.LogRecord) -> str:
    """A record's message, its arguments, its traceback and every extra attribute, as text."""
    parts = [record.getMessage(), repr(record.msg), repr(record.args), record.exc_text or ""]
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    parts += [f"{name}={value!r}" for name, value in vars(record).items()]
    return "\n".join(parts)


@pytest.mark.django_db(transaction=True)
def test_no_api_key_or_password_ever_reaches_a_log_record(client, account, caplog):
    services.api_key_cache.forget()
    selectors.price_cache.forget()
    scheduler.reset()
    limiter.reset()
    # the 43 characters after the (loggable) "tdm_<8 hex>_" prefix; they may hold "_" themselves, so no rsplit
    secret_part = account.raw_key.split("_", 2)[2]
    assert len(secret_part) == 43
    wrong_key = account.raw_key[:-4] + ("AAAA" if not account.raw_key.endswith("AAAA") else "BBBB")
    wrong_password = "hunter2-wrong-" + secrets.token_hex(8)
    _all_loggers_at_debug(caplog)
    connection.force_debug_cursor = True  # and every SQL statement, as DEBUG would log them
    try:
        # sign-ins: a wrong password, the right one, then throttled attempts (the admin's too)
        assert sign_in(client, "acme", wrong_password).status_code == 200
        assert sign_in(client, "acme", account.password).status_code == 302
        client.logout()
        fail(client, "acme", MAX_FAILURES)
        assert sign_in(client, "acme", account.password).status_code == 429
        client.post("/admin/login/", {"username": "acme", "password": account.password})

        # the API through the ASGI application, as the server runs it: a completion, a bad key, the models
        async def api_calls() -> list[int]:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
                statuses = []
                for key in (account.raw_key, wrong_key):
                    response = await http.post(
                        "/v1/chat/completions",
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": "tandem-test", "messages": [{"role": "user", "content": "Hello"}]},
                    )
                    statuses.append(response.status_code)
                response = await http.get("/v1/models", headers={"Authorization": f"Bearer {account.raw_key}"})
                statuses.append(response.status_code)
                response = await http.get("/v1/models", headers={"Authorization": f"Basic {account.raw_key}"})
                statuses.append(response.status_code)
                return statuses

        from asgiref.sync import async_to_sync

        assert async_to_sync(api_calls)() == [200, 401, 200, 401]
    finally:
        connection.force_debug_cursor = False
        _remove_caplog_handler(caplog)
    assert len(caplog.records) > 5  # the capture worked: the stack logged (SQL at least)
    secrets_ = {
        "raw API key": account.raw_key,
        "API key's secret part": secret_part,
        "wrong API key": wrong_key,
        "password": account.password,
        "wrong password": wrong_password,
    }
    for record in caplog.records:
        text = _everything_in(record)
        for what, secret in secrets_.items():
            assert secret not in text, f"the {what} is in a log record of {record.name}: {record.getMessage()[:300]}"
