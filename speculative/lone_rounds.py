"""A lone greedy session's drafting rounds one after another (``LlamaCppVerifier.speculate_greedy``), in C where it can.

Each round asks the drafter for up to ``k`` tokens, decodes ``[pending, x1..xk]`` alone, keeps
the agreeing prefix and the verifier's token, rolls the rest back and tells the drafter the
verdict: the same decode, verdict and cache as a round through ``verify``, without a round's
Python around it. Where the native library built (``speculative.native_steps``) and the draft is
a llama.cpp model, whole runs of rounds go to ``lockstep.c``'s ``tandem_speculate``: the draft's
catch-up and proposal, the verifier's decode, the verdict and both sequences' rollback, round
after round without a return to the interpreter (which, between two decodes, runs cold: the
weights just streamed through the caches). Afterwards its rounds are told to the session, the
draft and the caller as Python's rounds are: the same decodes, verdicts and caches (the tests
run both). C ends its rounds where Python's end (``max_tokens``, the end-of-sequence token, the
caller's interrupt or deadline, another thread waiting for the draft), or before a round it
leaves to Python (nothing to draft with a long catch-up, a context's end).
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from speculative.acceptance import accept_greedy_ids
from speculative.draft_llama import LlamaCppDraft
from speculative.errors import InvalidRequestError
from speculative.llama_logits import check_decode
from speculative.native_steps import Lockstep
from speculative.types import MAX_DRAFT_TOKENS, GreedyDrafter, Proposal, SpeculatedRound, Verdict
from speculative.verifier import VerifyRequest

if TYPE_CHECKING:
    from speculative.draft_llama import NativeTurn
    from speculative.verifier_llama import LlamaCppVerifier, _Session

log = logging.getLogger(__name__)

_NO_PROPOSAL = Proposal(tokens=(), q=None, draft_ms=0.0)  # a round with nothing to draft (the end is near)
MAX_ROUNDS = 512  # rounds one call may run
FEED_TOKENS = 512  # committed tokens the draft may lack before a round in C (its batch's worth at most)


class Side(ctypes.Structure):
    """``tandem_side``: one model's context, memory, batch and sequence."""

    _fields_ = [
        ("ctx", ctypes.c_void_p),
        ("memory", ctypes.c_void_p),
        ("batch", ctypes.c_void_p),
        ("batch_tokens", ctypes.c_int32),
        ("seq", ctypes.c_int32),
        ("n_past", ctypes.c_int32),
        ("n_vocab", ctypes.c_int32),
        ("n_ctx", ctypes.c_int32),
    ]


class NativeRound(ctypes.Structure):
    """``tandem_round``: one round as it ran."""

    _fields_ = [
        ("drafted", ctypes.c_int32 * MAX_DRAFT_TOKENS),
        ("k", ctypes.c_int32),
        ("caught_up", ctypes.c_int32),
        ("n_matches", ctypes.c_int32),
        ("token", ctypes.c_int32),
        ("draft_ms", ctypes.c_double),
        ("verify_ms", ctypes.c_double),
    ]


