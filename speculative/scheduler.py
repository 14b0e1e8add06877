"""Cross-session verify batching: many sessions' rounds in one verifier forward pass.

A worker thread takes the first waiting round, then gathers more for at most
``window_ms``, and stops waiting early as soon as every session that has joined is in
the batch (so a lone session never waits). Sessions join and leave between steps:
continuous batching. A batch that fails is retried one round at a time, so one bad
request fails alone; a retried round is safe because the verifier answers a repeated
round number with the verdict it already gave.

Two kinds of sessions submit rounds. A *driven* one (``submit_driven``: every
completion of :class:`~speculative.engine.SpeculativeEngine`) is advanced by this
worker itself right after its batch: it takes its verdict, hands its tokens to its
consumer, drafts, and its next round is in the next batch at once. No thread wakes per
round, so a round's time is the forward pass plus each session's own bookkeeping; with
sessions on threads of their own (measured on the demo pair's llama.cpp verifier, 16
sessions) the GIL hand-offs of 16 threads waking and resubmitting cost more than the
forward. A plain ``submit`` returns a future (the remote verifier's server, tests).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from speculative.controller import SpeculationGovernor
from speculative.errors import SpeculativeError
from speculative.types import GreedyDrafter, SamplingParams, SpeculatedRound, Verdict
from speculative.verifier import Verifier, VerifyRequest

if TYPE_CHECKING:
    from speculative.draft import DraftSession

log = logging.getLogger(__name__)

# The longest a verify step waits for sessions still drafting. It closes as soon as
# every joined session is in, so a lone session never waits; with many sessions this
# keeps them in lockstep (one forward per round, not two half-empty ones).
DEFAULT_WINDOW_MS = 8.0
DEFAULT_MAX_BATCH = 64
COST_WINDOW = 128  # recent batches behind the batch cost line
# The longest a plain run goes on before its sessions see their tokens: the delay a streaming client's tokens may
# take (a run's steps are delivered together), and a session waiting to open waits no longer (it stops the run).
PLAIN_RUN_MS = 25.0


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

    Refitted after every batch from running sums over the window, not from the window's
    points: at one session that is every token, and the two-pass fit over 128 points (plus
    counting their distinct sizes) was about 50 us of a round whose decode is 0.6 ms. The
    sums are recomputed from the points once per window, so rounding cannot accumulate.
    """

    def __init__(self, window: int = COST_WINDOW):
        self._points: deque[tuple[int, float]] = deque(maxlen=window)
        self._line: tuple[float, float] | None = None
        self._sizes: dict[int, int] = {}  # points per distinct token count
        self._sums = [0.0, 0.0, 0.0, 0.0]  # x, y, x*x, x*y
        self._since_exact = 0

    def record(self, tokens: int, verify_ms: float) -> None:
        """Add a batch and refit, once per batch on the scheduler's thread (not per session read)."""
        if len(self._points) == self._points.maxlen:
            self._count(*self._points[0], sign=-1)  # the oldest leaves the window
        self._points.append((tokens, verify_ms))
        self._count(tokens, verify_ms, sign=1)
        self._since_exact += 1
        if self._since_exact >= len(self._points):
            self._since_exact = 0
            sx, sy = sum(x for x, _ in self._points), sum(y for _, y in self._points)
            self._sums = [sx, sy, sum(x * x for x, _ in self._points), sum(x * y for x, y in self._points)]
        if len(self._sizes) >= 2:
            self._line = self._fit()

    def _count(self, x: int, y: float, sign: int) -> None:
        left = self._sizes.get(x, 0) + sign
        if left:
            self._sizes[x] = left
        else:
            del self._sizes[x]
        sums = self._sums
        sums[0] += sign * x
        sums[1] += sign * y
        sums[2] += sign * x * x
        sums[3] += sign * x * y

    def _fit(self) -> tuple[float, float]:
        """``controller.cost_line`` of the window's points, from the sums."""
        n = len(self._points)
        sx, sy, sxx, sxy = self._sums
        mean_x, mean_y = sx / n, sy / n
        var = sxx - sx * mean_x
        slope = max(0.0, (sxy - sx * mean_y) / var) if var > 0 else 0.0
        return max(0.0, mean_y - slope * mean_x), slope

    def line(self) -> tuple[float, float] | None:
        """(intercept_ms, slope_ms_per_token), or None until batches of two sizes were seen."""
        return self._line


