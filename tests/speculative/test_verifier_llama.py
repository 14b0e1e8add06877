"""The llama.cpp verifier backend: batched verify, rollback, slot reuse, batched prefill, bad input."""

from __future__ import annotations

import threading
import uuid

import pytest

from speculative.errors import (
    ContextOverflowError,
    InvalidRequestError,
    ModelLoadError,
    SessionNotFoundError,
    SpeculativeError,
    VerifierBusyError,
)
from speculative.llama_runs import GreedyRun
from speculative.llama_sequences import COPY_OVER, COPY_PASSES
from speculative.pair import DEMO_VERIFIER_GGUF
from speculative.types import MAX_DRAFT_TOKENS, Proposal, SamplingParams, Verdict
from speculative.verifier import VerifyRequest
from speculative.verifier_llama import LlamaCppVerifier

GREEDY = SamplingParams()
PROMPTS = ["The Django ORM", "Middleware is a framework of hooks", "def get_queryset(self):"]


@pytest.fixture(scope="module")
def llama(demo_pair_llama):
    verifier, _, tokenizer = demo_pair_llama
    return verifier, tokenizer


def _plain(verifier: LlamaCppVerifier, prompt: list[int], n: int) -> list[int]:
    """n tokens of plain greedy decoding: k = 0 rounds."""
    sid = uuid.uuid4().hex
    verifier.open_session(sid, prompt, GREEDY)
    try:
        return [verifier.verify([VerifyRequest(sid, (), None, r)]).verdicts[0].verifier_token for r in range(n)]
    finally:
        verifier.close_session(sid)


def test_a_draft_equal_to_plain_decoding_is_accepted_whole_with_the_next_token_as_bonus(llama):
    verifier, tokenizer = llama
    prompt = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    expected = _plain(verifier, prompt, 6)
    verifier.open_session("whole", prompt, GREEDY)
    try:
        verdict = verifier.verify([VerifyRequest("whole", tuple(expected[:5]), None, 0)]).verdicts[0]
    finally:
        verifier.close_session("whole")
    assert (verdict.n_matches, verdict.verifier_token) == (5, expected[5])


def test_a_rejected_tail_is_rolled_back_so_the_next_rounds_continue_as_plain_decoding(llama):
    verifier, tokenizer = llama
    prompt = tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    expected = _plain(verifier, prompt, 8)
    wrong = (expected[0], expected[1], (expected[2] + 1) % verifier.vocab_size, 7, 9)
    verifier.open_session("tail", prompt, GREEDY)
    try:
        first = verifier.verify([VerifyRequest("tail", wrong, None, 0)]).verdicts[0]
        rest = [verifier.verify([VerifyRequest("tail", (), None, r)]).verdicts[0].verifier_token for r in range(1, 6)]
    finally:
        verifier.close_session("tail")
    assert (first.n_matches, first.verifier_token) == (2, expected[2])
    assert rest == expected[3:8]


def test_many_sessions_verified_in_one_decode_each_get_their_own_plain_decoding(llama):
    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    expected = [_plain(verifier, p, 7) for p in prompts]
    for i, p in enumerate(prompts):
        verifier.open_session(f"b{i}", p, GREEDY)
    try:
        before = verifier.decodes
        drafts = [tuple(expected[0][:3]), tuple(expected[1][:1]) + (5, 5), ()]  # accepted, cut short, plain
        result = verifier.verify([VerifyRequest(f"b{i}", d, None, 0) for i, d in enumerate(drafts)])
        assert verifier.decodes == before + 1
        got = [v.emitted_tokens(d) for v, d in zip(result.verdicts, drafts, strict=True)]
        assert got == [tuple(expected[0][:4]), tuple(expected[1][:2]), tuple(expected[2][:1])]
        # and each sequence continues from exactly what it kept
        nxt = verifier.verify([VerifyRequest(f"b{i}", (), None, 1) for i in range(3)]).verdicts
        assert [v.verifier_token for v in nxt] == [expected[0][4], expected[1][2], expected[2][1]]
    finally:
        for i in range(3):
            verifier.close_session(f"b{i}")


def test_a_rounds_rows_reach_llama_cpp_in_increasing_sequence_ids_whatever_order_sessions_join(llama, monkeypatch):
    # With a KV stream per sequence, llama.cpp runs each run of consecutive ids as a micro-batch of its
    # own: rows in join order (say 2, 0, 1) would be three graph evaluations instead of one
    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    expected = [_plain(verifier, p, 3) for p in prompts]
    for i, p in enumerate(prompts):
        verifier.open_session(f"o{i}", p, GREEDY)
    seen: list[list[int]] = []
    real = verifier._decode_batch

    def recording() -> int:
        batch = verifier._batch.batch
        seen.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return real()

    monkeypatch.setattr(verifier, "_decode_batch", recording)
    try:
        order = [2, 0, 1]
        drafts = {0: tuple(expected[0][:2]), 1: (), 2: tuple(expected[2][:1])}
        result = verifier.verify([VerifyRequest(f"o{i}", drafts[i], None, 0) for i in order])
    finally:
        for i in range(3):
            verifier.close_session(f"o{i}")
    assert len(seen) == 1 and seen[0] == sorted(seen[0]) and len(set(seen[0])) == 3
    # the verdicts still come back in the order asked, each its own session's
    got = [v.emitted_tokens(drafts[i]) for v, i in zip(result.verdicts, order, strict=True)]
    assert got == [tuple(expected[2][:2]), tuple(expected[0][:3]), tuple(expected[1][:1])]


