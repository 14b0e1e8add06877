"""The GPU benchmark's cost-side pieces: emulated acceptance and the random 8B-shaped stand-in."""

from __future__ import annotations

import pytest
import torch

from speculative.bench_gpu import EmulatedAcceptanceVerifier, random_llama
from speculative.types import SamplingParams
from speculative.verifier import VerifyRequest
from tests.speculative.conftest import tiny_llama


def _rounds(verifier, k: int, rounds: int) -> list[int]:
    verifier.open_session("s", [1, 2, 3], SamplingParams())
    accepted = []
    for r in range(rounds):
        verdict = verifier.verify([VerifyRequest("s", tuple(range(5, 5 + k)), None, r)]).verdicts[0]
        accepted.append(verdict.n_matches)
    verifier.close_session("s")
    return accepted


@pytest.mark.parametrize("rate, expected", [(0.0, 0), (1.0, 3)])
def test_emulated_acceptance_at_the_extremes_accepts_nothing_or_everything(rate, expected):
    verifier = EmulatedAcceptanceVerifier("tiny", model=tiny_llama(vocab=64), device="cpu", acceptance=rate)
    assert _rounds(verifier, k=3, rounds=5) == [expected] * 5


def test_emulated_acceptance_follows_its_rate_per_token_and_keeps_the_cache_consistent():
    verifier = EmulatedAcceptanceVerifier("tiny", model=tiny_llama(vocab=64), device="cpu", acceptance=0.7, seed=3)
    accepted = _rounds(verifier, k=4, rounds=40)
    # the per-token rate as the benchmark reports it: accepted / (accepted + rounds cut short)
    cut_short = sum(n < 4 for n in accepted)
    assert 0.55 < sum(accepted) / (sum(accepted) + cut_short) < 0.85
    # every round moved the session forward by what it accepted plus the verifier's token
    verifier.open_session("t", [1, 2, 3], SamplingParams())
    before = verifier._sessions["t"].length
    verdict = verifier.verify([VerifyRequest("t", (9, 9), None, 0)]).verdicts[0]
    assert verifier._sessions["t"].length == before + 1 + verdict.n_matches


def test_the_random_stand_in_only_ever_emits_ids_the_draft_can_read():
    model = random_llama("tiny", vocab_used=100, device=torch.device("cpu"))
    assert model.config.vocab_size > 100
    assert all(torch.isfinite(p).all() for p in model.parameters())  # initialised, no garbage
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 100, (4, 12))).logits
    assert int(logits.argmax(-1).max()) < 100
