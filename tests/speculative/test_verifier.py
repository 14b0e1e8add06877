"""The batched verifier: slot KV caches give the same logits as a plain forward pass."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
import pytest
import torch

from speculative.errors import ContextOverflowError, InvalidRequestError, SessionNotFoundError
from speculative.types import MAX_DRAFT_TOKENS, SamplingParams
from speculative.verifier import TransformersVerifier, VerifyRequest, attention_backends
from tests.speculative.conftest import tiny_llama

GREEDY = SamplingParams()


@pytest.fixture
def model():
    return tiny_llama(vocab=64)


@pytest.fixture
def verifier(model):
    return TransformersVerifier("tiny", model=model, device="cpu")


def _reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache at all."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_plain_decoding_across_ragged_batches_matches_full_forward(model, verifier):
    prompts = [[1, 2, 3, 4, 5], [9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    expected = [_reference_greedy(model, p, 10) for p in prompts]
    for i, p in enumerate(prompts):
        verifier.open_session(f"s{i}", p, GREEDY)
    got: list[list[int]] = [[] for _ in prompts]
    for r in range(10):
        result = verifier.verify([VerifyRequest(f"s{i}", (), None, r) for i in range(3)])
        for i, verdict in enumerate(result.verdicts):
            got[i].append(verdict.verifier_token)
    assert got == expected


def test_drafts_of_different_lengths_keep_exactly_the_agreeing_prefix(model, verifier):
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8]]
    expected = [_reference_greedy(model, p, 24) for p in prompts]
    for i, p in enumerate(prompts):
        verifier.open_session(f"s{i}", p, GREEDY)
    got: list[list[int]] = [[], []]
    for r in range(40):
        requests = []
        for i in range(2):
            pos, k = len(got[i]), (r + 2 * i) % 5
            right = expected[i][pos : pos + k]
            # every third round, corrupt the draft after its first token
            draft = right[:1] + [(t + 1) % 64 for t in right[1:]] if r % 3 == 0 else right
            requests.append(VerifyRequest(f"s{i}", tuple(draft), None, r))
        for i, verdict in enumerate(verifier.verify(requests).verdicts):
            got[i].extend(verdict.emitted_tokens(requests[i].tokens))
        if min(len(g) for g in got) >= 24:
            break
    assert [g[:24] for g in got] == expected


def test_sessions_join_and_leave_between_steps(model, verifier):
    a, b, c = [5, 6, 7], [8, 9], [10, 11, 12, 13]
    verifier.open_session("a", a, GREEDY)
    out = {"a": [], "b": [], "c": []}
    for r in range(12):
        if r == 3:
            verifier.open_session("b", b, GREEDY)
        if r == 6:
            verifier.close_session("a")
            verifier.open_session("c", c, GREEDY)  # takes a's freed slot
        live = [s for s in ("a", "b", "c") if s in verifier._sessions]
        result = verifier.verify([VerifyRequest(s, (), None, r) for s in live])
        for s, verdict in zip(live, result.verdicts, strict=True):
            out[s].append(verdict.verifier_token)
    assert out["a"] == _reference_greedy(model, a, 6)
    assert out["b"] == _reference_greedy(model, b, 9)
    assert out["c"] == _reference_greedy(model, c, 6)


def test_a_session_left_out_of_a_step_keeps_its_cache(model, verifier):
    """Rows between batch members that sit out a step must not be written over."""
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [12, 13, 14], "c": [20, 21, 22, 23]}
    for sid, p in prompts.items():
        verifier.open_session(sid, p, GREEDY)  # slots 0, 1, 2
    out: dict[str, list[int]] = {sid: [] for sid in prompts}
    rounds = {sid: 0 for sid in prompts}
    for step in range(18):
        live = ["a", "c"] if step % 3 else ["a", "b", "c"]  # b (the middle slot) often sits out
        result = verifier.verify([VerifyRequest(s, (), None, rounds[s]) for s in live])
        for s, verdict in zip(live, result.verdicts, strict=True):
            out[s].append(verdict.verifier_token)
            rounds[s] += 1
    for sid, p in prompts.items():
        assert out[sid] == _reference_greedy(model, p, len(out[sid])), sid


class _QueueWatch(deque):
    """The verifier's queue of sessions waiting to open, telling the test when ``n`` are in it."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.full = n, threading.Event()

    def append(self, item) -> None:
        super().append(item)
        if len(self) >= self.n:
            self.full.set()


