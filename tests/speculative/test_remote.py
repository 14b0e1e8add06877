"""The remote verifier end to end: a real uvicorn server in a thread, a tiny random Llama.

The server's verdicts must be exactly the local verifier's, retries must not advance a
session, bad input must come back as clear 4xx errors, a dead or silent server must
raise VerifierUnavailableError quickly, and the engine must decode over HTTP exactly as
it decodes locally.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from transformers import LlamaForCausalLM

from speculative.draft_hf import TransformersDraft
from speculative.engine import SpeculativeEngine
from speculative.errors import (
    ContextOverflowError,
    InvalidRequestError,
    SessionNotFoundError,
    VerifierUnavailableError,
)
from speculative.remote import RemoteVerifier
from speculative.scheduler import VerifyScheduler
from speculative.serve import create_app
from speculative.types import Provenance, SamplingParams
from speculative.verifier import TransformersVerifier, VerifyRequest
from tests.speculative.conftest import ByteTokenizer, tiny_llama

VOCAB = 256
CONTEXT = 256
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_k=50, seed=7)


def _draft(model: LlamaForCausalLM) -> TransformersDraft:
    draft = TransformersDraft.__new__(TransformersDraft)
    draft.model, draft.device = model, torch.device("cpu")
    draft.vocab_size, draft.context_length = VOCAB, CONTEXT
    return draft


class ServerThread:
    """uvicorn serving an app on 127.0.0.1 from a background thread."""

    def __init__(self, app):
        # bind before starting: the port is known at once, and connections made before
        # uvicorn serves wait in the listen backlog instead of being refused
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        for _ in range(20):
            try:
                if httpx.get(self.url + "/v1/health", timeout=5.0).status_code == 200:
                    return
            except httpx.TransportError:
                if not self.thread.is_alive():
                    break
        raise RuntimeError(f"the test server at {self.url} did not come up")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


# fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verifier_model() -> LlamaForCausalLM:
    return tiny_llama(vocab=VOCAB, seed=0)  # no EOS: completions run to their length


@pytest.fixture(scope="module")
def draft_model(verifier_model) -> LlamaForCausalLM:
    """The verifier with noise on its output layer: agrees with it often, not always."""
    model = copy.deepcopy(verifier_model)
    torch.manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.02)
    return model


@pytest.fixture
def local(verifier_model) -> TransformersVerifier:
    return TransformersVerifier("tiny", model=verifier_model, device="cpu")


@contextlib.contextmanager
def _serving(model: LlamaForCausalLM) -> Iterator[ServerThread]:
    """A fresh verifier, scheduler and server around ``model``, torn down afterwards."""
    verifier = TransformersVerifier("tiny", model=model, device="cpu")
    scheduler = VerifyScheduler(verifier)
    server = ServerThread(create_app(verifier, scheduler))
    try:
        yield server
    finally:
        if server.thread.is_alive():
            server.stop()
        scheduler.close()


@pytest.fixture
def served(verifier_model) -> Iterator[ServerThread]:
    with _serving(verifier_model) as server:
        yield server


@pytest.fixture(scope="module")
def shared_server(verifier_model) -> Iterator[ServerThread]:
    """One server for the tests that open no session (a fresh server per test costs ~0.2 s)."""
    with _serving(verifier_model) as server:
        yield server


@pytest.fixture
def remote(served) -> Iterator[RemoteVerifier]:
    with RemoteVerifier(served.url, timeout_s=10.0, retries=1, backoff_s=0.01) as verifier:
        yield verifier


def _plain_decode(verifier: TransformersVerifier, prompt: list[int], n: int) -> list[int]:
    """The verifier's own greedy continuation, one token per round."""
    verifier.open_session("truth", prompt, GREEDY)
    out = [verifier.verify([VerifyRequest("truth", (), None, r)]).verdicts[0].verifier_token for r in range(n)]
    verifier.close_session("truth")
    return out


def _random_q(k: int, seed: int) -> tuple[tuple[int, ...], np.ndarray]:
    """k draft tokens sampled from k random distributions, with those distributions."""
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.full(VOCAB, 0.1), size=k).astype(np.float32)
    tokens = tuple(int(rng.choice(VOCAB, p=row / row.sum())) for row in q)
    return tokens, q


