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
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from speculative.types import MAX_DRAFT_TOKENS

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