def _open_together(verifier, sessions: dict[str, list[int]]) -> tuple[dict[str, float | BaseException], list[int]]:
    """Open ``sessions`` from one thread each while a forward holds the verifier, so they queue up.

    Returns each session's result (its prefill ms, or what it raised) and the row count of
    every forward the opening ran.
    """
    verifier._prefills = _QueueWatch(len(sessions))
    forwards: list[int] = []
    forward = verifier._forward
    verifier._forward = lambda rows, inputs, **kw: forwards.append(len(rows)) or forward(rows, inputs, **kw)
    results: dict[str, float | BaseException] = {}

    def open_one(sid: str, prompt: list[int]) -> None:
        try:
            results[sid] = verifier.open_session(sid.split("#")[0], prompt, GREEDY)
        except Exception as exc:  # noqa: BLE001 - what the test looks at
            results[sid] = exc

    threads = [threading.Thread(target=open_one, args=item) for item in sessions.items()]
    with verifier._lock:  # as if a verify step were running
        for t in threads:
            t.start()
        assert verifier._prefills.full.wait(10)
    for t in threads:
        t.join(10)
    verifier._forward = forward
    return results, forwards


def test_sessions_that_open_together_are_prefilled_in_one_forward_and_decode_exactly(model, verifier):
    prompts = {"a": [5, 6, 7, 8, 9], "b": [12], "c": [20, 21, 22, 23, 24, 25, 26, 27, 28], "d": [30, 31]}
    results, forwards = _open_together(verifier, prompts)
    assert forwards == [3]  # one forward for every prompt longer than its pending token
    shares = {sid: results[sid] for sid in prompts}
    assert shares["b"] == 0.0 and all(isinstance(v, float) and v >= 0 for v in shares.values())
    assert shares["c"] == pytest.approx(shares["a"] * 8 / 4) == pytest.approx(shares["d"] * 8)  # by positions
    out: dict[str, list[int]] = {sid: [] for sid in prompts}
    for r in range(8):
        result = verifier.verify([VerifyRequest(sid, (), None, r) for sid in prompts])
        for sid, verdict in zip(prompts, result.verdicts, strict=True):
            out[sid].append(verdict.verifier_token)
    assert out == {sid: _reference_greedy(model, p, 8) for sid, p in prompts.items()}


def test_a_session_that_cannot_open_fails_alone_in_a_batched_prefill(model, verifier):
    results, forwards = _open_together(verifier, {"s#1": [1, 2, 3], "s#2": [4, 5, 6], "t": [7, 8, 9]})
    assert forwards == [2]
    failed = [sid for sid in ("s#1", "s#2") if isinstance(results[sid], InvalidRequestError)]
    assert len(failed) == 1 and "already open" in str(results[failed[0]])
    assert isinstance(results["t"], float) and verifier.open_sessions == 2
    kept = [1, 2, 3] if failed == ["s#2"] else [4, 5, 6]  # the prompt of the "s" that opened
    result = verifier.verify([VerifyRequest("s", (), None, 0), VerifyRequest("t", (), None, 0)])
    assert [v.verifier_token for v in result.verdicts] == [
        _reference_greedy(model, kept, 1)[0],
        _reference_greedy(model, [7, 8, 9], 1)[0],
    ]


def test_a_failed_batched_prefill_opens_none_of_its_sessions(verifier):
    def broken(*args, **kwargs):
        raise RuntimeError("the forward failed")

    verifier._forward = broken
    with pytest.raises(RuntimeError, match="the forward failed"):
        verifier.open_session("a", [1, 2, 3], GREEDY)
    assert verifier.open_sessions == 0 and not verifier._slot_owner


