"""Logit warping: one function shapes both p and q."""

from __future__ import annotations

import pytest
import torch

from speculative.errors import InvalidRequestError
from speculative.sampling import check_sampling, warp
from speculative.types import SamplingParams


def test_temperature_one_is_plain_softmax():
    logits = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(warp(logits, SamplingParams(temperature=1.0)), torch.softmax(logits, -1))


def test_top_k_keeps_only_the_k_most_likely():
    probs = warp(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), SamplingParams(temperature=1.0, top_k=2))
    assert probs[0, 0] == 0 and probs[0, 2] == 0
    assert torch.isclose(probs.sum(), torch.tensor(1.0))


def test_top_p_keeps_the_smallest_set_covering_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = warp(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert probs[2] == 0 and probs[3] == 0
    assert torch.allclose(probs[:2], torch.tensor([0.625, 0.375]))
    top1 = warp(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert top1[0] == 1.0  # the most likely token always survives


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-40),
        SamplingParams(temperature=1.0, top_p=1e-50),
        SamplingParams(temperature=1e-30, top_p=1e-45),
    ],
    ids=["tiny temperature", "tiny top_p", "both"],
)
def test_extreme_but_valid_sampling_keeps_the_top_token_and_never_yields_nan(params):
    # found by fuzzing the API: 1e-40 overflowed every score to inf (a NaN softmax), a top_p that
    # rounds to 0 dropped every token; torch.multinomial then raised and the client got a 502
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-3]])
    probs = warp(logits, params)
    assert not torch.isnan(probs).any() and probs[0, 1] == 1.0
    assert int(torch.multinomial(probs[0], 1).item()) == 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=-0.1),
        SamplingParams(temperature=float("nan")),
        SamplingParams(temperature=1.0, top_k=-1),
        SamplingParams(temperature=1.0, top_p=0.0),
        SamplingParams(temperature=1.0, top_p=1.5),
    ],
)
def test_meaningless_sampling_values_are_refused(params):
    with pytest.raises(InvalidRequestError):
        check_sampling(params)
