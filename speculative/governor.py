"""The speculation governor: a cap on every session's draft length, from measured aggregate throughput.

Each session's ``DraftLengthController`` (``speculative.controller``) prices its own draft; the
governor measures what all of them make together under each cap, per concurrency level, and
rules drafting out where the verifier's (and the draft's) measured steps say no draft can pay.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import TYPE_CHECKING

from speculative.controller import LOAD_BUCKETS, expected_tokens, load_bucket
from speculative.types import MAX_DRAFT_TOKENS

if TYPE_CHECKING:
    from speculative.batch_cost import BatchCostModel

# few, well-separated arms: each epoch's measurement is noisy on a shared machine, and
# every epoch spent on a losing arm costs throughput
GOVERNOR_CAPS = (MAX_DRAFT_TOKENS, 0, 1, 2, 4)  # tried in this order, then the best is kept
EPOCH_BATCHES = 12
EPOCH_MIN_S = 0.1
# A lone session's epoch spans several requests (``_resumed``), and its rate is theirs: how well the draft agrees
# moves from one prompt to the next more than the caps' rates differ. At 0.1 s (3-4 requests of the demo pair's 64
# tokens) one epoch of a cap of 4 on easy prompts outscored a cap of 1 for many epochs: in process, 400 requests
# cycling 16 prompts, the governor kept a cap of 4 for 300 of them in one run and a cap of 1 for 285 in another
# (pinned: 31.7-32.8 ms a request against 30.7-31.5); at 0.5 s a cap of 1 for 299 and 305 in two runs.
# A cap's first epoch there is ``EPOCH_MIN_S`` still: five caps of 0.5 s each held a lone session on losing caps
# for 2.5 s before any was kept (``bench_peer`` visits one session for 0.3 s at a time: five of its six visits).
LONE_EPOCH_MIN_S = 0.5
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
# and for this long after the latest: then drafting is measured again at one session, and its rounds
# priced afresh (a host loaded while they were measured made them dear; one request's rounds re-judge it)
LONE_ROUNDS_TTL_S = 300.0


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
        self._lone_rounds_at = 0.0  # when the latest was measured (``on_batch``'s clock)
        self._lone_judged: float | None = None  # the ``_lone_rounds_at`` of rounds judged hopeless: held for them

    def cap_for(self, active: int) -> int:
        """The cap for a session choosing its draft length at ``active`` sessions (``load()``, those opening counted).

        ``cap`` is the current epoch's (or a paused lone epoch's), and what sessions leaving to a lower load
        keep. A session opening where no epoch runs, or at a higher load, takes the cap the next epoch there
        will take (``_choose``, as ``on_batch`` does at that epoch's first batch): a whole answer's first
        round is its only one, and a lone session's first after each burst had run its answer under the
        burst's cap of 0, plainly (served, demo pair: 42-45 ms against 33-36 drafting).
        """
        bucket = load_bucket(active)
        if (self._paused is not None and bucket == 1) or (self._start is not None and bucket <= self._bucket):
            return self.cap
        return self._choose(bucket)

    def on_lone_round(self, k: int, ms: float, now: float) -> None:
        """A lone session's steady drafting round (``k`` drafted, its draft and verify ``ms``), for ``_lone_hopeless``."""
        self._lone_rounds.append((k, ms))
        self._lone_rounds_at = now

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
        if self._batches >= EPOCH_BATCHES and now - self._start >= self._epoch_min_s(bucket):
            self._score(now)
            self._start, self._tokens, self._batches = now, 0, 0
            self.cap = self._choose(bucket)

    def _epoch_min_s(self, bucket: int) -> float:
        """An epoch's least length: ``LONE_EPOCH_MIN_S`` for a lone session's cap once it has a first measure."""
        return LONE_EPOCH_MIN_S if bucket == 1 and (bucket, self.cap) in self.rates else EPOCH_MIN_S

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
        return not _may_gain(full, per_round)

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
        while plain decoding runs, so a burst that comes and goes does not bring the drafting arms back,
        for ``LONE_ROUNDS_TTL_S``. A verdict of hopeless holds as long as its rounds do: the plain step
        ``c`` it is priced against moves with the host, and where a drafted token costs a bit less than a
        step the verdict is close (SmolLM2 and its draft, 36% agreement: one-token rounds 15.5 ms beside a
        7.3-9.1 ms step, so hopeless or a 14% gain by turns), and each turn back measured drafting caps
        again (50-91 tokens/s against plain decoding's 113-134; the client's next 8 requests at 86-103).
        """
        assert self._cost is not None
        if self._last - self._lone_rounds_at > LONE_ROUNDS_TTL_S:
            self._lone_rounds.clear()
        if self._drafting_measured_faster(1):
            return False
        if self._lone_rounds and self._lone_judged == self._lone_rounds_at:
            return True
        lone = self._cost.lone_typical_ms()
        if lone is None or len(self._lone_rounds) < LONE_ROUNDS_MIN:
            return False
        per_token = statistics.median((ms - lone) / k for k, ms in self._lone_rounds)
        if per_token <= 0 or _may_gain(lone, per_token):
            return False
        self._lone_judged = self._lone_rounds_at
        return True

    def _drafting_measured_faster(self, bucket: int) -> bool:
        """Whether a drafting cap's measured rate at ``bucket`` beats plain decoding's by ``HOPELESS_GAIN``.

        What the arms made, measured, overrules a model's verdict that no draft can pay. The lone rounds
        that price that verdict ran where the host was cold for them (a lone session's first requests after
        a burst of 16, or after another server on the same cores): the demo pair's one-token rounds were
        judged hopeless there and the verdict held for ``LONE_ROUNDS_TTL_S``, so the lone sessions decoded
        plainly at 34-36 ms a request where their drafting rounds had measured 28-31 (served, 2026-12-05).
        """
        plain = self.rates.get((bucket, 0))
        if plain is None:
            return False
        return any(rate >= HOPELESS_GAIN * plain for (b, cap), rate in self.rates.items() if b == bucket and cap > 0)

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


def _may_gain(step_ms: float, per_drafted_ms: float) -> bool:
    """Whether some draft length gains ``HOPELESS_GAIN`` over plain steps of ``step_ms`` for drafts agreeing
    ``OPTIMISTIC_AGREEMENT``, a round drafting ``k`` costing ``step_ms + k * per_drafted_ms``."""
    gains = (
        expected_tokens(OPTIMISTIC_AGREEMENT, k) * step_ms / (step_ms + k * per_drafted_ms)
        for k in range(1, MAX_DRAFT_TOKENS + 1)
    )
    return max(gains) >= HOPELESS_GAIN
