"""A plain run's tokens emitted as one ``TokenRun``: the same tokens, text, counts and shares as one by one."""

from __future__ import annotations

import random

import pytest

from speculative.completion import CompletionRequest, TokenStream
from speculative.errors import SpeculativeError
from speculative.pair import DEMO_VERIFIER, load_tokenizer
from speculative.types import FinishReason, TokenEvent, TokenRun


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO_VERIFIER)


class Stream(TokenStream):
    """A stream fed runs by the test (``_emit`` or ``_emit_run`` called directly)."""

    def _run(self):
        yield from ()


def _fed(tokenizer, runs, *, whole: bool, eos: int | None, **request) -> tuple[Stream, list]:
    stream = Stream(tokenizer, eos, CompletionRequest(prompt_ids=(1, 2), **request))
    stream._unbilled_gpu_ms = 0.9  # a prefill, billed to the first token
    items: list = []
    for run in runs:
        items += stream._emit_run([(run, 0, 1.3, 0)]) if whole else stream._emit(run, 0, 1.3)
        if stream.stats.finish_reason is not None:
            break
    return stream, items


def _as_events(items) -> list[tuple[int, str, float, float, str]]:
    """Each token's (id, text, gpu share, drafted, provenance), a run's spelled out."""
    out = []
    for item in items:
        if isinstance(item, TokenRun):
            drafted = item.drafted or (0.0,) * len(item.token_ids)
            parts = zip(item.token_ids, item.texts(), item.gpu_shares(), drafted, item.provenances(), strict=True)
            out += [(t, x, g, d, p.value) for t, x, g, d, p in parts]
        else:
            assert isinstance(item, TokenEvent)
            out.append((item.token_id, item.text, item.gpu_ms, item.drafted, item.provenance.value))
    return out


def test_runs_emit_what_their_tokens_one_by_one_would(tokenizer):
    rng = random.Random(5)
    eos = tokenizer.eos_token_id
    kinds = set()
    for _ in range(300):
        runs = [tuple(rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 20))) for _ in range(4)]
        if rng.random() < 0.3:  # EOS inside a run
            r = rng.randrange(4)
            runs[r] = (*runs[r][: rng.randrange(len(runs[r]))], eos, *runs[r])
        max_tokens = rng.randrange(1, 60)
        one, by_one = _fed(tokenizer, runs, whole=False, eos=eos, max_tokens=max_tokens)
        run, together = _fed(tokenizer, runs, whole=True, eos=eos, max_tokens=max_tokens)
        kinds |= {type(item) for item in together}
        spelled, events = _as_events(together), _as_events(by_one)
        # texts may gather on a later token of the run; the tokens, their shares and the text are the same
        assert [(t, g, d, p) for t, _, g, d, p in spelled] == [(t, g, d, p) for t, _, g, d, p in events]
        assert "".join(x for _, x, *_ in spelled) == "".join(x for _, x, *_ in events) == one.text == run.text
        assert run.stats == one.stats and run.token_ids == one.token_ids
    assert kinds == {TokenRun, TokenEvent}  # both seen: runs, and EOS or a run ending inside a character


def test_a_run_that_ends_inside_a_character_or_needs_stop_strings_or_logprobs_goes_token_by_token(tokenizer):
    byte_tokens = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith("\ufffd")]
    assert byte_tokens  # a byte-level vocabulary: some tokens hold part of a character
    run = (*tokenizer.encode("Hello", add_special_tokens=False), byte_tokens[0])
    _, items = _fed(tokenizer, [run], whole=True, eos=None, max_tokens=64)
    assert all(isinstance(item, TokenEvent) for item in items) and len(items) == len(run)
    hello = tuple(tokenizer.encode("Hello world", add_special_tokens=False))
    _, items = _fed(tokenizer, [hello], whole=True, eos=None, max_tokens=64, stop=("wor",))
    assert all(isinstance(item, TokenEvent) for item in items)
    stream, items = _fed(tokenizer, [hello], whole=True, eos=None, max_tokens=64)
    assert [type(item) for item in items] == [TokenRun] and items[0].text == "Hello world" == stream.text
    stream, items = _fed(tokenizer, [hello], whole=True, eos=None, max_tokens=2)
    assert [len(item.token_ids) for item in items] == [2] and stream.stats.finish_reason is FinishReason.LENGTH
    with pytest.raises(SpeculativeError, match="logprobs were requested"):  # never a run that silently lacks them
        _fed(tokenizer, [hello], whole=True, eos=None, max_tokens=64, logprobs=0)


def _drafted_rounds(rng: random.Random, vocab: int, eos: int, n: int) -> list[tuple[tuple[int, ...], int, float, int]]:
    """``n`` random drafting rounds (emitted, accepted, gpu ms, drafted); EOS, if any, in the last."""
    rounds = []
    for i in range(n):
        k = rng.randrange(0, 5)
        n_matches = rng.randrange(0, k + 1)
        emitted = tuple(rng.randrange(vocab) for _ in range(n_matches + 1))
        if i == n - 1 and rng.random() < 0.3:
            cut = rng.randrange(len(emitted))
            emitted = (*emitted[:cut], eos, *emitted[cut + 1 :])
        rounds.append((emitted, n_matches, rng.uniform(0.2, 2.0), k))
    return rounds


def test_drafting_rounds_as_one_run_emit_what_their_rounds_one_by_one_would(tokenizer):
    rng = random.Random(11)
    eos = tokenizer.eos_token_id
    kinds = set()
    for _ in range(300):
        rounds = _drafted_rounds(rng, len(tokenizer), eos, rng.randrange(1, 12))
        max_tokens = rng.randrange(1, 40)
        streams = []
        for whole in (False, True):
            stream = Stream(tokenizer, eos, CompletionRequest(prompt_ids=(1, 2), max_tokens=max_tokens))
            stream._unbilled_gpu_ms = 0.9
            items: list = []
            if whole:
                items += stream._emit_run(rounds)
            else:
                for emitted, n_matches, gpu_ms, k in rounds:
                    items += stream._emit(emitted, n_matches, gpu_ms, k)
                    if stream.stats.finish_reason is not None:
                        break
            streams.append((stream, items))
        (one, by_one), (run, together) = streams
        kinds |= {type(item) for item in together}
        spelled, events = _as_events(together), _as_events(by_one)
        assert [(t, g, d, p) for t, _, g, d, p in spelled] == [(t, g, d, p) for t, _, g, d, p in events]
        assert "".join(x for _, x, *_ in spelled) == "".join(x for _, x, *_ in events) == one.text == run.text
        assert run.stats == one.stats and run.token_ids == one.token_ids
    assert kinds == {TokenRun, TokenEvent}


def test_a_token_run_refuses_per_token_figures_of_another_length():
    with pytest.raises(ValueError, match="one a token"):
        TokenRun((1, 2), "ab", 0.1, 0.0, shares=(0.1,))