def test_a_retried_round_returns_the_same_verdict_and_changes_nothing(model, verifier):
    verifier.open_session("s", [1, 2, 3], GREEDY)
    first = verifier.verify([VerifyRequest("s", (4, 5), None, 0)]).verdicts[0]
    again = verifier.verify([VerifyRequest("s", (4, 5), None, 0)]).verdicts[0]
    assert again == first
    nxt = verifier.verify([VerifyRequest("s", (), None, 1)]).verdicts[0]
    emitted = first.emitted_tokens((4, 5))
    assert nxt.verifier_token == _reference_greedy(model, [1, 2, 3, *emitted], 1)[0]


def test_bad_requests_are_refused_before_anything_changes(verifier):
    with pytest.raises(InvalidRequestError):
        verifier.open_session("s", [], GREEDY)
    with pytest.raises(ContextOverflowError):
        verifier.open_session("s", [1] * 256, GREEDY)
    with pytest.raises(InvalidRequestError):
        verifier.open_session("s", [64], GREEDY)  # outside the vocabulary
    verifier.open_session("s", [1, 2], GREEDY)
    with pytest.raises(InvalidRequestError):
        verifier.open_session("s", [1, 2], GREEDY)  # already open
    with pytest.raises(InvalidRequestError):
        verifier.verify([VerifyRequest("s", (1,) * (MAX_DRAFT_TOKENS + 1), None, 0)])
    with pytest.raises(InvalidRequestError):
        verifier.verify([VerifyRequest("s", (99,), None, 0)])
    with pytest.raises(SessionNotFoundError):
        verifier.verify([VerifyRequest("nope", (), None, 0)])
    # the session is untouched by the refused rounds
    assert verifier._sessions["s"].length == 1


def test_sampling_sessions_need_q_of_the_right_shape(verifier):
    verifier.open_session("s", [1, 2], SamplingParams(temperature=1.0, seed=1))
    with pytest.raises(InvalidRequestError):
        verifier.verify([VerifyRequest("s", (3,), None, 0)])
    with pytest.raises(InvalidRequestError):
        verifier.verify([VerifyRequest("s", (3,), np.ones((2, 64), dtype=np.float32) / 64, 0)])
    ok = verifier.verify([VerifyRequest("s", (3,), np.ones((1, 64), dtype=np.float32) / 64, 0)])
    assert 0 <= ok.verdicts[0].verifier_token < 64


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "qwen3", "gemma", "gpt2", "gpt_neox"])
def test_other_causal_lm_architectures_verify_exactly(model_type):
    """The slot cache relies only on what transformers' attention calls: any causal LM works."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "gpt2":
        kwargs = {"vocab_size": 64, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}
    else:
        kwargs = {
            "vocab_size": 64,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
        }
        if model_type != "gpt_neox":
            kwargs["num_key_value_heads"] = 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()
    verifier = TransformersVerifier(model_type, model=model, device="cpu")
    verifier.open_session("a", [1, 2, 3, 4, 5], GREEDY)
    verifier.open_session("b", [9, 8], GREEDY)  # a second, shorter row in every batch
    got = []
    for r in range(8):
        result = verifier.verify([VerifyRequest("a", (), None, r), VerifyRequest("b", (), None, r)])
        got.append(result.verdicts[0].verifier_token)
    assert got == _reference_greedy(model, [1, 2, 3, 4, 5], 8)


def test_cuda_forwards_leave_out_cudnn_attention_and_restore_the_setting():
    # cuDNN's attention re-plans for every new key length (every decode step): measured at
    # 120 ms against 26 ms per 8B-shaped verify step on an H200. The flags are process-wide
    # switches, so the exclusion must hold inside the forward and be undone after it.
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with attention_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before  # a CPU forward changes nothing
