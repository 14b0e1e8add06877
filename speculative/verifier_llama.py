"""The verifier on llama.cpp: a GGUF model checking many sessions' drafts in one decode.

The second implementation of :class:`~speculative.verifier.Verifier`, for CPUs (and any
device llama.cpp runs on), through llama-cpp-python's low-level API as the draft does.
Each session owns a sequence id of one shared context, with a KV stream of its own. A verify
step puts every session's ``[pending, x1..xk]`` into one ``llama_batch`` (each token tagged
with its session's sequence id and absolute position, every position asking for logits),
runs ``llama_decode`` once, and judges each session's rows next to the logits with the
same acceptance rules as the torch backend (``speculative.acceptance``). Keeping the
accepted prefix and dropping a rejected tail is ``llama_memory_seq_rm`` from the kept
length on; the next step then continues exactly as a fresh evaluation of the kept prefix.

Sessions that open together are prefilled together (one decode for every queued prompt,
chunked to the batch size); a closed session's sequence keeps its tokens, and a session
whose prompt starts with them takes it and evaluates only the rest (``SequenceIds``).
Lossless here means equal to this backend's own plain decoding of the same GGUF: the
backend and the quantisation are part of the model version.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speculative import lone_rounds, native_steps
from speculative.acceptance import accept_greedy_ids, accept_sampling
from speculative.errors import (
    InvalidRequestError,
    ModelLoadError,
    SessionNotFoundError,
)
from speculative.llama_logits import LogitsReader, check_decode
from speculative.llama_runs import Between, GreedyRun, RunEnd, run_greedy
from speculative.llama_sequences import (
    DEFAULT_MAX_CONTEXT,
    Compaction,
    SequenceIds,
    check_context_sizes,
    in_sequence_order,
    padded_width,
    session_context,
)
from speculative.logprobs import token_logprobs, truncate_top
from speculative.prefill import PrefillTicket, checked_prompt, open_batch, open_together, open_when_prefilled
from speculative.prompt_stash import DEFAULT_STASH_BYTES, PromptStash
from speculative.sampling import warp
from speculative.types import MAX_DRAFT_TOKENS, SamplingParams, Verdict
from speculative.verifier import VerifyRequest, VerifyResult, checked_round

log = logging.getLogger(__name__)

DEFAULT_MAX_SESSIONS = 32  # sequences of the shared context (llama.cpp allows up to 256)
DEFAULT_BATCH_TOKENS = 512  # positions one llama_decode takes; larger steps run as several


def default_threads() -> int:
    """Half the cores this process may use, at least one (``TANDEM_VERIFIER_THREADS`` sets another count).

    Not llama.cpp's own default (every core): its threads meet at a barrier after every
    operation, spinning, so one of them losing its core to anything else stalls them all.
    Measured on this 2-core machine under ``make run`` with one other busy process (a niced
    training job): 40 tokens of the demo verifier took 2.3-4.1 s on two threads and 71 ms on
    one. On a quiet machine two threads were about 1.3x faster (the figures in the README),
    which a dedicated server can ask for.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // 2)


@dataclass
class _Session:
    seq: int  # its sequence id in the shared context
    # the committed tokens at positions 0 .. length-1 of the sequence: what a closed session leaves for the next
    tokens: list[int]
    pending: int  # the last committed token, not yet in the cache
    params: SamplingParams
    generator: torch.Generator
    round: int = -1
    last: Verdict | None = None

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class _Row:
    """Tokens of one sequence to evaluate from position ``n_past``; ``first`` is where its logits start."""

    seq: int
    tokens: list[int]
    n_past: int
    logits: bool
    first: int = -1  # index of its first output row in the step's logits
    pad: int = 0  # positions evaluated after its tokens, without logits, then rolled back (``padded_width``)