# (a) the same verdicts as the local verifier ----------------------------------------------
def test_greedy_verdicts_match_local_across_two_sessions(remote, local, verifier_model):
    assert (remote.vocab_size, remote.context_length, remote.eos_token_id) == (VOCAB, CONTEXT, None)
    prompts = {"a": [5, 17, 99, 3], "b": [200, 1, 42]}
    truth = {
        sid: _plain_decode(TransformersVerifier("t", model=verifier_model, device="cpu"), p, 20)
        for sid, p in prompts.items()
    }
    committed = {sid: 0 for sid in prompts}  # generated tokens both sides hold
    for sid, prompt in prompts.items():
        local.open_session(sid, prompt, GREEDY)
        assert remote.open_session(sid, prompt, GREEDY) >= 0.0
    seen: list[int] = []
    for round_no in range(6):
        requests = []
        for sid in prompts:
            right = truth[sid][committed[sid] : committed[sid] + 3]
            # all right, one right then a wrong one, wrong from the start
            draft = [right, right[:1] + [(right[1] + 1) % VOCAB], [(right[0] + 1) % VOCAB]][round_no % 3]
            requests.append(VerifyRequest(sid, tuple(draft), None, round_no))
        got = remote.verify(requests)
        want = local.verify(requests)
        assert got.verdicts == want.verdicts
        assert got.verify_ms > 0.0 and got.network_ms >= 0.0
        for req, verdict in zip(requests, got.verdicts, strict=True):
            committed[req.session_id] += verdict.n_matches + 1
            seen.append(verdict.n_matches)
    assert 0 in seen and 3 in seen and 1 in seen  # rejections, partial and full acceptance


def test_sampled_verdicts_match_local(remote, local):
    prompt = [9, 8, 7, 6, 5]
    local.open_session("s", prompt, SAMPLED)
    remote.open_session("s", prompt, SAMPLED)
    for round_no in range(5):
        tokens, q = _random_q(round_no % 4, seed=round_no)
        request = VerifyRequest("s", tokens, q if tokens else None, round_no)
        assert remote.verify([request]).verdicts == local.verify([request]).verdicts


# (b) retries are safe -----------------------------------------------------------------------
def test_a_retried_round_gets_the_same_verdict_and_does_not_advance(remote, local):
    prompt = [1, 2, 3, 4]
    local.open_session("r", prompt, GREEDY)
    assert remote.open_session("r", prompt, GREEDY) >= 0.0
    assert remote.open_session("r", prompt, GREEDY) >= 0.0  # a retried open succeeds
    first = VerifyRequest("r", (10, 11), None, 0)
    verdict = remote.verify([first]).verdicts[0]
    assert remote.verify([first]).verdicts[0] == verdict
    # the same round from two threads at once (a retry racing the original)
    second = VerifyRequest("r", (12,), None, 1)
    with ThreadPoolExecutor(2) as pool:
        racing = list(pool.map(lambda _: remote.verify([second]).verdicts[0], range(2)))
    assert racing[0] == racing[1]
    assert local.verify([first]).verdicts[0] == verdict
    assert local.verify([second]).verdicts[0] == racing[0]
    third = VerifyRequest("r", (), None, 2)
    assert remote.verify([third]).verdicts == local.verify([third]).verdicts  # state moved exactly twice


# (c) errors ---------------------------------------------------------------------------------
def test_unknown_session_and_bad_requests_raise_the_verifiers_errors(remote):
    with pytest.raises(SessionNotFoundError, match="nope"):
        remote.verify([VerifyRequest("nope", (1,), None, 0)])
    remote.open_session("s", [1, 2, 3], SAMPLED)
    with pytest.raises(InvalidRequestError, match=r"shape \(2, 256\)"):
        remote.verify([VerifyRequest("s", (1, 2), np.full((2, VOCAB - 1), 1 / VOCAB, np.float32), 0)])
    with pytest.raises(InvalidRequestError, match=r"\[0, 256\)"):
        remote.verify([VerifyRequest("s", (999,), None, 0)])
    with pytest.raises(InvalidRequestError, match="another prompt"):
        remote.open_session("s", [1, 2, 4], SAMPLED)
    with pytest.raises(ContextOverflowError):
        remote.open_session("long", [1] * CONTEXT, GREEDY)
    with pytest.raises(InvalidRequestError, match="temperature"):
        remote.open_session("hot", [1], SamplingParams(temperature=-1.0))
    remote.verify([VerifyRequest("s", (), None, 3)])
    with pytest.raises(InvalidRequestError, match="stale"):
        remote.verify([VerifyRequest("s", (), None, 2)])
    remote.close_session("s")
    remote.close_session("s")  # closing twice is fine
    with pytest.raises(SessionNotFoundError):
        remote.verify([VerifyRequest("s", (), None, 4)])


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "kind", "message"),
    [
        ("POST", "/v1/verify", b"{not json", 400, "InvalidRequestError", "not valid JSON"),
        ("POST", "/v1/verify", b"[1, 2]", 400, "InvalidRequestError", "JSON object"),
        (
            "POST",
            "/v1/verify",
            b'{"requests": [{"tokens": [1], "round": 0}]}',
            400,
            "InvalidRequestError",
            "missing field 'requests[0].session_id'",
        ),
        (
            "POST",
            "/v1/verify",
            b'{"requests": [{"session_id": "x", "tokens": [1], "round": 0, "q": "%%"}]}',
            400,
            "InvalidRequestError",
            "base64",
        ),
        (
            "POST",
            "/v1/verify",
            b'{"requests": [{"session_id": "x", "tokens": [], "round": 0},'
            b' {"session_id": "x", "tokens": [], "round": 0}]}',
            400,
            "InvalidRequestError",
            "at most once",
        ),
        (
            "POST",
            "/v1/sessions",
            b'{"session_id": "x", "prompt_ids": "abc"}',
            400,
            "InvalidRequestError",
            "'prompt_ids' must be a list of integers",
        ),
        (
            "POST",
            "/v1/sessions",
            b'{"session_id": "x", "prompt_ids": [1], "sampling": {"top_k": 1.5}}',
            400,
            "InvalidRequestError",
            "'sampling.top_k' must be an integer",
        ),
        ("GET", "/v1/nowhere", None, 404, "HTTPException", "Not Found"),
    ],
)
def test_malformed_http_gets_a_clear_4xx(shared_server, method, path, body, status, kind, message):
    response = httpx.request(method, shared_server.url + path, content=body, timeout=5.0)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == kind
    assert message in error["message"]


