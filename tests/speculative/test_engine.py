"""Whole completions: lossless output, stop conditions, stats, concurrency, bad input."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from speculative.controller import PROBE_EVERY, DraftLengthController
from speculative.draft_hf import TransformersDraft
from speculative.engine import SpeculativeEngine
from speculative.errors import ContextOverflowError, InvalidRequestError
from speculative.governor import SpeculationGovernor
from speculative.types import MAX_DRAFT_TOKENS, FinishReason, Provenance, SamplingParams, TokenEvent, TokenRun
from speculative.verifier import TransformersVerifier
from tests.speculative.conftest import ByteTokenizer, tiny_llama

PROMPTS = [
    "The Django ORM",
    "To create a new model, ",
    "Middleware is a framework of hooks",
    "def get_queryset(self):",
]


@pytest.fixture(scope="module")
def engines(demo_pair_any):
    """(speculative, plain) engines on one verifier backend; every test taking them runs on both."""
    verifier, draft, tokenizer = demo_pair_any
    spec = SpeculativeEngine(verifier, tokenizer, draft)
    plain = SpeculativeEngine(verifier, tokenizer, None, scheduler=spec.scheduler)  # one thread calls the model
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
        # a pinned k drafts every round; left to the controller, a backend where drafting does not pay
        # (the demo pair on llama.cpp, once its finished sessions have measured that) may not draft at all
        assert fast.stats.proposed > 0 or k is None


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


def test_under_a_governor_cap_every_session_that_drafts_drafts_the_cap_and_a_lone_one_does(engines, monkeypatch):
    spec, _ = engines
    completion = spec.stream("The Django ORM", max_tokens=64)  # not started: no session is open

    def picks() -> list[int]:
        return [completion._next_k(DraftLengthController(fixed_k=k), 16) for k in (0, 1, 6)]

    monkeypatch.setattr(spec.scheduler.governor, "cap_for", lambda active: 3)
    assert picks() == [0, 3, 3]  # a session whose controller will not draft still does not, beside others
    monkeypatch.setattr(spec.scheduler, "load", lambda: 1)
    assert picks() == [3, 3, 3]  # alone, it drafts the cap: the arm the governor measures is its run of rounds
    monkeypatch.setattr(spec.scheduler, "load", lambda: 2)
    monkeypatch.setattr(spec.scheduler.governor, "cap_for", lambda active: MAX_DRAFT_TOKENS)
    assert picks() == [0, 1, 6]  # uncapped: each session's own choice
    completion.close()


def test_under_a_cap_of_zero_the_controller_is_not_asked_and_backs_off_no_probe(engines, monkeypatch):
    spec, _ = engines
    completion = spec.stream("The Django ORM", max_tokens=64)  # not started: no session is open
    controller = DraftLengthController(t_draft=0.2, verify_by_k={0: 1.0}, accepted=0.0, tried=10.0)
    monkeypatch.setattr(spec.scheduler.governor, "cap_for", lambda active: 0)
    assert [completion._next_k(controller, 16) for _ in range(4 * PROBE_EVERY)] == [0] * (4 * PROBE_EVERY)
    assert controller._probe_every == PROBE_EVERY  # its probes were never cancelled: none counted as failed
    pinned = spec.stream("The Django ORM", max_tokens=64, k=3)
    assert pinned._next_k(DraftLengthController(fixed_k=3), 16) == 3  # a pinned k is the caller's, cap or not
    completion.close()
    pinned.close()


def test_a_session_teaches_the_load_it_ran_at(engines, monkeypatch):
    spec, _ = engines
    verifier, draft = spec.verifier, spec.draft
    fresh = SpeculativeEngine(verifier, spec.tokenizer, draft, scheduler=spec.scheduler)  # nothing measured
    # nor by the shared scheduler's governor, which caps a lone session too: earlier tests may have taught it cap 0
    monkeypatch.setattr(spec.scheduler, "governor", SpeculationGovernor())
    completion = fresh.generate(PROMPTS[0], max_tokens=24)
    assert completion.stats.proposed > 0  # a first guess drafts, and so measures
    assert set(fresh.controller_priors._by_bucket) == {1}  # a lone session's costs are a lone session's
    assert fresh.controller_priors.at(1).t_draft is not None
    deadline = time.monotonic() + 10
    while spec.scheduler.governor._start is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spec.scheduler.governor._start is None  # the scheduler, with nothing left to run, told its governor


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
    kwargs = dict(kwargs)  # the case's dict is shared by both backends' runs
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


# Sampling is lossless: speculative output ~ the verifier alone -----------------------------------
SAMPLED_VOCAB = 4  # 4 tokens of a 4-token vocabulary: 256 sequences, few enough to enumerate and fill
SAMPLED_TOKENS = 4  # the whole completion: one round drafting 3 tokens, then whatever rounds remain
SAMPLED_K = 3  # drafts at positions 0, 1, 2: acceptance, rejection and recovery at every one, and the bonus
SAMPLED_RUNS = 1000
# A correct engine fails a case with probability 1e-9 (what the threshold means; the seeds are
# fixed, so the outcome itself is the same every run). At 1000 runs, 1e-9 still catches with
# probability >= 0.99 any bias whose chi-square distance sum((b - p)^2 / p) from the verifier's
# distribution is >= 0.10 (top-k: 16 cells, 15 degrees of freedom) to 0.15 (plain and top-p:
# 64 and 67 cells after pooling), from the noncentral chi-square with lambda = 1000 * distance;
# for scale, moving 0.1 of probability from a sequence of 0.2 to one of 0.1 is 0.15. Measured
# with these seeds, three classic acceptance bugs patched into the verifier give p-values of
# (plain, top-k, top-p):
#   recovered token drawn from p instead of norm(max(0, p - q)):  7e-9, 5e-64, 9e-57
#   bonus token drawn from p[k - 1] instead of p[k]:              2e-15, 5e-101, 3e-39
#   every position's ratio taken against q[0] (a later-position bug): 7e-20, 6e-60, 5e-38
# so each is caught by at least two cases (the plain case alone misses the first at 1e-9); the
# bonus bug (top-k, top-p) and the q[0] bug (top-k) also emit sequences the verifier gives
# probability 0, which fails at once (asserted separately).
SAMPLED_P_THRESHOLD = 1e-9


@pytest.fixture
def one_torch_thread():
    """Tiny matrices: torch's second thread only contends with the other processes (twice as fast alone)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _warped_by_hand(logits: torch.Tensor, params: SamplingParams) -> np.ndarray:
    """softmax(logits / T), cut to the top_k tokens, then to the smallest head covering top_p, renormalised.

    Written apart from ``speculative.sampling.warp`` so that the reference does not share its bugs.
    logits  # (rows, vocab) -> (rows, vocab) float64
    """
    out = np.zeros(tuple(logits.shape))
    for row, scores in enumerate(logits.double().numpy() / params.temperature):
        order = np.argsort(-scores, kind="stable")
        kept = order[: params.top_k] if params.top_k else order
        probs = np.exp(scores[kept] - scores[kept].max())
        probs /= probs.sum()
        if params.top_p < 1.0:
            covered_before = np.cumsum(probs) - probs  # the mass of the tokens ranked above each one
            head = covered_before < params.top_p
            kept, probs = kept[head], probs[head] / probs[head].sum()
        out[row, kept] = probs
    return out


