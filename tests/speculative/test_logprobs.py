"""Per-token log-probabilities: read off the logits of the model that served each token.

Speculative tokens carry the verifier's log_softmax at their position (a plain forward of
the verifier over the final sequence must agree), edge tokens the draft's own; the top N
are sorted and of length N; nothing is computed or returned unless asked; the remote
verifier returns them over HTTP exactly as the local one computes them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from speculative.draft_hf import TransformersDraft
from speculative.edge import EdgeEngine
from speculative.engine import SpeculativeEngine
from speculative.errors import InvalidRequestError, SpeculativeError, VerifierUnavailableError
from speculative.logprobs import token_logprobs
from speculative.remote import RemoteVerifier
from speculative.scheduler import VerifyScheduler
from speculative.serve import create_app, parse_verify_body
from speculative.types import MAX_TOP_LOGPROBS, MIN_LOGPROB, Provenance, SamplingParams, TokenEvent
from speculative.verifier import TransformersVerifier, VerifyRequest
from tests.speculative.conftest import ByteTokenizer, tiny_llama
from tests.speculative.test_remote import ServerThread

VOCAB = 256
SAMPLED = SamplingParams(temperature=0.9, top_k=40, seed=11)
TOLERANCE = 2e-4  # a cached forward over k + 1 positions against one forward over the whole sequence


@pytest.fixture(scope="module")
def demo_engine(demo_pair) -> Iterator[SpeculativeEngine]:
    verifier, draft, tokenizer = demo_pair
    engine = SpeculativeEngine(verifier, tokenizer, draft)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A random verifier and a noisy copy as draft: they agree often, not always."""
    verifier = tiny_llama(vocab=VOCAB, seed=0)
    draft = copy.deepcopy(verifier)
    torch.manual_seed(1)
    with torch.no_grad():
        draft.lm_head.weight.add_(torch.randn_like(draft.lm_head.weight) * 0.05)
    return verifier, draft


def _tiny_draft(model: LlamaForCausalLM) -> TransformersDraft:
    return TransformersDraft("tiny", model=model, device="cpu")


@pytest.fixture
def tiny_engine(tiny_pair) -> Iterator[SpeculativeEngine]:
    verifier_model, draft_model = tiny_pair
    verifier = TransformersVerifier("tiny", model=verifier_model, device="cpu", fast_cpu_linears=False)
    engine = SpeculativeEngine(verifier, ByteTokenizer(VOCAB), _tiny_draft(draft_model))
    yield engine
    engine.close()


@torch.inference_mode()
def _reference(model, prompt: tuple[int, ...], events: list[TokenEvent]) -> torch.Tensor:
    """log_softmax of one plain forward over prompt + completion, at each completion token's position.

    returns  # (len(events), vocab)
    """
    ids = torch.tensor([[*prompt, *(e.token_id for e in events)]])
    logits = model(input_ids=ids).logits[0].float()  # (len, vocab)
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]


def _assert_match(events: list[TokenEvent], reference: torch.Tensor, top_n: int) -> None:
    for j, event in enumerate(events):
        want = reference[j]
        assert event.logprob == pytest.approx(float(want[event.token_id]), abs=TOLERANCE), j
        assert len(event.top_logprobs) == top_n
        values = [lp for _, lp in event.top_logprobs]
        assert values == sorted(values, reverse=True)
        top = torch.topk(want, top_n)
        assert values == pytest.approx(top.values.tolist(), abs=TOLERANCE)
        for token, lp in event.top_logprobs:  # robust to near-ties swapping places
            assert lp == pytest.approx(float(want[token]), abs=TOLERANCE)


# the speculative engine: the verifier's logits ----------------------------------------------
def test_greedy_speculative_logprobs_are_the_verifiers_log_softmax_on_the_final_sequence(demo_engine, demo_pair):
    verifier = demo_pair[0]
    completion = demo_engine.stream("The Django ORM", max_tokens=40, k=4, logprobs=5)
    events = list(completion)
    assert {e.provenance for e in events} == {Provenance.DRAFTED, Provenance.VERIFIER}
    _assert_match(events, _reference(verifier.model, completion.request.prompt_ids, events), 5)
    # greedy: every emitted token is the verifier's argmax, so it heads its own top list
    assert all(e.top_logprobs[0][0] == e.token_id for e in events)


