"""Engine events to the event loop: a driven completion hears whether its client takes the answer whole."""

from __future__ import annotations

import asyncio
import threading

import pytest

from inference.handoff import END, LAZY_BATCH, pump_on_thread

pytestmark = pytest.mark.asyncio


class DrivenFake:
    """A completion with ``drive``: hands ``n`` events to its sink on a thread, as the scheduler's would."""

    def __init__(self, n: int):
        self.n = n
        self.whole: bool | None = None

    def drive(self, sink, *, whole: bool = False) -> None:
        self.whole = whole
        threading.Thread(target=lambda: [sink(i) for i in range(self.n)] + [sink(None)]).start()

    def cancel(self) -> None:
        pass


async def _pumped(lazy: bool, n: int, monkeypatch) -> tuple[DrivenFake, list[object], int]:
    """(the fake, what reached the queue, the loop's wake-ups) for ``n`` events pumped with ``lazy``."""
    loop = asyncio.get_running_loop()
    wakes = 0
    wake = loop.call_soon_threadsafe

    def counted(callback, *args, **kwargs):
        nonlocal wakes
        wakes += 1
        return wake(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    queue: asyncio.Queue = asyncio.Queue()
    fake = DrivenFake(n)
    pump_on_thread(fake, queue, threading.Event(), "test", lazy=lazy)
    items = []
    while not items or items[-1] is not END:
        items.append(await asyncio.wait_for(queue.get(), 5))
    return fake, items, wakes


@pytest.mark.parametrize("lazy", [True, False])
async def test_a_driven_completion_is_told_its_client_takes_the_answer_whole(lazy, monkeypatch):
    fake, items, _ = await _pumped(lazy, 3, monkeypatch)
    assert fake.whole is lazy  # a whole answer's runs may be longer (``speculative.engine.Completion.drive``)
    assert items == [0, 1, 2, END]


async def test_a_whole_answer_wakes_the_loop_once_per_lazy_batch_and_at_its_end(monkeypatch):
    _, items, wakes = await _pumped(True, LAZY_BATCH + 5, monkeypatch)
    assert items == [*range(LAZY_BATCH + 5), END]
    assert wakes <= 2  # one at LAZY_BATCH events (if the loop had not taken them yet), one at the end