def _exact_sequence_distribution(model, prompt: list[int], params: SamplingParams, length: int) -> np.ndarray:
    """P(t1 .. t_length | prompt) of the verifier alone, by enumeration: (vocab ** length,), t1 most significant."""
    joint = np.ones(1)
    prefixes: list[tuple[int, ...]] = [()]
    with torch.no_grad():
        for _ in range(length):
            rows = torch.tensor([[*prompt, *prefix] for prefix in prefixes])
            probs = _warped_by_hand(model(input_ids=rows).logits[:, -1], params)  # (len(prefixes), vocab)
            joint = (joint[:, None] * probs).reshape(-1)
            prefixes = [(*prefix, t) for prefix in prefixes for t in range(probs.shape[1])]
    return joint


@pytest.mark.parametrize(
    "params",
    [SamplingParams(1.0), SamplingParams(1.0, top_k=2), SamplingParams(1.0, top_p=0.8)],
    ids=["temperature", "top_k", "top_p"],
)
def test_sampled_output_follows_the_verifier_distribution(params, one_torch_thread):
    """Chi-square over whole 4-token completions drafted 3 at a time: speculative samples ~ verifier alone."""
    vocab, runs = SAMPLED_VOCAB, SAMPLED_RUNS
    verifier_model = tiny_llama(vocab=vocab, hidden=32, layers=1, seed=1)
    draft_model = tiny_llama(vocab=vocab, hidden=32, layers=1, seed=2)  # disagrees often
    engine = SpeculativeEngine(
        TransformersVerifier("v", model=verifier_model, device="cpu"),
        ByteTokenizer(vocab),
        TransformersDraft("d", model=draft_model, device="cpu"),
    )
    prompt = [1, 2, 3]
    observed = np.zeros(vocab**SAMPLED_TOKENS)
    first_round_matches = np.zeros(SAMPLED_K + 1, dtype=int)  # runs whose first round accepted n drafts
    try:
        for seed in range(runs):
            sampling = dataclasses.replace(params, seed=seed)
            completion = engine.generate(prompt, max_tokens=SAMPLED_TOKENS, sampling=sampling, k=SAMPLED_K)
            assert len(completion.token_ids) == SAMPLED_TOKENS and completion.stats.draft_lengths[0] == SAMPLED_K
            observed[int(np.ravel_multi_index(completion.token_ids, (vocab,) * SAMPLED_TOKENS))] += 1
            # the first round emits its n accepted drafts, then the verifier's token (recovered or bonus)
            first_round_matches[completion.stats.provenance.index(Provenance.VERIFIER)] += 1
    finally:
        engine.close()
    # every drafted position was both rejected and accepted often, and all three drafts were too
    assert (first_round_matches >= runs // 30).all(), first_round_matches
    exact = _exact_sequence_distribution(verifier_model, prompt, params, SAMPLED_TOKENS)
    # a sequence the verifier never samples (past top-k or top-p) is never emitted
    assert observed[exact == 0].sum() == 0, np.flatnonzero((exact == 0) & (observed > 0))
    # pool rare sequences so every expected count is at least 5 (chi-square's usual condition)
    order = np.argsort(exact)
    keep = order[exact[order] * runs >= 5]
    pooled = order[(exact[order] > 0) & (exact[order] * runs < 5)]
    obs, exp = observed[keep], exact[keep] * runs
    if pooled.size:
        obs, exp = np.append(obs, observed[pooled].sum()), np.append(exp, exact[pooled].sum() * runs)
    assert chisquare(obs, exp / exp.sum() * obs.sum()).pvalue > SAMPLED_P_THRESHOLD


def test_token_cost_shares_add_up_to_the_completions_verifier_time(engines):
    spec, _ = engines
    # a prompt no other test sends: a sequence that kept it whole would need no prefill (``SequenceIds``)
    completion = spec.stream(PROMPTS[2] + " and its cost shares, token by token,", max_tokens=25, k=3)
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
    # the scheduler's thread drives the rounds, ahead of a slow consumer (as a server's does): the stats
    # count what was generated up to the close, at least what was delivered, never past max_tokens
    assert len(delivered) == 7 and 7 <= completion.stats.completion_tokens <= 40
    assert spec.verifier.open_sessions == 0  # and close() returned with its sessions released


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


def test_the_text_decoder_is_the_tokenizers_decode_whatever_the_ids(demo_pair, demo_pair_llama):
    # where it skips transformers' wrapper, it must return the same string, special tokens and
    # partial UTF-8 sequences included; any other tokenizer goes through its own decode
    import copy
    import random

    from speculative.completion import text_decoder

    rng = random.Random(7)
    for _, _, tokenizer in (demo_pair, demo_pair_llama):
        decode = text_decoder(tokenizer)
        assert decode.__code__.co_names == ()  # the Rust tokenizer's call, not tokenizer.decode
        special = list(tokenizer.all_special_ids)
        for _ in range(500):
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 70))]
            ids[rng.randrange(len(ids))] = rng.choice(special)
            assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    cleaning = copy.copy(demo_pair[2])
    cleaning.clean_up_tokenization_spaces = True  # transformers would edit the Rust text: its decode decides
    assert "decode" in text_decoder(cleaning).__code__.co_names
    byte = ByteTokenizer(64)
    assert text_decoder(byte)([40, 41]) == byte.decode([40, 41], skip_special_tokens=True) == "OP"