def test_sessions_opening_together_are_prefilled_in_one_decode(llama):
    verifier, tokenizer = llama
    # prompts no other test opens: a sequence that kept one (``SequenceIds``) would need no prefill at all
    texts = ["Template tags are", "QuerySets are lazy because", "class Meta: ordering ="]
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in texts]
    start = threading.Barrier(len(prompts))
    decodes_before = verifier.decodes
    errors: list[BaseException] = []

    def open_one(i: int) -> None:
        start.wait(timeout=30)
        try:
            verifier.open_session(f"p{i}", prompts[i], GREEDY)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with verifier._lock:  # hold the decode lock so all three queue up behind it
        threads = [threading.Thread(target=open_one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        deadline = threading.Event()
        for _ in range(600):  # poll until every ticket is queued (no sleep on a fixed guess)
            if len(verifier._prefills) == len(prompts):
                break
            deadline.wait(0.01)
        assert len(verifier._prefills) == len(prompts)
    for t in threads:
        t.join(timeout=60)
    try:
        assert not errors
        assert verifier.decodes == decodes_before + 1
        tokens = verifier.verify([VerifyRequest(f"p{i}", (), None, 0) for i in range(3)]).verdicts
    finally:
        for i in range(3):
            verifier.close_session(f"p{i}")
    assert [v.verifier_token for v in tokens] == [_plain(verifier, p, 3)[0] for p in prompts]


def test_a_closed_sessions_sequence_is_reused_clean_and_a_full_verifier_refuses_more():
    verifier = LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=2, n_threads=1)
    prompt = [5, 6, 7, 8]
    expected = _plain(verifier, prompt, 4)
    verifier.open_session("a", prompt, GREEDY)
    verifier.open_session("b", [9, 10, 11], GREEDY)
    with pytest.raises(VerifierBusyError):
        verifier.open_session("c", prompt, GREEDY)
    verifier.verify([VerifyRequest("a", (1, 2, 3), None, 0)])
    verifier.close_session("a")
    verifier.open_session("again", prompt, GREEDY)  # takes the sequence "a" left
    got = [verifier.verify([VerifyRequest("again", (), None, r)]).verdicts[0].verifier_token for r in range(4)]
    assert got == expected
    assert verifier.open_sessions == 2


def test_the_warm_up_leaves_every_sequence_free_and_plain_decoding_unchanged():
    verifier = LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=2, n_threads=1)
    prompt = [5, 6, 7, 8]
    expected = _plain(verifier, prompt, 4)
    decodes = verifier.decodes
    timed = verifier.warm_up()
    assert verifier.decodes > decodes and verifier.open_sessions == 0
    # its warmed decodes, timed: four one-position steps and one of every round size
    assert [n for n, _ in timed] == [1, 1, 1, 1, *range(2, MAX_DRAFT_TOKENS + 2)] and all(ms > 0 for _, ms in timed)
    verifier.open_session("a", prompt, GREEDY)  # both sequences, the warm-up's among them, hold nothing of it
    verifier.open_session("b", prompt, GREEDY)
    for sid in ("a", "b"):
        assert [verifier.verify([VerifyRequest(sid, (), None, r)]).verdicts[0].verifier_token for r in range(4)] == (
            expected
        )


def test_the_scheduler_warms_its_verifier_up_on_its_own_thread_before_any_round():
    from speculative.scheduler import VerifyScheduler

    class Recording:
        def __init__(self):
            self.calls: list[str] = []
            self.warmed = threading.Event()

        def warm_up(self):
            self.calls.append(threading.current_thread().name)
            self.warmed.set()
            return [(1, 0.5)] * 4 + [(16, 5.0)]

    verifier = Recording()
    scheduler = VerifyScheduler(verifier)  # type: ignore[arg-type]
    try:
        assert verifier.warmed.wait(5)
        assert verifier.calls == ["verify-scheduler"]  # the thread whose OpenMP team serves every round
    finally:
        scheduler.close()
    # its timed steps are the cost model's first points
    assert scheduler.cost.lone_ms() == 0.5 and list(scheduler.cost._points)[-1] == (16, 5.0)


def test_a_retried_round_gets_the_same_verdict_and_a_stale_one_is_refused(llama):
    verifier, tokenizer = llama
    verifier.open_session("retry", tokenizer.encode(PROMPTS[2], add_special_tokens=False), GREEDY)
    try:
        first = verifier.verify([VerifyRequest("retry", (3, 4), None, 0)]).verdicts[0]
        again = verifier.verify([VerifyRequest("retry", (3, 4), None, 0)]).verdicts[0]
        verifier.verify([VerifyRequest("retry", (), None, 1)])
        with pytest.raises(InvalidRequestError, match="stale"):
            verifier.verify([VerifyRequest("retry", (), None, 0)])
    finally:
        verifier.close_session("retry")
    assert again == first


@pytest.mark.parametrize(
    ("tokens", "q", "params", "match"),
    [
        ((1,) * 17, None, GREEDY, "at most"),
        ((10**6,), None, GREEDY, "must lie in"),
        ((1, 2), None, SamplingParams(temperature=0.7), "sampling needs q"),
    ],
)
def test_a_bad_round_is_a_clear_error_and_changes_nothing(llama, tokens, q, params, match):
    verifier, tokenizer = llama
    prompt = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    expected = _plain(verifier, prompt, 1)
    verifier.open_session("bad", prompt, params)
    try:
        with pytest.raises(InvalidRequestError, match=match):
            verifier.verify([VerifyRequest("bad", tokens, q, 0)])
        if params.greedy:  # the session is untouched: its round 0 still gives plain decoding's token
            assert verifier.verify([VerifyRequest("bad", (), None, 0)]).verdicts[0].verifier_token == expected[0]
    finally:
        verifier.close_session("bad")