def test_health_and_delete_over_plain_http(shared_server):
    health = httpx.get(shared_server.url + "/v1/health", timeout=5.0).json()
    assert health == {
        "status": "ok",
        "model": "tiny",
        "vocab_size": VOCAB,
        "context_length": CONTEXT,
        "eos_token_id": None,
        "open_sessions": 0,
    }
    assert httpx.delete(shared_server.url + "/v1/sessions/never-opened", timeout=5.0).status_code == 204


# (d) an unreachable verifier fails fast -----------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_server_raises_unavailable_quickly():
    url = f"http://127.0.0.1:{_closed_port()}"
    started = time.perf_counter()
    with pytest.raises(VerifierUnavailableError, match=f"{url}.*3 attempts"):
        RemoteVerifier(url, timeout_s=0.5, retries=2, backoff_s=0.01)
    assert time.perf_counter() - started < 3.0


def test_a_silent_server_times_out_instead_of_hanging():
    with socket.socket() as sock:  # accepts connections (backlog), never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        started = time.perf_counter()
        with pytest.raises(VerifierUnavailableError, match="Timeout"):
            RemoteVerifier(url, timeout_s=0.2, retries=1, backoff_s=0.01)
        assert time.perf_counter() - started < 3.0


def test_a_server_killed_mid_stream_makes_the_next_round_raise(served):
    remote = RemoteVerifier(served.url, timeout_s=1.0, retries=2, backoff_s=0.01)
    remote.open_session("k", [3, 1, 4], GREEDY)
    remote.verify([VerifyRequest("k", (1, 5), None, 0)])
    served.stop()
    started = time.perf_counter()
    with pytest.raises(VerifierUnavailableError, match=served.url):
        remote.verify([VerifyRequest("k", (9,), None, 1)])
    remote.close_session("k")  # best effort: logs, does not raise
    assert time.perf_counter() - started < 5.0
    remote.close()


# (e) the engine over HTTP -------------------------------------------------------------------
def test_engine_over_remote_equals_local_plain_decoding(served, remote, local, draft_model):
    tokenizer, draft = ByteTokenizer(VOCAB), _draft(draft_model)
    prompts = [[72, 101, 108, 108, 111], [1, 2, 3]]
    plain = SpeculativeEngine(local, tokenizer, None)
    want = [plain.generate(p, max_tokens=30).token_ids for p in prompts]
    plain.close()
    engine = SpeculativeEngine(remote, tokenizer, draft)
    with ThreadPoolExecutor(2) as pool:  # two completions at once: the server batches them
        completions = list(pool.map(lambda p: engine.generate(p, max_tokens=30, k=4), prompts))
    engine.close()
    assert [c.token_ids for c in completions] == want
    for c in completions:
        assert c.stats.accepted > 0 and Provenance.DRAFTED in c.stats.provenance
        assert c.stats.network_ms >= 0.0
    assert sum(c.stats.accepted for c in completions) < sum(c.stats.proposed for c in completions)  # some rejected
    assert httpx.get(served.url + "/v1/health", timeout=5.0).json()["open_sessions"] == 0


def test_engine_sampling_over_remote_equals_local(remote, local, draft_model):
    tokenizer, draft = ByteTokenizer(VOCAB), _draft(draft_model)
    runs = []
    for verifier in (local, remote):
        engine = SpeculativeEngine(verifier, tokenizer, draft)
        runs.append(engine.generate([7, 7, 7], max_tokens=24, k=3, sampling=SAMPLED).token_ids)
        engine.close()
    assert runs[0] == runs[1]
