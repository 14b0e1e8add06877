"""Adaptive draft length: pick each round's k to maximise expected tokens per second.

With per-token acceptance rate ``a`` (draft tokens accepted independently), a round that
drafts k tokens emits on average

    E[tokens](k) = (1 - a^(k+1)) / (1 - a)

tokens (the accepted prefix plus the verifier's token), and costs

    T(k) = t_round + k * t_draft + rtt + t_verify(k)      (t_round only when k > 0)

So k* = argmax_k E[tokens](k) / T(k). A slow link (large rtt) makes longer drafts pay;
poor agreement (small a) makes them waste, down to k = 0: plain verifier decoding. The
controller estimates every term per session from what it measures: ``a`` as an
exponentially weighted ratio of accepted to tried draft tokens, the draft's cost as a
line in k over the k values it drafted (``t_round``: what a drafting round costs before
its first token, catching up on the tokens the verifier committed; ``t_draft`` per
token), and ``rtt``. Pricing every drafted token at its round's average made short drafts
look cheap: on the demo pair on llama.cpp a 1-token draft costs about what a whole verify
step does. ``t_verify`` comes from the scheduler's batch cost line (verify ms against
tokens in the batch): when ``n`` sessions share a forward and each drafts k, the batch
holds about n * (k + 1) tokens, so t_verify(k) = intercept + slope * n * (k + 1). Until
that line exists it falls back to a line in k over this session's own rounds. At k = 0
it still probes a short draft now and then, so it notices when agreement comes back.

A session starts from what the engine's finished sessions measured at its concurrency
level (``ControllerPriors``: their acceptance, draft and verify costs), with little weight,
so it adapts to its own prompt within a few rounds instead of guessing k = 4 and learning
from scratch.
"""

from __future__ import annotations

import functools
import math
import statistics
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from speculative.types import MAX_DRAFT_TOKENS

if TYPE_CHECKING:
    from speculative.batch_cost import BatchCostModel

EWMA_DECAY = 0.8  # weight of the past in the running estimates of costs
# and in the acceptance rate's counts, per round: a round tries a few tokens, and at 0.8 one early
# rejection swung the estimate enough to stop drafting for dozens of rounds (the demo pair on
# llama.cpp: 0.9 per token measured, estimates between 0.68 and 0.99 within one completion)
ACCEPTANCE_DECAY = 0.95
PRIOR_ACCEPTANCE = 0.6
PRIOR_WEIGHT = 2.0  # pseudo-counts behind the prior acceptance rate
PRIOR_SEED_WEIGHT = 16.0  # pseudo-counts behind what earlier sessions measured (ControllerPrior): at 4, one
# rejection in a first round took the demo pair on llama.cpp from 0.90 to 0.71 and to plain decoding
PROBE_EVERY = 16  # rounds at k = 0 before the first probing round; the gap doubles after each probe that
PROBE_EVERY_MAX = 256  # changed nothing, up to this (a probe costs a drafting round where drafting does not pay)
PROBE_K = 2
MIN_ROUND_MS = 1e-3  # the least a round is taken to cost when every measured cost rounds to zero
# A drafting round first evaluates the committed tokens its draft has not seen: one or two after a
# drafting round (the verifier's token, and the last accepted draft token), the whole prompt in a
# session's first round, every token since in a round after plain decoding. Only rounds with at most
# this many price drafting: the others' catch-up is a one-off (on the demo pair on llama.cpp a first
# round priced the prompt at 1 ms a drafted token, against 0.17, and the session never drafted again).
STEADY_CATCH_UP = 2


