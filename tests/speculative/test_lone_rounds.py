"""A lone session's drafting rounds in C (``lockstep.c``'s ``tandem_speculate``, ``speculative.lone_rounds``): round
for round what Python's rounds do (tokens, verdicts, both models' caches and bookkeeping), ended where Python's end,
a failed decode undone in both models."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import shutil
import threading
import time
from contextlib import contextmanager

import pytest

from speculative import lone_rounds, native_steps
from speculative.draft import DraftSession
from speculative.draft_llama import LlamaCppContext
from speculative.errors import SpeculativeError
from speculative.verifier import VerifyRequest
from tests.speculative.test_native_steps import needs_cc
from tests.speculative.test_verifier_llama import GREEDY, _emitted, _plain


@pytest.fixture(scope="module")
def pair(demo_pair_llama):
    verifier, draft, tokenizer = demo_pair_llama
    if shutil.which("cc") is not None:
        assert verifier._native_rounds is not None  # a machine with a compiler builds and uses it
    return verifier, draft, tokenizer


def _speculate(pair, prompt: list[int], max_tokens: int, k: int, native: bool, **kwargs) -> dict:
    """A run of rounds from a fresh session (in C where ``native``): what it returned and left in both models."""
    verifier, draft, _ = pair
    verifier.open_session("lone", prompt, GREEDY)
    drafter = DraftSession(draft, prompt, GREEDY, lazy=True)
    try:
        decodes = verifier.decodes, draft.decodes
        interrupt = ctypes.c_int32(0) if native else None
        rounds = verifier.speculate_greedy("lone", 0, max_tokens, drafter, k, interrupt=interrupt, **kwargs)
        s = verifier._sessions["lone"]
        after = {
            "rounds": [(r.proposal.tokens, r.proposal.caught_up, r.verdict) for r in rounds],
            "session": (list(s.tokens), s.pending, s.round, s.last),
            "draft": (list(drafter.committed), drafter._n_cached, list(drafter._ctx._tokens)),
            "decodes": (verifier.decodes - decodes[0], draft.decodes - decodes[1]),
            "timed": all(r.verify_ms > 0 for r in rounds) and all(r.proposal.draft_ms > 0 for r in rounds[:-1]),
            # both caches hold what was committed: the next plain round and the next proposal go on from there
            "next": verifier.verify([VerifyRequest("lone", (), None, len(rounds))]).verdicts[0].verifier_token,
        }
        after["proposal"] = drafter.propose_now(2).tokens
        after["emitted"] = _emitted(rounds)
        return after
    finally:
        drafter.close()
        verifier.close_session("lone")


def _counting_python_rounds(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = lone_rounds._round

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lone_rounds, "_round", counted)
    return calls


@needs_cc
@pytest.mark.parametrize("k", [1, 3])
def test_rounds_in_c_are_pythons_rounds_for_the_session_the_draft_and_both_caches(pair, monkeypatch, k):
    verifier, _, tokenizer = pair
    prompt = tokenizer.encode("Migrations are Django's way of", add_special_tokens=False)
    expected = _plain(verifier, prompt, 31)
    _speculate(pair, prompt, 30, k, native=False)  # (the draft then reuses the prompt alike in both runs below)
    python = _speculate(pair, prompt, 30, k, native=False)
    calls = _counting_python_rounds(monkeypatch)
    native = _speculate(pair, prompt, 30, k, native=True)
    assert calls == []  # every round ran in C, the last one (nothing left to draft) too
    assert native["emitted"] == python["emitted"] == expected[:30] and native["next"] == expected[30]
    for what in ("rounds", "session", "draft", "decodes", "proposal"):
        assert native[what] == python[what], what
    assert native["timed"] and python["timed"]
    assert any(v.n_matches < len(tokens) for tokens, _, v in native["rounds"])  # (rollbacks were part of it)


@needs_cc
def test_rounds_in_c_end_at_the_interrupt_the_deadline_and_the_end_of_sequence(pair, monkeypatch):
    verifier, _, tokenizer = pair
    prompt = tokenizer.encode("A URLconf maps", add_special_tokens=False)
    expected = _plain(verifier, prompt, 24)
    calls = _counting_python_rounds(monkeypatch)
    asked = [0]

    def stop_once_put() -> bool:  # a session is queued just after the run looked: its put sets the interrupt
        asked[0] += 1
        interrupt.value = 1
        return asked[0] > 1

    interrupt = ctypes.c_int32(0)
    verifier.open_session("lone", prompt, GREEDY)
    drafter = DraftSession(pair[1], prompt, GREEDY, lazy=True)
    try:
        rounds = verifier.speculate_greedy("lone", 0, 20, drafter, 2, stop_once_put, interrupt=interrupt)
    finally:
        drafter.close()
        verifier.close_session("lone")
    assert len(rounds) == 1 and _emitted(rounds) == expected[: len(_emitted(rounds))]
    past = time.perf_counter() - 1.0
    ran = _speculate(pair, prompt, 20, 2, native=True, deadline=past, stop=lambda: time.perf_counter() > past)
    assert len(ran["rounds"]) == 1 and calls == []  # the first round always runs, in C
    step = next(i for i in range(4, 20) if expected[i] not in expected[:i])
    monkeypatch.setattr(verifier, "eos_token_id", expected[step])  # a token it emits plays the end of sequence
    ran = _speculate(pair, prompt, 20, 2, native=True)
    tokens, _, verdict = ran["rounds"][-1]
    assert expected[step] in verdict.emitted_tokens(tokens) and ran["emitted"] == expected[: len(ran["emitted"])]
    assert expected[step] not in ran["emitted"][: -1 - verdict.n_matches]  # the round that emitted it was the last
    assert ran["emitted"] == _speculate(pair, prompt, 20, 2, native=False)["emitted"]


@needs_cc
def test_rounds_in_c_give_way_to_another_thread_waiting_for_the_draft(pair, monkeypatch):
    verifier, draft, tokenizer = pair
    prompt = tokenizer.encode("The admin site", add_special_tokens=False)
    expected = _plain(verifier, prompt, 16)
    # a thread waiting for the draft's turn raises its flag, and lowers it as it takes the turn
    draft._claim()
    waiter = threading.Thread(target=lambda: (draft._claim(), draft._release_turn()))
    waiter.start()
    deadline = time.monotonic() + 10
    while not draft._waiting.value and time.monotonic() < deadline:
        time.sleep(0.001)
    assert draft._waiting.value == 1
    draft._release_turn()
    waiter.join(timeout=10)
    assert draft._waiting.value == 0  # lowered as the waiter took its turn
    # with the flag raised during every turn in C, each turn runs one round and Python's rounds go between them
    real = LlamaCppContext.native_turn

    def contended(self, threads=None):
        with real(self, threads) as turn:
            turn.waiting.value = 1
            yield turn

    monkeypatch.setattr(LlamaCppContext, "native_turn", contextmanager(contended))
    calls = _counting_python_rounds(monkeypatch)
    ran = _speculate(pair, prompt, 16, 1, native=True)
    assert ran["emitted"] == expected and ran["next"] == _plain(verifier, prompt, 17)[16]
    assert 0 < len(calls) <= len(ran["rounds"]) - len(calls) <= len(calls) + 1  # C's and Python's rounds alternate


@needs_cc
@pytest.mark.parametrize("fails_at", [3, 4])  # (k = 1) round 2's draft decode, its verifier decode
def test_a_failed_decode_in_c_undoes_its_round_in_both_models_and_keeps_the_rounds_before(pair, monkeypatch, fails_at):
    import llama_cpp

    verifier, draft, tokenizer = pair
    prompt = tokenizer.encode("Class-based views provide", add_special_tokens=False)
    expected = _plain(verifier, prompt, 12)
    native = verifier._native_rounds
    decode_type = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, llama_cpp.llama_batch)
    real_decode = decode_type(native._lib.decode)
    calls = [0]

    @decode_type
    def failing(ctx, batch):  # (llama.cpp's status 1: no room in the KV cache)
        calls[0] += 1
        return 1 if calls[0] == fails_at else real_decode(ctx, batch)

    failing_lib = dataclasses.replace(native._lib, decode=ctypes.cast(failing, ctypes.c_void_p).value)
    verifier.open_session("lone", prompt, GREEDY)
    drafter = DraftSession(draft, prompt, GREEDY, lazy=True)
    try:
        monkeypatch.setattr(native, "_lib", failing_lib)
        with pytest.raises(SpeculativeError, match="status 1"):
            verifier.speculate_greedy("lone", 0, 12, drafter, 1, interrupt=ctypes.c_int32(0))
        monkeypatch.undo()
        s = verifier._sessions["lone"]
        first = len(s.tokens) - len(prompt) + 1  # what round 1 emitted
        assert (
            s.tokens[len(prompt) :] + [s.pending] == expected[:first] and drafter.committed == prompt + expected[:first]
        )
        assert drafter._ctx._tokens == drafter.committed[: drafter._n_cached]
        rest = verifier.speculate_greedy("lone", 1, 12 - first, drafter, 1, interrupt=ctypes.c_int32(0))
    finally:
        drafter.close()
        verifier.close_session("lone")
    assert expected[:first] + _emitted(rest) == expected  # as if the failed round never was


def test_without_the_native_library_or_an_interrupt_rounds_run_in_python(pair, monkeypatch):
    verifier, _, tokenizer = pair
    prompt = tokenizer.encode("A form field", add_special_tokens=False)
    expected = _plain(verifier, prompt, 10)
    calls = _counting_python_rounds(monkeypatch)
    assert _speculate(pair, prompt, 10, 2, native=False)["emitted"] == expected and calls
    del calls[:]
    monkeypatch.setattr(verifier, "_native_rounds", None)
    assert _speculate(pair, prompt, 10, 2, native=True)["emitted"] == expected and calls
    assert lone_rounds.bind(None, verifier) is None


@needs_cc
def test_c_structs_not_mirrored_leave_the_rounds_to_python(pair, caplog):
    verifier = pair[0]
    lib = native_steps.lockstep()
    assert lib is not None and lib.layout == (ctypes.sizeof(lone_rounds.Side), ctypes.sizeof(lone_rounds.NativeRound))
    assert lone_rounds.bind(lib, verifier) is not None
    other = dataclasses.replace(lib, layout=(lib.layout[0], lib.layout[1] + 8))  # (a draft cap changed on one side)
    with caplog.at_level(logging.WARNING, logger="speculative.lone_rounds"):
        assert lone_rounds.bind(other, verifier) is None
    assert "run in Python" in caplog.text
