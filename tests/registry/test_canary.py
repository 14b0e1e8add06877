"""The canary's figures and verdict: per-token acceptance from the ledger, and each rule that rolls a draft back.

The controller chooses draft lengths from the machine's timings, so two drafts that agree
with the verifier equally often can show very different accepted / drafted ratios (a long
draft is cut short with more tokens left unused). The canary compares per-token
acceptance instead: accepted / (accepted + rounds cut short).
"""

from __future__ import annotations

import dataclasses
import random
from decimal import Decimal

import pytest
from django.utils import timezone

from registry.models import Rollout
from registry.selectors import ServingFigures, serving_figures
from registry.services import (
    CANARY_MAX_ERROR_RISE,
    CANARY_MAX_TTFT_RATIO,
    CANARY_TTFT_MIN_SAMPLES,
    CANARY_TTFT_SLACK_MS,
    canary_verdict,
)
from tests.dashboards.ledger import insert, make_row

pytestmark = pytest.mark.django_db

MODEL = "tandem-test"


@pytest.fixture
def ledger(account, price_book):
    """Write one speculative completion of ``version`` per (draft length, accepted) round, counted as the tally does."""

    def write(version: str, rounds: list[tuple[int, int]]) -> None:
        rng = random.Random(version)
        rows = [
            make_row(
                rng,
                tenant=account.tenant,
                at=timezone.now(),
                price_book=price_book,
                users=[account.user],
                keys=[account.api_key],
                route_tier="speculative",
                source="generation",
                outcome="completed",
                model=MODEL,
                draft_version=version,
                drafted_tokens=Decimal(k),
                accepted_tokens=accepted,
                draft_rejections=int(accepted < k),
                completion_tokens=accepted + 1,
            )
            for k, accepted in rounds
        ]
        insert(rows)

    return write


def test_two_drafts_that_agree_equally_often_have_the_same_acceptance_whatever_their_draft_lengths(ledger):
    # per position each draft's token is accepted with p = 3/4: short drafts of 2 and long ones of 8
    short = [(2, 2)] * 9 + [(2, 1)] * 3 + [(2, 0)]  # 21 accepted of 26 drafted, 4 rounds cut short
    long = [(8, 3)] * 5 + [(8, 8)]  # 23 accepted of 48 drafted, 5 rounds cut short
    ledger("short@1", short)
    ledger("long@1", long)
    a = serving_figures(model=MODEL, version="short@1")
    b = serving_figures(model=MODEL, version="long@1")
    assert a.completions == len(short) and b.completions == len(long)
    assert a.acceptance == pytest.approx(21 / 25) and b.acceptance == pytest.approx(23 / 28)
    # accepted / drafted would have called the long draft 40% worse: 23/48 against 21/26
    assert canary_verdict(Rollout(max_canary_drop=Decimal("0.1")), b, a) == []


def test_a_version_that_drafted_nothing_has_no_acceptance(ledger):
    ledger("idle@1", [(0, 0)] * 3)
    figures = serving_figures(model=MODEL, version="idle@1")
    assert figures.completions == 3 and figures.acceptance is None


def figures(**over) -> ServingFigures:
    values = {"version": "v", "completions": 50, "acceptance": 0.8, "error_rate": 0.0, "ttft_ms": 40.0, "tokens": 900}
    return ServingFigures(**{**values, **over})


@pytest.mark.parametrize(
    ("candidate", "worse"),
    [
        (figures(), None),
        (figures(acceptance=0.8 * 0.9 + 0.001), None),  # within max_canary_drop (0.1)
        (figures(acceptance=0.8 * 0.9 - 0.001), "acceptance"),
        (figures(acceptance=None), "acceptance"),  # a draft the controller stopped using
        (figures(error_rate=CANARY_MAX_ERROR_RISE), None),
        (figures(error_rate=CANARY_MAX_ERROR_RISE + 0.001), "error rate"),
        (figures(ttft_ms=40.0 * CANARY_MAX_TTFT_RATIO + CANARY_TTFT_SLACK_MS), None),
        (figures(ttft_ms=40.0 * CANARY_MAX_TTFT_RATIO + CANARY_TTFT_SLACK_MS + 0.1), "mean TTFT"),
    ],
)
def test_each_rule_of_the_canary_verdict(candidate, worse):
    reasons = canary_verdict(Rollout(max_canary_drop=Decimal("0.1")), candidate, figures())
    if worse is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and reasons[0].startswith(worse), reasons


def test_first_token_times_are_judged_only_over_enough_completions():
    slow = figures(ttft_ms=99.0)
    few = CANARY_TTFT_MIN_SAMPLES - 1
    rollout = Rollout(max_canary_drop=Decimal("0.1"))
    assert canary_verdict(rollout, dataclasses.replace(slow, completions=few), figures(ttft_ms=34.4)) == []
    enough = dataclasses.replace(slow, completions=CANARY_TTFT_MIN_SAMPLES)
    assert canary_verdict(rollout, enough, figures(ttft_ms=34.4, completions=few)) == []  # both sides need them
    [reason] = canary_verdict(rollout, enough, figures(ttft_ms=34.4, completions=CANARY_TTFT_MIN_SAMPLES))
    assert reason.startswith("mean TTFT")