def test_sampled_speculative_logprobs_are_the_verifiers_raw_distribution(tiny_engine, tiny_pair):
    completion = tiny_engine.stream([5, 17, 99, 3], max_tokens=48, k=4, sampling=SAMPLED, logprobs=3)
    events = list(completion)
    stats = completion.stats
    assert stats.rejections > 0 and stats.accepted > 0  # recovered and accepted tokens both checked
    # the raw softmax (temperature 1, no top-k), not the warped p the tokens were sampled from
    _assert_match(events, _reference(tiny_pair[0], completion.request.prompt_ids, events), 3)


def test_plain_verifier_decoding_carries_logprobs_too(tiny_pair):
    verifier = TransformersVerifier("tiny", model=tiny_pair[0], device="cpu", fast_cpu_linears=False)
    engine = SpeculativeEngine(verifier, ByteTokenizer(VOCAB), None)
    try:
        completion = engine.stream([1, 2, 3], max_tokens=12, logprobs=0)
        events = list(completion)
    finally:
        engine.close()
    _assert_match(events, _reference(tiny_pair[0], completion.request.prompt_ids, events), 0)


def test_logprobs_are_none_when_not_requested(tiny_engine):
    events = list(tiny_engine.stream([5, 17, 99], max_tokens=16, k=3, sampling=SAMPLED))
    assert all(e.logprob is None and e.top_logprobs == () for e in events)


