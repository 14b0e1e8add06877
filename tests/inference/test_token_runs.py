"""A whole answer's plain runs reach the gateway as one item each (``TokenRun``), charged as their tokens one by one."""

from __future__ import annotations

import asyncio
import threading

import pytest

from inference import gateway
from inference.engines import CharTokenizer, TrivialCompletion
from inference.handoff import LAZY_BATCH, _Handoff
from inference.stream import Tally
from speculative.types import Provenance, TokenEvent, TokenRun
from tenants.models import UsageRecord
from tests.inference.conftest import GatedEngine, serving_gated

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

TEXT = "Runs of the verifier's tokens, é and all. "
PREFILL_MS = 0.7  # billed to the first token
RUN_MS = 2.6  # a run's decodes, shared by its tokens


class RunCompletion(TrivialCompletion):
    """Plain runs of ``TEXT``'s characters, driven as the scheduler drives a completion: each run whole or by token."""

    def drive(self, sink, *, whole: bool = False) -> None:
        self._engine.drives.append(whole)

        def run() -> None:
            self._unbilled_gpu_ms = PREFILL_MS
            try:
                ids = (*(ord(c) for c in TEXT), CharTokenizer.eos_token_id)  # EOS inside the last run
                for start in range(0, len(ids), 16):  # runs of 16 tokens, as runs that ended at their deadline
                    run_ids = ids[start : start + 16]
                    emit = self._emit_run([(run_ids, 0, RUN_MS, 0)]) if whole else self._emit(run_ids, 0, RUN_MS)
                    for item in emit:
                        sink(item)
                    if self.stats.finish_reason is not None:
                        break
                sink(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the sink, as the scheduler does
                sink(exc)

        threading.Thread(target=run).start()

    def cancel(self) -> None:
        pass


class RunEngine(GatedEngine):
    def __init__(self) -> None:
        super().__init__()
        self.drives: list[bool] = []

    def stream(self, prompt, **kwargs) -> RunCompletion:
        return RunCompletion(self, self.request(prompt, **kwargs))


def call(**kwargs) -> gateway.CompletionCall:
    return gateway.CompletionCall(**{"model": "tandem-test", "prompt": "Hello there", "max_tokens": 30, **kwargs})


async def _answer(account, *, stream: bool, max_tokens: int) -> tuple[str, list[gateway.TokenDelta], UsageRecord]:
    principal = await gateway.authenticate_api_key(account.raw_key)
    started = await gateway.start(principal, call(stream=stream, max_tokens=max_tokens))
    text, deltas = await gateway.collect(started)
    return text, deltas, await UsageRecord.objects.aget(request_id=started.request_id)


@pytest.mark.parametrize("max_tokens", [30, len(TEXT), 100])
async def test_a_whole_answer_in_runs_is_charged_and_told_as_its_tokens_one_by_one(account, max_tokens):
    with serving_gated(RunEngine()) as engine:
        whole = await _answer(account, stream=False, max_tokens=max_tokens)
        streamed = await _answer(account, stream=True, max_tokens=max_tokens)
    assert engine.drives == [True, False]  # the first in runs, the other token by token
    (text, deltas, row), (text_1, deltas_1, row_1) = whole, streamed
    n = min(max_tokens, len(TEXT))
    eos = max_tokens > len(TEXT)  # the answer ends with EOS: its own event after the run, charged, no text
    told = [ord(c) for c in TEXT[:n]] + [CharTokenizer.eos_token_id] * eos
    assert text == text_1 == TEXT[:n]
    assert [(d.index, d.token_id, d.provenance) for d in deltas] == [
        (i, token, Provenance.VERIFIER) for i, token in enumerate(told)
    ]
    assert [(d.index, d.token_id) for d in deltas] == [(d.index, d.token_id) for d in deltas_1]
    charged = ("completion_tokens", "gpu_ms", "drafted_tokens", "accepted_tokens", "cost_total", "finish_reason")
    assert {f: getattr(row, f) for f in charged} == {f: getattr(row_1, f) for f in charged}
    assert row.completion_tokens == n + eos and row.finish_reason == ("stop" if eos else "length")


async def test_a_runs_tokens_wait_at_hand_for_take_at_hand_and_anext_which_settles(account):
    with serving_gated(RunEngine()):
        principal = await gateway.authenticate_api_key(account.raw_key)
        stream = await gateway.start(principal, call(stream=False, max_tokens=20))
        await stream.ready()
        taken = stream.take_at_hand(limit=5)  # a run of 16 delivered at once: 5 taken, 11 left at hand
        assert [d.index for d in taken] == [0, 1, 2, 3, 4]
        assert stream.at_hand() and stream.delivered == 16
        taken.append(await stream.__anext__())
        await stream.ready()
        taken += stream.take_at_hand(limit=100)
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
    assert [d.index for d in taken] == list(range(20)) and "".join(d.text for d in taken) == TEXT[:20]
    assert stream.usage is not None and stream.usage.completion_tokens == 20 and stream.usage.outcome == "completed"


async def test_a_run_counts_in_a_tally_as_its_events_would_to_the_last_bit():
    shares = [0.1 + 0.7, 0.1 + 1 / 3, 0.1 + 1 / 3, 0.1 + 1 / 3, 2.2 / 3]
    run = TokenRun((5, 6, 7, 8, 9), "fives", shares[0], shares[1])
    events = [
        TokenEvent(t, x, Provenance.VERIFIER, g)
        for t, x, g in zip(run.token_ids, run.texts(), run.gpu_shares(), strict=True)
    ]
    one_by_one, together = Tally(gpu_ms=0.3), Tally(gpu_ms=0.3)
    for event in events:
        one_by_one.count(event)
    together.count_run(run)
    together.started = one_by_one.started
    assert together == one_by_one and run.texts() == ["", "", "", "", "fives"]
    with pytest.raises(ValueError, match="at least one token"):
        TokenRun((), "", 0.0, 0.0)


async def test_a_drafting_run_counts_in_a_tally_as_its_events_would():
    drafted_, verifier = Provenance.DRAFTED, Provenance.VERIFIER
    # rounds: two accepted of three drafted and the verifier's token; none of two drafted; one of one and a bonus
    provenance = (drafted_, drafted_, verifier, verifier, drafted_, verifier)
    drafted = (1.0, 1.0, 1.0, 2.0, 1.0, 0.0)
    shares = (0.9 + 1 / 3, 1 / 3, 1 / 3, 0.7, 0.55, 0.55)
    run = TokenRun((5, 6, 7, 8, 9, 10), "sixes!", shares[0], 0.0, shares=shares, provenance=provenance, drafted=drafted)
    events = [
        TokenEvent(t, x, p, g, d)
        for t, x, p, g, d in zip(run.token_ids, run.texts(), provenance, shares, drafted, strict=True)
    ]
    one_by_one, together = Tally(), Tally()
    for event in events:
        one_by_one.count(event)
    together.count_run(run)
    together.started = one_by_one.started
    assert together == one_by_one
    assert (together.accepted, together.rejections, together.drafted) == (3, 2, 6.0)


async def test_a_lazy_handoff_counts_a_runs_tokens_towards_its_batch():
    queue: asyncio.Queue = asyncio.Queue()
    wakes: list[object] = []

    class Loop:
        def call_soon_threadsafe(self, callback, *args):
            wakes.append(callback)

    handoff = _Handoff(queue, Loop(), threading.Event(), lazy=True)  # type: ignore[arg-type]
    handoff.put(TokenRun(tuple(range(LAZY_BATCH - 1)), "x", 0.0, 0.0))
    assert wakes == []  # one token short of a batch
    handoff.put(TokenEvent(1, "y", Provenance.VERIFIER))
    assert len(wakes) == 1  # a batch's worth of tokens: the loop is woken
