"""Sessions on their way to a verify scheduler, as a hint: the platform counts a request from when its view
starts until its engine does (or it waits in a queue, or ends), and an idle scheduler opening sessions waits for
the rest of a burst, at most ``ARRIVAL_WAIT_MS``, to open them all in one prefill.

A burst of requests (clients that sent together, or the next requests of clients that a wave of
answers released together) reaches the scheduler one by one, as the platform's event loop works through
each request's view (about 1.3 ms of Python each on the demo pair's host). Opened as they came, they
started in three or four prefills between decode steps, which took both cores from the loop still
working through the rest, and so ended as raggedly. Held until the loop had handed them all over,
they open in one prefill, run every step together and end together. Demo pair on llama.cpp, 2 cores,
one server toggled between holding and not, 16-20 alternating runs each (2026-12-04): with the host
quiet 1.05-1.08x at 16 sessions and 1.00-1.04x at 4; with it loaded (the same build at 60% of its speed)
0.97-0.99x at both; level at one session, where nothing else is on its way.

Process-wide (``ARRIVALS``), not per engine: a view counts before it knows its model and tier, so a
request for another model or tier can hold an opening for the time its view takes, never longer than
the cap. Nothing counts outside the platform's HTTP API (benchmarks in process, the websocket), so
there nothing waits.
"""

from __future__ import annotations

import math
import threading
import time

ARRIVAL_WAIT_MS = 30.0  # the longest an idle scheduler waits for a burst's other requests (60: no better)


class Arrival:
    """One request on its way; ``came()`` (idempotent) once it started, queued or ended."""

    __slots__ = ("_arrivals", "_came")

    def __init__(self, arrivals: Arrivals):
        self._arrivals = arrivals
        self._came = False
        arrivals._add(1)

    @property
    def on_its_way(self) -> bool:
        return not self._came

    def came(self) -> None:
        if not self._came:
            self._came = True
            self._arrivals._add(-1)


class Arrivals:
    """How many requests are on their way; a scheduler waits until none is."""

    def __init__(self) -> None:
        self._coming = 0
        self._none = threading.Condition()

    def arrival(self) -> Arrival:
        return Arrival(self)

    @property
    def coming(self) -> int:
        return self._coming

    def wait(self, timeout_s: float) -> bool:
        """Wait until no request is on its way, at most ``timeout_s``; whether none is."""
        with self._none:
            return self._none.wait_for(lambda: self._coming <= 0, timeout_s)

    def _add(self, n: int) -> None:
        with self._none:
            self._coming += n
            if self._coming <= 0:
                self._none.notify_all()


class Returning:
    """Sessions that ended since a scheduler last opened any: their clients' next requests may be on their way.

    Closed-loop clients (a benchmark's, a batch job's workers) whose answers went out together
    send their next requests together, but one by one as each reads its answer, and the
    platform's loop hands them over one by one between the other replies: ``Arrivals`` often
    counted none on its way between two of them, and the wave opened in two or three parts
    (demo pair, 16 clients, 2026-12-04: 6 + 10, 7 + 9, 7 + 5 + 4), each part a prefill of its
    own, its sessions ending apart from the others', and their prompts found where the last
    wave left them only when they opened together (``SequenceIds.plan``). An idle scheduler
    opening sessions waits for as many as ended within ``ARRIVAL_WAIT_MS`` of each other, but only
    until ``ARRIVAL_WAIT_MS`` after the last of them ended: clients that do not come back cost a
    request arriving at once that long.
    """

    def __init__(self) -> None:
        self._ended = 0
        self._last_end = -math.inf

    def ended(self, window_s: float) -> None:
        """A session ended (the scheduler's lock is held); those that ended over ``window_s`` before it are not
        counted: sessions ending one by one over seconds (long answers of a batch) are no wave coming back."""
        now = time.perf_counter()
        if now - self._last_end > window_s:
            self._ended = 0
        self._ended += 1
        self._last_end = now

    def opened(self) -> None:
        """Sessions opened: those that ended before are no longer waited for."""
        self._ended = 0

    def expected(self, wait_s: float) -> tuple[int, float]:
        """(How many sessions to wait for, until when: ``time.perf_counter``), ``wait_s`` after the last ended at
        most; (0, now) once that is over."""
        until = self._last_end + wait_s
        now = time.perf_counter()
        return (self._ended, until) if now < until else (0, now)


ARRIVALS = Arrivals()
