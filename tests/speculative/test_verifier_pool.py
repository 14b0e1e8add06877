"""Several verifiers behind one (speculative.verifier_pool): lossless, spread, and a failed one skipped."""

from __future__ import annotations

import threading

import pytest

from speculative.draft_hf import TransformersDraft
from speculative.engine import SpeculativeEngine
from speculative.errors import VerifierUnavailableError
from speculative.verifier import TransformersVerifier
from speculative.verifier_pool import VerifierPool
from tests.speculative.conftest import ByteTokenizer, tiny_llama

VOCAB = 64
PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [3, 1, 4, 1, 5], [9, 2, 6]]


def verifier() -> TransformersVerifier:
    return TransformersVerifier("v", model=tiny_llama(vocab=VOCAB, seed=1), device="cpu")  # same weights each time


class Failing:
    """A verifier whose server is gone: every call fails as a RemoteVerifier's would."""

    def __init__(self, inner: TransformersVerifier) -> None:
        self.vocab_size, self.context_length, self.eos_token_id = (
            inner.vocab_size,
            inner.context_length,
            inner.eos_token_id,
        )
        self.opened = 0

    def open_session(self, *args, **kwargs) -> float:
        self.opened += 1
        raise VerifierUnavailableError("http://gone:8765 is unreachable")

    def verify(self, requests):
        raise VerifierUnavailableError("http://gone:8765 is unreachable")

    def close_session(self, session_id: str) -> None:
        pass


def draft() -> TransformersDraft:
    return TransformersDraft("d", model=tiny_llama(vocab=VOCAB, seed=1), device="cpu")  # agrees: long rounds


def run_all(engine: SpeculativeEngine) -> dict[int, list[int]]:
    """Every prompt at once, each on a thread of its own; the tokens each got."""
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = engine.generate(PROMPTS[i], max_tokens=16, k=3).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_sessions_spread_over_the_pool_and_the_output_equals_one_verifiers():
    alone = SpeculativeEngine(verifier(), ByteTokenizer(VOCAB), None)
    expected = {i: alone.generate(p, max_tokens=16).token_ids for i, p in enumerate(PROMPTS)}
    alone.close()
    pool = VerifierPool([verifier(), verifier()])
    seen: list[list[int]] = []
    original = pool.verify

    def watching(requests):
        seen.append(pool.sessions())
        return original(requests)

    pool.verify = watching  # type: ignore[method-assign]
    engine = SpeculativeEngine(pool, ByteTokenizer(VOCAB), draft())
    assert run_all(engine) == expected
    engine.close()
    assert any(min(counts) > 0 for counts in seen)  # both verifiers held sessions at once
    assert pool.sessions() == [0, 0]  # every session closed where it was opened


def test_a_verifier_that_fails_takes_no_new_sessions_and_the_rest_serve_them():
    gone = Failing(verifier())
    pool = VerifierPool([gone, verifier()], cooldown_s=60)
    alone = SpeculativeEngine(verifier(), ByteTokenizer(VOCAB), None)
    expected = {i: alone.generate(p, max_tokens=16).token_ids for i, p in enumerate(PROMPTS)}
    alone.close()
    engine = SpeculativeEngine(pool, ByteTokenizer(VOCAB), draft())
    assert run_all(engine) == expected
    engine.close()
    assert gone.opened == 1  # tried once, then left alone for its cool-down


def test_every_verifier_down_is_the_callers_failure_and_mismatched_models_are_refused():
    pool = VerifierPool([Failing(verifier()), Failing(verifier())])
    engine = SpeculativeEngine(pool, ByteTokenizer(VOCAB), None)
    with pytest.raises(VerifierUnavailableError):
        engine.generate([1, 2, 3], max_tokens=4)
    engine.close()
    other = TransformersVerifier("v", model=tiny_llama(vocab=VOCAB * 2, seed=1), device="cpu")
    with pytest.raises(ValueError, match="different models"):
        VerifierPool([verifier(), other])
