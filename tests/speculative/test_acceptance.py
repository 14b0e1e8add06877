"""The acceptance rules, checked exactly (greedy) and statistically (sampling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from speculative.acceptance import accept_greedy, accept_sampling


@given(
    target=st.lists(st.integers(0, 5), min_size=1, max_size=9),
    draft_seed=st.lists(st.integers(0, 5), min_size=0, max_size=8),
)
def test_greedy_accepts_exactly_the_longest_agreeing_prefix(target, draft_seed):
    k = min(len(draft_seed), len(target) - 1)
    draft = draft_seed[:k]
    verdict = accept_greedy(torch.tensor(draft, dtype=torch.long), torch.tensor(target[: k + 1]))
    n = 0
    while n < k and draft[n] == target[n]:
        n += 1
    assert verdict.n_matches == n
    assert verdict.verifier_token == target[n]


def test_greedy_with_no_draft_is_plain_argmax_decoding():
    verdict = accept_greedy(torch.zeros(0, dtype=torch.long), torch.tensor([3]))
    assert (verdict.n_matches, verdict.verifier_token) == (0, 3)


def _expected(probs: torch.Tensor, n: int) -> np.ndarray:
    exact = probs.double().numpy()
    return exact / exact.sum() * n


def _random_dist(gen: torch.Generator, vocab: int, rows: int) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, vocab, generator=gen) * 1.5, dim=-1)


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_rule_emits_tokens_distributed_as_the_verifier(k):
    """Whatever q is, the first emitted token follows p[0] (Leviathan et al. 2023, Thm 1)."""
    vocab, trials = 6, 20000
    gen = torch.Generator().manual_seed(7)
    p = _random_dist(gen, vocab, k + 1)
    q = _random_dist(gen, vocab, k)
    counts = np.zeros(vocab)
    second = np.zeros(vocab)  # second emitted token, given the first was draft token x0 = 0
    n_second = 0
    rng = torch.Generator().manual_seed(11)
    for _ in range(trials):
        draft = torch.stack([torch.multinomial(q[i], 1, generator=rng)[0] for i in range(k)])
        verdict = accept_sampling(draft, q, p, rng)
        emitted = draft[: verdict.n_matches].tolist() + [verdict.verifier_token]
        counts[emitted[0]] += 1
        if k > 1 and emitted[0] == 0 and verdict.n_matches >= 1:
            second[emitted[1]] += 1
            n_second += 1
    assert chisquare(counts, _expected(p[0], trials)).pvalue > 1e-3
    if k > 1 and n_second > 500:
        # positions are verified independently of the prefix here, so x1 | x0 also follows p[1]
        assert chisquare(second, _expected(p[1], n_second)).pvalue > 1e-3


def test_rejection_rule_always_accepts_when_draft_equals_verifier():
    gen = torch.Generator().manual_seed(3)
    p = _random_dist(gen, 8, 4)
    draft = torch.tensor([1, 2, 3])
    for _ in range(50):
        assert accept_sampling(draft, p[:3], p, gen).n_matches == 3


def test_recovered_token_is_never_a_token_the_draft_overweights():
    """On rejection the residual norm(max(0, p - q)) has no mass where q >= p."""
    p = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[0.0, 0.1, 0.9]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        verdict = accept_sampling(torch.tensor([2]), q, p, gen)
        assert verdict.n_matches == 0  # p(2) = 0: always rejected
        assert verdict.verifier_token in (0, 1)
        assert q[0, verdict.verifier_token] < p[0, verdict.verifier_token]
    # Tokens the verifier likes (p > 0) but the draft overweights (q >= p): token 1 (q == p)
    # and token 2 (q > p, the drafted one). The residual is (0.4, 0, 0), so every recovered
    # token is 0; recovering from p itself (a classic bug) would give 1 or 2 half the time.
    p = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[0.1, 0.3, 0.6]])
    rejections = 0
    for _ in range(200):
        verdict = accept_sampling(torch.tensor([2]), q, p, gen)
        if verdict.n_matches == 0:  # rejected: probability 1 - p(2)/q(2) = 2/3
            rejections += 1
            assert q[0, verdict.verifier_token] < p[0, verdict.verifier_token], verdict
            assert verdict.verifier_token == 0
    assert rejections > 100  # the rejection path really ran (about 133 of 200 expected)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 4), st.integers(0, 10_000))
def test_sampling_verdict_is_well_formed(k, seed):
    gen = torch.Generator().manual_seed(seed)
    p = _random_dist(gen, 5, k + 1)
    q = _random_dist(gen, 5, k)
    draft = torch.tensor([int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)], dtype=torch.long)
    verdict = accept_sampling(draft, q, p, gen)
    assert 0 <= verdict.n_matches <= k
    assert 0 <= verdict.verifier_token < 5


def test_the_plain_id_greedy_rule_gives_the_tensor_rules_verdict():
    from speculative.acceptance import accept_greedy_ids

    rng = torch.Generator().manual_seed(5)
    for k in (0, 1, 2, 4, 8):
        for _ in range(50):
            draft = torch.randint(0, 3, (k,), generator=rng)  # a 3-token vocabulary: many matches, some misses
            argmax = torch.randint(0, 3, (k + 1,), generator=rng)
            assert accept_greedy_ids(draft.tolist(), argmax.tolist()) == accept_greedy(draft, argmax)
