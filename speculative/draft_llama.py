"""The edge draft backend: a GGUF model run by llama.cpp (llama-cpp-python).

All sessions share ONE llama.cpp context, each on its own sequence id and KV stream, and drafting is batched across sessions: the sessions that draft at the same
moment have their rounds run together, in lockstep, each step one ``llama_decode`` for
all of them. A decode costs llama.cpp a fixed ~0.2 ms on top of its arithmetic, so
sixteen sessions drafting one token each pay it once instead of sixteen times (the same
idea as the verifier's batching, on the edge side). The thread that completes a
gathering (or whose short wait runs out) runs the whole round for everyone in it,
picking each session's tokens with that session's own rule, while the others sleep:
one gathering and one wake-up per session per round, not per token. A lone session
never waits for anyone.

Rolling back removes the rejected tail from the session's sequence
(``llama_memory_seq_rm`` from ``n_keep`` on); the next evaluation then continues
exactly as a fresh evaluation of the kept prefix would.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speculative.errors import DraftBusyError, ModelLoadError
from speculative.llama_logits import LogitsReader
from speculative.llama_sequences import (
    DEFAULT_MAX_CONTEXT,
    Compaction,
    SequenceIds,
    check_context_sizes,
    in_sequence_order,
    padded_width,
    session_context,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_SESSIONS = 32
DEFAULT_BATCH_TOKENS = 512
GATHER_WAIT_S = 0.004  # the longest a drafting thread waits for others to join its decode


@dataclass
class _Step:
    """Tokens of one sequence to evaluate at positions from ``n_past``; ``logits`` after the last."""

    seq: int
    tokens: list[int]
    n_past: int
    logits: np.ndarray | None = None


@dataclass
class _Round:
    """One session's share of a batched drafting round: evaluate ``tokens``, then draft ``k``."""

    seq: int
    tokens: list[int]
    n_past: int
    k: int = 0
    choose: Callable[[np.ndarray], int] | None = None
    logits: np.ndarray | None = None  # after the last evaluated token
    evaluated: int = 0  # positions this round added to the sequence
    drafted: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: bool = False
    ctx: LlamaCppContext | None = None  # whose sequence: its id is read again when the round runs (``_compact``)


@dataclass
class NativeTurn:
    """A draft sequence's decodes handed to C for a while (``LlamaCppContext.native_turn``): what they need."""

    ctx: int  # llama_context *
    memory: int  # its llama_memory_t
    batch: ctypes.Structure  # llama_batch, room for ``batch_tokens``
    batch_tokens: int
    seq: int
    n_past: int  # positions the sequence holds: the C side's to update
    n_vocab: int
    n_ctx: int
    waiting: ctypes.c_int32  # set while another thread waits for its turn to decode on this model
    decodes: int = 0  # the C side's to count


