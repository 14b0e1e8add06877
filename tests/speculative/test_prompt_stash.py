"""Kept prompts stashed in host memory: which streams go there and come back (``SequenceIds``), the stash
itself on a llama.cpp context (``PromptStash``), and the verifier decoding on a stream written back."""

from __future__ import annotations

import pytest

from speculative.llama_sequences import COPY_OVER, SequenceIds, common_prefix
from speculative.pair import DEMO_VERIFIER_GGUF
from speculative.prompt_stash import PromptStash
from speculative.types import SamplingParams
from speculative.verifier import VerifyRequest
from speculative.verifier_llama import LlamaCppVerifier
from tests.speculative.test_verifier_llama import _prefilled_positions

GREEDY = SamplingParams()


class FakeStash:
    """``PromptStash``'s side of ``SequenceIds``, recording what it was asked."""

    def __init__(self, fail: bool = False):
        self.entries: dict[tuple[int, ...], int] = {}  # tokens -> the id saved from
        self.saved: list[tuple[int, tuple[int, ...]]] = []
        self.restored: list[tuple[tuple[int, ...], int, int]] = []
        self.fail = fail

    def save(self, seq: int, tokens) -> None:
        self.entries[tuple(tokens)] = seq
        self.saved.append((seq, tuple(tokens)))

    def longest(self, want):
        return max(((common_prefix(k, want), k) for k in self.entries), default=(0, None))

    def restore(self, key, seq: int, keep: int) -> bool:
        self.restored.append((key, seq, keep))
        return not self.fail


def _ids(n: int, stash: FakeStash, copy: bool = True):
    removed: list[tuple[int, int]] = []
    copied: list[tuple[int, int]] = []
    ids = SequenceIds(
        n,
        lambda seq, start: removed.append((seq, start)),
        copy=(lambda a, b: copied.append((a, b))) if copy else None,
        stash=stash,  # type: ignore[arg-type]
    )
    return ids, removed, copied


PROMPT = list(range(100, 100 + COPY_OVER + 6))
ANSWER = [7] * 10


def test_a_kept_prompt_no_free_id_apart_can_take_is_stashed_and_written_back_for_its_next_request():
    stash = FakeStash()
    ids, removed, copied = _ids(3, stash)
    assert [ids.take()[0] for _ in range(2)] == [0, 1]  # two sessions go on
    assert ids.take(PROMPT) == (2, 0)
    ids.release(2, PROMPT + ANSWER)
    assert ids.take([5, 6]) == (2, 0)  # the only free id, beside them: nowhere apart to copy the prompt to
    assert copied == [] and stash.saved == [(2, tuple(PROMPT + ANSWER))]
    ids.release(2)
    removed.clear()
    # the prompt again: written back from host memory into the id it takes, emptied first; nothing evaluated again
    assert ids.take(PROMPT) == (2, len(PROMPT))
    assert removed == [(2, 0)] and stash.restored == [(tuple(PROMPT + ANSWER), 2, len(PROMPT))]
    assert ids.reused == len(PROMPT) and copied == []


def test_a_stash_is_written_back_only_for_copy_over_positions_more_than_an_id_keeps():
    stash = FakeStash()
    ids, _, _ = _ids(2, stash)
    stash.save(9, PROMPT + ANSWER)
    ids.take()  # session on id 0 goes on
    ids.release(1, PROMPT[: len(PROMPT) - COPY_OVER + 1])
    assert ids.take(PROMPT) == (1, len(PROMPT) - COPY_OVER + 1) and stash.restored == []
    ids.release(1, PROMPT[: len(PROMPT) - COPY_OVER])
    assert ids.take(PROMPT) == (1, len(PROMPT)) and len(stash.restored) == 1


def test_a_kept_prompt_a_copy_from_elsewhere_overwrites_goes_apart_first():
    for stash in (None, FakeStash()):
        ids, _, copied = _ids(8, stash)  # type: ignore[arg-type]
        assert [ids.take()[0] for _ in range(4)] == [0, 1, 2, 3]  # sessions that go on
        other = list(range(300, 300 + COPY_OVER + 2))
        assert ids.take(other) == (4, 0) and ids.take(PROMPT) == (5, 0)
        ids.release(4, other + ANSWER)  # beside sessions 0-3
        ids.release(5, PROMPT + ANSWER)  # apart from them
        # the prompt again: 5's stream is copied beside the others, over 4's, whose prompt goes first: copied apart
        # without a stash, to host memory with one
        assert ids.take(PROMPT) == (4, len(PROMPT)) and copied[-1] == (5, 4)
        if stash is None:
            assert len(copied) == 2 and copied[0][0] == 4 and copied[0][1] not in (4, 5)
        else:
            assert len(copied) == 1 and stash.saved == [(4, tuple(other + ANSWER))]


def test_streams_a_copy_reads_or_writes_at_the_next_decode_are_neither_stashed_nor_written_over():
    stash = FakeStash()
    ids, _, copied = _ids(8, stash)
    assert [ids.take()[0] for _ in range(4)] == [0, 1, 2, 3]  # sessions that go on
    other, third = list(range(300, 300 + COPY_OVER + 2)), list(range(500, 500 + COPY_OVER + 3))
    assert ids.take(other) == (4, 0) and ids.take(PROMPT) == (5, 0)
    ids.release(4, other + ANSWER)
    ids.release(5, PROMPT + ANSWER)
    assert ids.take(PROMPT) == (4, len(PROMPT)) and copied == [(5, 4)]  # 5's stream is read at the next decode
    assert ids.pending == {4}
    stash.save(9, third + ANSWER)
    # the third prompt's stash goes into a free id beside the others, but not 5, which that copy still reads
    seq, held = ids.take(third)
    assert held == len(third) and seq not in (4, 5) and stash.restored == [(tuple(third + ANSWER), seq, len(third))]
    ids.applied()  # the decode ran: the copies are done
    assert ids.pending == set() and not ids._copying(5)
    # a free id a copy will write is not stashed from: its data is not yet what it is said to hold
    ids.release(4, PROMPT + ANSWER)
    ids.pending.add(4)
    saved = len(stash.saved)
    ids.moved(4, seq)
    assert len(stash.saved) == saved


