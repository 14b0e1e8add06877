"""Whole completions: lossless output, stop conditions, stats, concurrency, bad input."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from speculative.controller import DraftLengthController
from speculative.draft_hf import TransformersDraft
from speculative.engine import SpeculativeEngine
from speculative.errors import ContextOverflowError, InvalidRequestError
from speculative.types import MAX_DRAFT_TOKENS, FinishReason, Provenance, SamplingParams
from speculative.verifier import TransformersVerifier
from tests.speculative.conftest import ByteTokenizer, tiny_llama

PROMPTS = [
    "The Django ORM",
    "To create a new model, ",
    "Middleware is a framework of hooks",
    "def get_queryset(self):",
]


@pytest.fixture(scope="module")
def engines(demo_pair):
    verifier, draft, tokenizer = demo_pair
    spec = SpeculativeEngine(verifier, tokenizer, draft)
    plain = SpeculativeEngine(verifier, tokenizer, None)
    yield spec, plain
    spec.close()
    plain.close()


@pytest.mark.parametrize("k", [None, 1, 4, 8])
def test_greedy_speculative_output_equals_verifier_decoding(engines, k):
    spec, plain = engines
    for prompt in PROMPTS:
        fast = spec.generate(prompt, max_tokens=48, k=k)
        reference = plain.generate(prompt, max_tokens=48)
        assert fast.token_ids == reference.token_ids, prompt
        assert fast.text == reference.text
        assert fast.stats.proposed > 0


def test_concurrent_sessions_joining_mid_batch_stay_lossless(engines):
    spec, plain = engines
    expected = {p: plain.generate(p, max_tokens=40).token_ids for p in PROMPTS}
    results: dict[str, list[int]] = {}

    def run(prompt: str, wait_for: threading.Event | None, signal: threading.Event | None):
        if wait_for is not None:
            wait_for.wait(timeout=30)  # join once the first sessions are mid-stream
        completion = spec.stream(prompt, max_tokens=40, k=3)
        for n, _ in enumerate(completion):
            if signal is not None and n == 5:
                signal.set()
        results[prompt] = completion.token_ids

    first_tokens = threading.Event()
    threads = [
        threading.Thread(target=run, args=(PROMPTS[0], None, first_tokens)),
        threading.Thread(target=run, args=(PROMPTS[1], None, None)),
        threading.Thread(target=run, args=(PROMPTS[2], first_tokens, None)),
        threading.Thread(target=run, args=(PROMPTS[3], first_tokens, None)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected
    assert spec.scheduler.rounds > spec.scheduler.batches  # some rounds really were batched


def test_under_a_governor_cap_every_session_that_drafts_drafts_the_cap(engines, monkeypatch):
    spec, _ = engines
    completion = spec.stream("The Django ORM", max_tokens=64)  # not started: no session is open

    def picks() -> list[int]:
        return [completion._next_k(DraftLengthController(fixed_k=k), 16) for k in (0, 1, 6)]

    monkeypatch.setattr(spec.scheduler.governor, "cap", 3)
    assert picks() == [0, 3, 3]  # a session whose controller will not draft still does not
    monkeypatch.setattr(spec.scheduler.governor, "cap", MAX_DRAFT_TOKENS)
    assert picks() == [0, 1, 6]  # uncapped: each session's own choice
    completion.close()


def test_stats_and_provenance_add_up(engines):
    spec, _ = engines
    completion = spec.stream(PROMPTS[0], max_tokens=30, k=4)
    events = list(completion)
    stats = completion.stats
    assert stats.completion_tokens == 30 == len(events) == len(stats.provenance)
    assert stats.finish_reason is FinishReason.LENGTH
    assert sum(e.provenance is Provenance.DRAFTED for e in events) == stats.accepted
    assert stats.proposed == sum(stats.draft_lengths)
    assert 0.0 < stats.acceptance_rate <= 1.0
    assert stats.draft_ms > 0 and stats.verify_ms > 0
    assert "".join(e.text for e in events) == completion.text


def test_rejections_count_the_rounds_whose_draft_was_cut_short(engines):
    spec, _ = engines
    completion = spec.generate(PROMPTS[1], max_tokens=40, k=4)
    stats = completion.stats
    # each round emits its accepted draft tokens, then one verifier token
    accepted_per_round, run = [], 0
    for source in stats.provenance:
        if source is Provenance.DRAFTED:
            run += 1
        else:
            accepted_per_round.append(run)
            run = 0
    assert len(accepted_per_round) == stats.rounds == len(stats.draft_lengths)
    cut_short = sum(n < k for n, k in zip(accepted_per_round, stats.draft_lengths, strict=True))
    assert stats.rejections == cut_short
    assert 0 < stats.rejections < stats.rounds  # the demo pair both agrees and disagrees here


def test_a_stop_string_ends_the_text_right_before_it(engines):
    spec, plain = engines
    full = plain.generate(PROMPTS[1], max_tokens=40).text
    stop = full[10:14]
    assert stop.strip(), full
    completion = spec.stream(PROMPTS[1], max_tokens=40, stop=[stop])
    streamed = "".join(e.text for e in completion)
    assert completion.text == full[: full.find(stop)] == streamed
    assert completion.stats.finish_reason is FinishReason.STOP


def test_eos_stops_the_completion_and_is_not_in_the_text():
    model = tiny_llama(vocab=64, seed=3)
    prompt = [1, 2, 3, 4]
    reference = SpeculativeEngine(TransformersVerifier("v", model=model, device="cpu"), ByteTokenizer(64), None)
    free_run = reference.generate(prompt, max_tokens=12).token_ids
    reference.close()
    eos = free_run[6]
    first = free_run.index(eos)  # the first time the model produces that token
    model.config.eos_token_id = eos
    engine = SpeculativeEngine(
        TransformersVerifier("v", model=model, device="cpu"),
        ByteTokenizer(64),
        TransformersDraft("d", model=tiny_llama(vocab=64, seed=4), device="cpu"),
    )
    completion = engine.generate(prompt, max_tokens=12, k=3)
    engine.close()
    assert completion.stats.finish_reason is FinishReason.STOP
    assert completion.token_ids == free_run[:first]
    assert completion.stats.completion_tokens == first + 1  # EOS was generated, so it counts


def test_closing_a_stream_releases_its_sessions(engines):
    spec, _ = engines
    completion = spec.stream(PROMPTS[2], max_tokens=100, k=4)
    taken = [next(completion) for _ in range(5)]
    completion.close()
    assert len(taken) == 5
    assert completion.stats.completion_tokens >= 5
    assert spec.verifier.open_sessions == 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"prompt": "", "max_tokens": 8}, InvalidRequestError),
        ({"prompt": [], "max_tokens": 8}, InvalidRequestError),
        ({"prompt": "hi", "max_tokens": 0}, InvalidRequestError),
        ({"prompt": "hi", "max_tokens": -3}, InvalidRequestError),
        ({"prompt": "hi", "max_tokens": 8, "k": -1}, InvalidRequestError),
        ({"prompt": "hi", "max_tokens": 8, "k": 99}, InvalidRequestError),
        ({"prompt": "hi", "max_tokens": 8, "stop": [""]}, InvalidRequestError),
        ({"prompt": "hi", "max_tokens": 8, "sampling": SamplingParams(temperature=-1)}, InvalidRequestError),
        ({"prompt": "word " * 2000, "max_tokens": 8}, ContextOverflowError),
        ({"prompt": "hi", "max_tokens": 5000}, ContextOverflowError),
    ],
)
def test_bad_requests_are_clear_errors_and_open_nothing(engines, kwargs, error):
    spec, _ = engines
    prompt = kwargs.pop("prompt")
    with pytest.raises(error):
        spec.stream(prompt, **kwargs)
    assert spec.verifier.open_sessions == 0


def test_seeded_sampling_is_reproducible(engines):
    spec, _ = engines
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=42)
    a = spec.generate(PROMPTS[0], max_tokens=30, sampling=params, k=4)
    b = spec.generate(PROMPTS[0], max_tokens=30, sampling=params, k=4)
    assert a.token_ids == b.token_ids


def _exact_two_token_distribution(model, prompt: list[int], temperature: float) -> np.ndarray:
    """P(t1, t2 | prompt) of the verifier alone, by enumeration: (vocab, vocab)."""
    with torch.no_grad():
        p1 = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        vocab = p1.numel()
        rows = torch.tensor([[*prompt, t] for t in range(vocab)])
        p2 = torch.softmax(model(input_ids=rows).logits[:, -1] / temperature, -1)
    return (p1.unsqueeze(1) * p2).double().numpy()


def test_sampled_output_follows_the_verifier_distribution():
    """Chi-square on a 6-token vocabulary: speculative samples of (t1, t2) ~ verifier alone."""
    vocab, runs, temperature = 6, 1500, 1.0
    verifier_model = tiny_llama(vocab=vocab, hidden=32, layers=1, seed=1)
    draft_model = tiny_llama(vocab=vocab, hidden=32, layers=1, seed=2)  # disagrees often
    engine = SpeculativeEngine(
        TransformersVerifier("v", model=verifier_model, device="cpu"),
        ByteTokenizer(vocab),
        TransformersDraft("d", model=draft_model, device="cpu"),
    )
    prompt = [1, 2, 3]
    counts: Counter[tuple[int, int]] = Counter()
    accepted = 0
    for seed in range(runs):
        completion = engine.generate(prompt, max_tokens=2, sampling=SamplingParams(temperature, seed=seed), k=2)
        counts[tuple(completion.token_ids)] += 1
        accepted += completion.stats.accepted
    engine.close()
    assert accepted > 0  # the draft was really used
    exact = _exact_two_token_distribution(verifier_model, prompt, temperature).reshape(-1)
    observed = np.array([counts[(i // vocab, i % vocab)] for i in range(vocab * vocab)], dtype=float)
    # pool rare cells so every expected count is at least 5 (chi-square's usual condition)
    order = np.argsort(exact)
    keep = order[exact[order] * runs >= 5]
    pooled = order[exact[order] * runs < 5]
    obs = np.append(observed[keep], observed[pooled].sum())
    exp = np.append(exact[keep], exact[pooled].sum()) * runs
    assert chisquare(obs, exp / exp.sum() * obs.sum()).pvalue > 1e-3


def test_token_cost_shares_add_up_to_the_completions_verifier_time(engines):
    spec, _ = engines
    completion = spec.stream(PROMPTS[2], max_tokens=25, k=3)
    events = list(completion)
    stats = completion.stats
    assert stats.prefill_ms > 0
    assert sum(e.gpu_ms for e in events) == pytest.approx(stats.gpu_ms)
    assert events[0].gpu_ms >= stats.prefill_ms  # the prompt's prefill rides on the first token
    # drafted shares sum to what was proposed in the rounds whose tokens were all emitted
    assert sum(e.drafted for e in events) == pytest.approx(stats.proposed, abs=16)
    assert all(e.gpu_ms > 0 for e in events)


def test_a_stream_cut_off_mid_round_carries_only_the_delivered_tokens_shares(engines):
    spec, _ = engines
    completion = spec.stream(PROMPTS[0], max_tokens=40, k=6)
    delivered = [next(completion) for _ in range(7)]
    completion.close()
    # the stats saw every round that ran; the delivered tokens carry no more than that
    assert sum(e.gpu_ms for e in delivered) <= completion.stats.gpu_ms + 1e-9
    # every accepted draft token carries one drafted token: accepted never exceeds drafted
    for n in range(1, len(delivered) + 1):
        accepted = sum(e.provenance is Provenance.DRAFTED for e in delivered[:n])
        assert sum(e.drafted for e in delivered[:n]) >= accepted
    assert len(delivered) == 7 and completion.stats.completion_tokens == 7


def test_edge_engine_decodes_with_the_draft_alone_exactly_as_hf_greedy_does(demo_paths, demo_pair):
    from transformers import AutoModelForCausalLM

    from speculative.edge import EdgeEngine

    _, _, tokenizer = demo_pair
    model = AutoModelForCausalLM.from_pretrained(demo_paths["draft_hf"], dtype=torch.float32).eval()
    edge = EdgeEngine(TransformersDraft(demo_paths["draft_hf"], model=model), tokenizer, tokenizer.eos_token_id)
    for prompt in PROMPTS[:2]:
        completion = edge.generate(prompt, max_tokens=20, k=5)  # k is meaningless without a verifier
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20)
        assert completion.token_ids == expected[0, ids.shape[1] :].tolist()[: len(completion.token_ids)]
        assert set(completion.stats.provenance) == {Provenance.EDGE}
        assert completion.stats.gpu_ms == 0.0


def test_edge_engine_respects_stop_strings_and_max_tokens(demo_pair):
    from speculative.edge import EdgeEngine

    _, draft, tokenizer = demo_pair
    edge = EdgeEngine(draft, tokenizer, tokenizer.eos_token_id)
    full = edge.generate(PROMPTS[1], max_tokens=30)
    assert full.stats.completion_tokens <= 30
    stop = full.text[8:11]
    assert stop.strip(), full.text
    cut = edge.generate(PROMPTS[1], max_tokens=30, stop=[stop])
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.stats.finish_reason is FinishReason.STOP
