"""Turning logits into the distribution a token is drawn from.

One function, :func:`warp`, applies temperature, top-k and top-p. The draft's ``q`` and
the verifier's ``p`` both go through it, so the rejection rule compares like with like
(speculative sampling is lossless with respect to the *warped* verifier distribution).
"""

from __future__ import annotations

import torch

# check_sampling lives with SamplingParams (no torch, so the cloud tier checks without importing it)
from speculative.types import SamplingParams, check_sampling  # noqa: F401

ARGMAX_BELOW_TEMPERATURE = 1e-20  # a temperature this small samples the top token with probability 1


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p.

    logits  # (..., vocab) float
    returns # (..., vocab) float32, each row sums to 1
    """
    assert not params.greedy, "greedy decoding uses argmax, not probabilities"
    scores = logits.float()
    if params.temperature < ARGMAX_BELOW_TEMPERATURE:
        # float32 cannot divide by it (below ~1e-38 it rounds to 0: a NaN softmax); at such a
        # temperature the distribution is the argmax to the last bit anyway
        top = scores.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(scores).scatter_(-1, top, 1.0)
    # Shifted so the top score is 0 before dividing (softmax is shift-invariant): a small temperature
    # then sends the others to -inf instead of every score to inf (a NaN softmax).
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k and params.top_k < scores.size(-1):
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        # drop a token when the tokens ranked above it already cover top_p; keep the first
        drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= params.top_p
        drop_sorted[..., 0] = False  # the top token always stays (a top_p so small it rounds to 0 kept none)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.softmax(scores, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from ``probs  # (vocab,)``."""
    return int(torch.multinomial(probs, 1, generator=generator).item())