@dataclass(frozen=True)
class OpenOrder:
    """A completion's first step: open its verifier session (answered with its prefill ms).

    The scheduler's thread opens every session that starts at the same moment with one
    batched prefill: every call into the verifier's model comes from that one thread (on a
    CPU, llama.cpp's OpenMP workers of a second calling thread take the cores from the
    first's: a 0.7 ms verify step measured 3.5 ms once another thread had prefilled).
    """

    session_id: str
    prompt_ids: Sequence[int]
    params: SamplingParams


@dataclass(frozen=True)
class PlainRun:
    """A greedy session's plain decoding, several steps at once (answered with a :class:`PlainResult`).

    Where the verifier has ``decode_greedy`` and every round of a batch is a plain run, the
    verifier decodes them in lockstep for up to the fewest ``max_steps`` of any, without a
    round's Python around each step, and stops early once a session waits to join or the
    run has lasted ``PLAIN_RUN_MS``. In a batch with drafting sessions it is the one plain
    round ``request`` (answered with a :class:`RoundResult`).
    """

    request: VerifyRequest
    max_steps: int


@dataclass(frozen=True)
class PlainResult:
    tokens: list[int]  # the verifier's greedy tokens, one a step
    verify_ms: float  # the whole run's
    batch_size: int  # sessions in the run


@dataclass(frozen=True)
class SpecRun(PlainRun):
    """A lone greedy session's drafting rounds, several at once (answered with a :class:`SpecResult`).

    Where the verifier has ``speculate_greedy`` and the session is alone in its batch, the
    verifier runs its rounds (drafts of ``k`` from ``draft``) one after another in one call,
    up to ``max_tokens`` tokens, stopping early as a plain run does. In a batch with other
    sessions it is what its plain run would be (``max_steps`` plain steps, or one plain round):
    the others' rounds go on as they are.
    """

    draft: GreedyDrafter
    k: int
    max_tokens: int


@dataclass(frozen=True)
class SpecResult:
    rounds: list[SpeculatedRound]


@dataclass(frozen=True)
class DraftOrder:
    """A step of a completion: draft ``k`` tokens with ``draft`` (answered with its :class:`Proposal`)."""

    draft: DraftSession
    k: int


class DrivenSession(Protocol):
    """A session the worker advances itself (:class:`speculative.engine.DrivenRounds`)."""

    def step(
        self, result: Any = None, error: BaseException | None = None
    ) -> VerifyRequest | PlainRun | OpenOrder | DraftOrder | None:
        """Take the answer to its last step (or its failure); return its next step, or None once it ended."""
        ...


Answer = Future[RoundResult] | DrivenSession
Item = tuple[VerifyRequest | PlainRun | None, Answer]  # None: a driven session to start
Round = tuple[VerifyRequest | PlainRun, Answer]


