"""Acceptance rules: which drafted tokens the verifier keeps, and the token it adds.

Greedy: accept the longest prefix on which the draft agrees with the verifier's argmax,
then emit the verifier's own argmax at the first disagreement (or after the last draft
token: the bonus token). The output is exactly greedy verifier decoding.

Sampling: the speculative sampling rule of Leviathan et al. 2023 ("Fast Inference from
Transformers via Speculative Decoding", Algorithm 1) and Chen et al. 2023 ("Accelerating
Large Language Model Decoding with Speculative Sampling", Algorithm 2). Draft token x_i,
drawn from q_i, is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first
rejection the recovered token is drawn from norm(max(0, p_i - q_i)); if all k are
accepted a bonus token is drawn from p_k. Every emitted token is then distributed
exactly as p, whatever q is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from speculative.sampling import sample
from speculative.types import Verdict


def accept_greedy(draft_tokens: torch.Tensor, target_argmax: torch.Tensor) -> Verdict:
    """draft_tokens   # (k,) long
    target_argmax  # (k + 1,) long: the verifier's argmax after the prefix and each draft token
    """
    k = draft_tokens.size(0)
    assert target_argmax.shape == (k + 1,), f"{tuple(target_argmax.shape)} != ({k + 1},)"
    mismatch = (draft_tokens != target_argmax[:k]).nonzero()
    n_matches = int(mismatch[0, 0]) if mismatch.numel() else k
    return Verdict(n_matches=n_matches, verifier_token=int(target_argmax[n_matches]))


def accept_greedy_ids(draft_tokens: Sequence[int], target_argmax: Sequence[int]) -> Verdict:
    """``accept_greedy`` on plain ids: the same verdict without a tensor (llama.cpp's verifier, a few ids a row)."""
    k = len(draft_tokens)
    assert len(target_argmax) == k + 1, f"{len(target_argmax)} != {k + 1}"
    n_matches = next((i for i, (d, t) in enumerate(zip(draft_tokens, target_argmax, strict=False)) if d != t), k)
    return Verdict(n_matches=n_matches, verifier_token=int(target_argmax[n_matches]))


def accept_sampling(
    draft_tokens: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator
) -> Verdict:
    """draft_tokens  # (k,) long, x_i ~ q_i
    q             # (k, vocab) float: the draft's warped distributions
    p             # (k + 1, vocab) float: the verifier's warped distributions
    """
    k = draft_tokens.size(0)
    assert q.shape[0] == k and p.shape[0] == k + 1 and p.shape[1] == q.shape[1], (q.shape, p.shape)
    if k:
        idx = torch.arange(k)
        p_x = p[idx, draft_tokens]
        q_x = q[idx, draft_tokens]
        # r_i < p/q  <=>  accept with probability min(1, p/q); q_x > 0 since x was drawn from q
        r = torch.rand(k, generator=generator, dtype=p.dtype)
        rejected = (r * q_x > p_x).nonzero()
        if rejected.numel():
            n_matches = int(rejected[0, 0])
            residual = (p[n_matches] - q[n_matches]).clamp_min(0)
            total = residual.sum()
            # p == q exactly leaves no residual mass; rejection then has probability 0, but
            # guard float round-off by falling back to p itself
            probs = residual / total if total > 0 else p[n_matches]
            return Verdict(n_matches=n_matches, verifier_token=sample(probs, generator))
    return Verdict(n_matches=k, verifier_token=sample(p[k], generator))
