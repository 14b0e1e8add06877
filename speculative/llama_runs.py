"""Greedy sessions decoding plainly in lockstep on the llama.cpp verifier, joining and leaving between steps.

One ``llama_decode`` a step holds every member's pending token; a member leaves at the end of
its own run (its steps, its deadline, or the end-of-sequence token) while the others go on,
and the caller's ``between`` (called after every step, outside the verifier's lock) hears of
the runs that ended, may hand their sessions a new run or add sessions that opened meanwhile,
and may stop the lot. This is llama.cpp's own server loop (continuous batching) for the
platform's sessions: measured in the served platform at 16 sessions (demo pair, two threads,
2026-12-03), ending every member's run together (when the first of them ended, when a session
waited to open, or every 25 ms) left the decode threads idle 16-18% of the wall time, about a
millisecond of Python each time for the 16 sessions' tokens and next runs at once, and a
newcomer's one-step first run made the whole batch run one step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from speculative.errors import ContextOverflowError, InvalidRequestError, SpeculativeError
from speculative.llama_sequences import in_sequence_order
from speculative.types import Verdict
from speculative.verifier import VerifyRequest

if TYPE_CHECKING:
    from speculative.verifier_llama import LlamaCppVerifier, _Session


@dataclass(frozen=True)
class GreedyRun:
    """A session's plain decoding for up to ``max_steps`` steps, or until ``deadline`` (``time.perf_counter``)."""

    key: Hashable  # the caller's name for this run
    session_id: str
    first_round: int  # its first step's round number
    max_steps: int
    deadline: float = math.inf


@dataclass
class RunEnd:
    """An ended run: its tokens (one a step), the time of the steps it was in and its share of them, or its error."""

    key: Hashable
    tokens: list[int]
    verify_ms: float = 0.0  # the whole steps'
    gpu_ms: float = 0.0  # each step's time over the sessions in it, summed
    error: BaseException | None = None

    @property
    def batch_size(self) -> int:
        """The sessions a step of this run held, on average."""
        return max(1, round(self.verify_ms / self.gpu_ms)) if self.gpu_ms > 0 else 1


# after each step: the runs that ended at it, the sessions the step held, its ms -> (runs to join, stop)
Between = Callable[[list[RunEnd], int, float], tuple[Sequence[GreedyRun], bool]]


@dataclass(eq=False)  # members are told apart by identity
class _Member:
    run: GreedyRun
    session: _Session
    steps: int  # most steps: its run's, within its context
    before: tuple[int, int]  # (length, pending) when it joined: where a failed step puts it back
    end: RunEnd = field(init=False)

    def __post_init__(self) -> None:
        self.end = RunEnd(self.run.key, [])


def _joined(verifier: LlamaCppVerifier, run: GreedyRun, members: Sequence[_Member]) -> _Member:
    """``run`` as a member of the lockstep (under the verifier's lock); raises what makes it unfit."""
    if run.max_steps < 1:
        raise InvalidRequestError(f"max_steps must be >= 1, got {run.max_steps}")
    s = verifier._session(run.session_id)
    if any(m.session is s for m in members):
        raise InvalidRequestError("a session may appear only once per run")
    if not s.params.greedy:
        raise InvalidRequestError("a plain run serves greedy sessions only")
    verifier._check_request(VerifyRequest(run.session_id, (), None, run.first_round), s)
    room = verifier.context_length - s.length - 1  # steps before its context is full
    if room < 1:
        raise ContextOverflowError(f"session {run.session_id!r} fills the context of {verifier.context_length}")
    return _Member(run, s, min(run.max_steps, room), (s.length, s.pending))


