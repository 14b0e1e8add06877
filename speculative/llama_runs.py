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
newcomer's one-step first run made the whole batch run one step. The steps between two
things the caller must hear of run in C where it built (``lockstep.c``, ``native_steps``).
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from speculative.errors import ContextOverflowError, InvalidRequestError, SpeculativeError
from speculative.llama_logits import check_decode
from speculative.llama_sequences import in_sequence_order
from speculative.native_steps import CHUNK_TOKENS
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


# after each step (or native steps, ``_step``): the runs that ended at its last, the sessions it held, its ms (all
# of its steps'), its steps -> (runs to join, stop)
Between = Callable[[list[RunEnd], int, float, int], tuple[Sequence[GreedyRun], bool]]


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


def run_greedy(
    verifier: LlamaCppVerifier, runs: Sequence[GreedyRun], between: Between, interrupt: ctypes.c_int32 | None = None
) -> tuple[list[RunEnd], float]:
    """Decode ``runs`` in lockstep, members joining and leaving between steps: (the last runs' ends, wall ms).

    ``runs`` are checked before any work (a bad one raises); a run added by ``between`` that is
    unfit ends with its error. ``between`` hears of the runs that ended at each step; the ones
    it does not hear of are returned: those still in when ``between`` stopped the lot (with the
    tokens they have; it must add no run as it stops), and runs added that could not join once
    no member was left. A step that fails puts every member back where it joined and raises:
    runs already ended keep theirs.

    With an ``interrupt`` (a flag another thread sets when ``between`` would have something to
    do: a session waiting to join), steps in which no run ends run in C where the verifier has
    the native loop (``speculative.native_steps``), and ``between`` hears of them together: the
    steps up to the first in which a run ends, the deadline passes or the flag is set. The
    caller clears the flag before it looks for what would set it.
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
            n, step_ms, ended, steps = _step(verifier, members, interrupt)
        adding, stop = between(failed + ended if failed else ended, n, step_ms, steps)
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


def _step(
    verifier: LlamaCppVerifier, members: list[_Member], interrupt: ctypes.c_int32 | None = None
) -> tuple[int, float, list[RunEnd], int]:
    """One decode of every member's pending token (under the lock), or natively as many as run until one must
    end: (sessions, ms of the steps, the runs that ended and left ``members``, steps).

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
    steps = 1
    t0 = time.perf_counter()
    try:
        if interrupt is not None and verifier._native is not None:
            steps, chosen = _native_steps(verifier, lockstep, interrupt)
        else:
            check_decode(verifier._decode_batch())
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
    for i, m in enumerate(lockstep):
        s, end = m.session, m.end
        s.tokens.append(s.pending)
        if steps == 1:
            token_id = chosen[i]
            end.tokens.append(token_id)
        else:  # the member's tokens of every step: the pending one of each step but the last went in
            column = chosen[i::n]
            s.tokens += column[:-1]
            token_id = column[-1]
            end.tokens += column
        s.pending = token_id
        end.verify_ms += step_ms
        end.gpu_ms += share
        if token_id == eos or len(end.tokens) >= m.steps or now >= m.run.deadline:
            ended.append(m)
    if steps > 1 and n > 1:
        verifier._compaction.accrue([m.session.seq for m in members], steps - 1)  # the steps ``due`` did not see
    if not ended:
        return n, step_ms, [], steps
    for m in ended:
        members.remove(m)
    return n, step_ms, [_ended(m) for m in ended], steps


def _native_steps(
    verifier: LlamaCppVerifier, lockstep: list[_Member], interrupt: ctypes.c_int32
) -> tuple[int, list[int]]:
    """The batch's steps in C (``speculative.lockstep.c``) until a member's run must end or ``interrupt`` is set:
    (steps, their tokens: step by step, each in batch order). A failed decode raises, as a Python step's."""
    native, n = verifier._native, len(lockstep)
    assert native is not None
    most = min(min(m.steps - len(m.end.tokens) for m in lockstep), CHUNK_TOKENS // n)
    steps = native.run(most, min(m.run.deadline for m in lockstep), interrupt)
    verifier._count_decodes(steps, native.rc.value)
    check_decode(native.rc.value)
    return steps, native.tokens[: steps * n]


def _seq_of(m: _Member) -> int:
    return m.session.seq


def _ended(m: _Member) -> RunEnd:
    """The member's run as ended: its session's round and verdict as after that many plain rounds."""
    s, end = m.session, m.end
    if end.tokens:
        s.round, s.last = m.run.first_round + len(end.tokens) - 1, Verdict(0, end.tokens[-1])
    return end
