"""Cross-session verify batching: many sessions' rounds in one verifier forward pass.

A worker thread takes the first waiting round, then gathers more for at most
``window_ms``, and stops waiting early as soon as every session that has joined is in
the batch (so a lone session never waits). Sessions join and leave between steps:
continuous batching. Greedy sessions decoding plainly on a verifier with ``run_greedy`` stay
in one lockstep call while others come and go: each leaves at its own run's end and
newcomers join at the next step (``VerifyScheduler._run_plain``). A batch that fails is
retried one round at a time, so one bad request fails alone; a retried round is safe
because the verifier answers a repeated round number with the verdict it already gave.

Two kinds of sessions submit rounds. A *driven* one (``submit_driven``: every
completion of :class:`~speculative.engine.SpeculativeEngine`) is advanced by this
worker itself right after its batch: it takes its verdict, hands its tokens to its
consumer, drafts, and its next round is in the next batch at once. No thread wakes per
round, so a round's time is the forward pass plus each session's own bookkeeping; with
sessions on threads of their own (measured on the demo pair's llama.cpp verifier, 16
sessions) the GIL hand-offs of 16 threads waking and resubmitting cost more than the
forward. A plain ``submit`` returns a future (the remote verifier's server, tests).
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from speculative.arrivals import ARRIVAL_WAIT_MS, ARRIVALS, Arrivals, Returning
from speculative.batch_cost import BatchCostModel
from speculative.controller import STEADY_CATCH_UP
from speculative.errors import SpeculativeError
from speculative.governor import SpeculationGovernor
from speculative.lockstep_runs import LockstepRuns
from speculative.steps import (
    DraftOrder,
    DrivenSession,
    OpenOrder,
    PlainRun,
    RoundResult,
    SpecResult,
    SpecRun,
    answer_step,
)
from speculative.types import Proposal, SpeculatedRound
from speculative.verifier import Verifier, VerifyRequest

log = logging.getLogger(__name__)

# The longest a verify step waits for sessions still drafting. It closes as soon as
# every joined session is in, so a lone session never waits; with many sessions this
# keeps them in lockstep (one forward per round, not two half-empty ones).
DEFAULT_WINDOW_MS = 8.0
DEFAULT_MAX_BATCH = 64
# The longest a plain run goes on before its session sees its tokens: the delay a streaming client's tokens may
# take (a run's steps are delivered together). Sessions waiting to open join the lockstep at its next step.
PLAIN_RUN_MS = 25.0
# The same where the client takes the answer whole (``PlainRun.whole``): only a cancel waits on its tokens.
WHOLE_RUN_MS = 100.0
HAND_OVER_MS = 2.0  # a lone session's end: how long the scheduler's thread lets its consumer reply first


Answer = Future[RoundResult] | DrivenSession
Item = tuple[VerifyRequest | PlainRun | None, Answer]  # None: a driven session to start
Round = tuple[VerifyRequest | PlainRun, Answer]


class VerifyScheduler:
    def __init__(
        self,
        verifier: Verifier,
        *,
        window_ms: float = DEFAULT_WINDOW_MS,
        max_batch: int = DEFAULT_MAX_BATCH,
        arrivals: Arrivals = ARRIVALS,
    ):
        self.verifier = verifier
        self.arrivals = arrivals  # requests on their way: an idle worker opens a burst's sessions together
        self.window_s = window_ms / 1e3
        self.max_batch = max_batch
        self._queue: queue.Queue[Item | None] = queue.Queue()
        # set after every put: ends the verifier's native plain steps (``run_greedy``) so that ``between`` sees the
        # item; cleared by ``between`` before it looks at the queue
        self._interrupt = ctypes.c_int32(0)
        # the worker's own thread only: driven sessions' next rounds, and this round's draft orders (run together)
        self._next: deque[Round] = deque()
        self._drafts: list[tuple[DraftOrder, DrivenSession]] = []
        self._active = 0
        self._returning = Returning()  # sessions that ended since the last opening: their clients may be back
        self._arriving = 0  # sessions opened by this batch that have not joined yet
        self._lock = threading.Lock()
        self._closed = False
        self.batches = 0
        self.rounds = 0
        self.cost = BatchCostModel()
        # what a draft step costs by the sessions drafting in it (ms a drafted token): the governor's too
        self.draft_cost = BatchCostModel()
        self.governor = SpeculationGovernor(self.cost, self.draft_cost)
        self._worker = threading.Thread(target=self._run, name="verify-scheduler", daemon=True)
        self._worker.start()

    def join(self) -> None:
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            self._returning.ended(ARRIVAL_WAIT_MS / 1e3)

    def hand_over(self) -> None:
        """A lone session's tokens and end were handed to its consumer and it left: wait until another session
        comes, at most ``HAND_OVER_MS``, before this thread releases its sequences and does the step's bookkeeping.

        The end wakes the consumer (the platform's loop, which replies), but the GIL stayed with this
        thread through the session's release and the cost line's and governor's bookkeeping: 0.25 ms
        that the reply waited for at one session (demo pair, timed in the server). A sleep of 0.3 ms
        was too short: it ended inside the reply's work, whose journal write gave the GIL back to it.
        Waiting on the queue, a session that comes meanwhile is taken at once.
        """
        if self.load() or self._next or self._drafts:  # (called once the session left: none is running)
            return
        waiting = self._queue
        with waiting.not_empty:  # (the queue's own condition: a put wakes this wait)
            if not waiting._qsize():
                waiting.not_empty.wait(HAND_OVER_MS / 1e3)

    def load(self) -> int:
        """Sessions running, counting those opened together with the caller that have yet to join."""
        return self._active + self._arriving

    def submit(self, request: VerifyRequest) -> Future[RoundResult]:
        future: Future[RoundResult] = Future()
        if self._closed:
            future.set_exception(SpeculativeError("the verify scheduler is closed"))
        else:
            self._put((request, future))
        return future

    def start_driven(self, session: DrivenSession) -> None:
        """Hand a driven session to this worker: it opens it (with others starting then), then runs its rounds."""
        if self._closed:
            answer_step(session, error=SpeculativeError("the verify scheduler is closed"))
        else:
            self._put((None, session))

    def close(self) -> None:
        self._closed = True
        self._put(None)
        self._worker.join(timeout=5)

    def _put(self, item: Item | None) -> None:
        self._queue.put(item)
        self._interrupt.value = 1  # (after the put: ``between`` clears it, then looks)

    def _gather(self, first: Item) -> list[Round]:
        batch: list[Item] = [first]
        while self._next and len(batch) < self.max_batch:
            batch.append(self._next.popleft())
        deadline = time.perf_counter() + self.window_s
        while len(batch) < self.max_batch:
            with self._lock:
                everyone_in = len(batch) >= self._active
            if not self._take_queued(batch, 0.0 if everyone_in else deadline - time.perf_counter()):
                break
        if self._active == 0 and any(request is None for request, _ in batch):
            # nothing runs and sessions open: the rest of a burst on its way opens with them, in one prefill (the
            # two waits together ARRIVAL_WAIT_MS at most)
            cap = time.perf_counter() + ARRIVAL_WAIT_MS / 1e3
            expected, until = self._returning.expected(ARRIVAL_WAIT_MS / 1e3)  # (``Returning``)
            opening = sum(request is None for request, _ in batch)
            while opening < expected and len(batch) < self.max_batch:
                if not self._take_queued(batch, min(until, cap) - time.perf_counter()):
                    break
                opening += batch[-1][0] is None
            if self.arrivals.coming > 0:
                self.arrivals.wait(max(0.0, cap - time.perf_counter()))
            while len(batch) < self.max_batch and self._take_queued(batch, 0.0):
                pass
        starting = [answer for request, answer in batch if request is None]
        rounds: list[Round] = [(request, answer) for request, answer in batch if request is not None]
        if starting:
            assert all(not isinstance(s, Future) for s in starting)
            rounds += self._open([s for s in starting if not isinstance(s, Future)])
        return rounds

    def _take_queued(self, batch: list[Item], wait_s: float) -> bool:
        """Add the next queued item to ``batch``, waiting up to ``wait_s``; False if none came (or the close did)."""
        try:
            item = self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return False
        if item is None:
            self._queue.put(None)  # let the run loop see the close
            return False
        batch.append(item)
        return True

    def _open(self, starting: list[DrivenSession]) -> list[Round]:
        """Open starting sessions with one batched prefill; their first rounds (a session that failed is told)."""
        openings: list[tuple[DrivenSession, OpenOrder]] = []
        rounds: list[Round] = []
        for session in starting:
            first = answer_step(session)  # runs it up to its opening
            if isinstance(first, OpenOrder):
                openings.append((session, first))
            elif first is not None:
                answer_step(session, error=SpeculativeError("a completion must open its session first"))
        if not openings:
            return rounds
        self._returning.opened()
        results = self._open_sessions([o for _, o in openings])
        waiting = len(self._next)
        self._arriving = len(openings)
        for (session, _), result in zip(openings, results, strict=True):
            self._arriving -= 1  # it joins now, or fails
            error = result if isinstance(result, BaseException) else None
            self._continue(session, None if error else result, error)  # its first draft or round
        self._draft_round()
        while len(self._next) > waiting:  # the new sessions' first rounds join this batch
            rounds.append(self._next.pop())
        return rounds

    def _open_sessions(self, openings: list[OpenOrder]) -> list[float | BaseException]:
        many = getattr(self.verifier, "open_many", None)
        items = [(o.session_id, o.prompt_ids, o.params) for o in openings]
        if many is not None:
            try:
                return list(many(items))
            except Exception as exc:  # noqa: BLE001 - every opening hears of it
                return [exc] * len(items)
        results: list[float | BaseException] = []
        for item in items:
            try:
                results.append(self.verifier.open_session(*item))
            except Exception as exc:  # noqa: BLE001 - this opening fails alone
                results.append(exc)
        return results

    def _run(self) -> None:
        warm_up = getattr(self.verifier, "warm_up", None)  # on this thread: its OpenMP team is the one that serves
        if warm_up is not None:
            try:
                for positions, ms in warm_up() or ():  # its warmed steps: the cost model's first points
                    self.cost.record(positions, ms)
            except Exception:  # noqa: BLE001 - a model that cannot decode says so on its first round
                log.exception("the verifier's warm-up failed")
        while True:
            first: Item | None
            if self._next:
                first = self._next.popleft()
            else:
                try:
                    first = self._queue.get_nowait()
                except queue.Empty:
                    self.governor.on_idle()  # no session has a round to run: they all ended
                    first = self._queue.get()
            if first is None:
                break
            batch = self._gather(first)
            if not batch:  # only openings, all failed (their consumers were told)
                continue
            try:
                self._verify(batch)
            except BaseException as exc:  # noqa: BLE001 - the worker must outlive any bug
                log.exception("verify step failed")
                for _, answer in batch:
                    if not isinstance(answer, Future) or not answer.done():
                        self._continue(answer, error=exc)
        # closed: every round still waiting hears so (a driven session's consumer would wait forever)
        closed = SpeculativeError("the verify scheduler is closed")
        while self._next:
            answer_step(self._next.popleft()[1], error=closed)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                answer_step(item[1], error=closed)

    def _verify(self, batch: list[Round]) -> None:
        if len(batch) == 1 and isinstance(batch[0][0], SpecRun) and hasattr(self.verifier, "speculate_greedy"):
            self._run_spec(batch[0])
            return
        if all(isinstance(req, PlainRun) for req, _ in batch) and hasattr(self.verifier, "run_greedy"):
            self._run_plain(batch)
            return
        rounds = [(req.request if isinstance(req, PlainRun) else req, answer) for req, answer in batch]
        try:
            result = self.verifier.verify([req for req, _ in rounds])
        except Exception as exc:  # noqa: BLE001 - every waiting session must hear of it
            self._one_at_a_time(rounds, exc, self._verify)
            return
        batch_tokens = sum(1 + len(req.tokens) for req, _ in rounds)
        results = [
            RoundResult(verdict, result.verify_ms, result.network_ms, len(rounds), batch_tokens)
            for verdict in result.verdicts
        ]
        # sessions waiting on a future first: the bookkeeping and driven sessions below must not keep them
        for (_, answer), round_result in zip(rounds, results, strict=True):
            if isinstance(answer, Future):
                answer.set_result(round_result)
        self.batches += 1
        self.rounds += len(rounds)
        self.cost.record(batch_tokens, result.verify_ms)  # before the driven sessions pick their next k
        self.governor.on_batch(
            emitted=sum(1 + v.n_matches for v in result.verdicts), active=self._active, now=time.perf_counter()
        )
        for (_, answer), round_result in zip(rounds, results, strict=True):
            if not isinstance(answer, Future):
                self._continue(answer, round_result)
        self._draft_round()

    def _run_plain(self, batch: list[Round]) -> None:
        """Plain runs in one lockstep call of the verifier's (``run_greedy``): each session's run ends on its own.

        A session whose run ended is answered between two steps, and its next plain run joins the
        next step; sessions that start meanwhile are opened and join too. The call ends when no
        session is left, or once a round that is not a plain run waits (a drafting round, a plain
        ``submit``, a lone session's run of rounds), the sessions still in answered with their
        tokens so far.
        """
        runs = LockstepRuns(self)
        try:
            last, _ = self.verifier.run_greedy(  # type: ignore[attr-defined]
                [runs.add(item) for item in batch], runs.between, interrupt=self._interrupt
            )
        except Exception as exc:  # noqa: BLE001 - a failed step changed nothing of the runs in it: each runs alone
            runs.flush()
            self._one_at_a_time(list(runs.live.values()), exc, self._run_plain)
            return
        runs.flush()
        for end in last:
            runs.answer(end, join=False)
        self._draft_round()

    def _run_deadline(self, whole: bool) -> float:
        """When a run starting now ends (``time.perf_counter``): ``WHOLE_RUN_MS`` for a ``whole`` answer, else ``PLAIN_RUN_MS``."""
        return time.perf_counter() + (WHOLE_RUN_MS if whole else PLAIN_RUN_MS) / 1e3

    def _run_spec(self, item: Round) -> None:
        """A lone session's drafting rounds in one call, until a session waits to join or ``PLAIN_RUN_MS`` (``WHOLE_RUN_MS``
        for a ``whole`` answer, as a plain run): the governor hears of its rounds at its end."""
        run, answer = item
        assert isinstance(run, SpecRun)
        deadline = self._run_deadline(run.whole)
        try:
            rounds: list[SpeculatedRound] = self.verifier.speculate_greedy(  # type: ignore[attr-defined]
                run.request.session_id,
                run.request.round,
                run.max_tokens,
                run.draft,
                run.k,
                stop=lambda: not self._queue.empty() or time.perf_counter() > deadline,
                deadline=deadline,
                interrupt=self._interrupt,  # (set by a put: the rounds in C end as ``stop()`` would)
            )
        except Exception as exc:  # noqa: BLE001 - the session hears of it
            self._continue(answer, error=exc)
            return
        self.batches += len(rounds)
        self.rounds += len(rounds)
        now = time.perf_counter()
        for r in rounds:
            self.cost.record(1 + len(r.proposal.tokens), r.verify_ms)
            if r.proposal.tokens and r.proposal.caught_up <= STEADY_CATCH_UP:
                # (not into ``draft_cost``: lockstep draft steps of 2 or more sessions, which one-session points
                # would only push out of its window)
                self.governor.on_lone_round(len(r.proposal.tokens), r.proposal.draft_ms + r.verify_ms, now)
        self.governor.on_batch(
            emitted=sum(1 + r.verdict.n_matches for r in rounds), active=self._active, now=now, batches=len(rounds)
        )
        self._continue(answer, SpecResult(rounds))
        self._draft_round()

    def _one_at_a_time(
        self, batch: Sequence[Round], error: BaseException, again: Callable[[list[Round]], None]
    ) -> None:
        """A failed batch's rounds again, one at a time (a failure changes nothing), so that a bad one fails alone."""
        if len(batch) > 1:
            for item in batch:
                again([item])
        elif batch:
            self._continue(batch[0][1], error=error)

    def _continue(self, answer: Answer, result: Any = None, error: BaseException | None = None) -> None:
        """Answer a round; a driven session's next round goes straight into the next batch."""
        following = answer_step(answer, result, error)
        if following is not None:
            self._follow(following, answer)

    def _follow(self, following: VerifyRequest | PlainRun | OpenOrder | DraftOrder, answer: Answer) -> None:
        """Queue a driven session's next step: its round in the next batch, its draft in this round's drafts."""
        assert not isinstance(answer, Future)
        if isinstance(following, VerifyRequest | PlainRun):
            self._next.append((following, answer))
        elif isinstance(following, DraftOrder):
            self._drafts.append((following, answer))
        else:
            self._continue(answer, error=SpeculativeError("a completion asked to open its session twice"))

    def _arrivals(self) -> tuple[list[Round], bool]:
        """Sessions waiting to start, opened now: (their first rounds, whether anything else waits)."""
        starting: list[DrivenSession] = []
        others = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # let the run loop see the close
                others = True
                break
            request, answer = item
            if request is None:
                assert not isinstance(answer, Future)
                starting.append(answer)
            else:
                self._next.append((request, answer))
                others = True
        return (self._open(starting) if starting else []), others

    def _draft_round(self) -> None:
        """Every draft order of this round as one lockstep round of each draft model; then their verify rounds."""
        from speculative.draft import propose_together

        while self._drafts:
            orders, self._drafts = self._drafts, []
            started = time.perf_counter()
            try:
                proposals: list = propose_together([(order.draft, order.k) for order, _ in orders])
            except Exception as exc:  # noqa: BLE001 - every session of the round hears of it
                proposals = [exc] * len(orders)
            self._draft_step_cost(proposals, (time.perf_counter() - started) * 1e3)
            for (_, session), proposal in zip(orders, proposals, strict=True):
                if isinstance(proposal, BaseException):
                    self._continue(session, error=proposal)
                else:
                    self._continue(session, proposal)

    def _draft_step_cost(self, proposals: list, ms: float) -> None:
        """A lockstep draft round's ms a drafted token, by its sessions, where none of them caught up on many tokens."""
        drafted = [p for p in proposals if isinstance(p, Proposal) and p.tokens]
        if drafted and all(p.caught_up <= STEADY_CATCH_UP for p in drafted):
            self.draft_cost.record(len(drafted), ms / max(len(p.tokens) for p in drafted))