def test_unknown_sessions_and_files_are_clear_errors(llama, tmp_path):
    verifier, _ = llama
    with pytest.raises(SessionNotFoundError):
        verifier.verify([VerifyRequest("nobody", (), None, 0)])
    with pytest.raises(ModelLoadError):
        LlamaCppVerifier(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        LlamaCppVerifier(tmp_path / "junk.gguf")
    # sizes llama.cpp would abort the process on (a batch smaller than the sequences) or cannot hold
    with pytest.raises(ModelLoadError, match=r"batch_tokens \(2\) must be at least max_sessions \(3\)"):
        LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=3, batch_tokens=2)
    for sessions in (0, 257):
        with pytest.raises(ModelLoadError, match="max_sessions must lie in"):
            LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=sessions)
    with pytest.raises(ModelLoadError, match="max_context must be at least 1 token"):
        LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=1, max_context=0)


def test_a_sessions_context_is_the_models_own_capped_at_max_context_and_a_longer_prompt_is_refused():
    assert LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=1, n_threads=1, max_context=None).context_length == 1024
    assert LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=1, n_threads=1).context_length == 1024  # under the cap
    capped = LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=1, n_threads=1, max_context=40)
    assert capped.context_length == 40
    with pytest.raises(ContextOverflowError):
        capped.open_session("long", list(range(5, 45)), GREEDY)
    capped.open_session("fits", list(range(5, 38)), GREEDY)  # the prompt and room for the next tokens
    verdict = capped.verify([VerifyRequest("fits", (), None, 0)]).verdicts[0]
    assert verdict.verifier_token >= 0


def test_logprobs_of_a_verified_round_equal_those_of_plain_decoding_at_the_same_positions(llama):
    verifier, tokenizer = llama
    prompt = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    expected = _plain(verifier, prompt, 4)
    verifier.open_session("lp-plain", prompt, GREEDY)
    verifier.open_session("lp-spec", prompt, GREEDY)
    try:
        plain = [verifier.verify([VerifyRequest("lp-plain", (), None, r, 3)]).verdicts[0] for r in range(3)]
        spec = verifier.verify([VerifyRequest("lp-spec", tuple(expected[:2]), None, 0, 3)]).verdicts[0]
    finally:
        verifier.close_session("lp-plain")
        verifier.close_session("lp-spec")
    assert spec.n_matches == 2 and spec.logprobs is not None and len(spec.logprobs) == 3
    for mine, theirs in zip(spec.logprobs, (v.logprobs[0] for v in plain if v.logprobs), strict=True):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t for t, _ in mine.top] == [t for t, _ in theirs.top] and len(mine.top) == 3


def test_a_step_larger_than_the_batch_runs_as_several_decodes_with_the_same_verdicts(llama):
    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    expected = [_plain(verifier, p, 6) for p in prompts]
    small = LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=3, n_threads=1, batch_tokens=4)
    for i, p in enumerate(prompts):
        small.open_session(f"s{i}", p, GREEDY)  # prompts of 4 to 9 tokens: prefill in chunks of 4
    drafts = [tuple(e[:4]) for e in expected]  # 3 rows of 5 positions: rows split across decodes
    before = small.decodes
    verdicts = small.verify([VerifyRequest(f"s{i}", d, None, 0) for i, d in enumerate(drafts)]).verdicts
    assert small.decodes - before == 4  # ceil(15 / 4)
    assert [(v.n_matches, v.verifier_token) for v in verdicts] == [(4, e[4]) for e in expected]


def test_a_sessions_verdicts_do_not_depend_on_the_drafts_batched_beside_it(llama):
    """Batch invariance: 16 sessions' four-token drafts in one decode give each its plain decoding alone.

    With one KV pool for all sequences (kv_unified) a session's cells interleave with the
    others' and flash attention sums them in another order: 5 of these 16 prompts' greedy
    outputs changed within 48 tokens. A KV stream per sequence keeps them equal.
    """
    verifier, tokenizer = llama
    topics = ["ORM", "admin", "forms", "views", "templates", "signals", "caching", "sessions"]
    prompts = [
        tokenizer.encode(f"{opening} {t}", add_special_tokens=False) for t in topics for opening in ("The", "Use")
    ]
    n = 40
    alone = [_plain(verifier, p, n) for p in prompts]
    got: list[list[int]] = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        verifier.open_session(f"inv{i}", p, GREEDY)
    try:
        for r in range(n):
            live = [i for i in range(len(prompts)) if len(got[i]) < n]
            if not live:
                break
            requests = [VerifyRequest(f"inv{i}", tuple(alone[i][len(got[i]) : len(got[i]) + 4]), None, r) for i in live]
            for i, req, verdict in zip(live, requests, verifier.verify(requests).verdicts, strict=True):
                got[i].extend(verdict.emitted_tokens(req.tokens))
    finally:
        for i in range(len(prompts)):
            verifier.close_session(f"inv{i}")
    assert [g[:n] for g in got] == alone


def _record_batches(verifier: LlamaCppVerifier, monkeypatch) -> list[list[tuple[int, bool]]]:
    """Each decode's (sequence id, logits wanted) per token, as llama.cpp receives them."""
    seen: list[list[tuple[int, bool]]] = []
    real = verifier._decode_batch

    def recording() -> int:
        b = verifier._batch.batch
        seen.append([(b.seq_id[i][0], bool(b.logits[i])) for i in range(b.n_tokens)])
        return real()

    monkeypatch.setattr(verifier, "_decode_batch", recording)
    return seen


