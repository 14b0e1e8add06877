"""Fixtures for the inference tests."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
import pytest_asyncio

from inference.cache import exact_cache, in_flight
from inference.engines import EngineSet, ModelEntry, TrivialCompletion, TrivialEngine, set_engines, trivial_entry
from inference.holds import gpu_pace
from inference.limits import limiter
from inference.queueing import scheduler
from inference.semantic_cache import semantic_cache
from tenants import selectors, services


@pytest.fixture(autouse=True)
def empty_caches():
    """Each test starts with this process's key and price caches empty (their rows may be another test's)."""
    services.api_key_cache.forget()
    selectors.price_cache.forget()
    scheduler.reset()  # and no engine slot still held by another test's stream
    limiter.reset()  # nor another test's rate-limit buckets
    gpu_pace.reset()  # nor the GPU pace other tests' completions set for holds
    exact_cache.reset()  # nor another test's cached answers
    semantic_cache.reset()  # nor its prompts indexed by meaning
    in_flight.reset()  # nor its requests in flight, for collapsing


# an engine a test releases token by token ----------------------------------------------------------
class GatedCompletion(TrivialCompletion):
    def _run(self):
        for n, event in enumerate(super()._run()):
            if n >= self._engine.free_tokens:
                self._engine.blocked.set()  # every token before this one has been handed to the gateway
                self._engine.waits.release()  # one more wait at the gate
                self._engine.gate.acquire()  # the engine thread waits until the test lets one more token out
            yield event


class GatedEngine(TrivialEngine):
    def __init__(self, free_tokens: int = 0):
        super().__init__()
        self.gate = threading.Semaphore(0)
        self.blocked = threading.Event()  # set when a completion first waits at the gate
        self.waits = threading.Semaphore(0)  # released each time a completion waits at the gate
        self.free_tokens = free_tokens  # tokens each completion emits before it waits for the gate

    def stream(self, prompt, **kwargs) -> GatedCompletion:
        return GatedCompletion(self, self.request(prompt, **kwargs))


@contextmanager
def serving_gated(engine: GatedEngine, *others: ModelEntry) -> Iterator[GatedEngine]:
    """``tandem-test`` served by ``engine`` (beside ``others``) until the block ends."""
    plain = trivial_entry()
    entry = ModelEntry(
        name="tandem-test",
        speculative=engine,
        edge=engine,
        verifier_version=plain.verifier_version,
        draft_version=plain.draft_version,
        context_length=engine.context_length,
        tokenizer=engine.tokenizer,
    )
    previous = set_engines(EngineSet([entry, *others]))
    try:
        yield engine
    finally:
        engine.gate.release(10_000)  # let engine threads of stopped streams see the cancel and end
        set_engines(previous)


# Redis, where a test needs the shared store ----------------------------------------------------------
def worker_redis_url(database: int) -> str:
    """``database`` on the local Redis, one lower for each pytest-xdist worker after the first (gw1: ``database - 1``),
    so that parallel workers never empty each other's keys."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return f"redis://127.0.0.1:6379/{database - int(worker.removeprefix('gw') or 0)}"


REDIS_TEST_URL = os.environ.get("TANDEM_TEST_REDIS_URL", worker_redis_url(15))


@pytest_asyncio.fixture
async def redis_db() -> AsyncIterator[tuple[str, object]]:
    """(url, client) of an emptied Redis database, emptied again after the test; skips where none answers."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_TEST_URL, socket_connect_timeout=0.5)
    try:
        await client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is a reason to skip, said in the report
        await client.aclose()
        pytest.skip(f"needs Redis at {REDIS_TEST_URL} (TANDEM_TEST_REDIS_URL): {exc}")
    await client.flushdb()
    yield REDIS_TEST_URL, client
    await client.flushdb()
    await client.aclose()