def test_a_session_moving_into_a_free_id_sends_the_prompt_it_keeps_to_host_memory_first():
    stash = FakeStash()
    ids, _, _ = _ids(5, stash)
    assert [ids.take(want)[0] for want in ([], PROMPT, [3], [4, 5], [9])] == [0, 1, 2, 3, 4]
    ids.release(1, PROMPT + ANSWER)
    ids.moved(1, 2)
    assert stash.saved == [(1, tuple(PROMPT + ANSWER))]
    ids.release(3, [4, 5] + ANSWER)
    ids.moved(3, 4)  # a short prompt's stream, mostly answer: not stashed
    assert len(stash.saved) == 1


def test_a_stash_that_cannot_be_written_back_leaves_the_stream_empty_and_nothing_reused():
    stash = FakeStash(fail=True)
    ids, removed, _ = _ids(2, stash)
    stash.save(9, PROMPT + ANSWER)
    ids.take()
    ids.release(1, PROMPT[:2])
    assert ids.take(PROMPT) == (1, 0) and ids.reused == 0
    assert removed == [(1, 0)]


# the stash on a llama.cpp context -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(demo_pair_llama):
    return demo_pair_llama[2]


def _fresh(max_sessions: int = 3, stash_bytes: int = 1 << 26) -> LlamaCppVerifier:
    return LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=max_sessions, n_threads=1, prompt_stash_bytes=stash_bytes)


def _plain(verifier: LlamaCppVerifier, sid: str, prompt: list[int], n: int, close: bool = True) -> list[int]:
    verifier.open_session(sid, prompt, GREEDY)
    try:
        return [verifier.verify([VerifyRequest(sid, (), None, r)]).verdicts[0].verifier_token for r in range(n)]
    finally:
        if close:
            verifier.close_session(sid)


def test_a_prompt_written_back_from_host_memory_is_not_evaluated_again_and_decodes_as_a_fresh_one(
    tokenizer, monkeypatch
):
    prompt = tokenizer.encode("Middleware is a framework of hooks into Django's request", add_special_tokens=False)
    other = tokenizer.encode("def get_queryset(self):", add_special_tokens=False)
    assert len(prompt) > COPY_OVER + 1
    expected = _plain(_fresh(), "x", prompt, 16)
    verifier = _fresh()
    _plain(verifier, "a", tokenizer.encode("The Django ORM", add_special_tokens=False), 2, close=False)  # id 0
    _plain(verifier, "b", tokenizer.encode("A form field", add_special_tokens=False), 2, close=False)  # id 1
    assert _plain(verifier, "p", prompt, 16) == expected  # on id 2, the last: its stream keeps the prompt
    _plain(verifier, "o", other, 4)  # takes id 2: nowhere to copy the prompt apart, so it is stashed
    stash = verifier._ids._stash
    assert stash is not None and stash.saved == 1 and stash.bytes > 0
    prefills = _prefilled_positions(verifier, monkeypatch)
    assert _plain(verifier, "p", prompt, 16) == expected  # written back: nothing evaluated before its first round
    assert prefills == [] and stash.restored == 1
    for sid in "ab":
        verifier.close_session(sid)


def test_the_stash_keeps_what_its_budget_holds_the_latest_used_and_a_longer_stash_of_the_same_tokens(
    tokenizer, monkeypatch
):
    verifier = _fresh()
    texts = ["Middleware is a framework of hooks", "The QuerySet API lets you filter", "A form field is a class"]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    for i, prompt in enumerate(prompts):
        _plain(verifier, f"s{i}", prompt, 4)
    stash = PromptStash(verifier._ctx, budget=1 << 30)
    kept = dict(verifier._ids._kept)  # id -> tokens its stream holds
    for seq, tokens in kept.items():
        stash.save(seq, tokens)
    size = stash.bytes // len(kept)
    seq, tokens = next(iter(kept.items()))
    stash.save(seq, tokens[:-2])  # held already, in a stash with more after it
    assert stash.saved == len(kept) and stash.longest(tokens[:-2] + [1]) == (len(tokens) - 2, tuple(tokens))
    small = PromptStash(verifier._ctx, budget=int(size * 2.5))
    for seq, tokens in kept.items():
        small.save(seq, tokens)
    assert small.saved == len(kept) and small.bytes <= small.budget
    first = next(iter(kept.values()))
    assert small.longest(first) == (0, None)  # the least recently used went first
    assert small.restore(tuple(first), 0, 3) is False
    few = PromptStash(verifier._ctx, budget=1 << 30)
    monkeypatch.setattr("speculative.prompt_stash.MAX_STASHED", 2)
    for seq, tokens in kept.items():
        few.save(seq, tokens)
    assert len(few._entries) == 2 and few.longest(first) == (0, None)  # the count is bounded too


def test_a_verifier_without_prefix_reuse_or_budget_stashes_nothing():
    assert LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=2, n_threads=1, reuse_prefixes=False)._ids._stash is None
    assert LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=2, n_threads=1, prompt_stash_bytes=0)._ids._stash is None