def test_a_free_id_left_between_sessions_is_closed_once_it_lasts(llama, monkeypatch):
    # a free id between sessions splits each of their steps into two passes over the weights; moving a session
    # down copies its whole KV stream, so it waits until the split steps have cost as much (``Compaction``)
    _, tokenizer = llama
    verifier = LlamaCppVerifier(DEMO_VERIFIER_GGUF, n_threads=1, reuse_prefixes=False)  # ids low-first, as named
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in [*PROMPTS, "Class-based views"]]
    expected = [_plain(verifier, p, 12) for p in prompts]
    for i, p in enumerate(prompts):
        verifier.open_session(f"h{i}", p, GREEDY)  # sequences 0-3
    live = [0, 2, 3]
    try:
        first = verifier.verify([VerifyRequest(f"h{i}", (), None, 0) for i in range(4)]).verdicts
        verifier.close_session("h1")
        before = verifier.compactions
        seen = _record_batches(verifier, monkeypatch)
        drafts = {0: tuple(expected[0][1:4]), 2: (), 3: tuple(expected[3][1:3])}  # accepted whole, plain
        second = verifier.verify([VerifyRequest(f"h{i}", drafts[i], None, 1) for i in live]).verdicts
        later = [verifier.verify([VerifyRequest(f"h{i}", (), None, r) for i in live]).verdicts for r in range(2, 8)]
    finally:
        for i in live:
            verifier.close_session(f"h{i}")
    assert [v.verifier_token for v in first] == [e[0] for e in expected]
    assert verifier.compactions == before + 1
    ids = [sorted({seq for seq, _ in batch}) for batch in seen]
    assert ids == [[0, 2, 3]] * COPY_PASSES + [[0, 1, 2]] * (len(seen) - COPY_PASSES)
    # split, and then moved (sequence 3 -> 1), every session continues as if nothing had happened
    emitted = [v.emitted_tokens(drafts[i]) for v, i in zip(second, live, strict=True)]
    assert emitted == [tuple(expected[0][1:5]), (expected[2][1],), tuple(expected[3][1:4])]
    offsets = {0: 5, 2: 2, 3: 4}  # the next token of each, after the second round
    for r, verdicts in enumerate(later):
        assert [v.verifier_token for v in verdicts] == [expected[i][offsets[i] + r] for i in live]


def test_rows_of_different_lengths_share_one_pass_where_padding_costs_less_and_the_padding_is_rolled_back(
    llama, monkeypatch
):
    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    expected = [_plain(verifier, p, 16) for p in prompts]
    for i, p in enumerate(prompts):
        verifier.open_session(f"p{i}", p, GREEDY)
    seen = _record_batches(verifier, monkeypatch)
    try:
        # rows of 5, 5 and 4 positions: one padded position keeps them in one pass
        drafts = [tuple(expected[0][:4]), tuple(expected[1][:4]), tuple(expected[2][:3])]
        padded = verifier.verify([VerifyRequest(f"p{i}", d, None, 0) for i, d in enumerate(drafts)]).verdicts
        # rows of 9, 1 and 1: padding would add 16 positions to save one pass; they go as they are
        drafts2 = [tuple(expected[0][5:13]), (), ()]
        uneven = verifier.verify([VerifyRequest(f"p{i}", d, None, 1) for i, d in enumerate(drafts2)]).verdicts
        after = verifier.verify([VerifyRequest(f"p{i}", (), None, 2) for i in range(3)]).verdicts
    finally:
        for i in range(3):
            verifier.close_session(f"p{i}")
    assert [len(batch) for batch in seen] == [15, 11, 3]
    assert sum(wanted for _, wanted in seen[0]) == 14  # no logits for the padding
    assert [v.emitted_tokens(d) for v, d in zip(padded, drafts, strict=True)] == [
        tuple(expected[0][:5]),
        tuple(expected[1][:5]),
        tuple(expected[2][:4]),
    ]
    assert [v.emitted_tokens(d) for v, d in zip(uneven, drafts2, strict=True)] == [
        tuple(expected[0][5:14]),
        (expected[1][5],),
        (expected[2][4],),
    ]
    # the third session's padded position is not in its sequence: it continues as plain decoding does
    assert [v.verifier_token for v in after] == [expected[0][14], expected[1][6], expected[2][5]]


def _fresh(max_sessions: int = 4, reuse: bool = True, stash: bool = True) -> LlamaCppVerifier:
    extra = {} if stash else {"prompt_stash_bytes": 0}
    return LlamaCppVerifier(DEMO_VERIFIER_GGUF, max_sessions=max_sessions, n_threads=1, reuse_prefixes=reuse, **extra)


def _prefilled_positions(verifier: LlamaCppVerifier, monkeypatch) -> list[int]:
    """Positions each decode without logits evaluates (a prefill's), as llama.cpp receives them."""
    seen: list[int] = []
    real = verifier._decode_batch

    def recording() -> int:
        b = verifier._batch.batch
        if not any(b.logits[i] for i in range(b.n_tokens)):
            seen.append(b.n_tokens)
        return real()

    monkeypatch.setattr(verifier, "_decode_batch", recording)
    return seen


def test_a_prompt_a_closed_session_left_is_not_evaluated_again_and_decodes_as_a_fresh_one(llama, monkeypatch):
    _, tokenizer = llama
    prompt = tokenizer.encode("Middleware is a framework of hooks into", add_special_tokens=False)
    expected = _plain(_fresh(reuse=False), prompt, 24)
    verifier = _fresh()
    assert _plain(verifier, prompt, 24) == expected  # its stream keeps the prompt and the 23 tokens after it
    prefills = _prefilled_positions(verifier, monkeypatch)
    assert _plain(verifier, prompt, 24) == expected  # the same prompt again: nothing to evaluate before its first round
    assert prefills == [] and verifier._ids.reused == len(prompt) - 1
    # a chat's next turn: the prompt, the answer so far, and more; only what follows the kept tokens is evaluated
    turn = prompt + expected[:12] + tokenizer.encode(" The next", add_special_tokens=False)
    assert _plain(verifier, turn, 16) == _plain(_fresh(reuse=False), turn, 16)
    assert prefills == [len(turn) - 1 - (len(prompt) + 12)]


