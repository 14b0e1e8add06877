"""Fixtures for the inference tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from inference.cache import exact_cache, in_flight
from inference.engines import EngineSet, ModelEntry, TrivialCompletion, TrivialEngine, set_engines, trivial_entry
from inference.holds import gpu_pace
from inference.limits import limiter
from inference.queueing import scheduler
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