def test_the_text_encoder_is_the_tokenizers_encode_whatever_the_text(demo_pair, monkeypatch):
    # where it skips transformers' wrapper it must give the same ids, special tokens' text included;
    # a tokenizer set otherwise (splitting special tokens) or of its own goes through its own encode
    import copy
    import random

    from speculative import completion
    from speculative.completion import encode_text, text_encoder

    tokenizer = demo_pair[2]
    encode = text_encoder(tokenizer)
    assert "encode" not in encode.__code__.co_names  # the Rust tokenizer's call
    rng = random.Random(5)
    pieces = ["the", " view", "s", " ", "\n", "  ", "é", "日本", "🙂", ".", "Django", *tokenizer.all_special_tokens]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
        assert encode(text) == tokenizer.encode(text, add_special_tokens=False)
    splitting = copy.copy(tokenizer)
    splitting.split_special_tokens = True
    assert "encode" in text_encoder(splitting).__code__.co_names
    special = f"ask {tokenizer.all_special_tokens[0]} now"
    assert text_encoder(splitting)(special) == splitting.encode(special, add_special_tokens=False)
    byte = ByteTokenizer(64)
    assert text_encoder(byte)("OP") == byte.encode("OP", add_special_tokens=False)
    # a prompt counted for routing and then built into a request is encoded once
    calls: list[str] = []
    real = completion.text_encoder
    monkeypatch.setattr(completion, "text_encoder", lambda t: lambda text: calls.append(text) or real(t)(text))
    first, again = encode_text(tokenizer, "How do I add a view?"), encode_text(tokenizer, "How do I add a view?")
    assert first == again == tokenizer.encode("How do I add a view?", add_special_tokens=False)
    assert calls == ["How do I add a view?"]
    again.append(0)  # each caller's own list: the kept ids stay as they were
    assert encode_text(tokenizer, "How do I add a view?") == first and len(calls) == 1
    assert encode_text(byte, "How do I add a view?") == byte.encode("How do I add a view?")  # another tokenizer's
    assert len(calls) == 2


