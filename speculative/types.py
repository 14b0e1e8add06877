"""Values that cross the core's boundaries: requests, proposals, verdicts and stats.

All frozen dataclasses, so a value handed from draft to verifier to engine to caller
cannot be changed on the way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from speculative.errors import InvalidRequestError

MAX_DRAFT_TOKENS = 16  # the controller never proposes more per round
MAX_TOP_LOGPROBS = 20  # the most alternatives a request may ask for per token (OpenAI's limit)
# the floor of a reported log-probability: a token the model rules out (a -inf logit) is
# reported at this value, as OpenAI does, so every logprob is a finite JSON number
MIN_LOGPROB = -9999.0

TopLogprobs = tuple[tuple[int, float], ...]  # (token id, logprob) pairs, highest first


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen; applied identically to the draft (q) and the verifier (p).

    ``temperature == 0`` means greedy decoding. ``top_k == 0`` and ``top_p == 1.0``
    disable those filters.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling(params: SamplingParams) -> None:
    """Refuse values that have no meaning, before any work is done."""
    if params.temperature < 0 or params.temperature != params.temperature:
        raise InvalidRequestError(f"temperature must be >= 0, got {params.temperature}")
    if params.top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0, got {params.top_k}")
    if not 0.0 < params.top_p <= 1.0:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p}")


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model that produced it, and the top alternatives.

    The distribution is the model's own: ``log_softmax`` of its raw logits at temperature 1,
    before top-k and top-p (what vLLM reports by default). So it is defined under greedy
    decoding too, does not move with a request's sampling settings, and answers "how sure
    was the model" alike for every request. Natural logs, floored at ``MIN_LOGPROB``.
    """

    logprob: float
    top: TopLogprobs = ()  # the N most likely tokens at this position, highest first


@dataclass(frozen=True)
class Proposal:
    """What the draft proposes for one session this round.

    tokens    # (k,) int token ids
    q         # (k, vocab) float32: the draft's (warped) probabilities each token was drawn
              # from; None under greedy decoding, where only the argmax matters
    logprobs  # (k,) the draft's own log-probability of each token, when asked for (edge tier)
    """

    tokens: tuple[int, ...]
    q: np.ndarray | None
    draft_ms: float
    logprobs: tuple[TokenLogprob, ...] | None = None
    # committed tokens the draft evaluated before drafting (``draft_ms`` includes them): one or two
    # in a run of drafting rounds, the prompt in a session's first, every token since in a round
    # after plain decoding. What drafting costs from here on is what a round with few of them costs.
    caught_up: int = 0


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verified round for one session.

    ``n_matches`` draft tokens were accepted, then one token from the verifier: the bonus
    token when all were accepted, the recovered (resampled) token otherwise. When the round
    asked for them, ``logprobs`` holds one entry per emitted token (``n_matches + 1``), each
    under the verifier's distribution at that position: an accepted draft token is the
    verifier's output as much as its own token is.
    """

    n_matches: int
    verifier_token: int
    logprobs: tuple[TokenLogprob, ...] | None = None

    def emitted_tokens(self, draft_tokens: tuple[int, ...]) -> tuple[int, ...]:
        """The tokens this round adds: the accepted draft prefix, then the verifier's token."""
        return tuple(draft_tokens[: self.n_matches]) + (self.verifier_token,)


@dataclass(frozen=True)
class SpeculatedRound:
    """One round of a lone session's run of rounds (``LlamaCppVerifier.speculate_greedy``): its draft and verdict."""

    proposal: Proposal
    verdict: Verdict
    verify_ms: float  # this round's decode, judging and rollback


class GreedyDrafter(Protocol):
    """A session's draft, as a run of rounds calls it (``DraftSession``): propose now, then hear the verdict."""

    def propose_now(self, k: int, threads: int | None = None) -> Proposal: ...

    def accept(self, proposal: Proposal, verdict: Verdict) -> None: ...


class Provenance(enum.StrEnum):
    DRAFTED = "drafted"  # a draft token the verifier accepted
    VERIFIER = "verifier"  # produced by the verifier (bonus, recovered, or plain decoding)
    EDGE = "edge"  # produced by the draft model alone, never verified (the edge tier)
    CLOUD = "cloud"  # relayed from a cloud upstream (a chunk of its text; it has no token id here)


