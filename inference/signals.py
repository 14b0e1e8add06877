"""What the router decides from, worked out once per request: PII in the prompt, its difficulty, its size, its class.

``assess(call, policy, prompt_tokens)`` runs only the checks the policy needs: the PII
scan when the policy lets the cloud (or a refusal) depend on it, the difficulty
classifier when the policy routes by difficulty and the client did not ask for a tier.
Both are CPU work of a few milliseconds; a long prompt is checked on a thread, off the
event loop. The result is recorded with the route (``Route.signals``) in the ledger.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inference.completion import CompletionCall
from inference.model_tokenizers import counts_with
from tenants.tiers import Tier

if TYPE_CHECKING:
    from inference.pii import PiiReport
    from inference.router import Policy

INLINE_CHECK_CHARS = 2048  # longer prompts are checked on a thread
INTERACTIVE = "interactive"
BATCH = "batch"
LATENCY_CLASSES = (INTERACTIVE, BATCH)


@dataclass(frozen=True)
class Signals:
    requested_tier: str | None = None
    pii_kinds: tuple[str, ...] = ()
    pii: PiiReport | None = field(default=None, compare=False, repr=False)  # the findings, for redaction
    difficulty: str | None = None  # routine / hard_open / hard_frontier under the policy's thresholds
    difficulty_probs: Mapping[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    max_tokens: int = 0
    latency_class: str = INTERACTIVE
    logprobs: bool = False  # the client asked for log-probabilities (a cloud upstream names its own tokens)
    pii_scanned: bool = True  # False: no scan ran (no cloud could serve the request), so no cloud may
    check_ms: float = 0.0  # what the PII scan and the classifier cost this request

    def as_dict(self) -> dict[str, Any]:
        """What the ledger keeps (the kinds of PII found, never the values)."""
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "latency_class": self.latency_class,
            "check_ms": round(self.check_ms, 3),
        }
        if self.requested_tier:
            out["requested_tier"] = self.requested_tier
        if self.logprobs:
            out["logprobs"] = True
        if not self.pii_scanned:
            out["pii_unscanned"] = True
        if self.pii_kinds:
            out["pii"] = list(self.pii_kinds)
        if self.difficulty is not None:
            out["difficulty"] = self.difficulty
            out["difficulty_probs"] = {k: round(v, 4) for k, v in self.difficulty_probs.items()}
        return out


def text_of(call: CompletionCall) -> str:
    """The text the classifier reads: a chat's messages (what a cloud upstream would be sent), else the prompt."""
    if call.messages:
        return "\n".join(m.get("content", "") for m in call.messages)
    return call.prompt


def needs_pii_scan(policy: Policy, cloud_served: bool = True) -> bool:
    """Whether PII can change this request's route: the cloud may serve it, or the policy refuses PII."""
    return (cloud_served and Tier.CLOUD in policy.allowed) or policy.pii_action == "refuse"


def needs_difficulty(policy: Policy, call: CompletionCall) -> bool:
    return policy.difficulty_routing and call.requested_tier is None


def check(call: CompletionCall, policy: Policy, tokenizer: Any, cloud_served: bool = True) -> Signals:
    """The signals of ``call`` under ``policy`` (sync: inline for short prompts, else on a thread).

    ``cloud_served``: whether the model has a cloud tier for this tenant at all; without one
    the PII scan is skipped (the prompt cannot reach a cloud) and the route says so, which
    keeps a later failover from taking it to a cloud upstream registered meanwhile.
    """
    started = time.perf_counter()
    prompt_tokens = counts_with(tokenizer, call.prompt)
    text = text_of(call)
    report = None
    scanned = needs_pii_scan(policy, cloud_served)
    if scanned:
        from inference.pii import scan
        from inference.redaction import scan_text

        report = scan(scan_text(call))
    difficulty, probs = None, {}
    if needs_difficulty(policy, call):
        from inference.difficulty.classifier import Thresholds, classify, default_classifier

        verdict = classify(text)
        committed = default_classifier().thresholds
        thresholds = Thresholds(
            cloud=policy.cloud_threshold if policy.cloud_threshold is not None else committed.cloud,
            hard=policy.hard_threshold if policy.hard_threshold is not None else committed.hard,
        )
        difficulty, probs = verdict.label_with(thresholds), dict(verdict.probs)
    return Signals(
        requested_tier=call.requested_tier,
        pii_kinds=tuple(sorted(report.kinds)) if report else (),
        pii=report if report else None,
        difficulty=difficulty,
        difficulty_probs=probs,
        prompt_tokens=prompt_tokens,
        max_tokens=call.max_tokens,
        latency_class=call.latency_class,
        logprobs=call.logprobs is not None,
        pii_scanned=scanned,
        check_ms=(time.perf_counter() - started) * 1e3,
    )


async def assess(call: CompletionCall, policy: Policy, tokenizer: Any, cloud_served: bool = True) -> Signals:
    """``check`` from the event loop: a short prompt inline, a long one on a thread.

    ``tokenizer`` (the model's) counts the prompt for the policy's prompt-length rule.
    """
    if len(call.prompt) <= INLINE_CHECK_CHARS:
        return check(call, policy, tokenizer, cloud_served)
    return await asyncio.to_thread(check, call, policy, tokenizer, cloud_served)


def warm_up() -> None:
    """Load the PII detector and the difficulty classifier now, so the first request does not wait for them."""
    from inference.difficulty.classifier import default_classifier
    from inference.pii import default_detector

    default_detector()
    default_classifier()
