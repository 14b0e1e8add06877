"""Plain greedy lockstep steps in C (``speculative/lockstep.c``): the same tokens and bookkeeping as the Python
steps, ended by a run's end, its deadline, the caller's interrupt or a failed decode; built once, optional."""

from __future__ import annotations

import ctypes
import logging
import shutil

import numpy as np
import pytest

from speculative import native_steps
from speculative.errors import SpeculativeError
from speculative.llama_runs import GreedyRun
from speculative.verifier import VerifyRequest
from tests.speculative.test_verifier_llama import GREEDY, PROMPTS, _plain  # plain rounds: what native steps equal

# (the lone session's rounds in C too: ``test_lone_rounds``)
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) here: Python's steps serve")


@pytest.fixture(scope="module")
def llama(demo_pair_llama):
    verifier, _, tokenizer = demo_pair_llama
    if shutil.which("cc") is not None:
        assert verifier._native is not None  # a machine with a compiler builds and uses it
    return verifier, tokenizer


def _run(verifier, runs, interrupt, stop_after=None):
    """``run_greedy`` with a ``between`` that adds nothing: each run's tokens, and what between heard (steps, n)."""
    heard, tokens = [], {}

    def between(ends, n, step_ms, steps):
        assert step_ms > 0 and all(e.verify_ms >= e.gpu_ms > 0 for e in ends)
        heard.append((steps, n))
        tokens.update((e.key, e.tokens) for e in ends)
        return (), stop_after is not None and sum(s for s, _ in heard) >= stop_after

    last, _ = verifier.run_greedy([GreedyRun(i, *run) for i, run in enumerate(runs)], between, interrupt)
    tokens.update((e.key, e.tokens) for e in last)
    return [tokens[i] for i in range(len(runs))], heard


@needs_cc
def test_native_steps_decode_what_plain_rounds_do_and_between_hears_of_them_together(llama):
    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    expected = [_plain(verifier, p, 15) for p in prompts]
    for i, prompt in enumerate(prompts):
        verifier.open_session(f"n{i}", prompt, GREEDY)
    try:
        # alone: one call of 9 steps; then three sessions whose runs end after 5, 3 and 4 more steps
        alone, heard_alone = _run(verifier, [("n0", 0, 9)], ctypes.c_int32(0))
        together, heard = _run(verifier, [("n0", 9, 5), ("n1", 0, 3), ("n2", 0, 4)], ctypes.c_int32(0))
        after = verifier.verify([VerifyRequest(f"n{i}", (), None, r) for i, r in ((0, 14), (1, 3), (2, 4))]).verdicts
    finally:
        for i in range(3):
            verifier.close_session(f"n{i}")
    assert alone == [expected[0][:9]] and heard_alone == [(9, 1)]
    assert together == [expected[0][9:14], expected[1][:3], expected[2][:4]]
    # steps in which no run ended went together; each end was heard at its own step
    assert heard == [(3, 3), (1, 2), (1, 1)]
    assert [v.verifier_token for v in after] == [expected[0][14], expected[1][3], expected[2][4]]  # sessions went on


@needs_cc
def test_an_interrupt_set_ends_native_steps_after_the_step_in_flight(llama):
    verifier, tokenizer = llama
    prompt = tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    expected = _plain(verifier, prompt, 6)
    verifier.open_session("i", prompt, GREEDY)
    try:
        raised = ctypes.c_int32(1)  # (as another thread leaves it once it queued a session: never cleared here)
        tokens, heard = _run(verifier, [("i", 0, 6)], raised)
    finally:
        verifier.close_session("i")
    assert tokens == [expected] and heard == [(1, 1)] * 6


@needs_cc
def test_native_steps_end_at_the_end_of_sequence_and_at_the_deadline(llama, monkeypatch):
    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:2]]
    expected = [_plain(verifier, p, 12) for p in prompts]
    step = next(i for i in range(3, 12) if expected[0][i] not in expected[0][:i] + expected[1][:i])
    verifier.open_session("eos", prompts[0], GREEDY)
    verifier.open_session("other", prompts[1], GREEDY)
    try:
        with monkeypatch.context() as m:
            m.setattr(verifier._native, "_args", verifier._native._args[:5] + (expected[0][step],))
            monkeypatch.setattr(verifier, "eos_token_id", expected[0][step])
            tokens, heard = _run(verifier, [("eos", 0, 12), ("other", 0, 12)], ctypes.c_int32(0), stop_after=step + 1)
    finally:
        verifier.close_session("eos")
        verifier.close_session("other")
    assert tokens == [expected[0][: step + 1], expected[1][: step + 1]] and heard == [(step + 1, 2)]
    verifier.open_session("late", prompts[0], GREEDY)
    try:
        tokens, heard = _run(verifier, [("late", 0, 8, 0.0)], ctypes.c_int32(0))  # deadline passed: a step
    finally:
        verifier.close_session("late")
    assert tokens == [expected[0][:1]] and heard == [(1, 1)]