def speculate_greedy(
    verifier: LlamaCppVerifier,
    session_id: str,
    first_round: int,
    max_tokens: int,
    drafter: GreedyDrafter,
    k: int,
    stop: Callable[[], bool] = lambda: False,
    deadline: float = math.inf,
    interrupt: ctypes.c_int32 | None = None,
) -> list[SpeculatedRound]:
    """``LlamaCppVerifier.speculate_greedy``: a lone greedy session's drafting rounds one after another in one call,
    ``verify`` without a round's Python.

    Each round asks ``drafter`` for up to ``k`` tokens, decodes ``[pending, x1..xk]`` alone,
    keeps the agreeing prefix and the verifier's token, rolls the rest back and tells the
    drafter the verdict: the same decode, verdict and cache as a round through ``verify``
    (rounds numbered from ``first_round``). Through the scheduler and the engine, a round of a
    lone session cost about 0.35 ms of Python besides its two models (in process, demo pair,
    one drafted token a round: 33 rounds of 64 tokens took 51.9 ms, plain decoding 50.5);
    here it costs what the draft's own plumbing does, and nothing in C: given an ``interrupt`` (a
    flag another thread sets as ``stop()`` becomes true) and ``stop()``'s ``deadline``, runs of
    rounds go to C where they can. The run ends after the round that reaches ``max_tokens`` or emits the
    end-of-sequence token, or once ``stop()`` is true. A round that fails raises: the
    sequence then holds what the rounds before it committed (the session fails; its drafter
    is left as that round's proposal left it, or with C's rounds before it).
    """
    with verifier._lock:
        s = verifier._session(session_id)
        if not s.params.greedy:
            raise InvalidRequestError("speculate_greedy serves greedy sessions only")
        if max_tokens < 1 or not 1 <= k <= MAX_DRAFT_TOKENS:
            raise InvalidRequestError(f"max_tokens must be >= 1 and k in [1, {MAX_DRAFT_TOKENS}]")
        verifier._check_request(VerifyRequest(session_id, (), None, first_round), s)
        native = verifier._native_rounds if interrupt is not None else None
        if native is not None and not native.usable(drafter, verifier):
            native = None
        rounds: list[SpeculatedRound] = []
        emitted = 0
        while True:
            if native is not None:
                assert interrupt is not None
                interrupt.value = 0  # (then stop() looks: from now on whatever makes it true sets the flag)
                if stop():
                    interrupt.value = 1
                ran = native.run(
                    verifier,
                    s,
                    drafter,
                    rounds,
                    (first_round + len(rounds), max_tokens - emitted, k, deadline, interrupt),
                )
                emitted += ran
                if ran and _over(verifier, rounds[-1], emitted, max_tokens, stop):
                    return rounds
            emitted += _round(
                verifier, s, drafter, k, max_tokens - emitted, (session_id, first_round + len(rounds)), rounds
            )
            if _over(verifier, rounds[-1], emitted, max_tokens, stop):
                return rounds


def _over(
    verifier: LlamaCppVerifier, last: SpeculatedRound, emitted: int, max_tokens: int, stop: Callable[[], bool]
) -> bool:
    """Whether the run ends after ``last``: ``max_tokens`` emitted, the end of sequence, or ``stop()``."""
    return emitted >= max_tokens or verifier.eos_token_id in last.verdict.emitted_tokens(last.proposal.tokens) or stop()


def _round(
    verifier: LlamaCppVerifier,
    s: _Session,
    drafter: GreedyDrafter,
    k: int,
    left: int,
    numbered: tuple[str, int],
    rounds: list[SpeculatedRound],
) -> int:
    """One round in Python (``numbered``: the session's id, the round's number), appended to ``rounds``: the tokens it
    emitted (``left`` at most)."""
    # a round adds 1 + k positions: never past the context, nor a draft past max_tokens
    want = min(k, left - 1, verifier.context_length - s.length - 1)
    # the draft decodes on this verifier's threads: they are idle while it drafts
    proposal = drafter.propose_now(want, verifier.n_threads) if want > 0 else _NO_PROPOSAL
    drafted = proposal.tokens
    started = time.perf_counter()
    request = VerifyRequest(numbered[0], drafted, None, numbered[1])
    verifier._check_request(request, s)
    b = verifier._batch.batch
    row = [s.pending, *drafted]
    for i, token in enumerate(row):
        b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = token, s.length + i, 1, s.seq
        b.logits[i] = True
    b.n_tokens = len(row)
    try:
        check_decode(verifier._decode_batch())
        chosen = verifier._logits(len(row)).argmax(-1).tolist()
    except BaseException:
        verifier._ctx.kv_cache_seq_rm(s.seq, s.length, -1)  # whatever part ran: only what is committed stays
        raise
    verdict = accept_greedy_ids(drafted, chosen)
    verifier._commit(s, request, verdict, len(row))
    rounds.append(SpeculatedRound(proposal, verdict, (time.perf_counter() - started) * 1e3))
    drafter.accept(proposal, verdict)
    return 1 + verdict.n_matches


