"""The completion views' part in the verify schedulers' hint of requests on their way (``speculative.arrivals``).

A completion request counts from the moment the API's handler takes it (``counted_request``, before
its body is read) until it starts on an engine (``arrived()`` from ``GatewayStream.launch``), waits in
a queue for a slot (``inference.queueing``: no telling when it starts) or ends (refused, answered from
a cache, failed). Counted only from its view's start, a burst's requests counted one at a time: the
event loop runs each handler up to its view, then each view up to its launch, and a view that never
waits (everything cached) launched before the next one counted, so a scheduler saw none on its way
and opened the burst in several prefills (demo pair, 16 clients: 7, 3, ... tokens, each beside the
loop's next admissions).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

from speculative.arrivals import ARRIVALS, Arrival

P = ParamSpec("P")
R = TypeVar("R")

_current: ContextVar[Arrival | None] = ContextVar("tandem_arrival", default=None)


COUNTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


@contextlib.contextmanager
def counted_request(scope: dict) -> Iterator[None]:
    """A completion request (POST to ``COUNTED_PATHS``) is on its way while this block runs, or until it arrives.

    Its arrival is set for the view (whose task copies the block's context).
    """
    if scope.get("method") != "POST" or scope.get("path") not in COUNTED_PATHS:
        yield
        return
    with _on_its_way(ARRIVALS.arrival()):
        yield


def counted_arrival(view: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """An async view whose request is on its way to an engine until it arrives or the view ends.

    Counted since its handler took it (``counted_request``), or else from the view's start.
    """

    @functools.wraps(view)
    async def counted(*args: P.args, **kwargs: P.kwargs) -> R:
        handed = _current.get()  # the handler's (an arrival that came already belongs to a request before it)
        with _on_its_way(handed if handed is not None and handed.on_its_way else ARRIVALS.arrival()):
            return await view(*args, **kwargs)

    return counted


@contextlib.contextmanager
def _on_its_way(arrival: Arrival) -> Iterator[None]:
    """``arrival`` is this context's request (``arrived()`` reads it) until the block ends: then it came."""
    token = _current.set(arrival)
    try:
        yield
    finally:
        arrival.came()
        _current.reset(token)


def arrived() -> None:
    """This request is no longer on its way: it started on an engine, or waits in a queue (no-op where uncounted)."""
    arrival = _current.get()
    if arrival is not None:
        arrival.came()
