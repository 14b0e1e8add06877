"""Cross-session verify batching: many sessions' rounds in one verifier forward pass.

Sessions submit their round and wait on a future. A worker thread takes the first
waiting round, then gathers more for at most ``window_ms``, and stops waiting early as
soon as every session that has joined is in the batch (so a lone session never waits).
Sessions join and leave between steps: continuous batching. A batch that fails is
retried one round at a time, so one bad request fails alone; a retried round is safe
because the verifier answers a repeated round number with the verdict it already gave.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from speculative.controller import SpeculationGovernor, cost_line
from speculative.errors import SpeculativeError
from speculative.types import Verdict
from speculative.verifier import Verifier, VerifyRequest

log = logging.getLogger(__name__)

# The longest a verify step waits for sessions still drafting. It closes as soon as
# every joined session is in, so a lone session never waits; with many sessions this
# keeps them in lockstep (one forward per round, not two half-empty ones).
DEFAULT_WINDOW_MS = 8.0
DEFAULT_MAX_BATCH = 64
COST_WINDOW = 128  # recent batches behind the batch cost line


@dataclass(frozen=True)
class RoundResult:
    verdict: Verdict
    verify_ms: float  # the whole batch's verifier time (what this round waited on)
    network_ms: float
    batch_size: int
    batch_tokens: int  # positions the batch fed the verifier: each round's pending token + draft

    def gpu_share_ms(self, k: int) -> float:
        """This round's share of the batch's verifier time: its positions over the batch's."""
        return self.verify_ms * (1 + k) / self.batch_tokens


class BatchCostModel:
    """A least-squares line ``verify_ms = intercept + slope * tokens`` over recent batches.

    ``tokens`` is what a batch feeds the verifier: each round's pending token plus its
    draft. The draft-length controller reads the line to price a longer draft: on a GPU
    the slope is near zero (a forward costs the same for 1 or 80 positions), on a CPU it
    is not, and there speculation must stay modest when many sessions share a forward.
    """

    def __init__(self, window: int = COST_WINDOW):
        self._points: deque[tuple[int, float]] = deque(maxlen=window)
        self._line: tuple[float, float] | None = None

    def record(self, tokens: int, verify_ms: float) -> None:
        """Add a batch and refit, once per batch on the scheduler's thread (not per session read)."""
        self._points.append((tokens, verify_ms))
        if len({x for x, _ in self._points}) >= 2:
            self._line = cost_line(self._points)

    def line(self) -> tuple[float, float] | None:
        """(intercept_ms, slope_ms_per_token), or None until batches of two sizes were seen."""
        return self._line


class VerifyScheduler:
    def __init__(self, verifier: Verifier, *, window_ms: float = DEFAULT_WINDOW_MS, max_batch: int = DEFAULT_MAX_BATCH):
        self.verifier = verifier
        self.window_s = window_ms / 1e3
        self.max_batch = max_batch
        self._queue: queue.Queue[tuple[VerifyRequest, Future[RoundResult]] | None] = queue.Queue()
        self._active = 0
        self._lock = threading.Lock()
        self._closed = False
        self.batches = 0
        self.rounds = 0
        self.cost = BatchCostModel()
        self.governor = SpeculationGovernor()
        # called with a batch's requests just before their sessions are answered, so the
        # engine can mark them all as drafting at once (keeps batched drafting in lockstep)
        self.before_answer: Callable[[list[VerifyRequest]], None] | None = None
        self._worker = threading.Thread(target=self._run, name="verify-scheduler", daemon=True)
        self._worker.start()

    def join(self) -> None:
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1

    def submit(self, request: VerifyRequest) -> Future[RoundResult]:
        future: Future[RoundResult] = Future()
        if self._closed:
            future.set_exception(SpeculativeError("the verify scheduler is closed"))
        else:
            self._queue.put((request, future))
        return future

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=5)

    def _gather(
        self, first: tuple[VerifyRequest, Future[RoundResult]]
    ) -> list[tuple[VerifyRequest, Future[RoundResult]]]:
        batch = [first]
        deadline = time.perf_counter() + self.window_s
        while len(batch) < self.max_batch:
            with self._lock:
                everyone_in = len(batch) >= self._active
            try:
                item = (
                    self._queue.get_nowait()
                    if everyone_in
                    else self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                )
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # let the run loop see the close
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._gather(first)
            try:
                self._verify(batch)
            except BaseException as exc:  # noqa: BLE001 - the worker must outlive any bug
                log.exception("verify step failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)

    def _verify(self, batch: list[tuple[VerifyRequest, Future[RoundResult]]]) -> None:
        try:
            result = self.verifier.verify([req for req, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every waiting session must hear of it
            if len(batch) > 1:
                for item in batch:
                    self._verify([item])
                return
            batch[0][1].set_exception(exc)
            return
        if self.before_answer is not None:
            try:
                self.before_answer([req for req, _ in batch])
            except Exception:  # noqa: BLE001 - a hook must never keep a session waiting
                log.exception("before_answer hook failed")
        batch_tokens = sum(1 + len(req.tokens) for req, _ in batch)
        # answer the sessions first: bookkeeping below must never keep one waiting
        for (_, future), verdict in zip(batch, result.verdicts, strict=True):
            future.set_result(RoundResult(verdict, result.verify_ms, result.network_ms, len(batch), batch_tokens))
        self.batches += 1
        self.rounds += len(batch)
        self.cost.record(batch_tokens, result.verify_ms)
        self.governor.on_batch(
            emitted=sum(1 + v.n_matches for v in result.verdicts), active=self._active, now=time.perf_counter()
        )
