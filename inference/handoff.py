"""Engine events from a worker thread to the event loop: one wake-up of the loop per burst of tokens.

A blocking engine is pumped by ``pump_on_thread``: a speculative completion (it has
``drive``) is handed to its verify scheduler, whose thread delivers each round's tokens
here with no thread of its own per stream; any other (the edge engine) runs on a stream
thread. An async one (a cloud upstream's stream) is pumped by ``pump_on_loop``. All put
each event on the stream's asyncio queue, then ``END`` (or the exception that stopped the
engine), and stop early once ``cancel`` is set.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

from inference.runtime import stream_threads
from speculative.types import TokenRun

END = object()  # the engine finished normally


LAZY_BATCH = 64  # a client that takes the answer whole: the loop wakes once per this many tokens (or at the end)


class _Handoff:
    """Items from the engine thread not yet on the queue.

    The thread appends, and wakes the loop only when no wake-up is on its way: each
    wake-up is a write to the loop's self-pipe and a turn of the loop, so a round's tokens
    (or an engine ahead of its client) share one. A *lazy* hand-off (a client that takes
    the answer whole, so nothing is sent before the end) wakes the loop once per
    ``LAZY_BATCH`` tokens, at the end, or on an error: measured on the demo pair on
    llama.cpp (one session, 64 tokens, one round a token), the loop's turn per token took
    a core from the verifier's two threads at every step.
    """

    def __init__(
        self, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop, cancel: threading.Event, lazy: bool = False
    ):
        self._queue, self._loop, self._cancel = queue, loop, cancel
        self._items: list[object] = []
        self._tokens = 0  # in ``_items`` (a run of tokens counts its tokens)
        self._lock = threading.Lock()
        self._lazy = lazy
        self._waking = False  # a hand-over is on its way to the loop: it takes what is appended meanwhile

    def put(self, item: object) -> None:
        """From the engine thread."""
        with self._lock:
            self._items.append(item)
            self._tokens += len(item.token_ids) if type(item) is TokenRun else 1
            if self._waking:
                return
            if self._lazy and self._tokens < LAZY_BATCH and item is not END and not isinstance(item, BaseException):
                return
            self._waking = True
        try:
            self._loop.call_soon_threadsafe(self._take_handoff)
        except RuntimeError:  # the loop is gone (the server is shutting down)
            self._cancel.set()

    def _take_handoff(self) -> None:
        """On the event loop: move what the engine thread handed over onto the queue."""
        with self._lock:
            items, self._items, self._tokens, self._waking = self._items, [], 0, False
        for item in items:
            self._queue.put_nowait(item)


def pump_on_thread(
    completion: Iterator, queue: asyncio.Queue, cancel: threading.Event, name: str, *, lazy: bool = False
) -> None:
    """Run a blocking ``completion`` (driven, or on a stream thread), handing each event to ``queue`` (call on the loop).

    ``lazy``: its client takes the answer whole, so the loop need not wake for every token.
    """
    handoff = _Handoff(queue, asyncio.get_running_loop(), cancel, lazy)
    drive = getattr(completion, "drive", None)
    if drive is not None:
        drive(_driven_sink(completion, handoff, cancel), whole=lazy)
        return

    def pump() -> None:
        threading.current_thread().name = name
        try:
            for event in completion:
                if cancel.is_set():
                    break
                handoff.put(event)
            handoff.put(END)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, raised there
            handoff.put(exc)
        finally:
            close = getattr(completion, "close", None)
            if close is not None:
                close()  # releases the engine's sessions (draft sequence, verifier slot)

    stream_threads.run(pump)


def _driven_sink(completion: object, handoff: _Handoff, cancel: threading.Event):
    """What a driven completion's rounds hand their events to (on the scheduler's thread)."""

    def sink(item: object) -> None:
        if item is None:  # the completion ended
            handoff.put(END)
        elif isinstance(item, BaseException):
            handoff.put(item)
        elif cancel.is_set():
            completion.cancel()  # type: ignore[attr-defined]  # stops at its next round; END follows
        else:
            handoff.put(item)

    return sink


def pump_on_loop(completion: AsyncIterator, queue: asyncio.Queue, cancel: threading.Event) -> asyncio.Task:
    """Run an async ``completion`` as a task on the loop, putting each event on ``queue``."""

    async def pump() -> None:
        try:
            async for event in completion:
                if cancel.is_set():
                    break
                queue.put_nowait(event)
            queue.put_nowait(END)
        except Exception as exc:  # noqa: BLE001 - handed to the stream, raised there
            queue.put_nowait(exc)
        finally:
            aclose = getattr(completion, "aclose", None)
            if aclose is not None:
                await aclose()

    return asyncio.ensure_future(pump())