@needs_cc
def test_a_failed_native_step_puts_every_session_back_and_counts_its_decodes(llama, monkeypatch):
    import llama_cpp

    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:2]]
    expected = [_plain(verifier, p, 6) for p in prompts]
    real = native_steps.lockstep()
    assert real is not None
    calls = [0]
    decode_type = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, llama_cpp.llama_batch)
    real_decode = decode_type(real.decode)

    @decode_type
    def failing(ctx, batch):  # the third step's decode fails (llama.cpp's status 1: no room in the KV cache)
        calls[0] += 1
        return 1 if calls[0] == 3 else real_decode(ctx, batch)

    native = verifier._native
    monkeypatch.setattr(native, "_args", (ctypes.cast(failing, ctypes.c_void_p).value,) + native._args[1:])
    for i, prompt in enumerate(prompts):
        verifier.open_session(f"f{i}", prompt, GREEDY)
    try:
        decodes = verifier.decodes
        with pytest.raises(SpeculativeError, match="status 1"):
            _run(verifier, [("f0", 0, 6), ("f1", 0, 6)], ctypes.c_int32(0))
        assert verifier.decodes - decodes == 3
        monkeypatch.undo()
        tokens, _ = _run(verifier, [("f0", 0, 6), ("f1", 0, 6)], ctypes.c_int32(0))  # as if the run never was
    finally:
        for i in range(2):
            verifier.close_session(f"f{i}")
    assert tokens == expected


@needs_cc
def test_the_c_argmax_is_numpys_first_largest_or_first_nan():
    path = native_steps.build()
    argmax = ctypes.CDLL(str(path)).tandem_argmax
    argmax.restype, argmax.argtypes = ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32]
    rng = np.random.default_rng(7)
    for trial in range(2000):
        x = rng.standard_normal(int(rng.integers(1, 200))).astype(np.float32)
        if trial % 2:
            x = np.round(x)  # ties: the first of them
        if trial % 5 == 0:
            x[rng.integers(0, len(x), 2)] = np.nan
        if trial % 13 == 0:
            x[:] = -np.inf
        assert argmax(x.ctypes.data, len(x)) == int(np.argmax(x)), x


@needs_cc
def test_the_library_is_built_once_per_source_and_compiler_and_refused_for_another_batch_layout(tmp_path, monkeypatch):
    first = native_steps.build(tmp_path)
    made = first.stat().st_mtime_ns
    assert native_steps.build(tmp_path) == first and first.stat().st_mtime_ns == made
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch file left
    assert native_steps._load(first).decode
    monkeypatch.setattr(native_steps, "BATCH_FIELDS", native_steps.BATCH_FIELDS[:-1])
    with pytest.raises(RuntimeError, match="layout"):
        native_steps._load(first)


def test_without_a_compiler_or_when_turned_off_plain_steps_run_in_python(tmp_path, monkeypatch, caplog):
    with pytest.raises(RuntimeError, match="no C compiler"):
        native_steps.build(tmp_path, compiler="no-such-cc")
    if shutil.which("false") is not None:
        with pytest.raises(RuntimeError, match="failed"):
            native_steps.build(tmp_path, compiler="false")  # a compiler that fails: refused, nothing left behind
        assert list(tmp_path.iterdir()) == []
    for env, said in (({"CC": "no-such-cc"}, "unavailable"), ({"TANDEM_NATIVE_STEPS": "0"}, "off")):
        monkeypatch.setattr(native_steps, "_tried", False)
        monkeypatch.setattr(native_steps, "_loaded", None)
        monkeypatch.setenv("TANDEM_NATIVE_DIR", str(tmp_path / "fresh"))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with caplog.at_level(logging.INFO, logger="speculative.native_steps"):
            assert native_steps.lockstep() is None and native_steps.lockstep() is None
        assert sum(said in r.getMessage() for r in caplog.records) == 1  # said once
        assert native_steps.bind(None, None, 1, None) is None
        caplog.clear()


@needs_cc
def test_a_session_that_comes_while_a_whole_answer_decodes_natively_joins_it_at_once(llama, monkeypatch):
    import threading
    import time

    from speculative.completion import TokenRun
    from speculative.engine import SpeculativeEngine

    verifier, tokenizer = llama
    monkeypatch.setattr("speculative.scheduler.WHOLE_RUN_MS", 60_000.0)  # the whole answer in one native run
    engine = SpeculativeEngine(verifier, tokenizer, None)
    ended = threading.Event()
    times: dict[str, float] = {}
    try:
        whole = engine.stream("To run the tests, use", max_tokens=800)

        def sink(item: object) -> None:
            if not isinstance(item, TokenRun):
                times.setdefault("whole", time.perf_counter())
                ended.set()

        whole.drive(sink, whole=True)
        deadline = time.perf_counter() + 10
        while engine.scheduler.load() < 1 and time.perf_counter() < deadline:
            time.sleep(0.001)
        time.sleep(0.05)  # opened alone (past a burst's arrival wait), it runs in C now
        joining = engine.stream("The settings file holds", max_tokens=4)
        next(iter(joining))
        times["joined"] = time.perf_counter()
        list(joining)
        assert ended.wait(timeout=60)
    finally:
        engine.close()
    # the newcomer's first token came while the whole answer still decoded: the native run ended for it
    assert times["joined"] < times["whole"] and whole.stats.completion_tokens == 800
