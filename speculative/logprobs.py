"""Log-probabilities of emitted tokens, read off the logits of the model that served them.

One function, :func:`token_logprobs`, turns a stack of logit rows and the token chosen at
each into :class:`~speculative.types.TokenLogprob` values: ``log_softmax`` of the raw
logits (temperature 1, before top-k/top-p; see ``TokenLogprob``), the chosen token's value
and the top N, computed where the logits are and copied to the host once. The verifier
calls it once per batch for every session that asked, the draft once per token on the edge
tier. Nothing here runs unless a request asks (``logprobs`` is None by default).
"""

from __future__ import annotations

import torch

# check_logprobs lives with the types (no torch), re-exported here
from speculative.types import MAX_TOP_LOGPROBS, MIN_LOGPROB, TokenLogprob, check_logprobs  # noqa: F401

# token ids travel through the one host copy as float64, exact below 2**53
_MAX_EXACT_ID = 2**53


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability and its ``top_n`` most likely tokens.

    logits  # (n, vocab) float, any dtype, on the model's device
    tokens  # (n,) long, on the same device: the token emitted after each row
    returns # n TokenLogprob, each with min(top_n, vocab) alternatives, highest first
    """
    n, vocab = logits.shape
    assert tokens.shape == (n,), f"{tuple(tokens.shape)} != ({n},)"
    assert 0 <= top_n <= MAX_TOP_LOGPROBS and vocab < _MAX_EXACT_ID
    logp = torch.log_softmax(logits.float(), dim=-1).clamp_min(MIN_LOGPROB)  # (n, vocab)
    parts = [logp.gather(-1, tokens.unsqueeze(-1)).double()]  # (n, 1)
    top_n = min(top_n, vocab)
    if top_n:
        top = torch.topk(logp, top_n, dim=-1)  # sorted, highest first
        parts += [top.values.double(), top.indices.double()]  # (n, top_n) each
    rows = torch.cat(parts, dim=-1).cpu().tolist()  # the one device-to-host copy: (n, 1 + 2 * top_n)
    return [
        TokenLogprob(
            row[0],
            tuple((int(token), value) for value, token in zip(row[1 : 1 + top_n], row[1 + top_n :], strict=True)),
        )
        for row in rows
    ]


def truncate_top(entry: TokenLogprob, top_n: int) -> TokenLogprob:
    """``entry`` with only its ``top_n`` best alternatives (a batch computes the most any row asked)."""
    return entry if len(entry.top) <= top_n else TokenLogprob(entry.logprob, entry.top[:top_n])