def test_the_text_decoder_does_not_import_transformers_for_a_tokenizer_of_its_own():
    # a process that serves no model (the platform's own tokenizers) must not pay for importing transformers
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    code = (
        "import sys\n"
        "from speculative.completion import text_decoder\n"
        "class Chars:\n"
        "    def decode(self, ids, skip_special_tokens=True):\n"
        "        return ''.join(map(chr, ids))\n"
        "assert text_decoder(Chars())([72, 105]) == 'Hi'\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"


def test_the_text_tracker_decodes_only_the_unsettled_ids_and_gives_the_whole_lists_text(demo_pair, demo_pair_llama):
    # byte-level tokenizers decode piecewise: a token's text is decoded once, not again for every later token
    # (whole-list decoding was quadratic); the text, its deltas and the held-back UTF-8 stay what they were
    import copy
    import random

    from speculative.completion import _TextTracker, decodes_piecewise

    rng = random.Random(11)
    for _, _, tokenizer in (demo_pair, demo_pair_llama):
        assert decodes_piecewise(tokenizer)
        special = list(tokenizer.all_special_ids)
        for _ in range(200):
            tracker = _TextTracker(tokenizer, ())
            decoded: list[int] = []
            real = tracker._decode
            tracker._decode = lambda ids, real=real, seen=decoded: seen.append(len(ids)) or real(ids)
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 120))]
            ids[rng.randrange(len(ids))] = rng.choice(special)
            emitted = ""
            for i, token in enumerate(ids):
                delta, stopped = tracker.push(token)
                emitted += delta
                whole = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
                assert not stopped
                if not whole.endswith("\ufffd"):
                    assert tracker.text == whole
            assert emitted + tracker.finish() == tracker.text
            assert sum(decoded) < 4 * len(ids)  # not len(ids) ** 2 / 2
    cleaning = copy.copy(demo_pair[2])
    cleaning.clean_up_tokenization_spaces = True  # its text is edited as a whole: decoded whole
    assert not decodes_piecewise(cleaning)
    assert not decodes_piecewise(ByteTokenizer(64))


@dataclasses.dataclass
class _Runs:
    """What the verifier's ``run_greedy`` calls did: each ended run (session, tokens), each step (sessions, ms; native
    steps that ran together count as one)."""

    ends: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    steps: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    sessions: set[str] = dataclasses.field(default_factory=set)  # every session that ran plainly


def _watch_runs(verifier, monkeypatch) -> _Runs:
    seen, real = _Runs(), verifier.run_greedy

    def run(runs, between, interrupt=None):
        names = {r.key: r.session_id for r in runs}

        def watched(ends, n, step_ms, steps):
            seen.ends.extend((names[e.key], len(e.tokens)) for e in ends)
            seen.steps.append((n, step_ms))
            adding, stop = between(ends, n, step_ms, steps)
            names.update((r.key, r.session_id) for r in adding)
            seen.sessions.update(r.session_id for r in adding)
            return adding, stop

        seen.sessions.update(names.values())
        last, ms = real(runs, watched, interrupt)
        seen.ends.extend((names[e.key], len(e.tokens)) for e in last)
        return last, ms

    monkeypatch.setattr(verifier, "run_greedy", run)
    return seen


