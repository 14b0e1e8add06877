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
from collections.abc import Generator, Sequence

from speculative.completion import CompletionRequest, Tokenizer, TokenStream, build_request
from speculative.controller import DraftLengthController
from speculative.draft import DraftModel, DraftSession
from speculative.scheduler import RoundResult, VerifyScheduler
from speculative.types import (
    MAX_DRAFT_TOKENS,
    TokenEvent,
)
from speculative.verifier import Verifier, VerifyRequest

__all__ = ["Completion", "CompletionRequest", "SpeculativeEngine", "TokenStream", "Tokenizer", "build_request"]

log = logging.getLogger(__name__)


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