class NativeRounds:
    """``tandem_speculate`` bound to one verifier's context and batch, with its buffers (one caller at a time: the
    verifier's lock)."""

    def __init__(self, lib: Lockstep, verifier: LlamaCppVerifier):
        self._lib = lib
        ctx, batch = verifier._ctx, verifier._batch.batch
        self._verifier = Side(
            ctx.ctx, ctx.memory, ctypes.addressof(batch), verifier._batch_tokens, 0, 0, verifier.vocab_size
        )
        self._context_length = verifier.context_length
        self._draft = Side()
        self._rounds = (NativeRound * MAX_ROUNDS)()
        self._feed = (ctypes.c_int32 * FEED_TOKENS)()
        self._rc = ctypes.c_int32()

    def usable(self, drafter: object, verifier: LlamaCppVerifier) -> bool:
        """Whether ``drafter``'s rounds can run here: a llama.cpp draft, its ids within the verifier's vocabulary."""
        model = getattr(drafter, "model", None)
        return isinstance(model, LlamaCppDraft) and model.vocab_size <= verifier.vocab_size

    def run(
        self,
        verifier: LlamaCppVerifier,
        s: _Session,
        drafter: Any,
        rounds: list[SpeculatedRound],
        plan: tuple[int, int, int, float, ctypes.c_int32],
    ) -> int:
        """Rounds in C, appended to ``rounds`` and told to ``s`` and ``drafter``; the tokens they emitted (0: none ran,
        C left the next round to Python). ``plan``: (first round's number, most tokens, k, deadline, interrupt).
        A failed decode raises once the rounds before it are told (that round undone in both models)."""
        first_round, max_tokens, k, deadline, interrupt = plan
        fed = drafter.native_feed()
        if fed is None or len(fed[1]) > FEED_TOKENS:  # (a llama.cpp draft's context: ``usable``)
            return 0
        ctx, feed = fed
        with ctx.native_turn(verifier.n_threads) as turn:
            n = self._call(s, turn, feed, k, max_tokens, verifier.eos_token_id, deadline, interrupt)
            emitted = self._told(s, drafter, rounds, first_round, n)
            ctx.now_holds(drafter.committed[: turn.n_past])
        verifier._count_decodes(n, self._rc.value)
        check_decode(self._rc.value)
        return emitted

    def _call(
        self,
        s: _Session,
        turn: NativeTurn,
        feed: list[int],
        k: int,
        max_tokens: int,
        eos: int | None,
        deadline: float,
        interrupt: ctypes.c_int32,
    ) -> int:
        v, d, lib = self._verifier, self._draft, self._lib
        v.seq, v.n_past, v.n_ctx = s.seq, s.length, self._context_length
        d.ctx, d.memory, d.batch, d.batch_tokens = (
            turn.ctx,
            turn.memory,
            ctypes.addressof(turn.batch),
            turn.batch_tokens,
        )
        d.seq, d.n_past, d.n_vocab, d.n_ctx = turn.seq, turn.n_past, turn.n_vocab, turn.n_ctx
        self._feed[: len(feed)] = feed  # type: ignore[assignment]
        byref = ctypes.byref
        n = lib.speculate(
            lib.decode,
            lib.logits,
            lib.seq_rm,
            byref(v),
            byref(d),
            s.pending,
            self._feed,
            len(feed),
            FEED_TOKENS,
            k,
            max_tokens,
            -1 if eos is None else eos,
            deadline,
            byref(interrupt),
            byref(turn.waiting),
            self._rounds,
            MAX_ROUNDS,
            byref(self._rc),
        )
        turn.n_past = d.n_past
        turn.decodes += sum(self._rounds[i].k for i in range(n))
        return n

    def _told(self, s: _Session, drafter: Any, rounds: list[SpeculatedRound], first_round: int, n: int) -> int:
        """The ``n`` rounds C ran, told to the session, the draft and ``rounds``: the tokens they emitted."""
        emitted: list[int] = []
        for i in range(n):
            r = self._rounds[i]
            drafted = tuple(r.drafted[: r.k])
            verdict = Verdict(r.n_matches, r.token)
            s.tokens.append(s.pending)
            s.tokens += drafted[: r.n_matches]
            s.pending = r.token
            emitted += verdict.emitted_tokens(drafted)
            proposal = Proposal(drafted, None, r.draft_ms, caught_up=r.caught_up)
            rounds.append(SpeculatedRound(proposal, verdict, r.verify_ms))
        if n:
            s.round, s.last = first_round + n - 1, rounds[-1].verdict
        drafter.ran_natively(emitted, self._draft.n_past)
        return len(emitted)


def bind(lib: Lockstep | None, verifier: LlamaCppVerifier) -> NativeRounds | None:
    """The C rounds for ``verifier``'s context and batch, or None where the native library is unavailable (or its
    structs are not the ones mirrored here: said in the log)."""
    if lib is None:
        return None
    if lib.layout != (ctypes.sizeof(Side), ctypes.sizeof(NativeRound)):
        log.warning(
            "lockstep.c's round structs are not lone_rounds' (%s): a lone session's rounds run in Python", lib.layout
        )
        return None
    return NativeRounds(lib, verifier)
