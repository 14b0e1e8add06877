"""Circuit breakers: closed, open after failures or a blown latency budget, half-open with one probe at a time."""

from __future__ import annotations

from inference.breakers import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def breaker(**kwargs) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker("t", failures_to_open=3, open_s=10.0, clock=clock, **kwargs), clock


def test_a_breaker_opens_after_consecutive_failures_only():
    b, _ = breaker()
    b.record_failure("e1")
    b.record_failure("e2")
    b.record_success()  # the run of failures is broken
    b.record_failure("e3")
    b.record_failure("e4")
    assert b.state is BreakerState.CLOSED and b.available()
    b.record_failure("e5")
    assert b.state is BreakerState.OPEN and not b.available() and not b.acquire()
    assert b.snapshot()["last_error"] == "e5" and b.snapshot()["retry_in_s"] == 10.0


def test_a_trip_opens_at_once():
    b, _ = breaker()
    b.trip("connection refused")
    assert b.state is BreakerState.OPEN


def test_an_open_breaker_turns_half_open_and_lets_one_probe_through():
    b, clock = breaker()
    b.trip("down")
    clock.now = 10.0
    assert b.state is BreakerState.HALF_OPEN and b.available()
    assert b.acquire()
    assert not b.available() and not b.acquire()  # one probe at a time


def test_a_successful_probe_closes_the_breaker():
    b, clock = breaker()
    b.trip("down")
    clock.now = 11.0
    assert b.acquire()
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.snapshot()["consecutive_failures"] == 0


def test_a_failed_probe_opens_it_again_for_a_full_period():
    b, clock = breaker()
    b.trip("down")
    clock.now = 11.0
    assert b.acquire()
    b.record_failure("still down")
    assert b.state is BreakerState.OPEN
    clock.now = 20.9
    assert b.state is BreakerState.OPEN
    clock.now = 21.0
    assert b.state is BreakerState.HALF_OPEN


def test_a_probe_that_ends_without_a_verdict_frees_the_probe():
    b, clock = breaker()
    b.trip("down")
    clock.now = 10.0
    assert b.acquire()
    b.release()
    assert b.acquire()


def test_an_answer_slower_than_the_latency_budget_counts_as_a_failure():
    b, _ = breaker(latency_budget_ms=500)
    for _ in range(3):
        b.record_success(latency_ms=900)
    assert b.state is BreakerState.OPEN and "900 ms" in b.last_error
    fast, _ = breaker(latency_budget_ms=500)
    fast.record_success(latency_ms=100)
    assert fast.state is BreakerState.CLOSED