class LlamaCppContext:
    """One session's sequence in the shared llama.cpp context."""

    def __init__(self, owner: LlamaCppDraft, seq: int, kept: Sequence[int] = ()):
        self._owner = owner
        self._seq = seq
        self._tokens = list(kept)  # what its sequence holds from position 0 (left to the next: ``SequenceIds``)
        self.reused = len(self._tokens)  # leading tokens a closed session left here, which this session's start with
        self.n_ctx: int = owner.context_length

    @property
    def _n_past(self) -> int:
        return len(self._tokens)

    def begin_round(self) -> None:
        self._owner._drafting_changed(+1)

    def end_round(self) -> None:
        self._owner._drafting_changed(-1)

    def evaluate(self, tokens: Sequence[int]) -> np.ndarray:
        work = self._run(_Round(self._seq, list(tokens), self._n_past, ctx=self))
        assert work.logits is not None
        return work.logits

    def draft(self, tokens: Sequence[int], k: int, choose: Callable[[np.ndarray], int]) -> list[int]:
        return self._run(_Round(self._seq, list(tokens), self._n_past, k, choose, ctx=self)).drafted

    @property
    def model(self) -> LlamaCppDraft:
        return self._owner

    def draft_together(
        self, items: Sequence[tuple[LlamaCppContext, Sequence[int], int, Callable[[np.ndarray], int]]]
    ) -> list[list[int] | BaseException]:
        """``draft`` for several sessions of this model at once, as one lockstep round (from one thread)."""
        works = [_Round(ctx._seq, list(tokens), ctx._n_past, k, choose, ctx=ctx) for ctx, tokens, k, choose in items]
        self._owner._run_together(works)
        outcomes: list[list[int] | BaseException] = []
        for (ctx, *_), work in zip(items, works, strict=True):
            ctx._evaluated(work)
            outcomes.append(work.error if work.error is not None else work.drafted)
        return outcomes

    def draft_now(
        self, tokens: Sequence[int], k: int, choose: Callable[[np.ndarray], int], threads: int | None = None
    ) -> list[int]:
        """``draft`` at once on this thread, this sequence alone: its decodes without a lockstep round's plumbing.

        For a lone session's run of rounds, where that plumbing (gathering, padding, ordering,
        copying each step's logits) was a third of a one-token draft round's Python.
        """
        owner = self._owner
        owner._claim()
        try:
            return owner._draft_alone(self, list(tokens), k, choose, threads)
        finally:
            owner._release_turn()

    @contextmanager
    def native_turn(self, threads: int | None = None) -> Iterator[NativeTurn]:
        """This sequence's decodes made by C for a while (a lone session's rounds: ``speculative.lone_rounds``).

        The model's turn to decode is taken as ``draft_now`` takes it, on ``threads``; the caller
        says what the sequence holds after (``now_holds``). Another thread that waits for the
        model meanwhile sets ``waiting``, for the C side to end its rounds.
        """
        owner = self._owner
        owner._claim()
        try:
            with owner._decode_lock:
                owner._use_threads(threads)
                turn = NativeTurn(
                    owner._ctx.ctx,
                    owner._ctx.memory,
                    owner._batch.batch,
                    owner._batch_tokens,
                    self._seq,
                    self._n_past,
                    owner.vocab_size,
                    self.n_ctx,
                    owner._waiting,
                )
                yield turn
                owner.decodes += turn.decodes
        finally:
            owner._release_turn()

    def now_holds(self, tokens: Sequence[int]) -> None:
        """What this sequence holds from position 0 after decodes made elsewhere (``native_turn``)."""
        self._tokens = list(tokens)

    def _run(self, work: _Round) -> _Round:
        try:
            self._owner._gather(work)
        finally:
            self._evaluated(work)
        if work.error is not None:
            raise work.error
        return work

    def _evaluated(self, work: _Round) -> None:
        """Count the positions ``work`` added: its tokens, then its drafted ones but the last."""
        self._tokens += (work.tokens + work.drafted)[: work.evaluated]

    def truncate(self, n_keep: int) -> None:
        if n_keep < self._n_past:
            self._owner._remove(self, n_keep)
            del self._tokens[n_keep:]

    def close(self) -> None:
        self._owner._release(self)