class LlamaCppVerifier:
    """A GGUF causal LM as verifier on llama.cpp; sessions are sequences of one shared context."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_threads: int | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_context: int | None = DEFAULT_MAX_CONTEXT,
        reuse_prefixes: bool = True,
        prompt_stash_bytes: int = DEFAULT_STASH_BYTES,
    ):
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp._logger import set_verbose

        self.model_path = str(model_path)
        if not Path(model_path).is_file() or not self.model_path.endswith(".gguf"):
            raise ModelLoadError(f"verifier model {self.model_path!r} is not a .gguf file")
        check_context_sizes(max_sessions, batch_tokens)
        llama_cpp.llama_backend_init()
        set_verbose(False)
        try:
            self._model = internals.LlamaModel(
                path_model=self.model_path, params=llama_cpp.llama_model_default_params(), verbose=False
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp cannot load {self.model_path!r}: {exc}") from exc
        self.vocab_size: int = self._model.n_vocab()
        self.context_length: int = session_context(self._model.n_ctx_train(), max_context)
        eos = self._model.token_eos()
        self.eos_token_id: int | None = eos if eos >= 0 else None
        self.max_sessions = max_sessions
        self.n_threads = n_threads or default_threads()
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = max_sessions
        # a KV stream per sequence, not one pool: in a pool, a session's cells interleave with the others',
        # and flash attention then sums its positions in another order than alone (the demo verifier's
        # greedy output alone and in a batch of 16 four-token drafts differed in 5 of 16 prompts; 0 with
        # a stream each, 2026-12-02); each stream holds one session's whole context, as n_ctx is sized
        params.kv_unified = False
        # every session's full context plus one round's draft in flight
        params.n_ctx = (self.context_length + MAX_DRAFT_TOKENS + 1) * max_sessions
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_threads = params.n_threads_batch = self.n_threads
        try:
            self._ctx = internals.LlamaContext(model=self._model, params=params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"llama.cpp cannot make a context for {self.model_path!r}: {exc}") from exc
        self._batch = internals.LlamaBatch(n_tokens=batch_tokens, embd=0, n_seq_max=1, verbose=False)
        self._llama_decode = llama_cpp.llama_decode  # (looked up once: every decode goes through ``_decode_batch``)
        self._batch_tokens = batch_tokens
        self._logits = LogitsReader(self._ctx.ctx, self.vocab_size).first
        # plain greedy steps in C where it builds (``llama_runs``): None runs them in Python
        self._native = native_steps.bind(self._ctx.ctx, self._batch.batch, self.vocab_size, self.eos_token_id)
        self._native_rounds = lone_rounds.bind(native_steps.lockstep(), self)  # a lone session's rounds in C
        self._sessions: dict[str, _Session] = {}
        # a closed session's stream keeps its tokens for the next prompt that starts with them
        stash = PromptStash(self._ctx, prompt_stash_bytes) if reuse_prefixes and prompt_stash_bytes else None
        self._ids = SequenceIds.of_context(self._ctx, max_sessions, reuse=reuse_prefixes, stash=stash)
        self._lock = threading.Lock()  # one decode at a time: llama.cpp contexts are not thread-safe
        self._prefill_lock = threading.Lock()  # guards the queue of sessions waiting to open
        self._prefills: deque[PrefillTicket] = deque()
        self.decodes = 0  # llama_decode calls so far
        self.compactions = 0  # sessions moved to a lower sequence id (``_compact``)
        self._compaction = Compaction()

    def tokens(self) -> list[str]:
        """The verifier's vocabulary, by id, as llama.cpp read it from the GGUF."""
        return [self._model.token_get_text(i) for i in range(self.vocab_size)]

    # sessions -------------------------------------------------------------------------
    def open_session(self, session_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> float:
        prompt = checked_prompt(prompt_ids, params, self.context_length, self.vocab_size)
        ticket = PrefillTicket(session_id, prompt, params)
        return open_when_prefilled(ticket, self._prefills, self._prefill_lock, self._lock, self._prefill_queued)

    def open_many(self, openings: Sequence[tuple[str, Sequence[int], SamplingParams]]) -> list[float | BaseException]:
        """Open several sessions with shared prefills; each one's prefill ms or its error."""
        return open_together(self, openings)

    def _prefill_queued(self) -> None:
        """Open every queued session and prefill their prompts together (under ``self._lock``; ``open_batch``)."""
        with self._prefill_lock:
            batch, self._prefills = list(self._prefills), deque()
        # the pending token (the prompt's last) is evaluated by the first round
        ids = dict(zip(map(id, batch), self._ids.plan([t.prompt[:-1] for t in batch]), strict=True))
        open_batch(
            batch,
            self._sessions,
            self.max_sessions,
            lambda ticket: self._new_session(ticket, ids[id(ticket)]),
            lambda s: self._release(s.seq),
            self._prefill,
        )

    def _new_session(self, ticket: PrefillTicket, planned: int | None = None) -> _Session:
        generator = torch.Generator().manual_seed(ticket.params.seed)
        cached = ticket.prompt[:-1]  # the pending token (the prompt's last) is evaluated by the first round
        seq, kept = self._ids.take(cached, planned)
        return _Session(seq, list(cached[:kept]), ticket.prompt[-1], ticket.params, generator)

    def _prefill(self, opened: list[tuple[PrefillTicket, _Session]]) -> None:
        """Every prompt but its last token (the session's pending token) into the cache, no logits.

        A session evaluates only what its sequence does not hold already (``SequenceIds``). Each
        session is billed its evaluated positions' share of the decodes' time.
        """
        rows = [
            _Row(s.seq, t.prompt[s.length : -1], s.length, logits=False)
            for t, s in opened
            if len(t.prompt) - 1 > s.length
        ]
        started = time.perf_counter()
        if rows:
            self._decode(rows)
        decode_ms = (time.perf_counter() - started) * 1e3
        positions = max(1, sum(len(r.tokens) for r in rows))
        for ticket, session in opened:
            evaluated = len(ticket.prompt) - 1 - session.length
            session.tokens = list(ticket.prompt[:-1])
            ticket.prefill_ms = decode_ms * evaluated / positions

    def close_session(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is not None:
                self._ids.release(session.seq, session.tokens)  # kept for a prompt that starts with them

    def _release(self, seq: int) -> None:
        """Free ``seq`` with nothing kept (a session that failed to open, the warm-up's)."""
        self._ids.release(seq)

    def _compact(self) -> None:
        """Move the sessions past the lowest one's run into the free ids within it, so the open ones are one run.

        llama.cpp evaluates a batch over per-sequence KV streams in micro-batches of consecutive
        sequence ids (``in_sequence_order``), each a whole pass over the weights: a session that
        ended below others left a hole that split every later step in two until a new session
        filled it. Measured on the demo verifier (Q8_0, two threads, one plain step): 4 sessions
        1.0-1.6 ms on ids 0-3 against 2.1-3.1 ms on 0, 2, 4, 6; 16 sessions 4.4-6.7 against
        9.5-12.2 ms. A move copies the session's whole stream (``llama_memory_seq_cp`` across
        streams, done at the next decode), cell for cell, so the session's attention reads the
        same cells in the same order as before: its output does not change. The copy costs
        several split steps at once, so it waits until a gap has lasted (``Compaction``).
        """
        low = min((s.seq for s in self._sessions.values()), default=0)
        end = low + len(self._sessions)  # the sessions go to ids low .. end-1
        holes = sorted(seq for seq in self._ids.free if low <= seq < end)
        movers = sorted((s for s in self._sessions.values() if s.seq >= end), key=lambda s: s.seq, reverse=True)
        for hole, s in zip(holes, movers, strict=True):
            self._ids.moved(hole, s.seq)  # before the copy: a prompt the hole keeps goes to host memory
            self._ctx.kv_cache_seq_cp(s.seq, hole, -1, -1)
            self._ctx.kv_cache_seq_rm(s.seq, 0, -1)
            s.seq = hole
        self.compactions += len(movers)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def warm_up(self) -> list[tuple[int, float]]:
        """Decode every round size on a spare sequence (the scheduler's thread calls it before any session).

        llama.cpp's first decodes in a process run 2-4x slower than later ones of the same size
        (measured on the demo verifier: 3.0 ms for a first one-token step, then 0.6-0.7; 2.2
        then 1.5 ms for five tokens). Those first rounds fed the batch cost line, which the
        draft-length controllers read, and priced each drafted token at twice its cost. Returns the
        warmed decodes' (positions, ms): the cost model's first points (``VerifyScheduler._run``).
        """
        timed: list[tuple[int, float]] = []
        with self._lock:
            if not self._ids.free:
                return timed
            seq, _ = self._ids.take()
            try:
                self._decode([_Row(seq, [0, 0], 0, logits=False)])
                for size in range(1, MAX_DRAFT_TOKENS + 2):
                    for attempt in range(5 if size == 1 else 2):
                        started = time.perf_counter()
                        self._decode([_Row(seq, [0] * size, 2, logits=True)])
                        if attempt:
                            timed.append((size, (time.perf_counter() - started) * 1e3))
                        self._ctx.kv_cache_seq_rm(seq, 2, -1)
            finally:
                self._release(seq)
        return timed

    # verification ---------------------------------------------------------------------
    def verify(self, requests: Sequence[VerifyRequest]) -> VerifyResult:
        started = time.perf_counter()
        with self._lock:
            sessions = self._distinct_sessions([r.session_id for r in requests], "verify call")
            verdicts: list[Verdict | None] = [None] * len(requests)
            todo: list[int] = []
            for i, (req, s) in enumerate(zip(requests, sessions, strict=True)):
                if req.round < s.round:
                    raise InvalidRequestError(f"round {req.round} of {req.session_id!r} is stale (now {s.round})")
                if req.round == s.round and s.last is not None:
                    verdicts[i] = s.last  # a retried round: answer it again, change nothing
                else:
                    self._check_request(req, s)
                    todo.append(i)
            if todo:
                for i, verdict in zip(
                    todo, self._verify_rows([requests[i] for i in todo], [sessions[i] for i in todo]), strict=True
                ):
                    verdicts[i] = verdict
        assert all(v is not None for v in verdicts)
        return VerifyResult(verdicts=verdicts, verify_ms=(time.perf_counter() - started) * 1e3)  # type: ignore[arg-type]

    def _verify_rows(self, requests: list[VerifyRequest], sessions: list[_Session]) -> list[Verdict]:
        """One decode over every session's ``[pending, x1..xk]``, then each session judged and rolled back."""
        if self._compaction.due(s.seq for s in sessions):
            self._compact()
        rows = [
            _Row(s.seq, [s.pending, *r.tokens], s.length, logits=True) for r, s in zip(requests, sessions, strict=True)
        ]
        width = padded_width([(row.seq, len(row.tokens)) for row in rows])
        for row in rows:
            row.pad = width - len(row.tokens) if width else 0
        try:
            logits = self._decode(rows)  # (sum of k_i + 1, vocab), row r's positions from rows[r].first
        except BaseException:
            for s in sessions:  # whatever part of the step ran, the sequences hold only what is committed
                self._ctx.kv_cache_seq_rm(s.seq, s.length, -1)
            raise
        argmax = logits.argmax(-1)  # (positions,)
        verdicts = []
        for row, req, s in zip(rows, requests, sessions, strict=True):
            span = slice(row.first, row.first + len(row.tokens))
            verdict = self._judge(s, req, logits[span], argmax[span])
            self._commit(s, req, verdict, len(row.tokens) + row.pad)
            verdicts.append(verdict)
        if any(r.logprobs is not None for r in requests):
            self._add_logprobs(logits, rows, requests, sessions)
            verdicts = [s.last for s in sessions]  # type: ignore[misc]
        return verdicts

    def _commit(self, s: _Session, req: VerifyRequest, verdict: Verdict, evaluated: int) -> None:
        """Keep the pending token and the accepted draft of a round that put ``evaluated`` positions in the cache."""
        s.tokens.append(s.pending)
        s.tokens += req.tokens[: verdict.n_matches]
        if evaluated > 1 + verdict.n_matches:
            self._ctx.kv_cache_seq_rm(s.seq, s.length, -1)  # the rejected tail (and any padding) goes
        s.pending = verdict.verifier_token
        s.round, s.last = req.round, verdict

    def run_greedy(
        self, runs: Sequence[GreedyRun], between: Between, interrupt: ctypes.c_int32 | None = None
    ) -> tuple[list[RunEnd], float]:
        """Plain greedy decoding of sessions in lockstep, one ``llama_decode`` a step, each leaving at its run's end.

        The same decodes as that many plain rounds of each session (``verify`` with no drafts,
        rounds numbered from each run's first), without a round's Python around each: for a lone
        session decoding plainly that was a fifth of its time (in process, on an AMD EPYC host: a
        loop of decodes alone made 1,112-1,617 tokens/s where the engine's plain rounds made
        949-1,099). Sessions join and leave between steps (``speculative.llama_runs``); with an
        ``interrupt``, steps in which nothing ends run in C where the native loop built.
        """
        return run_greedy(self, runs, between, interrupt)

    # A lone greedy session's drafting rounds one after another in one call (``speculative.lone_rounds``)
    speculate_greedy = lone_rounds.speculate_greedy

    def _distinct_sessions(self, session_ids: list[str], call: str) -> list[_Session]:
        sessions = [self._session(session_id) for session_id in session_ids]
        if len({id(s) for s in sessions}) < len(sessions):
            raise InvalidRequestError(f"a session may appear only once per {call}")
        return sessions

    def _session(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFoundError(f"no open verifier session {session_id!r}") from None

    def _check_request(self, req: VerifyRequest, s: _Session) -> None:
        checked_round(req, s.length, s.params, self.context_length, self.vocab_size)

    def _judge(self, s: _Session, req: VerifyRequest, logits: np.ndarray, argmax: np.ndarray) -> Verdict:
        """The acceptance rule. logits  # (k + 1, vocab) float32; argmax  # (k + 1,)"""
        if s.params.greedy:  # a few ids: plain Python beats building tensors (10% of a one-session round)
            return accept_greedy_ids(req.tokens, argmax.tolist())
        draft = torch.tensor(req.tokens, dtype=torch.long)
        k = len(req.tokens)
        p = warp(torch.from_numpy(logits), s.params)
        q = torch.from_numpy(np.asarray(req.q, dtype=np.float32)) if k else torch.zeros(0, p.size(-1))
        return accept_sampling(draft, q, p, s.generator)

    def _add_logprobs(
        self, logits: np.ndarray, rows: list[_Row], requests: list[VerifyRequest], sessions: list[_Session]
    ) -> None:
        """Each emitted token's logprob under the verifier, on the verdicts of the sessions that asked.

        logits  # (positions, vocab); emitted token j of a row was scored at its position j
        """
        index: list[int] = []
        tokens: list[int] = []
        asked = [(row, r, s) for row, r, s in zip(rows, requests, sessions, strict=True) if r.logprobs is not None]
        for row, req, s in asked:
            assert s.last is not None
            emitted = s.last.emitted_tokens(req.tokens)
            index += range(row.first, row.first + len(emitted))
            tokens += emitted
        top_n = max(req.logprobs or 0 for _, req, _ in asked)
        entries = iter(token_logprobs(torch.from_numpy(logits[index]), torch.tensor(tokens, dtype=torch.long), top_n))
        for _, req, s in asked:
            assert s.last is not None and req.logprobs is not None
            lps = tuple(truncate_top(next(entries), req.logprobs) for _ in range(s.last.n_matches + 1))
            s.last = dataclasses.replace(s.last, logprobs=lps)

    # llama.cpp ------------------------------------------------------------------------
    def _decode(self, rows: list[_Row]) -> np.ndarray:
        """Evaluate every row's tokens at its positions, in as few decodes as fit the batch.

        returns  # (positions of the rows with ``logits=True``, vocab) float32, in sequence id order;
        sets each such row's ``first`` (where its positions start). A row's ``pad`` positions follow its tokens
        without logits; rows without logits (prefill) add no output rows.
        """
        b = self._batch.batch
        chunks: list[np.ndarray] = []
        n_out = 0
        b.n_tokens = 0
        for row in in_sequence_order(rows, lambda row: row.seq):
            if row.logits:
                row.first = n_out
                n_out += len(row.tokens)
            real = len(row.tokens)
            for offset, token in enumerate(row.tokens + row.tokens[-1:] * row.pad):
                if b.n_tokens == self._batch_tokens:
                    chunks.append(self._flush())
                i = b.n_tokens
                b.token[i] = token
                b.pos[i] = row.n_past + offset
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = row.seq
                b.logits[i] = row.logits and offset < real
                b.n_tokens += 1
        chunks.append(self._flush())
        out = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        assert out.shape == (n_out, self.vocab_size), (out.shape, n_out)
        return out

    def _flush(self) -> np.ndarray:
        """Decode the tokens in the batch; return a copy of their logits (outputs in batch order)."""
        b = self._batch.batch
        n_out = sum(1 for i in range(b.n_tokens) if b.logits[i])
        if b.n_tokens:
            check_decode(self._decode_batch())
        b.n_tokens = 0
        if not n_out:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        return self._logits(n_out).copy()

    def _decode_batch(self) -> int:
        rc = int(self._llama_decode(self._ctx.ctx, self._batch.batch))
        self._count_decodes(int(rc == 0), rc)
        return rc

    def _count_decodes(self, done: int, rc: int) -> None:
        """``done`` decodes that ran, and one more that failed where ``rc`` is not 0 (``_decode_batch``'s, the native
        steps'): counted; the copies waiting for a decode are done once one has run (every copy has a destination)."""
        self.decodes += done + (rc != 0)
        if done and self._ids.pending:
            self._ids.applied()
