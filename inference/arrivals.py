"""The completion views' part in the verify schedulers' hint of requests on their way (``speculative.arrivals``).

A completion view counts from its start until its request starts on an engine (``arrived()`` from
``GatewayStream.launch``), waits in a queue for a slot (``inference.queueing``: no telling when it
starts) or the view ends (refused, answered from a cache, failed).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

from speculative.arrivals import ARRIVALS, Arrival

P = ParamSpec("P")
R = TypeVar("R")

_current: ContextVar[Arrival | None] = ContextVar("tandem_arrival", default=None)


def counted_arrival(view: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """An async view whose request is on its way to an engine from its start until it arrives or the view ends."""

    @functools.wraps(view)
    async def counted(*args: P.args, **kwargs: P.kwargs) -> R:
        arrival = ARRIVALS.arrival()
        token = _current.set(arrival)
        try:
            return await view(*args, **kwargs)
        finally:
            arrival.came()
            _current.reset(token)

    return counted


def arrived() -> None:
    """This request is no longer on its way: it started on an engine, or waits in a queue (no-op where uncounted)."""
    arrival = _current.get()
    if arrival is not None:
        arrival.came()