def expected_tokens(a: float, k: int) -> float:
    """E[tokens emitted by a round drafting k tokens] at per-token acceptance rate a."""
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def best_k(
    a: float,
    t_draft: float,
    rtt: float,
    t_verify_0: float,
    t_verify_slope: float,
    k_max: int,
    t_round: float = 0.0,
) -> int:
    """The k in [0, k_max] with the most expected tokens per unit time (``t_round``: a drafting round's fixed cost)."""

    def rate(k: int) -> float:
        # a fitted line can clamp to zero cost (a fast verifier, noisy timings, no network):
        # a floor keeps the comparison defined, and then the longer k still wins on tokens
        seconds = (t_round if k else 0.0) + k * t_draft + rtt + t_verify_0 + t_verify_slope * k
        return expected_tokens(a, k) / max(seconds, MIN_ROUND_MS)

    return max(range(k_max + 1), key=rate)


def cost_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = intercept + slope * x`` with both clamped at 0 (costs only grow).

    ``points`` must hold at least two distinct x values.
    """
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in points) / var)
    return max(0.0, mean_y - slope * mean_x), slope


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else EWMA_DECAY * old + (1 - EWMA_DECAY) * new


@dataclass
class DraftLengthController:
    """Per-session estimates and the k they imply. All times in milliseconds."""

    k_max: int = MAX_DRAFT_TOKENS
    fixed_k: int | None = None  # set to pin k (benchmarks, tests)
    accepted: float = PRIOR_ACCEPTANCE * PRIOR_WEIGHT
    tried: float = PRIOR_WEIGHT
    t_draft: float | None = None  # per drafted token
    rtt: float | None = None
    overhead: float | None = None  # a round's cost besides drafting, verifying and the network
    verify_by_k: dict[int, float] = field(default_factory=dict)
    draft_by_k: dict[int, float] = field(default_factory=dict)  # a drafting round's ms, by its k
    _rounds_at_zero: int = 0
    _probe_every: int = PROBE_EVERY

    @classmethod
    def starting_from(cls, prior: ControllerPrior | None, **kwargs: Any) -> DraftLengthController:
        """A session's controller, seeded with what the engine's earlier sessions measured."""
        controller = cls(**kwargs)
        if prior is not None and prior.tried > 0:
            scale = min(1.0, PRIOR_SEED_WEIGHT / prior.tried)  # their acceptance, as a few pseudo-counts
            controller.accepted, controller.tried = prior.accepted * scale, prior.tried * scale
            controller.rtt = prior.rtt
            controller.rebase(prior)
        return controller

    def rebase(self, prior: ControllerPrior) -> None:
        """Take the costs sessions measured at another load (none there: measure them afresh); keep the rest.

        What a round costs depends on how many sessions share it (a lockstep draft round of 16
        sessions cost 0.8 ms a drafted token on the demo pair on llama.cpp, 0.2 alone); the
        draft's agreement and the network do not. Called when the session's batches move to
        another concurrency level, so its costs are never another level's.
        """
        self.t_draft, self.overhead = prior.t_draft, prior.overhead
        self.verify_by_k, self.draft_by_k = dict(prior.verify_by_k), dict(prior.draft_by_k)
        self._probe_every = prior.probe_every  # probes that kept failing there stay rare

    @property
    def acceptance(self) -> float:
        return self.accepted / self.tried if self.tried else 0.0

    def next_k(self, batch_cost: tuple[float, float] | None = None, batch_size: int = 1) -> int:
        """The next round's k; ``batch_cost`` is (intercept_ms, ms per batch token)."""
        if self.fixed_k is not None:
            return self.fixed_k
        if self.t_draft is None or not self.verify_by_k:
            return min(4, self.k_max)  # nothing measured yet, here or by earlier sessions: a moderate first guess
        if batch_cost is not None:
            intercept, per_token = batch_cost
            # n sessions each feeding k + 1 tokens: t = intercept + per_token * n * (k + 1)
            intercept, slope = intercept + per_token * batch_size, per_token * batch_size
        else:
            intercept, slope = self._verify_line()
        t_round, t_draft = self._draft_line()
        # a round's fixed costs, whatever its k: the network's round trip and the round's own bookkeeping
        fixed = (self.rtt or 0.0) + (self.overhead or 0.0)
        k = best_k(self.acceptance, t_draft, fixed, intercept, slope, self.k_max, t_round)
        if k == 0:
            self._rounds_at_zero += 1
            if self._rounds_at_zero >= self._probe_every:
                self._rounds_at_zero = 0
                self._probe_every = min(2 * self._probe_every, PROBE_EVERY_MAX)
                return min(PROBE_K, self.k_max)
        else:
            self._rounds_at_zero, self._probe_every = 0, PROBE_EVERY
        return k

    def record(
        self,
        *,
        k: int,
        n_matches: int,
        draft_ms: float,
        verify_ms: float,
        network_ms: float,
        caught_up: int = 1,
        overhead_ms: float | None = None,
    ) -> None:
        """Fold one round's outcome into the estimates.

        ``caught_up``: tokens the draft evaluated before drafting; ``overhead_ms``: the rest of the
        round's time (delivering its tokens, the scheduler's turn), where it was measured.
        """
        if k:
            # n_matches accepted; a rejection (if any) was one more tried token
            self.accepted = ACCEPTANCE_DECAY * self.accepted + n_matches
            self.tried = ACCEPTANCE_DECAY * self.tried + n_matches + (1 if n_matches < k else 0)
            if caught_up <= STEADY_CATCH_UP:
                self.t_draft = _ewma(self.t_draft, draft_ms / k)
                self.draft_by_k[k] = _ewma(self.draft_by_k.get(k), draft_ms)
        if overhead_ms is not None:
            self.overhead = _ewma(self.overhead, overhead_ms)
        self.rtt = _ewma(self.rtt, network_ms)
        self.verify_by_k[k] = _ewma(self.verify_by_k.get(k), verify_ms)

    def _draft_line(self) -> tuple[float, float]:
        """(ms a drafting round costs before its first token, ms per drafted token), over the k values drafted."""
        points = sorted(self.draft_by_k.items())
        if len(points) < 2:
            assert self.t_draft is not None
            return 0.0, self.t_draft  # one k seen: its round's average per token
        return cost_line(points)

    def _verify_line(self) -> tuple[float, float]:
        """Least-squares t_verify(k) = intercept + slope * k over the k values seen."""
        points = sorted(self.verify_by_k.items())
        if len(points) == 1:
            k, t = points[0]
            slope = 0.05 * t  # assume each extra position costs 5%: small next to a forward
            return max(0.0, t - slope * k), slope
        return cost_line(points)


