"""What a completion asks the verify scheduler for, step by step, and what each step is answered with.

A driven completion (``speculative.engine``) is a generator of these steps: it opens its
session (:class:`OpenOrder`), drafts (:class:`DraftOrder`), verifies a round
(``VerifyRequest``, answered with a :class:`RoundResult`), decodes plainly for several steps
(:class:`PlainRun`) or, alone, runs its drafting rounds in one call (:class:`SpecRun`); the
scheduler's thread answers each (``speculative.scheduler``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from speculative.types import GreedyDrafter, SamplingParams, SpeculatedRound, Verdict
from speculative.verifier import VerifyRequest

if TYPE_CHECKING:
    from speculative.draft import DraftSession

log = logging.getLogger("speculative.scheduler")  # (a driven session's failure is the worker's to report)


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

    Where the verifier has ``run_greedy`` and every round of a batch is a plain run, the
    verifier decodes them in lockstep, without a round's Python around each step, each for up
    to its ``max_steps`` or ``PLAIN_RUN_MS`` (``WHOLE_RUN_MS`` where its consumer takes the
    answer ``whole``), others joining and leaving the lockstep meanwhile
    (``VerifyScheduler._run_plain``). In a batch with drafting sessions it is the one plain
    round ``request`` (answered with a :class:`RoundResult`).
    """

    request: VerifyRequest
    max_steps: int
    whole: bool = field(default=False, kw_only=True)  # nothing of the answer is sent before its end


@dataclass(frozen=True)
class PlainResult:
    tokens: list[int]  # the verifier's greedy tokens, one a step
    verify_ms: float  # the whole steps' time
    batch_size: int  # sessions a step, on average
    gpu_ms: float  # the session's share of the steps: each one's time over the sessions in it


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


def answer_step(
    answer: Future[RoundResult] | DrivenSession, result: Any = None, error: BaseException | None = None
) -> VerifyRequest | PlainRun | OpenOrder | DraftOrder | None:
    """Answer a round: a waiting caller's future, or a driven session's step (its next step returned, if any)."""
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
