"""One relay of a stream to a client, shared by the SSE and websocket adapters.

``relay(stream, keepalive_s, stop)`` yields what the adapter writes next: a batch of
token deltas (every token at hand, sent in one frame or one write), or ``KEEPALIVE`` when
``keepalive_s`` pass without a token. It ends when the stream ends (settled), when
``stop`` is set (a cancel frame, a disconnect: the stream is closed and settled for what
was sent), or when the adapter stops iterating; it raises the stream's ``GatewayError``
when the engine fails (settled for what was delivered).

Money: only ``stream.ready()`` is ever waited on, and it charges nothing. Tokens are taken
(``take_at_hand``, or ``__anext__`` for the end) only once they are at hand, which returns
without suspending, and the batch is yielded at once: a client that goes away is charged
for exactly the tokens it was sent. Had the wait been on ``__anext__`` itself, a token
taken just before the hang-up would be charged and never sent. However the relay ends,
it closes the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Final

from inference import settlement
from inference.completion import TokenDelta
from inference.stream import GatewayStream

KEEPALIVE: Final = None  # yielded when a keep-alive is due


async def relay(
    stream: GatewayStream, keepalive_s: float, stop: asyncio.Event | None = None
) -> AsyncGenerator[list[TokenDelta] | None, None]:
    waiter: asyncio.Task | None = None
    stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        while stop is None or not stop.is_set():
            if not stream.at_hand():
                # No task is made for a wait when tokens are already at hand (the engine is
                # ahead of the client): they are taken at once, every one in one batch.
                if waiter is None:
                    waiter = asyncio.ensure_future(stream.ready())
                waits = {waiter} if stopped is None else {waiter, stopped}
                done, _ = await asyncio.wait(waits, timeout=keepalive_s, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    yield KEEPALIVE
                    continue
                if waiter not in done:
                    break  # stopped
                waiter = None
            batch = stream.take_at_hand()
            if not batch:  # the end (settled here), or the engine's failure (raised here)
                try:
                    batch = [await stream.__anext__()]
                except StopAsyncIteration:
                    return
            yield batch
            # Sent (the adapter asks for more only once its write is done): on disk now, so that a
            # process killed from here on is still charged for it (inference.journal).
            settlement.journal.delivered(stream)
            # A batch at hand is taken without suspending, so let a disconnect or a cancel
            # frame in between writes.
            await asyncio.sleep(0)
    finally:
        if waiter is not None:
            waiter.cancel()
        if stopped is not None:
            stopped.cancel()
        # Shielded: a second cancellation must not cut the settlement of what was sent short.
        await asyncio.shield(stream.aclose())
