"""One completion, round by round: draft k, verify (batched with other sessions), accept.

:class:`SpeculativeEngine` ties a draft model, a verifier (local or remote) and the
verify scheduler together. ``engine.stream(prompt, ...)`` returns a :class:`Completion`,
an iterator of :class:`TokenEvent` that also carries the completion's stats. A round:

    k        = controller.next_k()               # 0 = plain verifier decoding
    proposal = draft.propose(k)                  # k tokens (+ q when sampling)
    verdict  = scheduler.submit(round).result()  # one batched forward, acceptance rule
    draft.accept(proposal, verdict)              # both sides keep the accepted prefix
    emit accepted draft tokens + the verifier's token, checking stop conditions

Several completions run at once from several threads; the scheduler batches them.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from speculative.controller import DraftLengthController
from speculative.draft import DraftModel, DraftSession
from speculative.errors import ContextOverflowError, InvalidRequestError, SpeculativeError
from speculative.logprobs import check_logprobs
from speculative.sampling import check_sampling
from speculative.scheduler import RoundResult, VerifyScheduler
from speculative.types import (
    MAX_DRAFT_TOKENS,
    CompletionStats,
    FinishReason,
    Provenance,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from speculative.verifier import Verifier, VerifyRequest

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class CompletionRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    k: int | None = None  # pin the draft length; None lets the controller choose
    # None: no log-probabilities (nothing computed); 0: each token's own; N: also the top N
    # alternatives (N <= MAX_TOP_LOGPROBS). See TokenEvent and TokenLogprob.
    logprobs: int | None = None


def build_request(
    tokenizer: Tokenizer,
    context_length: int,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 64,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    k: int | None = None,
    logprobs: int | None = None,
) -> CompletionRequest:
    """Validate and tokenise a completion request (raises InvalidRequestError early)."""
    sampling = sampling or SamplingParams()
    check_sampling(sampling)
    ids = tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
    if k is not None and not 0 <= k <= MAX_DRAFT_TOKENS:
        raise InvalidRequestError(f"k must be in [0, {MAX_DRAFT_TOKENS}], got {k}")
    if any(not isinstance(s, str) or not s for s in stop):
        raise InvalidRequestError("stop strings must be non-empty strings")
    check_logprobs(logprobs)
    if len(ids) + max_tokens > context_length:
        raise ContextOverflowError(
            f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"context of {context_length} tokens"
        )
    return CompletionRequest(tuple(ids), max_tokens, sampling, tuple(stop), k, logprobs)


class _TextTracker:
    """Turns emitted token ids into text deltas, holding back what might start a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._stop = stop
        self.ids: list[int] = []
        self.text = ""  # the completion text so far (cut at a stop string when one is found)
        self._flushed = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text safe to emit now, whether a stop string was hit)."""
        self.ids.append(token_id)
        text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False  # an incomplete UTF-8 sequence: wait for the next byte token
        self.text = text
        for stop in self._stop:
            idx = text.find(stop, max(0, self._flushed - len(stop)))
            if idx != -1:
                self.text = text[:idx]
                return self._flush(idx), True
        hold = max((_overlap(text, s) for s in self._stop), default=0)
        return self._flush(len(text) - hold), False

    def _flush(self, upto: int) -> str:
        """Release text up to ``upto`` (never backwards, never past the text)."""
        upto = min(max(upto, self._flushed), len(self.text))
        delta, self._flushed = self.text[self._flushed : upto], upto
        return delta

    def finish(self) -> str:
        """The held-back tail, released when the completion ends without a stop string."""
        return self._flush(len(self.text))


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class TokenStream:
    """An in-flight completion: iterate for tokens; ``stats`` and ``text`` when done.

    Subclasses produce the tokens (``_run``); this class turns them into events and
    enforces the stop conditions the same way for every tier.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int | None, request: CompletionRequest):
        self.request = request
        self.stats = CompletionStats(prompt_tokens=len(request.prompt_ids))
        self.session_id = uuid.uuid4().hex
        self._eos_token_id = eos_token_id
        self._tracker = _TextTracker(tokenizer, request.stop)
        self._unbilled_gpu_ms = 0.0  # verifier time not yet carried by an emitted token
        self._events = self._run()

    @property
    def text(self) -> str:
        return self._tracker.text

    @property
    def token_ids(self) -> list[int]:
        return list(self._tracker.ids)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop generating (a client went away); what was emitted stays counted."""
        self._events.close()

    def _run(self) -> Generator[TokenEvent, None, None]:
        raise NotImplementedError
        yield  # pragma: no cover - makes this a generator for type checkers

    def _emit(
        self,
        emitted: tuple[int, ...],
        n_matches: int,
        gpu_ms: float = 0.0,
        drafted: int = 0,
        provenance: Provenance | None = None,
        logprobs: Sequence[TokenLogprob] | None = None,
    ) -> Generator[TokenEvent, None, None]:
        """Yield a round's tokens, stopping at EOS, a stop string or max_tokens.

        The round's verifier time is shared evenly by the tokens it emits; each accepted
        draft token carries one drafted token and the verifier's token the rejected ones
        (see :class:`TokenEvent`); tokens past a stop condition are never emitted or charged.
        ``logprobs`` (one per emitted token) must be given when the request asked for them.
        """
        stats, req = self.stats, self.request
        if req.logprobs is not None and (logprobs is None or len(logprobs) != len(emitted)):
            # a backend that ignored the request: never stream tokens that silently lack them
            raise SpeculativeError(
                f"logprobs were requested but the model returned {'none' if logprobs is None else len(logprobs)} "
                f"for {len(emitted)} tokens"
            )
        gpu_each = gpu_ms / len(emitted)
        for i, token in enumerate(emitted):
            source = provenance or (Provenance.DRAFTED if i < n_matches else Provenance.VERIFIER)
            token_gpu_ms, self._unbilled_gpu_ms = gpu_each + self._unbilled_gpu_ms, 0.0
            # an accepted draft token carries itself; the verifier's token the drafts it rejected
            token_drafted = 1.0 if i < n_matches else float(drafted - n_matches)
            stats.completion_tokens += 1
            stats.provenance.append(source)
            lp = logprobs[i] if logprobs is not None and req.logprobs is not None else None
            logprob, top = (lp.logprob, lp.top) if lp is not None else (None, ())
            if token == self._eos_token_id:
                # EOS ends the text: release what was held back for a stop string
                stats.finish_reason = FinishReason.STOP
                yield TokenEvent(token, self._tracker.finish(), source, token_gpu_ms, token_drafted, logprob, top)
                return
            delta, hit_stop = self._tracker.push(token)
            if hit_stop:
                stats.finish_reason = FinishReason.STOP
            elif stats.completion_tokens >= req.max_tokens:
                stats.finish_reason = FinishReason.LENGTH
                delta += self._tracker.finish()
            yield TokenEvent(token, delta, source, token_gpu_ms, token_drafted, logprob, top)
            if stats.finish_reason is not None:
                return


class Completion(TokenStream):
    """A speculative completion: rounds of draft k, verify (batched), accept."""

    def __init__(self, engine: SpeculativeEngine, request: CompletionRequest):
        self._engine = engine
        super().__init__(engine.tokenizer, engine.eos_token_id, request)

    def _run(self) -> Generator[TokenEvent, None, None]:
        engine, req = self._engine, self.request
        draft = DraftSession(engine.draft, req.prompt_ids, req.sampling) if engine.draft is not None else None
        try:
            self.stats.prefill_ms = engine.verifier.open_session(self.session_id, req.prompt_ids, req.sampling)
            self.stats.gpu_ms = self.stats.prefill_ms
            self._unbilled_gpu_ms = self.stats.prefill_ms  # goes to the first token emitted
        except BaseException:
            if draft is not None:
                draft.close()
            raise
        engine.scheduler.join()
        if draft is not None:
            engine._drafting[self.session_id] = draft
            draft.start_round()
        try:
            controller = DraftLengthController(fixed_k=req.k if draft is not None else 0)
            batch_size = 1
            for round_no in itertools.count():
                k = self._next_k(controller, batch_size) if draft is not None else 0
                tokens, result, draft_ms = self._round(draft, k, round_no)
                verdict, batch_size = result.verdict, result.batch_size
                controller.record(
                    k=len(tokens),
                    n_matches=verdict.n_matches,
                    draft_ms=draft_ms,
                    verify_ms=result.verify_ms,
                    network_ms=result.network_ms,
                )
                gpu_ms = self._count_round(tokens, result, draft_ms)
                yield from self._emit(
                    verdict.emitted_tokens(tokens), verdict.n_matches, gpu_ms, len(tokens), logprobs=verdict.logprobs
                )
                if self.stats.finish_reason is not None:
                    return
        finally:
            engine._drafting.pop(self.session_id, None)
            engine.scheduler.leave()
            try:
                engine.verifier.close_session(self.session_id)
            finally:
                if draft is not None:
                    draft.close()

    def _next_k(self, controller: DraftLengthController, batch_size: int) -> int:
        scheduler, req = self._engine.scheduler, self.request
        k = controller.next_k(scheduler.cost.line(), batch_size)
        if req.k is None:  # a pinned k is the caller's choice; otherwise the governor's cap rules
            cap = scheduler.governor.cap
            if cap < MAX_DRAFT_TOKENS and k > 0:
                # A capped batch drafts in lockstep: every session waits for the longest draft
                # and the verify step, so a session drafting less than the cap saves the batch
                # next to nothing and loses tokens. It drafts the cap, unless its own controller
                # finds drafting does not pay for it at all (k = 0).
                k = cap
        # a round emits up to k + 1 tokens: never draft past max_tokens
        return min(k, req.max_tokens - self.stats.completion_tokens - 1, MAX_DRAFT_TOKENS)

    def _round(self, draft: DraftSession | None, k: int, round_no: int) -> tuple[tuple[int, ...], RoundResult, float]:
        """Draft k tokens, have them verified (batched with other sessions), keep the verdict."""
        proposal = draft.propose(k) if draft is not None and k > 0 else None
        tokens = proposal.tokens if proposal is not None else ()
        if draft is not None:
            draft.finish_round()
        q = proposal.q if proposal is not None else None
        request = VerifyRequest(self.session_id, tokens, q, round_no, self.request.logprobs)
        result = self._engine.scheduler.submit(request).result()
        if draft is not None:
            draft.start_round()
            if proposal is not None:
                draft.accept(proposal, result.verdict)
            else:
                draft.extend([result.verdict.verifier_token])
        return tokens, result, proposal.draft_ms if proposal is not None else 0.0

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
        self._drafting: dict[str, DraftSession] = {}  # open completions' draft sessions
        if draft is not None and self.scheduler.before_answer is None:
            self.scheduler.before_answer = self._mark_drafting
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

    def _mark_drafting(self, requests: list[VerifyRequest]) -> None:
        """Every session of a verified batch drafts next: say so before any of them wakes."""
        for req in requests:
            session = self._drafting.get(req.session_id)
            if session is not None:
                session.start_round()

    def close(self) -> None:
        self.scheduler.close()
