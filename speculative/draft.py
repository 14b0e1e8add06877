"""The draft side of a speculative round: propose up to k tokens, then roll back.

A draft backend evaluates tokens into its KV cache (returning the last position's
logits), truncates that cache, and runs a whole round's drafting (``draft``: catch up,
then k steps, each token picked by the caller's rule; ``draft_steps`` is that loop for a
backend with nothing to batch). :class:`DraftSession` does the rest the same way for every
backend: it keeps the committed token sequence, says which tokens the cache lacks, picks
each draft token (argmax, or sampled from the warped ``q`` with the request's seed), and
on the verdict keeps the accepted tokens and drops the rest. A backend that batches
sessions (llama.cpp) runs the k steps of every session drafting at the same time in
lockstep, from one thread: one gathering of the sessions per round, not per token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from speculative.errors import ContextOverflowError, DraftBusyError, InvalidRequestError
from speculative.logprobs import check_logprobs, token_logprobs
from speculative.sampling import sample, warp
from speculative.types import Proposal, SamplingParams, TokenLogprob, Verdict

_DRAFT_SEED_SALT = 0x5EED  # keep the draft's stream of random numbers apart from the verifier's


class DraftContext(Protocol):
    """One session's state inside a draft backend (its own KV cache)."""

    n_ctx: int

    def evaluate(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` to the cache; return the logits after the last one  # (vocab,)"""
        ...

    def truncate(self, n_keep: int) -> None:
        """Drop every cached position from ``n_keep`` on."""
        ...

    def draft(self, tokens: Sequence[int], k: int, choose: Callable[[np.ndarray], int]) -> list[int]:
        """Evaluate ``tokens`` (at least one), then draft ``k`` tokens and return them.

        ``choose(logits)`` picks each draft token from the logits before it  # (vocab,);
        every draft token but the last is evaluated into the cache (the last one's logits
        are not needed this round).
        """
        ...

    def begin_round(self) -> None:
        """This session starts drafting (a batching backend waits for drafting sessions)."""
        ...

    def end_round(self) -> None: ...

    def close(self) -> None: ...


def draft_steps(ctx: DraftContext, tokens: Sequence[int], k: int, choose: Callable[[np.ndarray], int]) -> list[int]:
    """``DraftContext.draft`` one evaluation at a time, for a backend with nothing to batch."""
    logits = ctx.evaluate(tokens)
    drafted: list[int] = []
    for i in range(k):
        drafted.append(choose(logits))
        if i + 1 < k:
            logits = ctx.evaluate([drafted[-1]])
    return drafted


class DraftModel(Protocol):
    """A draft backend: shares the verifier's tokenizer, opens per-session contexts."""

    vocab_size: int
    context_length: int

    def new_context(self, prefix: Sequence[int] = ()) -> DraftContext:
        """A context for one session; one that already holds ``prefix``'s first ``reused`` tokens where it can."""
        ...


@dataclass(frozen=True)
class _DraftPlan:
    """One session's drafting round, ready to run: evaluate ``tokens``, then draft ``k`` with ``choose``."""

    ctx: DraftContext
    tokens: list[int]
    k: int
    choose: Callable[[np.ndarray], int]
    finish: Callable[[Sequence[int], float], Proposal]


def propose_together(orders: Sequence[tuple[DraftSession, int]]) -> list[Proposal | BaseException]:
    """Each session's ``propose(k)``, as one lockstep round where the backend runs many at once (llama.cpp).

    The verify scheduler's thread drafts every session of a round here: one ``llama_decode``
    a step for all of them, as the lockstep drafter does for sessions on threads of their own.
    Each result is the session's proposal or what its drafting raised.
    """
    started = time.perf_counter()
    results: list[Proposal | BaseException | None] = [None] * len(orders)
    plans: list[tuple[int, _DraftPlan]] = []
    for i, (session, k) in enumerate(orders):
        try:
            plan = session._plan(k, None)
        except Exception as exc:  # noqa: BLE001 - this session's round fails alone
            results[i] = exc
            continue
        if plan is None:
            results[i] = Proposal(tokens=(), q=None, draft_ms=0.0)
        else:
            plans.append((i, plan))
    groups: dict[object, list[tuple[int, _DraftPlan]]] = {}  # by backend model: each runs its own lockstep round
    for i, plan in plans:
        groups.setdefault(getattr(plan.ctx, "model", id(plan.ctx)), []).append((i, plan))
    drafted: dict[int, list[int] | BaseException] = {}
    for group in groups.values():
        together = getattr(group[0][1].ctx, "draft_together", None)
        if together is not None and len(group) > 1:
            outcomes = together([(p.ctx, p.tokens, p.k, p.choose) for _, p in group])
            drafted.update((i, outcome) for (i, _), outcome in zip(group, outcomes, strict=True))
            continue
        for i, p in group:
            try:
                drafted[i] = p.ctx.draft(p.tokens, p.k, p.choose)
            except Exception as exc:  # noqa: BLE001 - this session's round fails alone
                drafted[i] = exc
    draft_ms = (time.perf_counter() - started) * 1e3  # the round's time: what each session waited
    for i, plan in plans:
        tokens = drafted[i]
        results[i] = tokens if isinstance(tokens, BaseException) else plan.finish(tokens, draft_ms)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


class DraftSession:
    """The draft's view of one completion: committed tokens plus a cache of some prefix."""

    def __init__(self, model: DraftModel, prompt_ids: Sequence[int], params: SamplingParams, *, lazy: bool = False):
        """``lazy``: the draft's context is opened at the first round that drafts, not now.

        A verifier's session takes one lazily: where the governor has it decode plainly (a CPU, one
        session) it never drafts, and opening and closing a draft sequence, and seeding its sampler,
        cost 0.14 ms of every request on the scheduler's thread, 0.1 of it before its first token
        (demo pair, served, 2026-12-04). A lazy session whose draft has no free sequence when it
        first drafts proposes nothing (its round decodes plainly) and tries again the next round.
        """
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        self._model = model
        self._params = params
        self._opened: DraftContext | None = None
        self._sampler: torch.Generator | None = None
        self.committed: list[int] = list(prompt_ids)
        self._n_cached = 0  # committed tokens already in the draft's KV cache
        self._in_round = False
        self._round_lock = threading.Lock()
        if not lazy:
            self._open()

    def _open(self) -> DraftContext:
        """The draft's context of this session (opened now if it is not yet): its prefix the draft still holds reused."""
        if self._opened is None:
            self._opened = self._model.new_context(self.committed)
            self._n_cached = getattr(self._opened, "reused", 0)
        return self._opened

    @property
    def model(self) -> DraftModel:
        return self._model

    @property
    def _ctx(self) -> DraftContext:
        return self._open()

    @property
    def _generator(self) -> torch.Generator:
        if self._sampler is None:  # seeded at its first draw: the same draws as seeded when the session opened
            self._sampler = torch.Generator().manual_seed(self._params.seed ^ _DRAFT_SEED_SALT)
        return self._sampler

    def propose(self, k: int, logprobs: int | None = None) -> Proposal:
        """Draft up to ``k`` tokens after the committed sequence (fewer near the context end).

        ``logprobs`` (None, or the top N wanted) also reads each token's log-probability off
        the draft's own logits: the edge tier serves the draft's tokens, so they are its to report.
        """
        started = time.perf_counter()
        plan = self._plan(k, logprobs)
        if plan is None:
            return Proposal(tokens=(), q=None, draft_ms=0.0, logprobs=None if logprobs is None else ())
        drafted = self._ctx.draft(plan.tokens, plan.k, plan.choose)
        return plan.finish(drafted, (time.perf_counter() - started) * 1e3)

    def propose_now(self, k: int, threads: int | None = None) -> Proposal:
        """``propose(k)`` on this thread at once: not gathered with other sessions' drafting rounds.

        A lone session's run of rounds (``LlamaCppVerifier.speculate_greedy``) drafts here, on the
        scheduler's thread, between its verifier's decodes; a backend that gathers concurrent
        drafters (llama.cpp) would otherwise wait for the edge tier's sessions. ``threads``: what a
        llama.cpp draft may decode on (the verifier's, idle meanwhile).
        """
        started = time.perf_counter()
        plan = self._plan(k, None)
        if plan is None:
            return Proposal(tokens=(), q=None, draft_ms=0.0)
        now = getattr(plan.ctx, "draft_now", None)
        if now is not None:
            drafted = now(plan.tokens, plan.k, plan.choose, threads)
        else:
            drafted = plan.ctx.draft(plan.tokens, plan.k, plan.choose)
        return plan.finish(drafted, (time.perf_counter() - started) * 1e3)

    def _plan(self, k: int, logprobs: int | None) -> _DraftPlan | None:
        """What this round drafts (None: nothing, near the context's end); ``finish`` makes the proposal of it."""
        if k < 0:
            raise InvalidRequestError(f"draft length k must be >= 0, got {k}")
        check_logprobs(logprobs)
        if k == 0:
            return None
        try:
            ctx = self._open()
        except DraftBusyError:
            return None  # (a lazy session: an eager one opened when it was made) no draft this round
        k = min(k, ctx.n_ctx - len(self.committed) - 1)
        if k <= 0:
            return None
        if len(self.committed) >= ctx.n_ctx:
            raise ContextOverflowError(f"{len(self.committed)} tokens exceed the draft context {ctx.n_ctx}")
        self._leave_one_uncached(ctx)
        q_rows: list[torch.Tensor] = []
        lp_rows: list[TokenLogprob] = []

        def pick(logits: np.ndarray) -> int:
            if self._params.greedy:
                return int(np.argmax(logits))
            q = warp(torch.from_numpy(np.asarray(logits, dtype=np.float32)), self._params)
            q_rows.append(q)
            return sample(q, self._generator)

        def pick_with_logprob(logits: np.ndarray) -> int:
            token = pick(logits)
            scores = torch.from_numpy(np.asarray(logits, dtype=np.float32)).unsqueeze(0)  # (1, vocab)
            lp_rows.extend(token_logprobs(scores, torch.tensor([token]), logprobs or 0))
            return token

        uncached = self.committed[self._n_cached :]

        def finish(drafted: Sequence[int], draft_ms: float) -> Proposal:
            self._n_cached = len(self.committed)  # accept() counts the draft tokens that were cached
            q = torch.stack(q_rows).numpy() if q_rows else None
            lps = None if logprobs is None else tuple(lp_rows)
            return Proposal(tokens=tuple(drafted), q=q, draft_ms=draft_ms, logprobs=lps, caught_up=len(uncached))

        choose = pick if logprobs is None else pick_with_logprob
        return _DraftPlan(ctx, uncached, k, choose, finish)

    def _leave_one_uncached(self, ctx: DraftContext) -> None:
        if self._n_cached >= len(self.committed):
            # everything is cached (only before any verdict): evaluate the last token again
            # for the logits after it, rather than keep a copy of them around
            self._n_cached = len(self.committed) - 1
            ctx.truncate(self._n_cached)

    def native_feed(self) -> tuple[DraftContext, list[int]] | None:
        """For a lone session's rounds run in C (``speculative.lone_rounds``): (its draft context, the committed
        tokens that context lacks: one at least), or None where no context could open now (greedy only)."""
        if not self._params.greedy:
            raise InvalidRequestError("rounds in C draft greedily only")
        try:
            ctx = self._open()
        except DraftBusyError:
            return None
        self._leave_one_uncached(ctx)
        return ctx, self.committed[self._n_cached :]

    def ran_natively(self, emitted: Sequence[int], n_cached: int) -> None:
        """Rounds in C emitted ``emitted`` (every round's accepted tokens and the verifier's); the draft's context
        now holds the first ``n_cached`` committed tokens."""
        self.committed.extend(emitted)
        self._n_cached = n_cached

    def accept(self, proposal: Proposal, verdict: Verdict) -> None:
        """Keep the accepted draft tokens and the verifier's token; drop the rejected tail."""
        if proposal.tokens:
            # propose() cached every committed token and all draft tokens but the last
            evaluated = len(proposal.tokens) - 1
            keep = len(self.committed) + min(verdict.n_matches, evaluated)
            if verdict.n_matches < evaluated:
                self._ctx.truncate(keep)
            self._n_cached = keep
        self.committed.extend(verdict.emitted_tokens(proposal.tokens))

    def start_round(self) -> None:
        """This session is drafting from now until ``finish_round`` (it owes the verifier a round).

        A batching backend waits for every drafting session before it evaluates, so the
        whole span counts, not just the evaluations: the time a session spends emitting
        its tokens between verdict and next draft is when the others must wait for it.
        """
        with self._round_lock:  # the scheduler's thread may call this too
            if not self._in_round:
                self._in_round = True
                self._ctx.begin_round()

    def finish_round(self) -> None:
        with self._round_lock:
            if self._in_round:
                self._in_round = False
                self._ctx.end_round()

    def extend(self, tokens: Sequence[int]) -> None:
        """Commit tokens produced without a draft (plain verifier decoding)."""
        self.committed.extend(tokens)

    def close(self) -> None:
        self.finish_round()
        if self._opened is not None:
            self._opened.close()
