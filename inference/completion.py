"""The values a completion is made of as it crosses the gateway: the call, each token delta, the usage summary.

Adapters build a :class:`CompletionCall`, iterate :class:`TokenDelta` values, and report
the :class:`UsageSummary` at the end. Nothing here does I/O.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from speculative.types import Provenance

if TYPE_CHECKING:
    from inference.router import Route

MINTED_ID_PREFIX = "req_"


def new_request_id() -> str:
    """A request id no client can have chosen: clients' ids never start with ``MINTED_ID_PREFIX``."""
    return MINTED_ID_PREFIX + os.urandom(16).hex()  # 128 random bits, as uuid4's 122, at a third of its cost


@dataclass(frozen=True)
class CompletionCall:
    """One completion request, already parsed by an adapter."""

    model: str
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""  # "" = mint a fresh one
    # True only for an id minted here (or by an adapter with ``new_request_id``): unique by
    # construction, so the request may skip the reservation row, whose unique request id is
    # what catches an id used twice (a budget lease admits it in memory instead).
    request_id_fresh: bool = False
    # A chat's messages as the client sent them (``({"role", "content"}, ...)``); ``prompt``
    # is then their rendering through the local model's template. A cloud upstream gets the
    # messages themselves, rendered by its own template.
    messages: tuple[Mapping[str, str], ...] = ()
    # The tier the client asked for (a request extension); the routing policy allows or refuses it.
    requested_tier: str | None = None
    # log-probabilities of each token from the serving model: None (none), 0 (the token's), N (and the top N)
    logprobs: int | None = None
    # False: the client takes the answer whole (a cloud upstream is asked for it whole, not streamed)
    stream: bool = True
    # "interactive" (a person waits: spill up from a saturated edge) or "batch" (may wait its turn)
    latency_class: str = "interactive"
    # The answer so far, when another tier takes over mid-stream: the engine goes on from it
    # (a local engine reads prompt + this text; a cloud upstream continues the partial answer).
    continue_from: str = ""

    def __post_init__(self) -> None:
        if not self.request_id:
            object.__setattr__(self, "request_id", new_request_id())
            object.__setattr__(self, "request_id_fresh", True)


@dataclass(frozen=True)
class NamedLogprob:
    """One upstream token's logprob and its alternatives, named as the upstream names them (it sends no ids)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # (token, logprob), highest first


@dataclass(frozen=True)
class TokenDelta:
    index: int
    text: str
    token_id: int
    provenance: Provenance
    route: Route | None = None  # set on the first token of a leg that took over mid-stream: the new route
    logprob: float | None = None  # when the call asked for logprobs: under the serving model
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), highest first
    # a cloud chunk's tokens, named by the upstream (``logprob`` is then their sum: the chunk's)
    named_logprobs: tuple[NamedLogprob, ...] = ()


@dataclass(frozen=True)
class UsageSummary:
    """What a finished stream produced and cost (the ledger row, as adapters report it)."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    drafted_tokens: Decimal
    accepted_tokens: int
    gpu_ms: Decimal
    cost: Mapping[str, Decimal]  # edge, verifier, cloud, total
    outcome: str  # completed / cancelled / error
    finish_reason: str  # stop / length / "" (cancelled or failed)
    ttft_ms: float | None
    duration_ms: float
    route: Route  # the last leg's
    legs: tuple[Mapping, ...] = ()  # each leg's route, tokens and cost, when several tiers served the request

    @property
    def acceptance_rate(self) -> float:
        return float(self.accepted_tokens / self.drafted_tokens) if self.drafted_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / (self.duration_ms / 1e3) if self.duration_ms > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "request_id": self.request_id,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "drafted_tokens": format(self.drafted_tokens, "f"),
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "gpu_ms": format(self.gpu_ms, "f"),
            "cost": {k: format(v, "f") for k, v in self.cost.items()},
            "outcome": self.outcome,
            "finish_reason": self.finish_reason,
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 2),
            "duration_ms": round(self.duration_ms, 2),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "route": self.route.as_dict(),
        } | ({"legs": list(self.legs)} if self.legs else {})