class ControllerPrior:
    """What an engine's finished sessions measured, for the next sessions to start from (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accepted = 0.0
        self.tried = 0.0
        self.t_draft: float | None = None
        self.rtt: float | None = None
        self.overhead: float | None = None
        self.verify_by_k: dict[int, float] = {}
        self.draft_by_k: dict[int, float] = {}
        self.probe_every = PROBE_EVERY

    def fold(self, controller: DraftLengthController) -> None:
        """A session ended: fold its estimates in (a pinned k teaches nothing about the best k)."""
        if controller.fixed_k is not None or controller.t_draft is None:
            return
        with self._lock:
            self.accepted = EWMA_DECAY * self.accepted + controller.accepted
            self.tried = EWMA_DECAY * self.tried + controller.tried
            self.t_draft = _ewma(self.t_draft, controller.t_draft)
            if controller.rtt is not None:
                self.rtt = _ewma(self.rtt, controller.rtt)
            if controller.overhead is not None:
                self.overhead = _ewma(self.overhead, controller.overhead)
            self.probe_every = controller._probe_every
            for mine, theirs in ((self.verify_by_k, controller.verify_by_k), (self.draft_by_k, controller.draft_by_k)):
                for k, ms in theirs.items():
                    mine[k] = _ewma(mine.get(k), ms)


LOAD_BUCKETS = (1, 2, 4, 8, 16, 32)  # concurrency levels measured apart
# few, well-separated arms: each epoch's measurement is noisy on a shared machine, and
# every epoch spent on a losing arm costs throughput
GOVERNOR_CAPS = (MAX_DRAFT_TOKENS, 0, 1, 2, 4)  # tried in this order, then the best is kept
EPOCH_BATCHES = 12
EPOCH_MIN_S = 0.1
# An epoch cut short by a session ending is still scored when it saw this many batches: a
# good draft finishes a completion in few rounds, and sessions that start together end
# together, so a concurrency level may never see EPOCH_BATCHES in a row at one count.
EPOCH_MIN_BATCHES = 4
EXPLORE_EVERY = 10  # every 10th epoch re-measures another cap (load and agreement drift)
CLEAR_LOSER = 1.3  # an arm the best beats by this factor is re-measured 4x less often
# Re-measuring less (every 20th epoch, an arm 10% behind 4x less often) bought the platform on llama.cpp 1-3%
# at 4 and 16 sessions, where plain decoding is the best cap, but cost the torch backend's `make bench` far
# more: an early noisy pick held, 1.96-1.98x at 4 sessions against 2.53-2.60x, 1.26-1.61x at 16 against
# 1.68-1.91x (2026-12-03, runs alternating). What a re-measured drafting cap costs on a CPU (every draft
# catching up on the tokens since it last drafted) is better cut where it is paid.
# An arm's rate is its tokens over its seconds, each epoch's share of both decayed by this once the
# arm is measured again: a short epoch (cut by a session ending) weighs what its seconds do. At 0.7
# per epoch, as a plain ratio of rates, one lucky 25 ms epoch at 16 sessions (a session ends every
# ~4 batches there) made a losing cap the best for a while.
RATE_DECAY = 0.85
# Drafting is not tried at a load where a draft agreeing this often would gain less than this over plain decoding,
# as measured steps price it (``SpeculationGovernor._hopeless``): on a CPU at 16 sessions (demo pair, llama.cpp,
# two threads, 160 requests) the governor's epochs on drafting caps, noisy enough there to make one the best for
# seconds, and the probes they let sessions make, held the platform at 2,030-2,130 tokens/s where plain decoding
# pinned made 2,290-2,340 in the same runs (a cap of 2 pinned: 1,540-1,760).
OPTIMISTIC_AGREEMENT = 0.95
HOPELESS_GAIN = 1.05
# A lone session's drafting rounds behind the same test at one session (``SpeculationGovernor._lone_hopeless``):
# there the draft runs between the verifier's steps on the same cores, so its time counts with the positions'.
LONE_ROUNDS = 32  # the latest steady ones kept
LONE_ROUNDS_MIN = 8  # before any is judged


@functools.lru_cache(maxsize=256)
def load_bucket(active: int) -> int:
    """The concurrency level ``active`` sessions are measured at: the nearest of ``LOAD_BUCKETS`` in ratio.

    Not the largest at most ``active``: 16 sessions where one just ended (15) are 16's load, not 8's.
    """
    active = max(1, active)
    return min(LOAD_BUCKETS, key=lambda b: abs(math.log(active / b)))


class ControllerPriors:
    """A :class:`ControllerPrior` per concurrency level (``load_bucket``): what sessions measured there.

    One prior for every load taught a lone session what drafting cost in a batch of 16 or
    4 (0.66 ms a drafted token, where alone it is 0.2 on the demo pair on llama.cpp), so
    after a burst a lone session started at k = 0, and stayed there. A session's costs
    belong to the level its batches ran at: it rebases on that level's prior when its
    batch size moves to another (``DraftLengthController.rebase``) and folds into the
    level it ended at.
    """

    def __init__(self) -> None:
        self._by_bucket: dict[int, ControllerPrior] = {}
        self._lock = threading.Lock()

    def at(self, active: int) -> ControllerPrior:
        """The prior of ``active`` concurrent sessions' level (made empty on first use)."""
        bucket = load_bucket(active)
        prior = self._by_bucket.get(bucket)
        if prior is None:
            with self._lock:
                prior = self._by_bucket.setdefault(bucket, ControllerPrior())
        return prior