def test_a_lone_plain_session_decodes_in_runs_and_one_joining_it_mid_run_changes_no_output(
    demo_pair_llama, monkeypatch
):
    from speculative.engine import PLAIN_RUN_STEPS
    from speculative.verifier import VerifyRequest

    verifier, _, tokenizer = demo_pair_llama

    def rounds(prompt: str, n: int) -> list[int]:  # plain decoding, one verify round a token
        verifier.open_session("reference", tokenizer.encode(prompt, add_special_tokens=False), SamplingParams())
        try:
            return [
                verifier.verify([VerifyRequest("reference", (), None, r)]).verdicts[0].verifier_token for r in range(n)
            ]
        finally:
            verifier.close_session("reference")

    first, second = "To run the tests, use", "The settings file holds"
    expected = [rounds(first, 40), rounds(second, 20)]
    runs = _watch_runs(verifier, monkeypatch)
    monkeypatch.setattr("speculative.scheduler.PLAIN_RUN_MS", 60_000.0)  # runs of whole PLAIN_RUN_STEPS, however slow
    engine = SpeculativeEngine(verifier, tokenizer, None)
    try:
        alone = engine.generate(first, max_tokens=40)
        assert alone.token_ids == expected[0]
        # the first token alone (the time to the first token), then whole runs
        assert [n for _, n in runs.ends] == [1, PLAIN_RUN_STEPS, PLAIN_RUN_STEPS, 40 - 1 - 2 * PLAIN_RUN_STEPS]
        deadline = time.perf_counter() + 5  # (the scheduler counts them once the reply had its turn: ``hand_over``)
        while engine.scheduler.batches < 40 and time.perf_counter() < deadline:
            time.sleep(0.001)
        assert alone.stats.rounds == 40 and engine.scheduler.batches == 40  # counted as the rounds they replace
        # a second session arrives while the first runs: it joins the lockstep, and they share steps
        runs.steps.clear()
        stream = engine.stream(first, max_tokens=40)
        got: list[int] = []
        joined = engine.stream(second, max_tokens=20)
        thread = threading.Thread(target=lambda: list(joined))
        for event in stream:
            got.append(event.token_id)
            if len(got) == 3:
                thread.start()
        thread.join(timeout=60)
        assert got == expected[0] and joined.token_ids == expected[1]
        assert any(n == 2 for n, _ in runs.steps)  # some steps were shared: rounds of two sessions in one decode
    finally:
        engine.close()


def _driven_whole(
    engine: SpeculativeEngine, prompt: str, max_tokens: int, cancel_at: int = 0, items: list | None = None
) -> list[int]:
    """Drive a completion whose consumer takes the answer whole; its tokens (cancelled after ``cancel_at``, if set).

    ``items`` gets what the sink received (events and runs), the end aside.
    """
    got: list[int] = []
    done = threading.Event()
    completion = engine.stream(prompt, max_tokens=max_tokens)

    def sink(item: object) -> None:
        if isinstance(item, TokenEvent | TokenRun):
            if items is not None:
                items.append(item)
            before = len(got)
            got.extend(item.token_ids if isinstance(item, TokenRun) else [item.token_id])
            if before < cancel_at <= len(got):
                completion.cancel()
        else:
            done.set()

    completion.drive(sink, whole=True)
    assert done.wait(timeout=60)
    return got


