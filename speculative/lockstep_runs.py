"""The scheduler's side of one ``run_greedy`` call: plain runs in an open lockstep (``speculative.scheduler``).

Which session each run is; after each step (or native steps, ``speculative.llama_runs``) the runs that
ended answered, their sessions' next plain runs and sessions that opened meanwhile joined, and the cost
line and the governor told of the steps at the step's end.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING

from speculative.llama_runs import GreedyRun, RunEnd
from speculative.steps import PlainResult, PlainRun, answer_step

if TYPE_CHECKING:
    from speculative.scheduler import Round, VerifyScheduler


class LockstepRuns:
    """The scheduler's side of one ``run_greedy`` call: which session each run is, and what ends and joins."""

    def __init__(self, scheduler: VerifyScheduler):
        self.scheduler = scheduler
        self.live: dict[Hashable, Round] = {}  # runs in the call, by key
        self._keys = itertools.count()
        self._steps = self._size = 0  # steps of this many sessions since the cost line and the governor last heard
        self._ms = 0.0

    def add(self, item: Round) -> GreedyRun:
        run, answer = item
        assert isinstance(run, PlainRun)
        key = next(self._keys)
        self.live[key] = item
        request = run.request
        return GreedyRun(key, request.session_id, request.round, run.max_steps, self.scheduler._run_deadline(run.whole))

    def between(self, ends: list[RunEnd], n: int, step_ms: float, steps: int = 1) -> tuple[list[GreedyRun], bool]:
        """After a step (``steps`` steps of ``n`` sessions, ``step_ms`` in all): answer the runs that ended; their next
        plain runs and sessions that opened join."""
        sched = self.scheduler
        sched._interrupt.value = 0  # (before the queue is read: a put from now on ends the next native steps)
        # most steps: nothing ended, waits or joins (the queue read without its lock: a put is seen a step later)
        if not ends and n == self._size and not sched._queue.queue and not sched._next and not sched._drafts:
            self._steps += steps
            self._ms += step_ms
            return [], False
        # the step's end, taken before its ended runs are answered: a lone session's end waits there for its reply
        # (``hand_over``), which the governor must not count as decoding time
        # and the sessions the step ran at: an ended session that is answered leaves (a lone one's whole run, told
        # as 0 sessions, was no batch at one session: the governor never scored plain decoding there)
        now, active = time.perf_counter(), sched._active
        if n != self._size:
            self.flush(now, active)  # a point of the cost line is one batch size
        self._steps += steps
        self._size = n
        self._ms += step_ms
        joining = [run for run in map(self.answer, ends) if run is not None]
        if ends:
            self.flush(now, active)
        stop = False
        if not sched._queue.empty():
            rounds, stop = sched._arrivals()
            for item in rounds:
                if type(item[0]) is PlainRun:
                    joining.append(self.add(item))
                else:
                    sched._next.append(item)
        if stop or sched._next or sched._drafts:  # a round of another kind waits (or the close): the call ends
            for run in joining:
                sched._next.append(self.live.pop(run.key))
            return [], True
        return joining, False

    def answer(self, end: RunEnd, join: bool = True) -> GreedyRun | None:
        """Answer an ended run; the session's next run if it is a plain one to ``join`` (any other step is queued)."""
        run, answer = self.live.pop(end.key)
        if end.error is not None:
            self.scheduler._continue(answer, error=end.error)
            return None
        following = answer_step(answer, PlainResult(end.tokens, end.verify_ms, end.batch_size, end.gpu_ms))
        if following is None:
            return None
        if join and type(following) is PlainRun:  # not a SpecRun: a lone session's rounds run in a call of their own
            return self.add((following, answer))
        self.scheduler._follow(following, answer)
        return None

    def flush(self, now: float | None = None, active: int | None = None) -> None:
        """Tell the cost line and the governor of the steps since they last heard (``now``: when the last ended;
        ``active``: the sessions running then)."""
        if not self._steps:
            return
        sched = self.scheduler
        sched.batches += self._steps
        sched.rounds += self._steps * self._size
        sched.cost.record(self._size, self._ms / self._steps)
        now = time.perf_counter() if now is None else now
        active = sched._active if active is None else active
        sched.governor.on_batch(emitted=self._steps * self._size, active=active, now=now, batches=self._steps)
        self._steps = 0
        self._ms = 0.0