def test_sessions_opening_together_find_the_prompts_a_wave_left_and_decode_as_fresh_ones(llama, monkeypatch):
    _, tokenizer = llama
    texts = ["The Django ORM", "A form field", "Middleware is a framework of", "def get_queryset(self):"]
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    expected = {i: _plain(_fresh(reuse=False), prompt, 6) for i, prompt in enumerate(prompts)}
    verifier = _fresh(max_sessions=4)

    def wave(order: list[int]) -> dict[int, list[int]]:
        sids = [f"wave-{i}" for i in order]
        opened = verifier.open_many([(sid, prompts[i], GREEDY) for sid, i in zip(sids, order, strict=True)])
        assert not any(isinstance(result, BaseException) for result in opened)
        out: dict[int, list[int]] = {i: [] for i in order}
        for r in range(6):  # their plain rounds in one batch, as the scheduler runs them
            verdicts = verifier.verify([VerifyRequest(sid, (), None, r) for sid in sids]).verdicts
            for i, verdict in zip(order, verdicts, strict=True):
                out[i].append(verdict.verifier_token)
        for sid in sids:
            verifier.close_session(sid)
        return out

    assert wave([0, 1, 2, 3]) == expected
    prefills = _prefilled_positions(verifier, monkeypatch)
    reused = verifier._ids.reused
    assert wave([2, 0, 3, 1]) == expected  # the next wave, its prompts in another order
    assert prefills == []  # each found where the first wave left it (``SequenceIds.plan``)
    assert verifier._ids.reused - reused == sum(len(p) - 1 for p in prompts)


def test_a_prompt_sharing_only_a_prefix_reuses_that_prefix_and_drafts_still_verify_as_fresh(llama, monkeypatch):
    _, tokenizer = llama
    first = tokenizer.encode("The QuerySet API of the database layer lets you filter", add_special_tokens=False)
    second = tokenizer.encode("The QuerySet API of the database layer is lazy: nothing", add_special_tokens=False)
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    # enough to be worth cutting the first prompt for: fewer would take an id that keeps nothing (``SequenceIds``)
    assert shared >= COPY_OVER
    plain = _plain(_fresh(reuse=False), second, 12)
    verifier = _fresh()
    _plain(verifier, first, 8)
    prefills = _prefilled_positions(verifier, monkeypatch)
    verifier.open_session("s", second, GREEDY)
    try:
        assert prefills == [len(second) - 1 - shared]
        # a draft of plain decoding's tokens, whole then wrong at its third, is judged as on a fresh sequence
        whole = verifier.verify([VerifyRequest("s", tuple(plain[:4]), None, 0)]).verdicts[0]
        wrong = (plain[5], plain[6], (plain[7] + 1) % verifier.vocab_size)
        partial = verifier.verify([VerifyRequest("s", wrong, None, 1)]).verdicts[0]
        rest = [verifier.verify([VerifyRequest("s", (), None, r)]).verdicts[0].verifier_token for r in range(2, 5)]
    finally:
        verifier.close_session("s")
    assert whole.emitted_tokens(tuple(plain[:4])) == tuple(plain[:5])
    assert partial.emitted_tokens(wrong) == tuple(plain[5:8])
    assert rest == plain[8:11]


def test_a_prompt_kept_apart_is_copied_beside_the_open_sessions_and_every_copied_stream_decodes_as_a_fresh_one(
    llama, monkeypatch
):
    _, tokenizer = llama
    prompt = tokenizer.encode(
        "Middleware is a framework of hooks into Django's request/response", add_special_tokens=False
    )
    other = tokenizer.encode("def get_queryset(self):", add_special_tokens=False)
    assert len(prompt) > COPY_OVER + 1
    expected, expected_other = _plain(_fresh(reuse=False), prompt, 16), _plain(_fresh(reuse=False), other, 8)
    verifier = _fresh(max_sessions=6, stash=False)  # with one, the prompt goes to host memory (test_prompt_stash)
    for sid, text in (("a", "The Django ORM"), ("b", "A form field")):
        verifier.open_session(sid, tokenizer.encode(text, add_special_tokens=False), GREEDY)  # ids 0 and 1
    try:
        assert _plain(verifier, prompt, 16) == expected  # on id 2, beside them: its stream keeps prompt and answer
        verifier.open_session("c", other, GREEDY)  # takes id 2, whose stream is first copied apart (to id 4)
        assert verifier._ids.copies == 1
        prefills = _prefilled_positions(verifier, monkeypatch)
        assert _plain(verifier, prompt, 16) == expected  # copied back beside the others (id 3): nothing evaluated
        assert prefills == [] and verifier._ids.copies == 2
        rounds = [verifier.verify([VerifyRequest("c", (), None, r)]).verdicts[0].verifier_token for r in range(8)]
        assert rounds == expected_other  # the stream copied apart held what it had until the copy was made
    finally:
        for sid in "abc":
            verifier.close_session(sid)


def test_without_reuse_a_closed_sessions_stream_is_emptied(llama, monkeypatch):
    _, tokenizer = llama
    prompt = tokenizer.encode("A form field", add_special_tokens=False)
    verifier = _fresh(reuse=False)
    _plain(verifier, prompt, 4)
    prefills = _prefilled_positions(verifier, monkeypatch)
    _plain(verifier, prompt, 4)
    assert prefills == [len(prompt) - 1] and verifier._ids.reused == 0


def lockstep(verifier, runs, stop=lambda: False):
    """Sessions' runs in lockstep until the first ends (its steps, or the end of sequence) or ``stop()``: each one's
    tokens, in the runs' order, and the call's ms (``run_greedy`` with a ``between`` that adds no run)."""
    ended = {}

    def between(ends, n, step_ms, steps):
        ended.update((e.key, e.tokens) for e in ends)
        return (), bool(ends) or stop()

    last, ms = verifier.run_greedy([GreedyRun(i, *run) for i, run in enumerate(runs)], between)
    ended.update((e.key, e.tokens) for e in last)
    return [ended[i] for i in range(len(runs))], ms