@pytest.mark.parametrize("top_n", [0, 1, MAX_TOP_LOGPROBS])
def test_top_logprobs_hold_exactly_n_alternatives_highest_first(tiny_engine, top_n):
    events = list(tiny_engine.stream([5, 17, 99], max_tokens=10, k=3, logprobs=top_n))
    for e in events:
        assert e.logprob is not None and MIN_LOGPROB <= e.logprob <= 0.0
        assert len(e.top_logprobs) == top_n
        assert len({t for t, _ in e.top_logprobs}) == top_n
        values = [lp for _, lp in e.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_sampled_logprobs_are_deterministic_under_a_seed(tiny_engine):
    def run() -> list[tuple[int, float | None, tuple]]:
        events = tiny_engine.stream([7, 7, 7], max_tokens=24, k=4, sampling=SAMPLED, logprobs=2)
        return [(e.token_id, e.logprob, e.top_logprobs) for e in events]

    assert run() == run()


def test_a_batch_computes_logprobs_only_for_the_sessions_that_asked(tiny_pair):
    verifier = TransformersVerifier("tiny", model=tiny_pair[0], device="cpu", fast_cpu_linears=False)
    verifier.open_session("asks", [1, 2, 3], SamplingParams())
    verifier.open_session("not", [4, 5], SamplingParams())
    requests = [VerifyRequest("asks", (9, 9), None, 0, 4), VerifyRequest("not", (9,), None, 0)]
    asks, other = verifier.verify(requests).verdicts
    assert asks.logprobs is not None and len(asks.logprobs) == asks.n_matches + 1
    assert all(len(e.top) == 4 for e in asks.logprobs)
    assert other.logprobs is None
    # a retried round gets the verdict it got, logprobs included
    assert verifier.verify(requests[:1]).verdicts[0] == asks


@pytest.mark.parametrize("bad", [-1, MAX_TOP_LOGPROBS + 1, True, 2.5])
def test_build_request_refuses_a_logprobs_count_out_of_range(tiny_engine, bad):
    with pytest.raises(InvalidRequestError, match="logprobs"):
        tiny_engine.request([1, 2], logprobs=bad)


def test_a_verifier_that_ignores_the_request_fails_the_stream_instead_of_dropping_logprobs(tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine.verifier, "_add_logprobs", lambda *args: None)
    with pytest.raises(SpeculativeError, match="logprobs were requested"):
        list(tiny_engine.stream([1, 2, 3], max_tokens=8, k=2, logprobs=1))


def test_token_logprobs_floors_ruled_out_tokens_at_min_logprob():
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    (entry,) = token_logprobs(logits, torch.tensor([1]), 3)
    assert entry.logprob == MIN_LOGPROB
    assert [t for t, _ in entry.top] == [2, 0, 1] and entry.top[-1][1] == MIN_LOGPROB


# the edge engine: the draft's own logits ----------------------------------------------------
def test_edge_logprobs_are_the_llama_cpp_drafts_own_log_softmax(demo_pair):
    _, draft, tokenizer = demo_pair
    engine = EdgeEngine(draft, tokenizer, tokenizer.eos_token_id)
    completion = engine.stream("The QuerySet API", max_tokens=24, logprobs=4)
    events = list(completion)
    assert all(e.provenance is Provenance.EDGE for e in events)
    ctx = draft.new_context()  # the reference: a fresh sequence, fed the same tokens one by one
    try:
        logits = [ctx.evaluate(completion.request.prompt_ids)]
        logits += [ctx.evaluate([e.token_id]) for e in events[:-1]]
    finally:
        ctx.close()
    _assert_match(events, torch.log_softmax(torch.from_numpy(np.stack(logits)), dim=-1), 4)


def test_edge_logprobs_match_a_transformers_drafts_forward_and_repeat_under_a_seed(tiny_pair):
    draft_model = tiny_pair[1]
    engine = EdgeEngine(_tiny_draft(draft_model), ByteTokenizer(VOCAB), None)
    runs = [list(engine.stream([3, 1, 4, 1, 5], max_tokens=16, sampling=SAMPLED, logprobs=2)) for _ in range(2)]
    assert [(e.token_id, e.logprob, e.top_logprobs) for e in runs[0]] == [
        (e.token_id, e.logprob, e.top_logprobs) for e in runs[1]
    ]
    _assert_match(runs[0], _reference(draft_model, (3, 1, 4, 1, 5), runs[0]), 2)


# the remote verifier: an optional field both ways -------------------------------------------
@pytest.fixture
def served(tiny_pair) -> Iterator[ServerThread]:
    verifier = TransformersVerifier("tiny", model=tiny_pair[0], device="cpu", fast_cpu_linears=False)
    scheduler = VerifyScheduler(verifier)
    server = ServerThread(create_app(verifier, scheduler))
    yield server
    server.stop()
    scheduler.close()


def test_engine_over_remote_carries_the_same_logprobs_as_local(served, tiny_engine, tiny_pair):
    with RemoteVerifier(served.url, timeout_s=10.0, retries=0) as remote:
        engine = SpeculativeEngine(remote, ByteTokenizer(VOCAB), _tiny_draft(tiny_pair[1]))
        try:
            over_http = list(engine.stream([5, 17, 99, 3], max_tokens=24, k=3, sampling=SAMPLED, logprobs=3))
        finally:
            engine.close()
    local = list(tiny_engine.stream([5, 17, 99, 3], max_tokens=24, k=3, sampling=SAMPLED, logprobs=3))
    assert [(e.token_id, e.logprob, e.top_logprobs) for e in over_http] == [
        (e.token_id, e.logprob, e.top_logprobs) for e in local
    ]


def test_a_round_without_logprobs_is_the_old_wire_format(served):
    httpx.post(served.url + "/v1/sessions", json={"session_id": "s", "prompt_ids": [1, 2]}).raise_for_status()
    old = {"requests": [{"session_id": "s", "tokens": [3], "q": None, "round": 0}]}
    verdict = httpx.post(served.url + "/v1/verify", json=old).json()["verdicts"][0]
    assert set(verdict) == {"n_matches", "verifier_token"}
    new = {"requests": [{"session_id": "s", "tokens": [], "q": None, "round": 1, "logprobs": 2}]}
    verdict = httpx.post(served.url + "/v1/verify", json=new).json()["verdicts"][0]
    assert len(verdict["logprobs"]) == 1 and len(verdict["top_logprobs"][0]) == 2


def test_a_server_that_returns_no_logprobs_makes_the_client_raise(served, monkeypatch):
    with RemoteVerifier(served.url, timeout_s=10.0, retries=0) as remote:
        remote.open_session("s", [1, 2], SamplingParams())
        # an older server: answers the verdict, ignores the field it does not know
        monkeypatch.setattr("speculative.serve.verdict_body", lambda v: {"n_matches": v.n_matches, "verifier_token": 1})
        with pytest.raises(VerifierUnavailableError, match="logprobs"):
            remote.verify([VerifyRequest("s", (), None, 0, 1)])


@pytest.mark.parametrize("bad", [-1, MAX_TOP_LOGPROBS + 1, "3", True])
def test_the_server_refuses_a_bad_logprobs_field(bad):
    body = {"requests": [{"session_id": "s", "tokens": [], "q": None, "round": 0, "logprobs": bad}]}
    with pytest.raises(InvalidRequestError, match="logprobs"):
        parse_verify_body(body, VOCAB)