@dataclass(frozen=True)
class TokenEvent:
    """One emitted token as a stream yields it, with its share of what it cost.

    A round's verifier time is spread evenly over the tokens the round emits (the
    prompt's prefill goes to the first token); each accepted draft token carries one
    drafted token and the verifier's token carries the drafts the verifier rejected. So
    summing the shares of the tokens a client received charges exactly what was
    delivered, even for a stream cut off in the middle of a round, and accepted never
    exceeds drafted.

    ``logprob`` and ``top_logprobs`` are filled when the request asked for them (see
    :class:`TokenLogprob` for the distribution: the raw softmax of the logits of the model
    that served the token, the verifier for speculative tokens, the draft on the edge tier).
    ``logprob`` is None when not asked for; ``top_logprobs`` holds the N requested
    alternatives, highest first, and is empty when N is 0 or nothing was asked.
    """

    token_id: int
    text: str
    provenance: Provenance
    gpu_ms: float = 0.0  # this token's share of verifier time (its batch share, prefill included)
    drafted: float = 0.0  # draft tokens this token accounts for (edge work): 1 if accepted, else the rejected
    logprob: float | None = None  # natural log of the token's probability under the serving model
    top_logprobs: TopLogprobs = ()  # (token id, logprob), highest first


@dataclass(frozen=True)
class TokenRun:
    """A run's tokens emitted at once, to a consumer that takes the answer whole (``Completion.drive(whole=True)``).

    A plain run's tokens are each the verifier's (``Provenance.VERIFIER``, nothing drafted);
    the run's text, decoded once, comes with its last token and the others carry none, as a
    token whose text is held back for a stop string does. ``gpu_ms`` is each token's share as
    :class:`TokenEvent` carries it: ``first_gpu_ms`` for the first (where a prefill or an
    earlier round's time not yet billed goes), ``gpu_ms`` for every other, so the consumer
    counts them one by one and charges exactly what the same tokens as events would.
    Measured on the demo pair (one session, 64 tokens): 64 events cost the scheduler's thread
    0.55 ms after the last decode, before the answer could go out.

    A lone session's drafting rounds (``SpecResult``) make a run whose tokens differ: each
    token's ``shares``, ``provenance`` and ``drafted`` then come with it, as its event's would.
    """

    token_ids: tuple[int, ...]
    text: str
    first_gpu_ms: float
    gpu_ms: float
    shares: tuple[float, ...] | None = None  # each token's share of verifier time (None: as above)
    provenance: tuple[Provenance, ...] | None = None  # each token's (None: the verifier's)
    drafted: tuple[float, ...] | None = None  # each token's ``TokenEvent.drafted`` (None: 0 each)

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("a token run holds at least one token")
        n = len(self.token_ids)
        if any(each is not None and len(each) != n for each in (self.shares, self.provenance, self.drafted)):
            raise ValueError("a token run's per-token figures must be one a token")

    def texts(self) -> list[str]:
        """Each token's text: the run's on the last, none on the others."""
        return [""] * (len(self.token_ids) - 1) + [self.text]

    def gpu_shares(self) -> list[float] | tuple[float, ...]:
        """Each token's share of verifier time, in order."""
        if self.shares is not None:
            return self.shares
        return [self.first_gpu_ms] + [self.gpu_ms] * (len(self.token_ids) - 1)

    def provenances(self) -> tuple[Provenance, ...]:
        """Each token's provenance, in order."""
        return self.provenance or (Provenance.VERIFIER,) * len(self.token_ids)


class FinishReason(enum.StrEnum):
    LENGTH = "length"
    STOP = "stop"  # EOS or a stop string


@dataclass
class CompletionStats:
    """What one completion cost and how speculation went (mutable while streaming)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    rejections: int = 0  # rounds whose draft was cut short: accepted / (accepted + rejections) is the per-token rate
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    network_ms: float = 0.0
    prefill_ms: float = 0.0  # verifier time to read the prompt
    gpu_ms: float = 0.0  # this completion's share of verifier time: prefill + its share of each batch
    draft_lengths: list[int] = field(default_factory=list)
    provenance: list[Provenance] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "rounds": self.rounds,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "draft_ms": round(self.draft_ms, 3),
            "verify_ms": round(self.verify_ms, 3),
            "network_ms": round(self.network_ms, 3),
            "prefill_ms": round(self.prefill_ms, 3),
            "gpu_ms": round(self.gpu_ms, 3),
            "finish_reason": self.finish_reason.value if self.finish_reason else None,
            "provenance": [p.value for p in self.provenance],
        }


def check_logprobs(logprobs: int | None) -> None:
    """None: none computed; 0: the chosen token's only; 1..MAX_TOP_LOGPROBS: also the top N."""
    if logprobs is None:
        return
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] or None, got {logprobs!r}")
