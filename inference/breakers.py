"""Circuit breakers: one per verifier and per cloud upstream, so a tier that keeps failing is routed around.

A breaker is *closed* (traffic flows) until ``failures_to_open`` consecutive failures, or
one definitive failure (``trip``: a refused connection), open it. An *open* breaker
refuses traffic for ``open_s`` seconds, then turns *half-open*: one request at a time may
probe the tier; its success closes the breaker, its failure opens it again. A success
slower than ``latency_budget_ms`` counts as a failure: a tier that answers, but too late
to keep the latency promise, is as good as down for routing.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

FAILURES_TO_OPEN = 3
OPEN_S = 10.0


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failures_to_open: int = FAILURES_TO_OPEN,
        open_s: float = OPEN_S,
        latency_budget_ms: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        assert failures_to_open >= 1 and open_s >= 0
        self.name = name
        self.failures_to_open = failures_to_open
        self.open_s = open_s
        self.latency_budget_ms = latency_budget_ms
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0  # consecutive
        self._opened_at: float | None = None
        self._probing = False  # a half-open probe is in flight
        self.last_error = ""

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state(self._clock())

    def _state(self, now: float) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        return BreakerState.OPEN if now - self._opened_at < self.open_s else BreakerState.HALF_OPEN

    def available(self) -> bool:
        """Whether routing may send a request here now (without claiming the half-open probe)."""
        with self._lock:
            state = self._state(self._clock())
            return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._probing)

    def acquire(self) -> bool:
        """Claim the right to send one request; in half-open, only one request at a time gets it."""
        with self._lock:
            state = self._state(self._clock())
            if state is BreakerState.CLOSED:
                return True
            if state is BreakerState.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def record_success(self, latency_ms: float | None = None) -> None:
        if latency_ms is not None and self.latency_budget_ms is not None and latency_ms > self.latency_budget_ms:
            self.record_failure(f"answered in {latency_ms:.0f} ms, over its budget of {self.latency_budget_ms:.0f} ms")
            return
        with self._lock:
            if self._opened_at is not None:
                log.info("breaker %s: closed again after a successful probe", self.name)
            self._failures = 0
            self._opened_at = None
            self._probing = False

    def record_failure(self, error: str = "") -> None:
        with self._lock:
            now = self._clock()
            self._failures += 1
            self.last_error = error
            half_open = self._state(now) is BreakerState.HALF_OPEN
            if half_open or self._failures >= self.failures_to_open:
                self._open(now)

    def trip(self, error: str = "") -> None:
        """Open now: a definitive failure (the tier refused the connection)."""
        with self._lock:
            self.last_error = error
            self._failures = max(self._failures, self.failures_to_open)
            self._open(self._clock())

    def release(self) -> None:
        """A claimed probe ended without a verdict (cancelled before the tier answered)."""
        with self._lock:
            self._probing = False

    def _open(self, now: float) -> None:
        if self._opened_at is None or self._state(now) is not BreakerState.OPEN:
            log.warning("breaker %s: open for %.0f s (%s)", self.name, self.open_s, self.last_error or "failures")
        self._opened_at = now
        self._probing = False

    def snapshot(self) -> dict:
        """For the console and the health endpoint."""
        with self._lock:
            now = self._clock()
            state = self._state(now)
            opened_at = self._opened_at
            retry_in = (
                max(0.0, self.open_s - (now - opened_at))
                if opened_at is not None and state is BreakerState.OPEN
                else 0.0
            )
            return {
                "name": self.name,
                "state": state.value,
                "consecutive_failures": self._failures,
                "retry_in_s": round(retry_in, 1),
                "last_error": self.last_error,
            }