def test_a_greedy_run_decodes_what_plain_rounds_do_and_stops_when_asked(llama):
    verifier, tokenizer = llama
    prompt = tokenizer.encode("Signals allow certain senders", add_special_tokens=False)
    expected = _plain(verifier, prompt, 16)
    verifier.open_session("run", prompt, GREEDY)
    try:
        [first], _ = lockstep(verifier, [("run", 0, 8)])
        asked: list[int] = []
        [second], _ = lockstep(verifier, [("run", 8, 8)], stop=lambda: asked.append(1) or len(asked) >= 3)
        after = [verifier.verify([VerifyRequest("run", (), None, r)]).verdicts[0].verifier_token for r in (11, 12)]
        with pytest.raises(InvalidRequestError, match="stale"):  # the run's steps were its rounds 0-10
            verifier.verify([VerifyRequest("run", (), None, 10)])
        with pytest.raises(InvalidRequestError, match="max_steps"):
            lockstep(verifier, [("run", 13, 0)])
        with pytest.raises(InvalidRequestError, match="once"):
            lockstep(verifier, [("run", 13, 2), ("run", 13, 2)])
        with pytest.raises(InvalidRequestError, match="1 to"):
            lockstep(verifier, [])
    finally:
        verifier.close_session("run")
    assert first == expected[:8] and second == expected[8:11] and after == expected[11:13]
    verifier.open_session("sampled", prompt, SamplingParams(temperature=0.8, seed=1))
    try:
        with pytest.raises(InvalidRequestError, match="greedy"):
            lockstep(verifier, [("sampled", 0, 4)])
    finally:
        verifier.close_session("sampled")


def test_sessions_run_in_lockstep_each_decode_their_own_tokens_for_the_fewest_steps_any_may_take(llama, monkeypatch):
    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:3]]
    expected = [_plain(verifier, p, 12) for p in prompts]
    batches = _record_batches(verifier, monkeypatch)
    for i, prompt in enumerate(prompts):
        verifier.open_session(f"s{i}", prompt, GREEDY)
    try:
        batches.clear()
        # the sessions' rounds need not match; the run takes the fewest steps (5), answered in the runs' order
        runs = [("s2", 0, 9), ("s0", 0, 5), ("s1", 0, 7)]
        tokens, _ = lockstep(verifier, runs)
        assert len(batches) == 5 and all(len(batch) == 3 for batch in batches)  # one decode a step, 3 rows each
        assert tokens == [expected[2][:5], expected[0][:5], expected[1][:5]]
        # each goes on from its own round: a run, then a verify round of all three
        tokens, _ = lockstep(verifier, [("s0", 5, 6), ("s1", 5, 6), ("s2", 5, 6)])
        rounds = verifier.verify([VerifyRequest(f"s{i}", (), None, 11) for i in range(3)]).verdicts
    finally:
        for i in range(3):
            verifier.close_session(f"s{i}")
    assert tokens == [e[5:11] for e in expected]
    assert [v.verifier_token for v in rounds] == [e[11] for e in expected]


def test_a_lockstep_that_ends_at_the_first_end_ends_for_everyone_at_a_sessions_end_of_sequence(llama, monkeypatch):
    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:2]]
    expected = [_plain(verifier, p, 12) for p in prompts]
    # a token of the first session's (its fourth or later, one neither decodes before) plays the end of sequence
    step = next(i for i in range(3, 12) if expected[0][i] not in expected[0][:i] + expected[1][:i])
    monkeypatch.setattr(verifier, "eos_token_id", expected[0][step])
    verifier.open_session("ends", prompts[0], GREEDY)
    verifier.open_session("goes-on", prompts[1], GREEDY)
    try:
        tokens, _ = lockstep(verifier, [("ends", 0, 12), ("goes-on", 0, 12)])
    finally:
        verifier.close_session("ends")
        verifier.close_session("goes-on")
    assert tokens == [expected[0][: step + 1], expected[1][: step + 1]]


def test_in_an_open_lockstep_each_run_ends_on_its_own_and_sessions_join_and_go_on_between_steps(llama, monkeypatch):
    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:3]]
    expected = [_plain(verifier, p, 12) for p in prompts]
    batches = _record_batches(verifier, monkeypatch)
    for i in range(2):
        verifier.open_session(f"s{i}", prompts[i], GREEDY)
    heard: list[tuple[list, int]] = []  # each step's ended runs (key, tokens) and the sessions it held

    def between(ends, n, step_ms, steps):
        heard.append(([(e.key, e.tokens) for e in ends], n))
        assert all(e.error is None and e.verify_ms >= e.gpu_ms > 0 for e in ends)
        joining = []
        for e in ends:
            if e.key == "s0-first":  # s0 goes on from its own round: a second run
                joining.append(GreedyRun("s0-second", "s0", 3, 5))
        if len(heard) == 2:  # a session opened meanwhile joins the next step
            opened = len(batches)
            verifier.open_session("s2", prompts[2], GREEDY)
            # its prefill is no step: a decode where the shared verifier kept less of its prompt (the tests
            # before, in this process, decide that), none where it kept it all
            del batches[opened:]
            joining.append(GreedyRun("s2", "s2", 0, 4))
        return joining, False

    try:
        batches.clear()
        last, _ = verifier.run_greedy([GreedyRun("s0-first", "s0", 0, 3), GreedyRun("s1", "s1", 0, 10)], between)
        s0_round = verifier._sessions["s0"].round
    finally:
        for i in range(3):
            verifier.close_session(f"s{i}")
    assert last == []  # every run ended on its own and was heard
    ends = {key: tokens for step, _ in heard for key, tokens in step}
    assert ends == {
        "s0-first": expected[0][:3],
        "s0-second": expected[0][3:8],
        "s1": expected[1][:10],
        "s2": expected[2][:4],
    }
    assert s0_round == 7  # its rounds were 0-7, as plain rounds
    # one decode a step: s2 joined the third step, s0's second run went on without a step of its own
    assert [n for _, n in heard] == [len(batch) for batch in batches] == [2, 2, 3, 3, 3, 3, 2, 2, 1, 1]