def run_greedy(verifier: LlamaCppVerifier, runs: Sequence[GreedyRun], between: Between) -> tuple[list[RunEnd], float]:
    """Decode ``runs`` in lockstep, members joining and leaving between steps: (the last runs' ends, wall ms).

    ``runs`` are checked before any work (a bad one raises); a run added by ``between`` that is
    unfit ends with its error. ``between`` hears of the runs that ended at each step; the ones
    it does not hear of are returned: those still in when ``between`` stopped the lot (with the
    tokens they have; it must add no run as it stops), and runs added that could not join once
    no member was left. A step that fails puts every member back where it joined and raises:
    runs already ended keep theirs.
    """
    started = time.perf_counter()
    with verifier._lock:
        members: list[_Member] = []
        for run in runs:
            members.append(_joined(verifier, run, members))
        if not members or len(members) > verifier._batch_tokens:
            raise InvalidRequestError(f"a run takes 1 to {verifier._batch_tokens} sessions, got {len(members)}")
    adding: Sequence[GreedyRun] = ()
    while True:
        with verifier._lock:
            failed = _join(verifier, adding, members) if adding else None
            if not members:
                return failed or [], (time.perf_counter() - started) * 1e3
            n, step_ms, ended = _step(verifier, members)
        adding, stop = between(failed + ended if failed else ended, n, step_ms)
        if stop:
            if adding:
                raise SpeculativeError("a run was added as the lot stopped")
            with verifier._lock:
                last = [_ended(m) for m in members]
            return last, (time.perf_counter() - started) * 1e3


def _join(verifier: LlamaCppVerifier, adding: Sequence[GreedyRun], members: list[_Member]) -> list[RunEnd]:
    """Runs that join between steps (under the lock): the ends of those that could not."""
    failed: list[RunEnd] = []
    for run in adding:
        try:
            members.append(_joined(verifier, run, members))
        except SpeculativeError as exc:
            failed.append(RunEnd(run.key, [], error=exc))
    return failed


def _step(verifier: LlamaCppVerifier, members: list[_Member]) -> tuple[int, float, list[RunEnd]]:
    """One decode of every member's pending token (under the lock); the runs it ended leave ``members``.

    Lean: this runs between two decodes of every lone session's token, with the CPU's caches cold
    from the decode (demo pair, one session: 27 us of Python a step, about 5% of a 0.55 ms step).
    """
    if len(members) > 1:
        if verifier._compaction.due(m.session.seq for m in members):
            verifier._compact()
        lockstep = in_sequence_order(members, _seq_of)
    else:
        verifier._compaction.owed = 0  # one session has no gap (``Compaction.due``)
        lockstep = members
    b, n = verifier._batch.batch, len(lockstep)
    token, pos, n_seq_id, seq_id, logits = b.token, b.pos, b.n_seq_id, b.seq_id, b.logits
    for i, m in enumerate(lockstep):
        s = m.session
        token[i], pos[i], n_seq_id[i], seq_id[i][0], logits[i] = s.pending, s.length, 1, s.seq, True
    b.n_tokens = n
    t0 = time.perf_counter()
    try:
        rc = verifier._decode_batch()
        if rc != 0:
            raise SpeculativeError(f"llama_decode failed with status {rc} (the KV cache may be full)")
        chosen = verifier._logits(n).argmax(-1).tolist()
    except BaseException:
        for m in members:  # as each was when it joined
            s = m.session
            length, s.pending = m.before
            del s.tokens[length:]
            verifier._ctx.kv_cache_seq_rm(s.seq, length, -1)
        raise
    now = time.perf_counter()
    step_ms = (now - t0) * 1e3
    share, eos = step_ms / n, verifier.eos_token_id
    ended: list[_Member] = []
    for m, token_id in zip(lockstep, chosen, strict=True):
        s, end = m.session, m.end
        s.tokens.append(s.pending)
        s.pending = token_id
        end.tokens.append(token_id)
        end.verify_ms += step_ms
        end.gpu_ms += share
        if token_id == eos or len(end.tokens) >= m.steps or now >= m.run.deadline:
            ended.append(m)
    if not ended:
        return n, step_ms, []
    for m in ended:
        members.remove(m)
    return n, step_ms, [_ended(m) for m in ended]


def _seq_of(m: _Member) -> int:
    return m.session.seq


def _ended(m: _Member) -> RunEnd:
    """The member's run as ended: its session's round and verdict as after that many plain rounds."""
    s, end = m.session, m.end
    if end.tokens:
        s.round, s.last = m.run.first_round + len(end.tokens) - 1, Verdict(0, end.tokens[-1])
    return end