class LlamaCppDraft:
    """A GGUF draft model; ``new_context()`` hands each session a sequence of one shared context."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_threads: int = 1,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_context: int | None = DEFAULT_MAX_CONTEXT,
    ):
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp._logger import set_verbose

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelLoadError(f"draft model {str(model_path)!r} does not exist (a .gguf file is needed)")
        check_context_sizes(max_sessions, batch_tokens)
        llama_cpp.llama_backend_init()
        set_verbose(False)  # llama.cpp's info lines would go to stderr; keep errors only
        try:
            self._model = internals.LlamaModel(
                path_model=str(self.model_path), params=llama_cpp.llama_model_default_params(), verbose=False
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp cannot load {str(self.model_path)!r}: {exc}") from exc
        self.vocab_size: int = self._model.n_vocab()
        self.context_length: int = session_context(self._model.n_ctx_train(), max_context)
        self.max_sessions = max_sessions  # sequences of the shared context: sessions at once
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = max_sessions
        # a KV stream per sequence, not one pool: in a pool, a session's cells interleave with the others',
        # and flash attention then sums its positions in another order than alone (the demo verifier's
        # greedy output alone and in a batch of 16 four-token drafts differed in 5 of 16 prompts; 0 with
        # a stream each, 2026-12-02); each stream holds one session's whole context, as n_ctx is sized
        params.kv_unified = False
        params.n_ctx = self.context_length * max_sessions
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_threads = params.n_threads_batch = n_threads
        self.n_threads = self._threads_now = n_threads
        self._ctx = internals.LlamaContext(model=self._model, params=params, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=batch_tokens, embd=0, n_seq_max=1, verbose=False)
        self._logits = LogitsReader(self._ctx.ctx, self.vocab_size)
        self._batch_tokens = batch_tokens
        self._ids = SequenceIds.of_context(self._ctx, max_sessions)
        self._live: dict[int, LlamaCppContext] = {}  # sequence id -> the session's context
        self.compactions = 0  # sessions moved to a lower sequence id (``_compact``)
        self._compaction = Compaction()
        self._cond = threading.Condition()
        self._decode_lock = threading.Lock()  # llama.cpp contexts are not thread-safe
        self._pending: list[_Round] = []
        self._drafting = 0
        self._running = False
        # raised by a thread that waits for ``_running`` (``native_turn``'s C rounds end on it), lowered as one takes it
        self._waiting = ctypes.c_int32(0)
        self.decodes = 0  # llama_decode calls so far (how well drafting batches), the warm-up's not counted
        self._warm_up()

    def _warm_up(self) -> None:
        """Decode a few catch-up and drafting steps on a spare sequence, at load.

        llama.cpp's first decodes in a process run several times slower than later ones: on the
        demo draft a session's first rounds measured 1.2-1.3 ms against 0.5-0.9 warm, and those
        rounds priced drafting for the controllers of every later session, which then never drafted.
        """
        seq = self._ids.free[-1]
        try:
            for size in (4, 1, 2, 3, 1, 1, 2):
                self._decode([_Step(seq, [0] * size, 0)])
                self._ctx.kv_cache_seq_rm(seq, 0, -1)
        finally:
            self._ctx.kv_cache_seq_rm(seq, 0, -1)
            self.decodes = 0

    def tokens(self) -> list[str]:
        """The draft's vocabulary, by id, as llama.cpp read it from the GGUF."""
        return [self._model.token_get_text(i) for i in range(self.vocab_size)]

    def tokenize(self, text: str) -> list[int]:
        return list(self._model.tokenize(text.encode(), add_bos=False, special=False))

    def new_context(self, prefix: Sequence[int] = ()) -> LlamaCppContext:
        """A session's sequence; where a closed session left ``prefix``'s first tokens in one, that one (``reused``)."""
        with self._decode_lock, self._cond:
            if not self._ids.free:
                raise DraftBusyError(f"all {self._ctx.n_ctx() // self.context_length} draft sequences are in use")
            seq, kept = self._ids.take(prefix)
            ctx = LlamaCppContext(self, seq, prefix[:kept])
            self._live[seq] = ctx
        return ctx

    # shared-context plumbing ------------------------------------------------------------
    def _release(self, ctx: LlamaCppContext) -> None:
        with self._decode_lock, self._cond:
            if self._live.get(ctx._seq) is ctx:
                del self._live[ctx._seq]
                self._ids.release(ctx._seq, ctx._tokens)  # kept for a session whose tokens start with them

    def _remove(self, ctx: LlamaCppContext, n_keep: int) -> None:
        with self._decode_lock:  # its sequence id changes only under this lock (``_compact``)
            self._ctx.kv_cache_seq_rm(ctx._seq, n_keep, -1)

    def _compact(self) -> None:
        """Move the sessions on the highest sequence ids into the free ids below (under ``_decode_lock``).

        As the verifier's (``LlamaCppVerifier._compact``): a free id between sessions splits
        each of their lockstep steps into two passes. The copy is the whole KV stream, cell for
        cell, done at the next decode; it waits until a gap has lasted (``Compaction``).
        """
        with self._cond:
            low = min(self._live, default=0)
            end = low + len(self._live)  # the sessions go to ids low .. end-1
            holes = sorted(seq for seq in self._ids.free if low <= seq < end)
            movers = sorted((seq for seq in self._live if seq >= end), reverse=True)
            for hole, seq in zip(holes, movers, strict=True):
                self._ids.moved(hole, seq)  # before the copy (``SequenceIds.moved``)
                self._ctx.kv_cache_seq_cp(seq, hole, -1, -1)
                self._ctx.kv_cache_seq_rm(seq, 0, -1)
                ctx = self._live.pop(seq)
                ctx._seq = hole
                self._live[hole] = ctx
            self.compactions += len(movers)

    def _drafting_changed(self, delta: int) -> None:
        with self._cond:
            self._drafting += delta
            self._cond.notify_all()  # a thread waiting for one more drafter may go now

    def _gather(self, work: _Round) -> None:
        """Queue ``work``; run every queued round when each drafting session is in, or on timeout."""
        deadline = time.perf_counter() + GATHER_WAIT_S
        batch: list[_Round] = []
        with self._cond:
            self._pending.append(work)
            while True:
                if work.done:
                    return
                ready = len(self._pending) >= max(1, self._drafting) or time.perf_counter() >= deadline
                if not self._running and ready:
                    batch, self._pending, self._running = self._pending, [], True
                    self._waiting.value = 0  # (a thread that waits from now on raises it again)
                    break
                self._waiting.value = self._running
                self._cond.wait(timeout=max(0.0, deadline - time.perf_counter()) or GATHER_WAIT_S)
        self._run_claimed(batch)

    def _run_together(self, rounds: list[_Round]) -> None:
        """Run ``rounds`` now as one lockstep round (after any round in progress); errors stay on each round."""
        self._claim()
        self._run_claimed(rounds)

    def _claim(self) -> None:
        """Take the turn to decode, once any round in progress has ended (its holder clears ``_running``)."""
        with self._cond:
            while self._running:
                self._waiting.value = 1
                self._cond.wait()
            self._running = True
            self._waiting.value = 0  # (a thread that waits from now on raises it again)

    def _release_turn(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()

    def _run_claimed(self, rounds: list[_Round]) -> None:
        """Run ``rounds`` (this thread set ``_running``); every session of the round hears of a failure."""
        try:
            self._run_rounds(rounds)
        except BaseException as exc:
            for w in rounds:
                w.error = w.error or exc
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._cond:
                for w in rounds:
                    w.done = True
                self._running = False
                self._cond.notify_all()

    def _run_rounds(self, rounds: list[_Round]) -> None:
        """Every round's tokens in one decode, then their draft steps in lockstep, one decode a step."""
        with self._decode_lock:
            decodes = max([1, *(w.k for w in rounds)])  # the catch-up decode, then one a drafted token but the last
            if self._compaction.due((w.ctx._seq for w in rounds if w.ctx is not None), decodes):
                self._compact()
            for w in rounds:
                if w.ctx is not None:
                    w.seq = w.ctx._seq
        steps = [_Step(w.seq, w.tokens, w.n_past) for w in rounds]
        self._decode(steps)
        for w, step in zip(rounds, steps, strict=True):
            w.logits, w.evaluated = step.logits, len(w.tokens)
        drafting = [w for w in rounds if w.k > 0]
        while drafting:
            evaluate: list[_Round] = []
            for w in drafting:
                assert w.choose is not None and w.logits is not None
                try:
                    w.drafted.append(w.choose(w.logits))
                except Exception as exc:  # noqa: BLE001 - this session's rule failed: it fails alone
                    w.error = exc
                    continue
                if len(w.drafted) < w.k:  # the last draft token's logits are not needed this round
                    evaluate.append(w)
            steps = [_Step(w.seq, [w.drafted[-1]], w.n_past + w.evaluated) for w in evaluate]
            if steps:
                self._decode(steps)
            for w, step in zip(evaluate, steps, strict=True):
                w.logits, w.evaluated = step.logits, w.evaluated + 1
            drafting = evaluate

    def _draft_alone(
        self, ctx: LlamaCppContext, tokens: list[int], k: int, choose: Callable[[np.ndarray], int], threads: int | None
    ) -> list[int]:
        """``ctx``'s tokens evaluated, then ``k`` drafted, one decode a token (this thread holds ``_running``)."""
        if len(tokens) > self._batch_tokens:  # a long catch-up (after plain decoding): all but the batch's worth first
            head, tokens = tokens[: -self._batch_tokens], tokens[-self._batch_tokens :]
            self._decode([_Step(ctx._seq, head, ctx._n_past)], threads)
            ctx._tokens += head
        drafted: list[int] = []
        b = self._batch.batch
        with self._decode_lock:
            self._use_threads(threads)
            seq, feed = ctx._seq, tokens
            while True:
                n_past, last = ctx._n_past, len(feed) - 1
                for i, token in enumerate(feed):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = token, n_past + i, 1, seq
                    b.logits[i] = i == last
                b.n_tokens = len(feed)
                self._ctx.decode(self._batch)
                self.decodes += 1
                ctx._tokens += feed
                drafted.append(choose(self._logits.row(last)))  # read before the next decode
                if len(drafted) == k:
                    return drafted
                feed = drafted[-1:]

    def _decode(self, steps: list[_Step], threads: int | None = None) -> None:
        """Evaluate every step's tokens at its positions, in as few decodes as fit (shorter ones padded: ``padded_width``)."""
        b = self._batch.batch
        outputs: list[tuple[_Step, int]] = []
        width = padded_width([(step.seq, len(step.tokens)) for step in steps])
        with self._decode_lock:
            self._use_threads(threads)
            b.n_tokens = 0
            for step in in_sequence_order(steps, lambda step: step.seq):
                real = len(step.tokens)
                pad = width - real if width else 0
                for offset, token in enumerate(step.tokens + step.tokens[-1:] * pad):
                    if b.n_tokens == self._batch_tokens:
                        self._flush(outputs)
                    i = b.n_tokens
                    b.token[i] = token
                    b.pos[i] = step.n_past + offset
                    b.n_seq_id[i] = 1
                    b.seq_id[i][0] = step.seq
                    last = offset == real - 1
                    b.logits[i] = last
                    if last:
                        outputs.append((step, i))
                    b.n_tokens += 1
            self._flush(outputs)
            if width:  # the padding positions go again: the next step evaluates from the real ones
                for step in steps:
                    if len(step.tokens) < width:
                        self._ctx.kv_cache_seq_rm(step.seq, step.n_past + len(step.tokens), -1)

    def _use_threads(self, threads: int | None) -> None:
        """Decode on ``threads`` (default: the model's own) from now on (under ``_decode_lock``)."""
        if (threads or self.n_threads) != self._threads_now:
            self._threads_now = threads or self.n_threads
            self._ctx.set_n_threads(self._threads_now, self._threads_now)

    def _flush(self, outputs: list[tuple[_Step, int]]) -> None:
        b = self._batch.batch
        if b.n_tokens:
            self._ctx.decode(self._batch)
            self.decodes += 1
            for step, i in outputs:
                step.logits = self._logits.row(i).copy()
        outputs.clear()
        b.n_tokens = 0