class SpeculationGovernor:
    """A cap on every session's k, chosen from measured aggregate throughput.

    Each session's controller prices its own draft, but when many sessions share one
    verifier (and, on a CPU, the same cores for drafting) a session cannot see what its
    draft costs the others: every session in a synchronised batch waits the same round
    time whatever its own k, so each would keep drafting even when all of them drafting
    is slower than none. The governor measures what matters, emitted tokens per second
    over all sessions, in short epochs under each cap (k <= cap; cap 0 is plain
    decoding), separately per concurrency level, and keeps the cap that did best while
    re-measuring another now and then. So speculation falls back to plain decoding
    exactly where it does not pay, as measured, not as modelled. A lone session too: its
    controller's model of its own costs is not the whole story (on an AMD EPYC host, the
    demo pair on llama.cpp in process, one session: a verify position cost 0.5 ms beside a
    0.66 ms one-token step, plain decoding made 1,048 tokens/s and the uncapped controller,
    still drafting, 879). Under a cap below
    ``MAX_DRAFT_TOKENS`` every session that drafts at all drafts the cap, and a lone session
    drafts it regardless (the engine's ``_next_k``): in lockstep a shorter draft saves the
    batch almost nothing, and a lone session's run of rounds (cap 1: one-token drafts,
    ``LlamaCppVerifier.speculate_greedy``) beat plain decoding where its controller priced it
    below.
    """

    def __init__(self, cost: BatchCostModel | None = None, draft_cost: BatchCostModel | None = None) -> None:
        self._cost = cost  # the verifier's measured steps: where drafting cannot pay, it is not tried
        self._draft_cost = draft_cost  # the draft's lockstep steps, ms a drafted token by the sessions in them
        self.rates: dict[tuple[int, int], float] = {}  # (load bucket, cap) -> tokens/s
        self._sums: dict[tuple[int, int], tuple[float, float]] = {}  # (load bucket, cap) -> decayed tokens, seconds
        self.cap = GOVERNOR_CAPS[0]
        self._epochs = 0
        self._start: float | None = None
        self._last = 0.0  # when the epoch's latest counted batch ended
        self._tokens = 0
        self._batches = 0
        self._bucket = LOAD_BUCKETS[0]
        self._active = 0
        self._paused: float | None = None  # a lone session's epoch between two requests: its seconds so far
        self._lone_rounds: deque[tuple[int, float]] = deque(maxlen=LONE_ROUNDS)  # (k, draft + verify ms)

    def on_lone_round(self, k: int, ms: float) -> None:
        """A lone session's steady drafting round (``k`` drafted, its draft and verify ``ms``), for ``_lone_hopeless``."""
        self._lone_rounds.append((k, ms))

    def on_batch(self, *, emitted: int, active: int, now: float, batches: int = 1) -> None:
        """Count a verified batch (``batches``: a plain run's steps, each a batch); score epochs as they end."""
        bucket = load_bucket(active)
        if self._paused is not None and self._resumed(active, now):
            return
        if self._start is None or active != self._active:
            # A session started: its prefill ran beside the last batches, which is no
            # property of the cap, so the epoch so far is dropped. A session ended: the
            # batches so far were a fair measure of the cap, so they count if there are enough.
            scored = self._start is not None and active < self._active and self._batches >= EPOCH_MIN_BATCHES
            if scored:
                self._score(self._last)  # up to the last batch of the old count
            # Sessions leaving keep the cap until an epoch at the lower level is scored: the
            # tail of a burst is too short to learn from, and should not go uncapped meanwhile.
            # Unless the lower level's best is known.
            if (
                self._start is None
                or bucket > self._bucket
                or (scored and bucket == self._bucket)
                or self._measured(bucket)
            ):
                self.cap = self._choose(bucket)
            self._start, self._tokens, self._batches, self._bucket, self._active = now, 0, 0, bucket, active
            return
        self._tokens += emitted
        self._batches += batches
        self._last = now
        if self._batches >= EPOCH_BATCHES and now - self._start >= EPOCH_MIN_S:
            self._score(now)
            self._start, self._tokens, self._batches = now, 0, 0
            self.cap = self._choose(bucket)

    def on_idle(self) -> None:
        """Every session ended: the epoch so far is scored if long enough, and the next batch starts afresh.

        Without this the idle time counted in the epoch, and its cap stayed on for whoever came
        next: after a burst at 16 sessions (cap 0), the lone sessions that followed ran plain.
        A lone session's epoch pauses instead, and goes on with the next lone session (``_resumed``).
        """
        if self._start is not None and self._bucket == 1 and self._batches > 0:
            self._paused = self._last - self._start  # lone sessions one after another: ``_resumed``
        elif self._start is not None and self._batches >= EPOCH_MIN_BATCHES:
            self._score(self._last)
        self._start = None

    def _resumed(self, active: int, now: float) -> bool:
        """Whether a lone session's epoch paused at the last one's end goes on now, under the same cap.

        A lone session's request is its own epoch otherwise: 64 tokens of the demo pair are 35 ms,
        a third of ``EPOCH_MIN_S``, and each cap was scored on one prompt, its agreement that
        prompt's: the governor chose a cap of 2 (1,356 tokens/s measured against plain decoding's
        1,246) where pinned runs made 1,003-1,213 and 1,436-1,922 (demo pair, one session, in
        process, 2026-12-03). Resumed, an epoch spans requests (not the idle time
        between them) until it is long enough. Another load ends the pause as an idle did before.
        """
        paused, self._paused = self._paused, None
        assert paused is not None
        if active == 1 and self._active == 1:
            self._start, self._last = now - paused, now  # this batch, the request's first, is not counted
            return True
        if self._batches >= EPOCH_MIN_BATCHES:
            self._start = self._last - paused
            self._score(self._last)
        self._start = None
        return False

    def _measured(self, bucket: int) -> bool:
        return all((bucket, cap) in self.rates for cap in self._arms(bucket))

    def _arms(self, bucket: int) -> tuple[int, ...]:
        """The caps measured at ``bucket`` sessions: plain decoding alone where drafting is ``_hopeless``."""
        return (0,) if self._hopeless(bucket) else GOVERNOR_CAPS

    def _hopeless(self, bucket: int) -> bool:
        """Whether no draft length can pay at ``bucket`` sessions, even for drafts agreeing ``OPTIMISTIC_AGREEMENT``.

        A step of ``n`` sessions is priced from measured ones as ``c(n) = c(1) + b (n - 1)``
        (``BatchCostModel.lone_ms``, ``_step_ms``); a round drafting ``k`` for each then costs
        ``c(n) + k (b n + d(n))`` for the ``(1 - a^(k+1)) / (1 - a)`` tokens a session expects, where
        ``d(n)`` is a lockstep draft step of ``n`` sessions, once measured (0 before). On a GPU ``b``
        is near zero and drafting is always measured; on a CPU a position costs about what a step
        does once the batch is large (demo pair, two threads: 0.65 ms alone, 4.6 ms for 16), and the
        draft steps are on the same cores (0.2 ms alone, 0.8 for 16). One session: ``_lone_hopeless``.
        """
        if self._cost is None:
            return False
        if bucket < 2:
            return self._lone_hopeless()
        lone, full = self._cost.lone_ms(), self._step_ms(bucket)
        if lone is None or full is None or full <= lone:
            return False
        per_position = (full - lone) / (bucket - 1)
        drafting = self._draft_cost.step_ms(bucket) if self._draft_cost is not None else None
        per_round = per_position * bucket + (drafting or 0.0)  # a drafted token each: positions, and a draft step
        a = OPTIMISTIC_AGREEMENT
        gains = ((1 - a ** (k + 1)) / (1 - a) * full / (full + k * per_round) for k in range(1, MAX_DRAFT_TOKENS + 1))
        return max(gains) < HOPELESS_GAIN

    def _step_ms(self, bucket: int) -> float | None:
        """A plain step of ``bucket`` sessions: measured, else priced a position as the nearest measured load's steps.

        A load between others is passed through as sessions come and go (16 clients' waves end through
        8, 4 and 2 sessions), seldom long enough for its own steps to be measured; its drafting caps
        were tried there, and every session drafted in lockstep for their epochs, in every wave's tail.
        """
        assert self._cost is not None
        measured = self._cost.step_ms(bucket)
        lone = self._cost.lone_ms()
        if measured is not None or lone is None:
            return measured
        others = [(b, ms) for b in LOAD_BUCKETS if b > 1 and (ms := self._cost.step_ms(b)) is not None]
        if not others:
            return None
        near, ms = min(others, key=lambda other: abs(math.log(other[0] / bucket)))
        return lone + (ms - lone) / (near - 1) * (bucket - 1)

    def _lone_hopeless(self) -> bool:
        """Whether no draft length can pay a lone session, even for drafts agreeing ``OPTIMISTIC_AGREEMENT``.

        A lone session's round drafting ``k`` costs its plain step ``c`` plus ``k`` times ``d``: a
        drafted token's verify position and its draft step, the median over its steady rounds
        (``on_lone_round``) of ``(round ms - c) / k``. Drafting gains at most
        ``(1 - a^(k+1)) / (1 - a) * c / (c + k d)``. On a 2-core CPU (llama.cpp, two threads) a
        verify position costs nearly what a step does: the demo verifier's lone step 0.5 ms, 0.33-0.40
        a position more, its draft 0.2 ms a token (in process); served, its one-token rounds took
        2.1-3.2 ms against a 0.85 ms plain step, and a 64-token request 54.5 ms of decoding drafting
        against ~45 plain (2026-12-04); SmolLM2's step 7.4 ms, 5.4 a position, 1.3 a draft token.
        On a GPU ``d`` is a small fraction of ``c`` and drafting stays measured. The rounds are kept
        while plain decoding runs, so a burst that comes and goes does not bring the drafting arms back.
        """
        assert self._cost is not None
        lone = self._cost.lone_typical_ms()
        if lone is None or len(self._lone_rounds) < LONE_ROUNDS_MIN:
            return False
        per_token = statistics.median((ms - lone) / k for k, ms in self._lone_rounds)
        if per_token <= 0:
            return False
        a = OPTIMISTIC_AGREEMENT
        gains = ((1 - a ** (k + 1)) / (1 - a) * lone / (lone + k * per_token) for k in range(1, MAX_DRAFT_TOKENS + 1))
        return max(gains) < HOPELESS_GAIN

    def _score(self, now: float) -> None:
        """Fold the epoch so far (``self.cap`` at ``self._bucket``) into the measured rates."""
        assert self._start is not None
        elapsed = now - self._start
        if elapsed <= 0:
            return
        key = (self._bucket, self.cap)
        tokens, seconds = self._sums.get(key, (0.0, 0.0))
        tokens, seconds = RATE_DECAY * tokens + self._tokens, RATE_DECAY * seconds + elapsed
        self._sums[key] = tokens, seconds
        self.rates[key] = tokens / seconds
        self._epochs += 1

    def _choose(self, bucket: int) -> int:
        arms = self._arms(bucket)
        untried = [c for c in arms if (bucket, c) not in self.rates]
        if untried:
            return untried[0]
        # the best measured, with no preference for leaving k to the controllers: on llama.cpp at 16
        # sessions that preference (kept while within 10% of the best) held them uncapped most of
        # the time at 1,599 tokens/s where plain decoding measured 1,846
        best = max(arms, key=lambda c: self.rates[(bucket, c)])
        if self._epochs % EXPLORE_EVERY == 0 and len(arms) > 1:
            turn = self._epochs // EXPLORE_EVERY
            others = [c for c in arms if c != best]
            candidate = others[turn % len(others)]
            clear_loser = self.rates[(bucket, best)] > CLEAR_LOSER * self.rates[(bucket, candidate)]
            if not clear_loser or turn % (4 * len(others)) < len(others):
                return candidate
        return best