class VerifyScheduler:
    def __init__(self, verifier: Verifier, *, window_ms: float = DEFAULT_WINDOW_MS, max_batch: int = DEFAULT_MAX_BATCH):
        self.verifier = verifier
        self.window_s = window_ms / 1e3
        self.max_batch = max_batch
        self._queue: queue.Queue[Item | None] = queue.Queue()
        # the worker's own thread only: driven sessions' next rounds, and this round's draft orders (run together)
        self._next: deque[Round] = deque()
        self._drafts: list[tuple[DraftOrder, DrivenSession]] = []
        self._active = 0
        self._arriving = 0  # sessions opened by this batch that have not joined yet
        self._lock = threading.Lock()
        self._closed = False
        self.batches = 0
        self.rounds = 0
        self.cost = BatchCostModel()
        self.governor = SpeculationGovernor()
        self._worker = threading.Thread(target=self._run, name="verify-scheduler", daemon=True)
        self._worker.start()

    def join(self) -> None:
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1

    def load(self) -> int:
        """Sessions running, counting those opened together with the caller that have yet to join."""
        return self._active + self._arriving

    def submit(self, request: VerifyRequest) -> Future[RoundResult]:
        future: Future[RoundResult] = Future()
        if self._closed:
            future.set_exception(SpeculativeError("the verify scheduler is closed"))
        else:
            self._queue.put((request, future))
        return future

    def start_driven(self, session: DrivenSession) -> None:
        """Hand a driven session to this worker: it opens it (with others starting then), then runs its rounds."""
        if self._closed:
            _answer(session, error=SpeculativeError("the verify scheduler is closed"))
        else:
            self._queue.put((None, session))

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=5)

    def _gather(self, first: Item) -> list[Round]:
        batch: list[Item] = [first]
        while self._next and len(batch) < self.max_batch:
            batch.append(self._next.popleft())
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
        starting = [answer for request, answer in batch if request is None]
        rounds: list[Round] = [(request, answer) for request, answer in batch if request is not None]
        if starting:
            assert all(not isinstance(s, Future) for s in starting)
            rounds += self._open([s for s in starting if not isinstance(s, Future)])
        return rounds

    def _open(self, starting: list[DrivenSession]) -> list[Round]:
        """Open starting sessions with one batched prefill; their first rounds (a session that failed is told)."""
        openings: list[tuple[DrivenSession, OpenOrder]] = []
        rounds: list[Round] = []
        for session in starting:
            first = _answer(session)  # runs it up to its opening
            if isinstance(first, OpenOrder):
                openings.append((session, first))
            elif first is not None:
                _answer(session, error=SpeculativeError("a completion must open its session first"))
        if not openings:
            return rounds
        results = self._open_sessions([o for _, o in openings])
        waiting = len(self._next)
        self._arriving = len(openings)
        for (session, _), result in zip(openings, results, strict=True):
            self._arriving -= 1  # it joins now, or fails
            error = result if isinstance(result, BaseException) else None
            self._continue(session, None if error else result, error)  # its first draft or round
        self._draft_round()
        while len(self._next) > waiting:  # the new sessions' first rounds join this batch
            rounds.append(self._next.pop())
        return rounds

    def _open_sessions(self, openings: list[OpenOrder]) -> list[float | BaseException]:
        many = getattr(self.verifier, "open_many", None)
        items = [(o.session_id, o.prompt_ids, o.params) for o in openings]
        if many is not None:
            try:
                return list(many(items))
            except Exception as exc:  # noqa: BLE001 - every opening hears of it
                return [exc] * len(items)
        results: list[float | BaseException] = []
        for item in items:
            try:
                results.append(self.verifier.open_session(*item))
            except Exception as exc:  # noqa: BLE001 - this opening fails alone
                results.append(exc)
        return results

    def _run(self) -> None:
        warm_up = getattr(self.verifier, "warm_up", None)  # on this thread: its OpenMP team is the one that serves
        if warm_up is not None:
            try:
                warm_up()
            except Exception:  # noqa: BLE001 - a model that cannot decode says so on its first round
                log.exception("the verifier's warm-up failed")
        while True:
            first: Item | None
            if self._next:
                first = self._next.popleft()
            else:
                try:
                    first = self._queue.get_nowait()
                except queue.Empty:
                    self.governor.on_idle()  # no session has a round to run: they all ended
                    first = self._queue.get()
            if first is None:
                break
            batch = self._gather(first)
            if not batch:  # only openings, all failed (their consumers were told)
                continue
            try:
                self._verify(batch)
            except BaseException as exc:  # noqa: BLE001 - the worker must outlive any bug
                log.exception("verify step failed")
                for _, answer in batch:
                    if not isinstance(answer, Future) or not answer.done():
                        self._continue(answer, error=exc)
        # closed: every round still waiting hears so (a driven session's consumer would wait forever)
        closed = SpeculativeError("the verify scheduler is closed")
        while self._next:
            _answer(self._next.popleft()[1], error=closed)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _answer(item[1], error=closed)

    def _verify(self, batch: list[Round]) -> None:
        if len(batch) == 1 and isinstance(batch[0][0], SpecRun) and hasattr(self.verifier, "speculate_greedy"):
            self._run_spec(batch[0])
            return
        if all(isinstance(req, PlainRun) for req, _ in batch) and hasattr(self.verifier, "decode_greedy"):
            self._run_plain(batch)
            return
        rounds = [(req.request if isinstance(req, PlainRun) else req, answer) for req, answer in batch]
        try:
            result = self.verifier.verify([req for req, _ in rounds])
        except Exception as exc:  # noqa: BLE001 - every waiting session must hear of it
            self._one_at_a_time(rounds, exc, self._verify)
            return
        batch_tokens = sum(1 + len(req.tokens) for req, _ in rounds)
        results = [
            RoundResult(verdict, result.verify_ms, result.network_ms, len(rounds), batch_tokens)
            for verdict in result.verdicts
        ]
        # sessions waiting on a future first: the bookkeeping and driven sessions below must not keep them
        for (_, answer), round_result in zip(rounds, results, strict=True):
            if isinstance(answer, Future):
                answer.set_result(round_result)
        self.batches += 1
        self.rounds += len(rounds)
        self.cost.record(batch_tokens, result.verify_ms)  # before the driven sessions pick their next k
        self.governor.on_batch(
            emitted=sum(1 + v.n_matches for v in result.verdicts), active=self._active, now=time.perf_counter()
        )
        for (_, answer), round_result in zip(rounds, results, strict=True):
            if not isinstance(answer, Future):
                self._continue(answer, round_result)
        self._draft_round()

    def _run_plain(self, batch: list[Round]) -> None:
        """Plain runs' steps in lockstep in one call; it stops early once a session waits to join."""
        runs = [
            (run.request.session_id, run.request.round, run.max_steps) for run, _ in batch if isinstance(run, PlainRun)
        ]
        try:
            tokens, verify_ms = self.verifier.decode_greedy(runs, stop=self._run_ends())  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - a failed run changed nothing: each session runs alone
            self._one_at_a_time(batch, exc, self._run_plain)
            return
        steps = len(tokens[0])
        self.batches += steps
        self.rounds += steps * len(batch)
        self.cost.record(len(batch), verify_ms / steps)
        self.governor.on_batch(emitted=steps * len(batch), active=self._active, now=time.perf_counter(), batches=steps)
        for (_, answer), run_tokens in zip(batch, tokens, strict=True):
            self._continue(answer, PlainResult(run_tokens, verify_ms, len(batch)))
        self._draft_round()

    def _run_ends(self) -> Callable[[], bool]:
        """When a run started now stops: once a session waits to join, or after ``PLAIN_RUN_MS``."""
        deadline = time.perf_counter() + PLAIN_RUN_MS / 1e3
        return lambda: not self._queue.empty() or time.perf_counter() > deadline

    def _run_spec(self, item: Round) -> None:
        """A lone session's drafting rounds in one call; it stops early once a session waits to join."""
        run, answer = item
        assert isinstance(run, SpecRun)
        try:
            rounds: list[SpeculatedRound] = self.verifier.speculate_greedy(  # type: ignore[attr-defined]
                run.request.session_id,
                run.request.round,
                run.max_tokens,
                run.draft,
                run.k,
                stop=self._run_ends(),
            )
        except Exception as exc:  # noqa: BLE001 - the session hears of it
            self._continue(answer, error=exc)
            return
        self.batches += len(rounds)
        self.rounds += len(rounds)
        for r in rounds:
            self.cost.record(1 + len(r.proposal.tokens), r.verify_ms)
        self.governor.on_batch(
            emitted=sum(1 + r.verdict.n_matches for r in rounds),
            active=self._active,
            now=time.perf_counter(),
            batches=len(rounds),
        )
        self._continue(answer, SpecResult(rounds))
        self._draft_round()

    def _one_at_a_time(
        self, batch: Sequence[Round], error: BaseException, again: Callable[[list[Round]], None]
    ) -> None:
        """A failed batch's rounds again, one at a time (a failure changes nothing), so that a bad one fails alone."""
        if len(batch) > 1:
            for item in batch:
                again([item])
        else:
            self._continue(batch[0][1], error=error)

    def _continue(self, answer: Answer, result: Any = None, error: BaseException | None = None) -> None:
        """Answer a round; a driven session's next round goes straight into the next batch."""
        following = _answer(answer, result, error)
        if following is None:
            return
        assert not isinstance(answer, Future)
        if isinstance(following, VerifyRequest | PlainRun):
            self._next.append((following, answer))
        elif isinstance(following, DraftOrder):
            self._drafts.append((following, answer))
        else:
            self._continue(answer, error=SpeculativeError("a completion asked to open its session twice"))

    def _draft_round(self) -> None:
        """Every draft order of this round as one lockstep round of each draft model; then their verify rounds."""
        from speculative.draft import propose_together

        while self._drafts:
            orders, self._drafts = self._drafts, []
            try:
                proposals: list = propose_together([(order.draft, order.k) for order, _ in orders])
            except Exception as exc:  # noqa: BLE001 - every session of the round hears of it
                proposals = [exc] * len(orders)
            for (_, session), proposal in zip(orders, proposals, strict=True):
                if isinstance(proposal, BaseException):
                    self._continue(session, error=proposal)
                else:
                    self._continue(session, proposal)


def _answer(
    answer: Answer, result: Any = None, error: BaseException | None = None
) -> VerifyRequest | PlainRun | OpenOrder | DraftOrder | None:
    if isinstance(answer, Future):
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)
        return None
    try:
        return answer.step(result, error)
    except BaseException:  # noqa: BLE001 - a session's bug must not stop the worker (step reports its own errors)
        log.exception("a driven session failed outside its completion")
        return None
