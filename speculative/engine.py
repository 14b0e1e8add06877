"""One completion, round by round: draft k, verify (batched with other sessions), accept.

:class:`SpeculativeEngine` ties a draft model, a verifier (local or remote) and the
verify scheduler together. ``engine.stream(prompt, ...)`` returns a :class:`Completion`,
an iterator of :class:`TokenEvent` that also carries the completion's stats (or, with
``drive(sink)``, a completion that hands its events to a callback). A round:

    k        = controller.next_k()               # 0 = plain verifier decoding
    proposal = draft.propose(k)                  # k tokens (+ q when sampling)
    verdict  = <the round, in the next batch>    # one batched forward, acceptance rule
    draft.accept(proposal, verdict)              # both sides keep the accepted prefix
    emit accepted draft tokens + the verifier's token, checking stop conditions

A completion is a generator of steps (``_steps``: open, draft, verify, tokens) that the
scheduler's thread advances (:class:`DrivenRounds`): the opening prefill, every draft and
every verify step of every session run on that one thread, back to back, and consumers
only receive tokens. Engines over the same verifier must share one scheduler (pass
``scheduler=``): on a CPU, llama.cpp's OpenMP keeps a team of worker threads per calling
thread, and an idle team's spinning workers take the cores from the busy one (measured on
the demo verifier, 2 threads: a 0.7 ms verify step took 3.5 ms once a second thread had
called the model).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from speculative.completion import CompletionRequest, DraftedRound, Tokenizer, TokenStream, build_request
from speculative.controller import ControllerPriors, DraftLengthController, load_bucket
from speculative.draft import DraftModel, DraftSession
from speculative.errors import SpeculativeError
from speculative.scheduler import VerifyScheduler
from speculative.steps import DraftOrder, OpenOrder, PlainResult, PlainRun, RoundResult, SpecResult, SpecRun
from speculative.types import (
    MAX_DRAFT_TOKENS,
    Proposal,
    TokenEvent,
    TokenRun,
)
from speculative.verifier import Verifier, VerifyRequest

__all__ = ["Completion", "CompletionRequest", "SpeculativeEngine", "TokenStream", "Tokenizer", "build_request"]

log = logging.getLogger(__name__)


class Completion(TokenStream):
    """A speculative completion: rounds of draft k, verify (batched), accept.

    The scheduler's thread drives its rounds (:class:`DrivenRounds`): when a batch's
    verdicts are in, it accepts each session's tokens, hands them to the session's
    consumer, drafts its next round and queues it, without waking the session's thread.
    The consumer (an iterating thread, or the platform's hand-off to the event loop)
    only receives tokens; it is never on the path from one verify step to the next.
    """

    def __init__(self, engine: SpeculativeEngine, request: CompletionRequest):
        self._engine = engine
        self._driven: DrivenRounds | None = None
        self._whole = False
        super().__init__(engine.tokenizer, engine.eos_token_id, request)

    def drive(self, sink: Callable[[object], None], *, whole: bool = False) -> None:
        """Leave the completion to the scheduler's thread: its prefill, drafts and rounds all run there.

        ``sink`` receives each :class:`TokenEvent`, then ``None`` (the end) or the exception
        that stopped the completion, on whichever thread runs the round (never concurrently).
        ``cancel()`` stops it at its next round. Iterating the completion instead drives it
        the same way, with a queue as the sink. ``whole``: its consumer sends nothing before
        the end, so its tokens may come in fewer, longer runs (no first token alone, runs of
        up to ``WHOLE_RUN_MS``), each plain run's as one :class:`TokenRun` where its text
        allows; a cancel then waits that long at most.
        """
        if self._driven is not None:
            raise SpeculativeError("a completion is driven once")
        self._whole = whole
        self._events.close()  # the iterator is not used: drop it (it never started)
        self._driven = DrivenRounds(self._steps(), sink)
        self._engine.scheduler.start_driven(self._driven)

    def cancel(self) -> None:
        """Stop at the next round (from any thread); the sink still gets its end (``None``)."""
        if self._driven is not None:
            self._driven.cancel()

    def close(self) -> None:
        """Stop generating; returns once its sessions are released (after the round in flight, if any)."""
        self.cancel()
        super().close()
        if self._driven is not None and not self._driven.wait(CLOSE_WAIT_S):
            log.error("completion %s: its round did not end within %.0f s of close()", self.session_id, CLOSE_WAIT_S)

    def _run(self) -> Generator[TokenEvent, None, None]:
        events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._driven = DrivenRounds(self._steps(), events.put)
        try:
            self._engine.scheduler.start_driven(self._driven)
            while True:
                item = events.get()
                if item is None:  # the end
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, TokenEvent)
                yield item
        finally:
            self._driven.cancel()  # a consumer that stops early: the rounds stop too

    def _steps(self) -> Generator[Step, Answer, None]:
        """The completion as steps: tokens to deliver; the opening, drafts and verify rounds to be answered."""
        engine, req = self._engine, self.request
        draft = (
            DraftSession(engine.draft, req.prompt_ids, req.sampling, lazy=True) if engine.draft is not None else None
        )
        try:
            prefill_ms = yield OpenOrder(self.session_id, req.prompt_ids, req.sampling)
            assert isinstance(prefill_ms, float)
            self.stats.prefill_ms = prefill_ms
            self.stats.gpu_ms = self.stats.prefill_ms
            self._unbilled_gpu_ms = self.stats.prefill_ms  # goes to the first token emitted
        except BaseException:
            if draft is not None:
                draft.close()
            raise
        engine.scheduler.join()
        # costs depend on how many sessions share a round: the controller starts from what sessions measured
        # at this load (those opening with it included), moves with its batches' load, teaches the last one
        level = load_bucket(engine.scheduler.load())
        controller = DraftLengthController.starting_from(
            engine.controller_priors.at(level), fixed_k=req.k if draft is not None else 0
        )
        batch_size = 1
        plain_runs = req.sampling.greedy and req.logprobs is None and hasattr(engine.verifier, "run_greedy")
        spec_runs = plain_runs and hasattr(engine.verifier, "speculate_greedy")
        round_no = 0
        try:
            last_round_at: float | None = None  # when the previous round's verdict was in
            while True:
                k = self._next_k(controller, batch_size) if draft is not None else 0
                # a lone session drafting: its rounds in one call too (past its first token, which comes alone to a
                # client that streams; a whole answer's first round is one of the run's)
                started = self.stats.completion_tokens > 0 or self._whole
                spec = k > 0 and spec_runs and started and engine.scheduler.load() == 1
                if (k == 0 and plain_runs) or spec:
                    # plain: several steps in one call (with the batch's other plain sessions), without a round's
                    # Python around each; but its first token alone, as soon as it is decoded (a run's tokens are
                    # delivered together, and the time to the first one is what a streaming client waits on); a
                    # whole answer (``drive(whole=True)``) waits for its end anyway: one run, up to WHOLE_RUN_MS
                    left = req.max_tokens - self.stats.completion_tokens
                    if self._whole:  # (nothing is sent before the end: no first token alone, no step cap)
                        steps = left
                    else:
                        steps = min(PLAIN_RUN_STEPS if self.stats.completion_tokens else 1, left)
                    request = VerifyRequest(self.session_id, (), None, round_no)
                    ran = yield (
                        SpecRun(request, steps, draft, k, left, whole=self._whole)
                        if spec and draft is not None
                        else PlainRun(request, steps, whole=self._whole)
                    )
                    if isinstance(ran, SpecResult):
                        round_no += len(ran.rounds)
                        last_round_at = None
                        batch_size = 1
                        level = self._follow_load(controller, level, batch_size)
                        yield from self._emit_rounds(controller, ran)
                        if self.stats.finish_reason is not None:
                            return
                        continue
                    if isinstance(ran, PlainResult):
                        round_no += len(ran.tokens)
                        if draft is not None:
                            draft.extend(ran.tokens)
                        last_round_at = None
                        batch_size = ran.batch_size
                        level = self._follow_load(controller, level, batch_size)
                        yield from self._emit_plain(ran)
                        if self.stats.finish_reason is not None:
                            return
                        continue
                    assert isinstance(ran, RoundResult)  # run as one round of a batch: as any plain round
                    result = ran
                    proposal = None
                    tokens: tuple[int, ...] = ()
                else:
                    proposal = None
                    if draft is not None and k > 0:
                        drafted = yield DraftOrder(draft, k)
                        assert isinstance(drafted, Proposal)
                        proposal = drafted
                    tokens = proposal.tokens if proposal is not None else ()
                    q = proposal.q if proposal is not None else None
                    verified = yield VerifyRequest(self.session_id, tokens, q, round_no, self.request.logprobs)
                    assert isinstance(verified, RoundResult)
                    result = verified
                round_no += 1
                if draft is not None:
                    if proposal is not None:
                        draft.accept(proposal, result.verdict)
                    else:
                        draft.extend([result.verdict.verifier_token])
                draft_ms = proposal.draft_ms if proposal is not None else 0.0
                verdict, batch_size = result.verdict, result.batch_size
                level = self._follow_load(controller, level, batch_size)
                now = time.perf_counter()
                # what a round costs besides its draft, verify and network time (its tokens' delivery, the
                # scheduler's turn): a lone session's only, as in a batch it would include waiting for others
                overhead_ms = None
                if last_round_at is not None and batch_size == 1:
                    cycle_ms = (now - last_round_at) * 1e3
                    overhead_ms = max(0.0, cycle_ms - draft_ms - result.verify_ms - result.network_ms)
                last_round_at = now
                controller.record(
                    k=len(tokens),
                    n_matches=verdict.n_matches,
                    draft_ms=draft_ms,
                    verify_ms=result.verify_ms,
                    network_ms=result.network_ms,
                    caught_up=proposal.caught_up if proposal is not None else 0,
                    overhead_ms=overhead_ms,
                )
                gpu_ms = self._count_round(tokens, result, draft_ms)
                yield from self._emit(
                    verdict.emitted_tokens(tokens), verdict.n_matches, gpu_ms, len(tokens), logprobs=verdict.logprobs
                )
                if self.stats.finish_reason is not None:
                    return
        finally:
            driven = self._driven if self.stats.finish_reason is not None else None  # None: it did not end
            if driven is not None:
                # its tokens are all out: the consumer hears of the end before the sessions are released
                driven.end_now()
            if draft is not None:
                engine.controller_priors.at(level).fold(controller)
            engine.scheduler.leave()
            if driven is not None and batch_size == 1:  # it decoded alone: its reply first (``hand_over``)
                engine.scheduler.hand_over()
            try:
                engine.verifier.close_session(self.session_id)
            finally:
                if draft is not None:
                    draft.close()

    def _follow_load(self, controller: DraftLengthController, level: int, batch_size: int) -> int:
        """The load level of a batch of ``batch_size``; the controller rebased on its prior if the level moved."""
        now_at = load_bucket(batch_size)
        if now_at != level:
            controller.rebase(self._engine.controller_priors.at(now_at))
        return now_at

    def _emit_rounds(
        self, controller: DraftLengthController, ran: SpecResult
    ) -> Generator[TokenEvent | TokenRun, None, None]:
        """A run of drafting rounds: each counted and emitted as the round it is (the draft has heard its verdict).

        To a consumer that takes the answer whole, as one :class:`TokenRun` (``_emit_run``): 64 events
        of a lone session's drafting rounds took 0.4 ms of the scheduler's thread and the loop's after the last
        decode (demo pair, served). Not where a stop string may end the answer in a round before the last.
        """
        req = self.request
        as_run: list[DraftedRound] | None = [] if self._whole and req.logprobs is None and not req.stop else None
        for r in ran.rounds:
            tokens, verdict = r.proposal.tokens, r.verdict
            controller.record(
                k=len(tokens),
                n_matches=verdict.n_matches,
                draft_ms=r.proposal.draft_ms,
                verify_ms=r.verify_ms,
                network_ms=0.0,
                caught_up=r.proposal.caught_up,
            )
            result = RoundResult(verdict, r.verify_ms, 0.0, 1, 1 + len(tokens))
            gpu_ms = self._count_round(tokens, result, r.proposal.draft_ms)
            if as_run is not None:
                as_run.append((verdict.emitted_tokens(tokens), verdict.n_matches, gpu_ms, len(tokens)))
                continue
            yield from self._emit(verdict.emitted_tokens(tokens), verdict.n_matches, gpu_ms, len(tokens))
            if self.stats.finish_reason is not None:
                return
        if as_run:
            yield from self._emit_run(as_run)

    def _emit_plain(self, ran: PlainResult) -> Generator[TokenEvent | TokenRun, None, None]:
        """A plain run's tokens: each its own round of the verifier's; its share of the run's time is a session's."""
        stats, n = self.stats, len(ran.tokens)
        stats.rounds += n
        stats.verify_ms += ran.verify_ms
        stats.gpu_ms += ran.gpu_ms
        stats.draft_lengths.extend([0] * n)
        if self._whole:  # its consumer sends nothing before the end: the run's tokens as one item, text decoded once
            yield from self._emit_run([(tuple(ran.tokens), 0, ran.gpu_ms, 0)])
        else:
            yield from self._emit(tuple(ran.tokens), 0, ran.gpu_ms)

    def _next_k(self, controller: DraftLengthController, batch_size: int) -> int:
        scheduler, req = self._engine.scheduler, self.request
        cap = scheduler.governor.cap_for(scheduler.load()) if req.k is None else MAX_DRAFT_TOKENS
        if cap == 0:
            # plain decoding for everyone: the controller is not asked (at 16 sessions its estimate was 3% of
            # the scheduler's thread), nor does it count a probe the cap would cancel as one that failed
            return 0
        k = controller.next_k(scheduler.cost.line(), batch_size)
        if req.k is None and cap < MAX_DRAFT_TOKENS and (k > 0 or scheduler.load() == 1):
            # A capped batch drafts in lockstep: every session waits for the longest draft and the
            # verify step, so a session drafting less than the cap saves the batch next to nothing
            # and loses tokens. It drafts the cap, unless its own controller finds drafting does not
            # pay for it at all (k = 0) beside others. A lone session drafts the cap regardless: its
            # rounds run as one call (``SpecRun``), a saving its controller's model of a round does
            # not see (in process, demo pair: one-token drafts beat plain decoding by 11% where its
            # controller priced them below it), and what the arm makes is measured by the governor.
            k = cap
        # a round emits up to k + 1 tokens: never draft past max_tokens
        return min(k, req.max_tokens - self.stats.completion_tokens - 1, MAX_DRAFT_TOKENS)

    def _count_round(self, tokens: tuple[int, ...], result: RoundResult, draft_ms: float) -> float:
        """Add a round to the stats; return this session's share of the batch's verifier time."""
        stats = self.stats
        gpu_ms = result.gpu_share_ms(len(tokens))
        stats.rounds += 1
        stats.proposed += len(tokens)
        stats.accepted += result.verdict.n_matches
        stats.rejections += result.verdict.n_matches < len(tokens)
        stats.draft_ms += draft_ms
        stats.verify_ms += result.verify_ms
        stats.gpu_ms += gpu_ms
        stats.network_ms += result.network_ms
        stats.draft_lengths.append(len(tokens))
        return gpu_ms


class SpeculativeEngine:
    """Draft + verifier + scheduler; ``draft=None`` is plain (batched) verifier decoding."""

    def __init__(
        self,
        verifier: Verifier,
        tokenizer: Tokenizer,
        draft: DraftModel | None = None,
        *,
        scheduler: VerifyScheduler | None = None,
    ):
        self.verifier = verifier
        self.draft = draft
        self.tokenizer = tokenizer
        self.scheduler = scheduler or VerifyScheduler(verifier)
        self.controller_priors = ControllerPriors()  # what its finished sessions measured, by load, for the next ones
        self.eos_token_id = verifier.eos_token_id
        self.context_length = min(verifier.context_length, draft.context_length if draft else verifier.context_length)

    def request(self, prompt: str | Sequence[int], **kwargs) -> CompletionRequest:
        """Validate and tokenise a completion request (raises InvalidRequestError early)."""
        return build_request(self.tokenizer, self.context_length, prompt, **kwargs)

    def stream(self, prompt: str | Sequence[int], **kwargs) -> Completion:
        return Completion(self, self.request(prompt, **kwargs))

    def generate(self, prompt: str | Sequence[int], **kwargs) -> Completion:
        """Run a completion to the end and return it (``.text``, ``.token_ids``, ``.stats``)."""
        completion = self.stream(prompt, **kwargs)
        started = time.perf_counter()
        for _ in completion:
            pass
        log.debug(
            "completion of %d tokens in %.1f ms",
            completion.stats.completion_tokens,
            (time.perf_counter() - started) * 1e3,
        )
        return completion

    def close(self) -> None:
        self.scheduler.close()


CLOSE_WAIT_S = 30.0  # close() waits this long at most for the round in flight
PLAIN_RUN_STEPS = 16  # a plain session's steps a call at most: a cancel or a cap change waits no longer


Step = TokenEvent | TokenRun | OpenOrder | DraftOrder | VerifyRequest | PlainRun  # what a completion's steps yield
Answer = float | Proposal | RoundResult | PlainResult | SpecResult | None  # and what each is answered with


class DrivenRounds:
    """A completion's steps, advanced by whichever thread has its next answer (``step``).

    Between verify rounds it delivers the tokens to ``sink`` and drafts (on the calling
    thread), and returns when it needs the verifier again: the scheduler's thread runs
    this for every session of a batch right after the batch, so no session thread wakes
    per round. Never advanced by two threads at once: a session has one round in flight.
    """

    def __init__(self, steps: Generator[Step, Answer, None], sink: Callable[[object], None]):
        self._steps = steps
        self._sink = sink
        self._cancelled = False
        self._done = False
        self._ended = threading.Event()

    def cancel(self) -> None:
        self._cancelled = True

    def step(
        self, result: Any = None, error: BaseException | None = None
    ) -> VerifyRequest | PlainRun | OpenOrder | DraftOrder | None:
        """Answer the pending step (or fail it); return the next one for the scheduler, or None once it ended."""
        value: Answer = result
        while True:
            if self._done:
                return None
            try:
                if self._cancelled:
                    self._steps.close()  # runs its clean-up (scheduler, verifier and draft sessions)
                    self._end(None)
                    return None
                item = self._steps.throw(error) if error is not None else self._steps.send(value)
            except StopIteration:
                self._end(None)
                return None
            except BaseException as exc:  # noqa: BLE001 - the completion failed: its consumer raises it
                self._end(exc)
                return None
            error, value = None, None
            if isinstance(item, VerifyRequest | PlainRun | OpenOrder | DraftOrder):
                return item  # the scheduler answers it (drafts of a round's sessions run together)
            self._sink(item)

    def wait(self, timeout: float) -> bool:
        """Wait until the completion ended and released its sessions; False on timeout."""
        return self._ended.wait(timeout)

    def end_now(self) -> None:
        """Hand the sink its end now, from the steps' clean-up, before the sessions are released.

        Once the last token is out nothing can change the answer, and releasing a completion's
        verifier and draft sessions took 0.3-0.4 ms on the scheduler's thread (demo pair, one
        session, 2026-12-04) that a whole-answer client waited through. A failure of that clean-up
        is logged, as the consumer has had its end.
        """
        sink, self._sink = self._sink, _ignore
        sink(None)

    def _end(self, item: object) -> None:
        # the last item: then let go of the sink, which may hold the completion that holds this (the platform's
        # does), so that the request's objects are freed as it ends, not left to the cyclic collector
        sink, self._sink = self._sink, _ignore
        if sink is _ignore and isinstance(item, BaseException):
            log.error("a completion failed releasing its sessions after its end", exc_info=item)
        self._done = True
        self._ended.set()
        sink(item)


def _ignore(item: object) -> None:
    """A finished completion's sink: nothing follows its end."""