def test_an_open_lockstep_ends_a_session_at_its_end_of_sequence_an_unfit_run_alone_and_all_when_stopped(
    llama, monkeypatch
):
    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:2]]
    expected = [_plain(verifier, p, 12) for p in prompts]
    step = next(i for i in range(3, 10) if expected[0][i] not in expected[0][:i] + expected[1][: i + 3])
    monkeypatch.setattr(verifier, "eos_token_id", expected[0][step])  # the first session's token ends it
    verifier.open_session("ends", prompts[0], GREEDY)
    verifier.open_session("goes-on", prompts[1], GREEDY)
    heard: dict = {}
    calls = [0]

    def between(ends, n, step_ms, steps):
        calls[0] += 1
        heard.update((e.key, e.tokens if e.error is None else e.error) for e in ends)
        if "ends" in heard and "unfit" not in heard:
            return [GreedyRun("unfit", "nobody", 0, 4)], False  # no such session: it ends with its error
        return (), calls[0] == step + 4  # three steps after the end of sequence, the lot stops

    try:
        runs = [GreedyRun("ends", "ends", 0, 12), GreedyRun("goes-on", "goes-on", 0, 12)]
        last, _ = verifier.run_greedy(runs, between)
        round_after = verifier._sessions["goes-on"].round
    finally:
        verifier.close_session("ends")
        verifier.close_session("goes-on")
    assert heard["ends"] == expected[0][: step + 1]
    assert isinstance(heard["unfit"], SpeculativeError)
    # the other went on alone, and ended with its tokens so far when stopped
    assert [(e.key, e.tokens) for e in last] == [("goes-on", expected[1][: step + 4])]
    assert round_after == step + 3


def test_a_run_past_its_deadline_ends_after_a_step(llama):
    verifier, tokenizer = llama
    prompt = tokenizer.encode(PROMPTS[2], add_special_tokens=False)
    verifier.open_session("late", prompt, GREEDY)
    heard: list = []

    def between(ends, n, step_ms, steps):
        heard.extend(ends)
        return (), False

    try:
        verifier.run_greedy([GreedyRun("late", "late", 0, 8, deadline=0.0)], between)
    finally:
        verifier.close_session("late")
    assert [len(e.tokens) for e in heard] == [1]


def test_a_failed_run_changes_nothing_and_a_session_without_room_is_named(llama, monkeypatch):
    verifier, tokenizer = llama
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:2]]
    expected = [_plain(verifier, p, 6) for p in prompts]
    verifier.open_session("a", prompts[0], GREEDY)
    verifier.open_session("b", prompts[1], GREEDY)
    try:
        lockstep(verifier, [("a", 0, 2), ("b", 0, 2)])
        calls = [0]
        real = verifier._decode_batch

        def fails_third() -> int:  # the run's third step fails
            calls[0] += 1
            return -1 if calls[0] == 3 else real()

        monkeypatch.setattr(verifier, "_decode_batch", fails_third)
        with pytest.raises(SpeculativeError, match="llama_decode failed"):
            lockstep(verifier, [("a", 2, 4), ("b", 2, 4)])
        monkeypatch.setattr(verifier, "_decode_batch", real)
        tokens, _ = lockstep(verifier, [("a", 2, 4), ("b", 2, 4)])  # the same rounds again, as if never run
        b_tokens = verifier._sessions["b"].tokens
        verifier._sessions["b"].tokens = [0] * (verifier.context_length - 1)  # b's context is full
        try:
            with pytest.raises(ContextOverflowError, match="'b'"):
                lockstep(verifier, [("a", 6, 4), ("b", 6, 4)])
        finally:
            verifier._sessions["b"].tokens = b_tokens
    finally:
        verifier.close_session("a")
        verifier.close_session("b")
    assert tokens == [expected[0][2:6], expected[1][2:6]]


def test_reading_the_logits_leaves_nothing_for_the_cyclic_collector(llama):
    # np.ctypeslib.as_array on llama_get_logits' pointer cast it, leaving a reference cycle at every decode
    import gc

    verifier, tokenizer = llama
    verifier.open_session("clean", tokenizer.encode(PROMPTS[1], add_special_tokens=False), GREEDY)
    try:
        gc.collect()
        gc.disable()  # nothing else collects the cycles meanwhile
        try:
            lockstep(verifier, [("clean", 0, 8)])
            verifier.verify([VerifyRequest("clean", (1, 2), None, 8)])
            assert gc.collect() == 0
        finally:
            gc.enable()
    finally:
        verifier.close_session("clean")


def test_a_decodes_logits_are_read_through_the_view_made_before_and_show_the_latest_decode(llama):
    import numpy as np

    verifier, tokenizer = llama
    verifier.open_session("views", tokenizer.encode(PROMPTS[2], add_special_tokens=False), GREEDY)
    try:
        lockstep(verifier, [("views", 0, 1)])
        first = verifier._logits(1)
        before = first.copy()
        lockstep(verifier, [("views", 1, 1)])
        again = verifier._logits(1)
    finally:
        verifier.close_session("views")
    assert again is first  # llama.cpp kept its buffer: no new view for the next step
    assert not np.array_equal(again, before)  # and through it, the next step's logits