def test_a_whole_answer_decodes_in_one_run_without_its_first_token_alone(demo_pair_llama, monkeypatch):
    verifier, _, tokenizer = demo_pair_llama
    prompt = "To run the tests, use"
    expected = _plain_rounds(verifier, tokenizer, prompt, 40)
    runs = _watch_runs(verifier, monkeypatch)
    monkeypatch.setattr("speculative.scheduler.WHOLE_RUN_MS", 60_000.0)
    engine = SpeculativeEngine(verifier, tokenizer, None)
    try:
        items: list = []
        assert _driven_whole(engine, prompt, 40, items=items) == expected
        assert [n for _, n in runs.ends] == [40]  # one run: no first token alone, no PLAIN_RUN_STEPS cap
        # handed over as one item, its text decoded once: the verifier's text, as one by one
        assert [type(item) for item in items] == [TokenRun]
        assert items[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        # its runs end at WHOLE_RUN_MS, not PLAIN_RUN_MS: at 0, after every step
        runs.ends.clear()
        monkeypatch.setattr("speculative.scheduler.PLAIN_RUN_MS", 60_000.0)
        monkeypatch.setattr("speculative.scheduler.WHOLE_RUN_MS", 0.0)
        assert _driven_whole(engine, prompt, 10) == expected[:10]
        assert [n for _, n in runs.ends] == [1] * 10
        # a cancel still stops it at its run's end
        assert _driven_whole(engine, prompt, 40, cancel_at=3) == expected[:3]
    finally:
        engine.close()


def test_a_lone_whole_answers_plain_run_counts_for_the_governor_at_one_session(demo_pair_llama, monkeypatch):
    verifier, _, tokenizer = demo_pair_llama
    monkeypatch.setattr("speculative.scheduler.WHOLE_RUN_MS", 60_000.0)
    engine = SpeculativeEngine(verifier, tokenizer, None)
    heard: list[tuple[int, int]] = []  # (active, emitted) of each on_batch
    real = engine.scheduler.governor.on_batch

    def on_batch(**kwargs):
        heard.append((kwargs["active"], kwargs["emitted"]))
        real(**kwargs)

    monkeypatch.setattr(engine.scheduler.governor, "on_batch", on_batch)
    try:
        assert len(_driven_whole(engine, "To run the tests, use", 30)) == 30
    finally:
        engine.close()
    # its one run's steps ran at one session: told as 0 (the session had left once answered), the governor
    # took them for a load change and never scored plain decoding at one session
    assert heard and all(active == 1 for active, _ in heard) and sum(n for _, n in heard) == 30


def _consume_together(completions) -> None:
    """Iterate the completions on threads of their own, at once, and wait for them all."""
    threads = [threading.Thread(target=lambda c=c: list(c)) for c in completions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


def _plain_rounds(verifier, tokenizer, prompt: str, n: int) -> list[int]:
    """n tokens of the verifier's plain decoding, one verify round a token."""
    from speculative.verifier import VerifyRequest

    verifier.open_session("reference", tokenizer.encode(prompt, add_special_tokens=False), SamplingParams())
    try:
        return [verifier.verify([VerifyRequest("reference", (), None, r)]).verdicts[0].verifier_token for r in range(n)]
    finally:
        verifier.close_session("reference")


@pytest.mark.parametrize("run_for", [60_000.0, 0.0])
def test_plain_sessions_decode_in_lockstep_runs_with_each_ones_output_unchanged(demo_pair_llama, monkeypatch, run_for):
    verifier, _, tokenizer = demo_pair_llama
    prompts = ["To run the tests, use", "The settings file holds", "A model is", "Forms validate"]
    lengths = [30, 12, 21, 26]  # the run takes the fewest steps any has left: a short one ends runs early
    expected = [_plain_rounds(verifier, tokenizer, p, n) for p, n in zip(prompts, lengths, strict=True)]
    runs = _watch_runs(verifier, monkeypatch)
    monkeypatch.setattr("speculative.scheduler.PLAIN_RUN_MS", run_for)
    engine = SpeculativeEngine(verifier, tokenizer, None)
    try:
        completions = [engine.stream(p, max_tokens=n) for p, n in zip(prompts, lengths, strict=True)]
        _consume_together(completions)
    finally:
        engine.close()
    assert [c.token_ids for c in completions] == expected
    assert all(
        c.stats.rounds == n and c.stats.completion_tokens == n for c, n in zip(completions, lengths, strict=True)
    )
    assert max(n for n, _ in runs.steps) > 1  # sessions ran together
    if run_for == 0.0:  # a run past its time ends after its step: every run one step
        assert {n for _, n in runs.ends} == {1}
    else:
        assert max(n for _, n in runs.ends) > 1
    # each session's share of a step's time is a position of it: shares add up to the steps' time
    shares = sum(c.stats.gpu_ms - c.stats.prefill_ms for c in completions)
    assert shares == pytest.approx(sum(ms for _, ms in runs.steps))


def test_a_plain_session_batched_with_a_drafting_one_takes_plain_rounds_and_both_outputs_stay_plain(
    demo_pair_llama, monkeypatch
):
    verifier, draft, tokenizer = demo_pair_llama
    prompts, n = ["The settings file holds", "To run the tests, use"], 30
    expected = [_plain_rounds(verifier, tokenizer, p, n) for p in prompts]
    verified: list[dict[str, int]] = []  # each verify call's sessions and their draft lengths
    real_verify = verifier.verify

    def verify(requests):
        verified.append({r.session_id: len(r.tokens) for r in requests})
        return real_verify(requests)

    monkeypatch.setattr(verifier, "verify", verify)
    ran = _watch_runs(verifier, monkeypatch)
    opened: list[list[int]] = []  # the draft sequences taken, by the prompt tokens they were opened with
    real_open = draft.new_context
    monkeypatch.setattr(draft, "new_context", lambda prefix=(): opened.append(list(prefix)) or real_open(prefix))
    engine = SpeculativeEngine(verifier, tokenizer, draft)
    try:
        plain = engine.stream(prompts[0], max_tokens=n, k=0)  # pinned: never drafts, asks for plain runs
        drafting = engine.stream(prompts[1], max_tokens=n, k=3)  # pinned: drafts 3 a round
        _consume_together([plain, drafting])
    finally:
        engine.close()
    assert plain.token_ids == expected[0] and drafting.token_ids == expected[1]
    # beside a drafting round, the plain session's run was one plain round of the same verify call
    mixed = [call for call in verified if call.get(plain.session_id) == 0 and call.get(drafting.session_id, 0) > 0]
    assert mixed
    assert drafting.session_id not in ran.sessions  # a drafting session never runs plainly
    assert plain.stats.rounds == n and plain.stats.proposed == 0 and drafting.stats.proposed > 0
    # the session that never drafted never took a draft sequence (its draft session is lazy)
    assert len(opened) == 1 and opened[0][: len(drafting.request.prompt_ids)] == list(drafting.request.prompt_ids)


def _watch_spec_runs(verifier, monkeypatch) -> list[list]:
    """Each ``speculate_greedy`` call's rounds, as the calls return."""
    runs: list[list] = []
    real = verifier.speculate_greedy

    def counted(*args, **kwargs):
        rounds = real(*args, **kwargs)
        runs.append(rounds)
        return rounds

    monkeypatch.setattr(verifier, "speculate_greedy", counted)
    return runs


@pytest.mark.parametrize("k", [1, 3])
def test_a_lone_drafting_session_runs_its_rounds_in_one_call_with_its_output_plain_and_each_round_counted(
    demo_pair_llama, monkeypatch, k
):
    verifier, draft, tokenizer = demo_pair_llama
    prompt, n = "Class-based views provide", 40
    expected = _plain_rounds(verifier, tokenizer, prompt, n)
    runs = _watch_spec_runs(verifier, monkeypatch)
    monkeypatch.setattr("speculative.scheduler.PLAIN_RUN_MS", 60_000.0)  # whole runs, however slow the runner
    engine = SpeculativeEngine(verifier, tokenizer, draft)
    try:
        completion = engine.generate(prompt, max_tokens=n, k=k)
    finally:
        engine.close()
    assert completion.token_ids == expected
    # the first round alone (its first token), then the rest of the completion in one run of rounds of k
    rounds = [r for run in runs for r in run]
    assert len(runs) == 1 and completion.stats.rounds == 1 + len(rounds)
    assert all(len(r.proposal.tokens) <= k for r in rounds) and max(len(r.proposal.tokens) for r in rounds) == k
    stats = completion.stats
    assert 0 <= stats.accepted - sum(r.verdict.n_matches for r in rounds) <= stats.draft_lengths[0]  # and the first's
    assert stats.proposed == stats.draft_lengths[0] + sum(len(r.proposal.tokens) for r in rounds)
    assert stats.verify_ms >= sum(r.verify_ms for r in rounds)
    assert stats.draft_ms >= sum(r.proposal.draft_ms for r in rounds)
    assert stats.completion_tokens == n and sum(stats.draft_lengths) == stats.proposed


def test_a_whole_answer_of_a_lone_drafting_session_is_one_run_of_rounds_first_round_included(
    demo_pair_llama, monkeypatch
):
    verifier, draft, tokenizer = demo_pair_llama
    prompt, n = "Class-based views provide", 40
    expected = _plain_rounds(verifier, tokenizer, prompt, n)
    runs = _watch_spec_runs(verifier, monkeypatch)
    monkeypatch.setattr("speculative.scheduler.PLAIN_RUN_MS", 0.0)  # a whole answer's run ends at WHOLE_RUN_MS
    monkeypatch.setattr("speculative.scheduler.WHOLE_RUN_MS", 60_000.0)
    engine = SpeculativeEngine(verifier, tokenizer, draft)
    monkeypatch.setattr(engine.scheduler.governor, "_choose", lambda bucket: 2)
    monkeypatch.setattr(engine.scheduler.governor, "cap", 2)
    try:
        items: list = []
        assert _driven_whole(engine, prompt, n, items=items) == expected
    finally:
        engine.close()
    # no first round alone: every round in one call, handed over as one item with each token's provenance
    assert len(runs) == 1 and [type(item) for item in items] == [TokenRun]
    (run,) = items
    rounds = runs[0]
    assert run.text == tokenizer.decode(expected, skip_special_tokens=True)
    provenance = [p for r in rounds for p in [Provenance.DRAFTED] * r.verdict.n_matches + [Provenance.VERIFIER]]
    assert list(run.provenances()) == provenance[:n] and Provenance.DRAFTED in provenance
    assert sum(run.drafted) == sum(len(r.proposal.tokens) for r in rounds)


def test_under_a_governor_cap_a_lone_session_drafts_it_in_runs_and_beside_another_it_decodes_plainly(
    demo_pair_llama, monkeypatch
):
    verifier, draft, tokenizer = demo_pair_llama
    prompts, n = ["The admin site", "A form field"], 30
    expected = [_plain_rounds(verifier, tokenizer, p, n) for p in prompts]
    asked: list[int] = []  # the k of each speculate_greedy call
    real = verifier.speculate_greedy

    def counted(session_id, first_round, max_tokens, drafter, k, **kwargs):
        asked.append(k)
        return real(session_id, first_round, max_tokens, drafter, k, **kwargs)

    monkeypatch.setattr(verifier, "speculate_greedy", counted)
    engine = SpeculativeEngine(verifier, tokenizer, draft)
    monkeypatch.setattr(engine.scheduler.governor, "_choose", lambda bucket: 1)  # the governor keeps cap 1
    monkeypatch.setattr(engine.scheduler.governor, "cap", 1)
    try:
        alone = engine.generate(prompts[0], max_tokens=n)
        assert alone.token_ids == expected[0] and asked and set(asked) == {1}
        together = [engine.stream(p, max_tokens=n) for p in prompts]
        _consume_together(together)
    finally:
        engine.close()
    assert [c.token_ids for c in together] == expected  # beside each other, their rounds batch: still plain output
    assert all(c.stats.proposed > 0 for c in together)


def test_a_driven_completion_whose_sink_holds_it_is_freed_by_reference_counts_as_it_ends(demo_pair_llama):
    # the platform's sink holds its completion (to cancel it): a cycle through the rounds' sink, which left
    # every request's objects for the cyclic collector until the rounds let go of the sink at their end
    import gc
    import weakref

    verifier, _, tokenizer = demo_pair_llama
    engine = SpeculativeEngine(verifier, tokenizer, None)
    gc.disable()  # only reference counts free anything meanwhile
    try:
        done = threading.Event()
        completion = engine.stream("The settings file holds", max_tokens=4)

        def sink(item: object, held: object = completion) -> None:
            if item is None or isinstance(item, BaseException):
                done.set()

        completion.drive(sink)
        assert done.wait(timeout=30)
        gone = weakref.ref(completion)
        del completion, sink
        deadline = time.monotonic() + 5
        while gone() is not None and time.monotonic() < deadline:  # the scheduler's thread lets go of it
            time.sleep(0.01)
        assert gone() is None
    finally:
        gc.enable()
        engine.close()


def _ends_with_open_sessions(engine: SpeculativeEngine) -> list[tuple[object, int]]:
    """Drive a four-token completion; what its sink got besides tokens, with the verifier's open sessions then."""
    ends: list[tuple[object, int]] = []

    def sink(item: object) -> None:
        if not isinstance(item, TokenEvent):
            ends.append((item, engine.verifier.open_sessions))

    completion = engine.stream("The settings file holds", max_tokens=4)
    completion.drive(sink)
    assert completion._driven is not None and completion._driven.wait(30)
    assert completion.stats.completion_tokens == 4
    return ends


def test_a_driven_completion_hands_over_its_end_before_it_releases_its_sessions(demo_pair_llama, monkeypatch, caplog):
    # a whole-answer client waits for the end only: the release of its sessions follows it
    verifier, _, tokenizer = demo_pair_llama
    engine = SpeculativeEngine(verifier, tokenizer, None)
    try:
        assert _ends_with_open_sessions(engine) == [(None, 1)]  # its session still open as the end came
        release = verifier.close_session

        def failing(session_id: str) -> None:
            release(session_id)
            raise RuntimeError("a failed release")

        monkeypatch.setattr(verifier, "close_session", failing)
        # a clean-up that fails once the end is out: logged, the consumer had its end
        assert _ends_with_open_sessions(engine) == [(None, 1)]
        assert "failed releasing its sessions after its end" in caplog.text
        assert verifier.open_sessions == 0
    finally:
        monkeypatch.undo()
        engine.close()