class _ScriptedDrafter:
    """Proposes the verifier's own next tokens, spoilt at a scripted offset in some rounds; hears each verdict."""

    def __init__(self, expected: list[int], vocab_size: int, spoil: list[int | None]):
        self.expected, self.vocab_size, self.spoil = expected, vocab_size, spoil
        self.position = 0  # tokens committed so far
        self.asked: list[tuple[int, int | None]] = []  # (k, threads) per round
        self.verdicts: list[tuple[int, int]] = []

    def propose_now(self, k: int, threads: int | None = None) -> Proposal:
        self.asked.append((k, threads))
        tokens = list(self.expected[self.position : self.position + k])
        spoil = self.spoil[(len(self.asked) - 1) % len(self.spoil)]
        if spoil is not None and spoil < len(tokens):
            tokens[spoil] = (tokens[spoil] + 1) % self.vocab_size
        return Proposal(tokens=tuple(tokens), q=None, draft_ms=0.1)

    def accept(self, proposal: Proposal, verdict: Verdict) -> None:
        self.verdicts.append((len(proposal.tokens), verdict.n_matches))
        self.position += verdict.n_matches + 1


def _emitted(rounds) -> list[int]:
    return [t for r in rounds for t in r.verdict.emitted_tokens(r.proposal.tokens)]


def test_a_run_of_drafting_rounds_emits_plain_decoding_whatever_the_drafts_and_leaves_the_cache_plain(llama):
    verifier, tokenizer = llama
    prompt = tokenizer.encode("Migrations are Django's way of", add_special_tokens=False)
    expected = _plain(verifier, prompt, 30)
    drafter = _ScriptedDrafter(expected, verifier.vocab_size, spoil=[None, 1, 0, 2])
    verifier.open_session("spec", prompt, GREEDY)
    try:
        before = verifier.decodes
        rounds = verifier.speculate_greedy("spec", 0, 20, drafter, 3)
        decodes = verifier.decodes - before
        after = verifier.verify([VerifyRequest("spec", (), None, len(rounds))]).verdicts[0]
        again = verifier.verify([VerifyRequest("spec", (), None, len(rounds))]).verdicts[0]  # a retried round
    finally:
        verifier.close_session("spec")
    assert _emitted(rounds) == expected[:20]  # the verifier's own greedy tokens, whatever was drafted
    # whole drafts accepted, or cut at the spoilt token; rounds numbered on, one decode a round
    assert [n for _, n in drafter.verdicts][:4] == [3, 1, 0, 2]
    assert drafter.verdicts == [(len(r.proposal.tokens), r.verdict.n_matches) for r in rounds]
    assert decodes == len(rounds) and all(r.verify_ms > 0 for r in rounds)
    assert {threads for _, threads in drafter.asked} == {verifier.n_threads}  # the draft may take its threads
    assert after.verifier_token == expected[20] and again == after  # the cache holds exactly what was committed


def test_a_run_of_drafting_rounds_ends_at_max_tokens_at_the_end_of_sequence_and_when_asked(llama, monkeypatch):
    verifier, tokenizer = llama
    prompt = tokenizer.encode("A URLconf maps", add_special_tokens=False)
    expected = _plain(verifier, prompt, 24)

    def run(max_tokens: int, k: int, **kwargs) -> tuple[list[int], _ScriptedDrafter]:
        drafter = _ScriptedDrafter(expected, verifier.vocab_size, spoil=[None])
        verifier.open_session("ends", prompt, GREEDY)
        try:
            return _emitted(verifier.speculate_greedy("ends", 0, max_tokens, drafter, k, **kwargs)), drafter
        finally:
            verifier.close_session("ends")

    tokens, drafter = run(5, 4)
    assert tokens == expected[:5] and [k for k, _ in drafter.asked] == [4]  # one round: a draft of 4 and a bonus
    tokens, drafter = run(8, 4)
    assert tokens == expected[:8] and [k for k, _ in drafter.asked] == [4, 2]  # never a draft past max_tokens
    tokens, drafter = run(20, 2, stop=lambda: True)
    assert tokens == expected[:3]  # asked to stop: after its first round
    step = next(i for i in range(4, 24) if expected[i] not in expected[:i])
    monkeypatch.setattr(verifier, "eos_token_id", expected[step])  # a token it emits plays the end of sequence
    tokens, _ = run(24, 3)
    assert tokens == expected[: 4 * (step // 4 + 1)]  # rounds of 4 accepted tokens: the one holding it was the last


def test_a_run_of_drafting_rounds_refuses_bad_input_and_a_failed_round_keeps_what_was_committed(llama, monkeypatch):
    verifier, tokenizer = llama
    prompt = tokenizer.encode("The template language", add_special_tokens=False)
    expected = _plain(verifier, prompt, 12)
    drafter = _ScriptedDrafter(expected, verifier.vocab_size, spoil=[None])
    with pytest.raises(SessionNotFoundError):
        verifier.speculate_greedy("nobody", 0, 4, drafter, 2)
    verifier.open_session("sampled", prompt, SamplingParams(temperature=0.8, seed=1))
    verifier.open_session("bad", prompt, GREEDY)
    try:
        with pytest.raises(InvalidRequestError, match="greedy"):
            verifier.speculate_greedy("sampled", 0, 4, drafter, 2)
        for max_tokens, k in ((0, 2), (4, 0), (4, 17)):
            with pytest.raises(InvalidRequestError, match="max_tokens"):
                verifier.speculate_greedy("bad", 0, max_tokens, drafter, k)
        assert drafter.asked == []  # refused before any work
        rounds = verifier.speculate_greedy("bad", 0, 3, drafter, 2)  # one whole round: 3 tokens
        real = verifier._decode_batch
        monkeypatch.setattr(verifier, "_decode_batch", lambda: -1)
        with pytest.raises(SpeculativeError, match="llama_decode failed"):
            verifier.speculate_greedy("bad", 1, 6, drafter, 2)
        monkeypatch.setattr(verifier, "_decode_batch", real)
        after = verifier.verify([VerifyRequest("bad", (), None, 1)]).verdicts[0]
    finally:
        verifier.close_session("sampled")
        verifier.close_session("bad")
    assert _emitted(rounds) == expected[:3] and after.verifier_token == expected[3]
