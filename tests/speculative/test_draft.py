"""Draft backends, the GGUF converter, and the vocabulary check at load time."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from speculative.draft import DraftSession
from speculative.draft_hf import TransformersDraft
from speculative.draft_llama import LlamaCppDraft
from speculative.errors import DraftBusyError, InvalidRequestError, ModelLoadError, VocabularyMismatchError
from speculative.gguf_export import export_gguf
from speculative.llama_sequences import (
    COPY_OVER,
    COPY_PASSES,
    PREFIX_OVER_GAP,
    Compaction,
    SequenceIds,
    common_prefix,
    micro_batches,
    padded_width,
)
from speculative.pair import DEMO_DRAFT_GGUF, DEMO_DRAFT_GGUF_TYPE, DEMO_VERIFIER, check_vocabularies, load_pair
from speculative.types import SamplingParams, Verdict
from speculative.verifier import TransformersVerifier
from tests.speculative.conftest import tiny_llama

LOGIT_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A user's own model: a random Llama with a freshly trained byte-level BPE tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    bpe = ByteLevelBPETokenizer()
    text = ["the quick brown fox jumps over the lazy dog", "speculative decoding drafts tokens"] * 20
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<eos>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    model = tiny_llama(vocab=len(tokenizer), hidden=64, seed=5, eos=tokenizer.eos_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    export_gguf(out, out / "tiny.gguf")
    return out, model, tokenizer


def test_converted_gguf_gives_the_same_logits_and_token_ids_as_transformers(tiny_checkpoint):
    out, model, tokenizer = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf")
    ids = tokenizer.encode("the lazy fox drafts tokens")
    assert draft.tokenize("the lazy fox drafts tokens") == ids
    ctx = draft.new_context()
    got = ctx.evaluate(ids)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(got - want).max() < LOGIT_TOLERANCE


def test_shipped_gguf_draft_matches_its_transformers_twin(demo_paths):
    # the shipped GGUF is quantised (DEMO_DRAFT_GGUF_TYPE): held to the registry's tolerance for its type,
    # the largest logit difference as a share of the largest logit, and the same top token throughout
    from registry.services import LOGIT_TOLERANCE as CONVERSION_TOLERANCE

    draft = LlamaCppDraft(demo_paths["draft_gguf"])
    twin = TransformersDraft(demo_paths["draft_hf"], device="cpu")
    ids = list(range(100, 140))
    for end in (1, 10, 40):
        a = draft.new_context().evaluate(ids[:end])
        b = twin.new_context().evaluate(ids[:end])
        assert np.abs(a - b).max() / np.abs(b).max() < CONVERSION_TOLERANCE[DEMO_DRAFT_GGUF_TYPE]
        assert np.argmax(a) == np.argmax(b)


@pytest.mark.parametrize("backend", ["llama.cpp", "transformers"])
def test_rollback_gives_the_logits_of_a_fresh_evaluation(backend, tiny_checkpoint):
    out, model, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf") if backend == "llama.cpp" else TransformersDraft("x", model=model)
    ids = [5, 17, 42, 99, 7, 250, 3, 8]
    ctx = draft.new_context()
    ctx.evaluate(ids)
    ctx.truncate(3)
    rolled = ctx.evaluate([11, 12])
    fresh = draft.new_context().evaluate(ids[:3] + [11, 12])
    assert np.abs(rolled - fresh).max() < 1e-4


def test_draft_session_cache_stays_consistent_through_accepts_and_rejects(tiny_checkpoint):
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf")
    session = DraftSession(draft, [1, 2, 3], SamplingParams())
    rng = np.random.default_rng(0)
    for _ in range(12):
        k = int(rng.integers(1, 6))
        proposal = session.propose(k)
        n = int(rng.integers(0, k + 1))
        session.accept(proposal, Verdict(n_matches=n, verifier_token=int(rng.integers(0, 300))))
        # what the session proposes next equals what a fresh session on the same tokens proposes
        fresh = DraftSession(draft, session.committed, SamplingParams())
        check = session.propose(3)
        assert check.tokens == fresh.propose(3).tokens
        session.accept(check, Verdict(n_matches=0, verifier_token=check.tokens[0]))
        fresh.close()
    with pytest.raises(InvalidRequestError):
        session.propose(-1)
    session.close()


def test_drafting_on_llama_cpp_leaves_nothing_for_the_cyclic_collector(tiny_checkpoint):
    # np.ctypeslib.as_array on llama_get_logits_ith's pointer cast it, leaving a reference cycle a drafted token
    import gc

    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf")
    session = DraftSession(draft, [5, 17, 42, 99, 7], SamplingParams())
    session.propose(2)  # the first proposal's one-off objects (caches, the context's) made outside the check
    gc.collect()
    gc.disable()  # nothing else collects the cycles meanwhile
    try:
        proposal = session.propose(4)
        session.accept(proposal, Verdict(n_matches=2, verifier_token=8))
        session.propose(3)
        assert gc.collect() == 0
    finally:
        gc.enable()
        session.close()


def test_a_proposal_says_how_many_committed_tokens_its_draft_caught_up_on(tiny_checkpoint):
    # the controllers price drafting only on rounds that caught up on a token or two
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf")
    session = DraftSession(draft, [5, 17, 42, 99, 7], SamplingParams())
    first = session.propose(3)
    assert first.caught_up == 5  # the prompt
    session.accept(first, Verdict(n_matches=1, verifier_token=8))  # cut short: one kept, the verifier's token
    cut = session.propose(3)
    assert cut.caught_up == 1  # only the verifier's token: the kept draft token was cached
    session.accept(cut, Verdict(n_matches=3, verifier_token=9))  # all kept: the last draft token was never evaluated
    whole = session.propose(2)
    assert whole.caught_up == 2
    session.accept(whole, Verdict(n_matches=0, verifier_token=10))
    session.extend([11, 12, 13])  # plain decoding meanwhile
    assert session.propose(2).caught_up == 4
    session.close()


def test_the_drafts_warm_up_at_load_leaves_every_sequence_free_and_empty(tiny_checkpoint):
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf", max_sessions=2)
    assert draft.decodes == 0  # the warm-up's decodes are not counted
    contexts = [draft.new_context(), draft.new_context()]  # both sequences, the warm-up's included
    ids = [5, 17, 42]
    fresh = LlamaCppDraft(out / "tiny.gguf", max_sessions=2).new_context().evaluate(ids)
    for ctx in contexts:  # nothing of the warm-up is left in either
        assert np.abs(ctx.evaluate(ids) - fresh).max() < 1e-4
    with pytest.raises(DraftBusyError):
        draft.new_context()


def test_a_draft_with_another_vocabulary_is_refused_at_load_time(tiny_checkpoint):
    out, _, _ = tiny_checkpoint
    with pytest.raises(VocabularyMismatchError, match="share one tokenizer"):
        load_pair(DEMO_VERIFIER, out / "tiny.gguf")
    with pytest.raises(VocabularyMismatchError):
        load_pair(DEMO_VERIFIER, out)  # the transformers draft backend is checked too


def test_vocabularies_differing_in_one_token_are_refused():
    with pytest.raises(VocabularyMismatchError, match="token 1"):
        check_vocabularies(["a", "b", "c"], ["a", "x", "c"], draft_name="d")
    check_vocabularies(["a", "b"], ["a", "b", "[PAD2]"], draft_name="padded")  # padding rows are fine


def test_unknown_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LlamaCppDraft(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError):
        LlamaCppDraft(tmp_path / "junk.gguf")
    # sizes llama.cpp would abort the process on (a batch smaller than the sequences) or cannot hold
    with pytest.raises(ModelLoadError, match=r"batch_tokens \(16\) must be at least max_sessions \(32\)"):
        LlamaCppDraft(DEMO_DRAFT_GGUF, max_sessions=32, batch_tokens=16)
    with pytest.raises(ModelLoadError, match="max_sessions must lie in"):
        LlamaCppDraft(DEMO_DRAFT_GGUF, max_sessions=0)
    with pytest.raises(ModelLoadError, match="max_context must be at least 1 token"):
        LlamaCppDraft(DEMO_DRAFT_GGUF, max_sessions=1, max_context=-1)
    assert LlamaCppDraft(DEMO_DRAFT_GGUF, max_sessions=1, max_context=64).context_length == 64
    with pytest.raises(ModelLoadError):
        TransformersVerifier(tmp_path / "nothing-here", device="cpu")


def test_a_full_draft_context_refuses_another_session_clearly(tiny_checkpoint):
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf", max_sessions=2)
    first, _second = draft.new_context(), draft.new_context()
    with pytest.raises(DraftBusyError, match="in use"):
        draft.new_context()
    first.close()
    draft.new_context().evaluate([1, 2, 3])  # a freed sequence is usable again


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.9, top_k=40, seed=7)])
def test_sessions_drafting_together_share_a_decode_per_step_and_draft_what_each_would_alone(
    tiny_checkpoint, monkeypatch, sampling
):
    monkeypatch.setattr("speculative.draft_llama.GATHER_WAIT_S", 10.0)  # only "everyone is in" may start it
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf")
    prompts, ks = [[1, 2, 3], [40, 41, 42, 43, 44], [7]], [4, 2, 3]
    alone = []
    for prompt, k in zip(prompts, ks, strict=True):
        session = DraftSession(draft, prompt, sampling)
        alone.append(session.propose(k))
        session.close()
    sessions = [DraftSession(draft, prompt, sampling) for prompt in prompts]
    for session in sessions:
        session.start_round()
    proposals: dict[int, object] = {}
    threads = [
        threading.Thread(target=lambda i=i: proposals.__setitem__(i, sessions[i].propose(ks[i]))) for i in range(3)
    ]
    before = draft.decodes
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert draft.decodes - before == max(ks)  # the prompts in one decode, then one per step for all
    for i, proposal in proposals.items():
        assert proposal.tokens == alone[i].tokens and len(proposal.tokens) == ks[i]
        if not sampling.greedy:
            assert np.abs(proposal.q - alone[i].q).max() < 1e-4  # llama.cpp sums in batch order


@pytest.mark.parametrize(
    "rows, passes",
    [
        ([(s, 1) for s in range(16)], [(16, 16)]),  # one run of one position each: one pass
        ([(3, 1), (0, 1), (1, 1)], [(2, 2), (1, 1)]),  # a free id (2) between sessions: two
        ([(0, 2)] + [(s, 3) for s in range(1, 16)], [(16, 32), (15, 15)]),  # one row shorter than the others
        ([(0, 1), (1, 5), (2, 1), (3, 5)], [(4, 4), (1, 4), (1, 4)]),  # the long rows are not consecutive
        ([(0, 0), (1, 2)], [(1, 2)]),  # a row without positions takes no part
    ],
)
def test_micro_batches_follow_llama_cpps_sequential_split_of_a_batch(rows, passes):
    assert micro_batches(rows) == passes


@pytest.mark.parametrize(
    "rows, width",
    [
        ([(s, 3) for s in range(16)], 0),  # equal already
        ([(0, 2)] + [(s, 3) for s in range(1, 16)], 3),  # one short row among 16: one padded position saves a pass
        ([(0, 9)] + [(s, 1) for s in range(1, 16)], 0),  # one long row among 16: padding would add 120 positions
        ([(0, 1), (1, 5), (2, 1), (3, 5)], 0),  # 8 padded positions against two passes of one stream
        ([(0, 3), (1, 4), (2, 2)], 4),  # three passes into one for 3 positions
    ],
)
def test_rows_are_padded_to_one_pass_only_where_the_positions_cost_less_than_the_passes(rows, width):
    assert padded_width(rows) == width


def test_sessions_move_down_only_once_their_gaps_have_cost_what_the_moves_would():
    compaction = Compaction()
    assert not compaction.due([0, 1, 2, 3])
    # a session ended at 1; the next request fills its id three steps later: nobody moved
    assert [compaction.due([0, 2, 3]) for _ in range(3)] == [False] * 3
    assert not compaction.due([0, 1, 2, 3]) and compaction.owed == 0
    # a gap that lasts: after COPY_PASSES split steps (one pass each), the one session above it moves
    assert [compaction.due([0, 2, 3]) for _ in range(COPY_PASSES + 1)] == [False] * COPY_PASSES + [True]
    # two movers cost twice as much; two gaps cost two passes a step; a drafting round is several steps
    assert [compaction.due([0, 3, 4]) for _ in range(2 * COPY_PASSES + 1)] == [False] * 2 * COPY_PASSES + [True]
    assert [compaction.due([0, 2, 4]) for _ in range(4)] == [False, False, False, True]  # owed 0, 2, 4, then 6
    assert compaction.due([0, 2, 3], steps=COPY_PASSES) is False and compaction.due([0, 2, 3])
    assert not compaction.due([1, 2, 3])  # one run, wherever it starts, is one pass


def _argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def _alone(draft: LlamaCppDraft, prompt: list[int], k: int) -> list[int]:
    """What a session drafts by itself, on a fresh sequence."""
    ctx = draft.new_context()
    try:
        return ctx.draft(prompt, k, _argmax)
    finally:
        ctx.close()


def test_a_free_id_left_between_sessions_is_closed_once_it_lasts(tiny_checkpoint, monkeypatch):
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf")
    prompts = [[1, 2, 3], [40, 41, 42, 43], [7, 8]]

    k = COPY_PASSES  # a round of k decodes: its split costs what a move does
    expected = {i: _alone(draft, [*prompts[i], 5], k) for i in (0, 2)}
    contexts = [draft.new_context() for _ in prompts]  # sequences 0, 1, 2
    for ctx, prompt in zip(contexts, prompts, strict=True):
        ctx.evaluate(prompt)  # in their caches before one of them moves
    contexts[1].close()
    seen: list[list[int]] = []
    real = draft._ctx.decode

    def recording(batch) -> None:
        seen.append([batch.batch.seq_id[i][0] for i in range(batch.batch.n_tokens)])
        real(batch)

    monkeypatch.setattr(draft._ctx, "decode", recording)
    try:
        # a first round runs split (each decode one more pass): a move would have cost as much as the round's gap
        got = contexts[0].draft_together([(contexts[i], [5], k, _argmax) for i in (0, 2)])
        assert got == [expected[0], expected[2]]
        assert draft.compactions == 0 and all(sorted(set(seqs)) == [0, 2] for seqs in seen)
        # a gap that lasts is closed: before the next round, the third session moves into the free id
        seen.clear()
        follow = contexts[0].draft_together([(contexts[i], [expected[i][-1]], k, _argmax) for i in (0, 2)])
        assert draft.compactions == 1
        assert all(sorted(set(seqs)) == [0, 1] for seqs in seen)
        # and the moved session's cache came along: it continues as one that never moved
        after = contexts[2].draft([follow[1][-1]], 2, _argmax)
    finally:
        contexts[0].close()
        contexts[2].close()
    assert follow == [_alone(draft, [*prompts[i], 5, *expected[i]], k) for i in (0, 2)]
    assert after == _alone(draft, [*prompts[2], 5, *expected[2], *follow[1]], 2)


def test_catch_up_rows_of_different_lengths_are_padded_into_one_decode_and_the_padding_rolled_back(tiny_checkpoint):
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf")
    prompts = [[1, 2, 3], [40, 41, 42, 43], [7, 8]]  # 3, 4 and 2 positions: three passes, or one padded to 4

    expected = [_alone(draft, p, 3) for p in prompts]
    contexts = [draft.new_context() for _ in prompts]
    try:
        before = draft.decodes
        got = contexts[0].draft_together([(ctx, p, 3, _argmax) for ctx, p in zip(contexts, prompts, strict=True)])
        assert got == expected
        assert draft.decodes - before == 3  # the padded catch-up, then two lockstep steps
        follow = contexts[2].draft([expected[2][-1]], 2, _argmax)  # its padding is gone from its sequence
    finally:
        for ctx in contexts:
            ctx.close()
    assert follow == _alone(draft, [*prompts[2], *expected[2]], 2)


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2), ([1, 2, 3], [1, 9, 3], 1), ((4,), [5], 0)],
)
def test_common_prefix_counts_the_leading_tokens_two_lists_share(a, b, n):
    assert common_prefix(a, b) == n == common_prefix(b, a)
    long = list(range(1000))
    assert common_prefix(long, long[:777] + [-1] + long[778:]) == 777


def _ids(n: int = 16) -> tuple[SequenceIds, list[tuple[int, int]]]:
    removed: list[tuple[int, int]] = []
    return SequenceIds(n, lambda seq, start: removed.append((seq, start))), removed


def test_sequence_ids_go_low_first_where_nothing_is_kept_and_a_release_without_tokens_empties_the_stream():
    ids, removed = _ids()
    assert [ids.take([1, 2])[0] for _ in range(3)] == [0, 1, 2]
    ids.release(1)
    assert removed == [(1, 0)]
    assert ids.take([1, 2]) == (1, 0)  # the free id between the others


def test_a_lone_session_takes_the_id_that_kept_the_longest_prefix_and_only_what_follows_it_goes():
    ids, removed = _ids(3)
    for prompt in ([7, 8, 9], [1, 2, 3, 4, 5], [6, 6]):
        seq, _ = ids.take(prompt)
        ids.release(seq, prompt)  # each session ends alone, on a free id that keeps nothing: 0, 1, 2
    assert ids.take([1, 2, 3, 4, 9, 9]) == (1, 4)
    assert removed == [(1, 4)]  # what followed the shared prefix
    ids.release(1, [1, 2, 3, 4, 9, 9])
    assert ids.take([5]) == (0, 0)  # nothing shared anywhere: the id whose tokens were kept longest ago
    assert removed[-1] == (0, 0) and ids.reused == 4


def test_a_few_shared_positions_do_not_cut_a_short_kept_prompt_while_an_id_keeps_nothing():
    ids, removed = _ids(3)
    form, urlconf = [33, 519, 479], [33, 2556, 675, 953]  # "A form field", "A URLconf maps": one token shared
    seq, _ = ids.take(form)
    ids.release(seq, [*form, 7, 7])
    assert ids.take(urlconf) == (1, 0)  # an empty id: 0 keeps ``form`` for its next request
    ids.release(1, [*urlconf, 8])
    assert ids.take(form) == (0, 3) and ids.take(urlconf) == (1, 4)
    assert removed == [(0, 3), (1, 4)]  # only what followed each prompt
    ids.release(0, [*form, 7])
    ids.release(1, [*urlconf, 8])
    other = [33, 9, 9, 9]
    assert ids.take(other) == (2, 0)  # the last empty id
    ids.release(2, other)
    # no id keeps nothing: the shared token is reused from the best prefix, as before
    assert ids.take([33, 2556, 5]) == (1, 2)
    assert ids.take([33, 6, 6]) == (0, 1)
    # a prompt wholly kept beyond the shared positions is no prompt cut: its own id (a chat's next turn)
    ids, _ = _ids(3)
    ids.release(ids.take(form)[0], [*form, 7])
    assert ids.take([*form, 7, 5]) == (0, 4)


def _demo_wave(ids: SequenceIds, prompts: list[list[int]], planned: list[int | None] | None = None) -> list[int]:
    """Sessions opening together on ``prompts`` (as the verifier opens a batch), then ending: their ids."""
    taken = [ids.take(p, None if planned is None else planned[i])[0] for i, p in enumerate(prompts)]
    for seq, prompt in zip(taken, prompts, strict=True):
        ids.release(seq, [*prompt, 900 + seq, 901 + seq])  # each kept with its answer
    return taken


def test_sessions_opening_together_take_the_ids_that_kept_their_prompts_where_those_make_one_run():
    # the peer benchmark's waves: 16 clients cycling through 8 short prompts, a wave opening where one ended
    prompts = [[10 * p + 1, 10 * p + 2, 10 * p + 3, 10 * p + 4][: 2 + p % 3] for p in range(8)] * 2
    wave_two = prompts[5:] + prompts[:5]  # the clients' next prompts, in another order
    one_by_one, _ = _ids()
    _demo_wave(one_by_one, prompts)
    reused = one_by_one.reused
    _demo_wave(one_by_one, wave_two)
    assert one_by_one.reused - reused < sum(map(len, wave_two))  # each beside the last: prompts evaluated again
    ids, _ = _ids()
    _demo_wave(ids, prompts)
    reused = ids.reused
    plan = ids.plan(wave_two)
    assert sorted(plan) == list(range(16))  # (every id: one run)
    assert _demo_wave(ids, wave_two, plan) == plan
    assert ids.reused - reused == sum(map(len, wave_two))  # every prompt wholly kept where it was


def test_a_plan_that_would_split_the_open_sessions_ids_leaves_the_choice_to_take():
    ids, _ = _ids(32)
    assert [ids.take()[0] for _ in range(21)] == list(range(21))
    first, second = [1, 2, 3], [4, 5, 6]
    ids.release(10, first)
    ids.release(20, second)
    for seq in range(4, 20):
        if seq != 10:
            ids.release(seq)  # 0-3 stay open
    assert ids.plan([first, second]) == [None, None]  # 10 and 20 would make three runs with 0-3
    assert ids.plan([first]) == [None]  # a lone session: ``take`` chooses
    assert ids.plan([first, [7, 7]]) == [None, None]  # 10 alone: two runs
    for seq in range(4):
        ids.release(seq)
    assert ids.plan([first, [7, 7]]) == [10, None]  # nothing open: one run, the other session's choice is take's


def test_beside_open_sessions_a_kept_prefix_elsewhere_wins_only_when_much_longer():
    ids, _ = _ids()
    taken = [ids.take()[0] for _ in range(8)]
    assert taken == list(range(8))
    short, long = list(range(100, 110)), list(range(200, 200 + PREFIX_OVER_GAP + 5))
    ids.release(0, long)
    ids.release(1, short)
    for seq in (2, 3, 4):
        ids.release(seq)  # sessions 5-7 stay open
    # ten kept tokens do not pay for an id apart from 5-7 (a second pass every step): an id beside them
    assert ids.take(short) == (4, 0)
    assert ids.take(long) == (0, len(long))  # a prefix PREFIX_OVER_GAP tokens longer does
    ids.moved(1, 7)  # a session moved from 7 into 1: 1's kept tokens are overwritten
    assert ids.take(short) == (2, 0)  # the lowest of the ids beside the open ones; nothing keeps ``short`` now


def _copying_ids(n: int) -> tuple[SequenceIds, list[tuple[int, int]], list[tuple[int, int]]]:
    removed: list[tuple[int, int]] = []
    copied: list[tuple[int, int]] = []
    ids = SequenceIds(n, lambda seq, start: removed.append((seq, start)), copy=lambda a, b: copied.append((a, b)))
    return ids, removed, copied


def test_beside_open_sessions_a_longer_prefix_kept_apart_is_copied_beside_them_and_stays_kept_there():
    ids, removed, copied = _copying_ids(16)
    assert [ids.take()[0] for _ in range(8)] == list(range(8))
    kept = list(range(200, 200 + COPY_OVER + 6))
    ids.release(0, kept)
    for seq in (1, 2, 3, 4):
        ids.release(seq)  # sessions 5-7 stay open
    removed.clear()
    want = kept[:-2] + [7, 7]  # shares all but kept's last two
    # id 4 is the one beside 5-7 (it keeps nothing): 0's stream is copied there, and what follows the prefix goes
    assert ids.take(want) == (4, len(kept) - 2)
    assert copied == [(0, 4)] and removed == [(4, len(kept) - 2)] and ids.copies == 1
    assert ids.take(kept) == (3, len(kept))  # 0 still keeps it, for the next prompt that starts with it
    assert copied[-1] == (0, 3) and ids.reused == 2 * len(kept) - 2
    # a prefix fewer than COPY_OVER tokens longer than the one beside them is not worth a copy
    ids.release(3, kept[: COPY_OVER - 1])
    assert ids.take(kept) == (3, COPY_OVER - 1) and len(copied) == 2


def test_a_kept_prompt_a_new_session_overwrites_beside_the_open_ones_is_first_copied_apart():
    ids, _, copied = _copying_ids(8)
    assert [ids.take()[0] for _ in range(2)] == [0, 1]
    chat, answer = list(range(100, 100 + COPY_OVER + 4)), [7] * 20
    assert ids.take(chat) == (2, 0)
    ids.release(2, chat + answer)  # a chat's turn ended; sessions 0 and 1 go on
    assert ids.take([5, 6]) == (
        2,
        0,
    )  # the only id beside them: its tokens go apart first, to the lowest empty id there
    assert copied == [(2, 4)]
    # the chat's next turn (its tokens and more) opens beside the others and takes them back by a copy
    turn = chat + answer + [1, 2]
    assert ids.take(turn) == (3, len(chat + answer)) and copied[-1] == (4, 3)
    # a short prompt's stream holds mostly its answer: overwritten without a copy apart
    ids.release(3)
    assert ids.take([9, 9]) == (3, 0)
    ids.release(3, [9, 9, *answer])
    assert ids.take([5]) == (3, 0) and len(copied) == 2


def test_without_a_copy_nothing_is_copied_and_a_prefix_kept_apart_is_taken_where_it_is():
    ids, _ = _ids(16)
    assert [ids.take()[0] for _ in range(8)] == list(range(8))
    kept = list(range(200, 200 + COPY_OVER + 6))
    ids.release(0, kept)
    ids.release(4)
    assert ids.take(kept) == (4, 0) and ids.copies == 0  # beside 5-7, as before the copies


def test_a_draft_context_reuses_what_a_closed_one_left_and_evaluates_on_as_a_fresh_one(tiny_checkpoint):
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf", max_sessions=2)
    ids = [5, 17, 42, 99, 7, 250, 3, 8]
    first = draft.new_context()
    first.evaluate(ids)
    first.close()  # its sequence keeps the eight tokens
    again = draft.new_context(ids[:5] + [11, 12])
    assert again.reused == 5
    reused = again.evaluate([11, 12])
    fresh = LlamaCppDraft(out / "tiny.gguf", max_sessions=2).new_context().evaluate(ids[:5] + [11, 12])
    assert np.array_equal(reused, fresh)


def test_a_draft_context_copies_a_prefix_kept_apart_beside_the_open_ones_and_evaluates_on_as_a_fresh_one(
    tiny_checkpoint,
):
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf", max_sessions=4)
    ids = [5, 17, 42, 99, 7, 250, 3, 8, 61, 33, 12, 90, 4, 77]
    assert len(ids) > COPY_OVER + 2
    open_one = draft.new_context()  # id 0, open throughout
    first = draft.new_context(ids)  # id 1, for the prompt ``ids``
    first.evaluate(ids)
    first.close()
    other = draft.new_context([9, 9])  # takes id 1: what it kept is copied apart (id 3) first
    again = draft.new_context(ids[:10] + [11, 12])  # id 2, beside them: a copy of id 3
    assert again.reused == 10 and draft._ids.copies == 2
    fresh = LlamaCppDraft(out / "tiny.gguf", max_sessions=2).new_context().evaluate(ids[:10] + [11, 12])
    assert np.array_equal(again.evaluate([11, 12]), fresh)
    for ctx in (open_one, other, again):
        ctx.close()


def test_a_draft_session_on_a_kept_prompt_catches_up_on_one_token_and_drafts_as_a_fresh_one(tiny_checkpoint):
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf", max_sessions=2)
    prompt = [5, 17, 42, 99, 7, 250]
    first = DraftSession(draft, prompt, SamplingParams())
    drafted = first.propose(4)
    first.accept(drafted, Verdict(n_matches=2, verifier_token=3))  # two kept, the rest rolled back
    first.close()
    again = DraftSession(draft, prompt + list(drafted.tokens[:2]) + [3], SamplingParams())
    proposal = again.propose(4)
    fresh = DraftSession(LlamaCppDraft(out / "tiny.gguf", max_sessions=2), again.committed, SamplingParams())
    assert proposal.caught_up == 1  # only the verifier's token: the prompt and the accepted drafts were kept
    assert proposal.tokens == fresh.propose(4).tokens
    again.close()


def test_a_lazy_draft_session_takes_a_sequence_only_when_it_drafts_and_drafts_as_an_eager_one(tiny_checkpoint):
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf", max_sessions=1)
    prompt = [5, 17, 42, 99, 7, 250]
    plain = DraftSession(draft, prompt, SamplingParams(), lazy=True)
    plain.extend([3, 8])  # decoded plainly: the draft is never asked
    assert plain.propose(0).tokens == ()
    plain.close()
    lazy = DraftSession(draft, prompt, SamplingParams(), lazy=True)  # the one sequence is still free for it
    draft.new_context().close()  # the one sequence is free (else DraftBusyError): the lazy session holds none yet
    lazy.extend([3, 8])
    proposal = lazy.propose(4)
    eager = DraftSession(LlamaCppDraft(out / "tiny.gguf", max_sessions=1), [*prompt, 3, 8], SamplingParams())
    assert proposal.tokens == eager.propose(4).tokens and len(proposal.tokens) == 4
    with pytest.raises(DraftBusyError):  # now it holds the sequence
        draft.new_context()
    lazy.close()
    eager.close()


def test_a_lazy_draft_session_whose_draft_is_full_proposes_nothing_until_a_sequence_frees(tiny_checkpoint):
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf", max_sessions=1)
    holder = draft.new_context()
    lazy = DraftSession(draft, [5, 17, 42], SamplingParams(), lazy=True)
    assert lazy.propose(3).tokens == ()  # its round decodes plainly, the session goes on
    lazy.accept(lazy.propose(3), Verdict(0, 11))
    holder.close()
    assert len(lazy.propose(3).tokens) == 3  # drafts once a sequence is free
    with pytest.raises(DraftBusyError):  # an eager session is refused at once, as before
        DraftSession(draft, [5, 17, 42], SamplingParams())
    lazy.close()


def test_a_lazy_sampling_draft_session_draws_what_an_eager_one_draws():
    draft = LlamaCppDraft(DEMO_DRAFT_GGUF, max_sessions=2)
    params = SamplingParams(temperature=0.9, seed=7)
    lazy = DraftSession(draft, [5, 17, 42, 99], params, lazy=True)
    lazy.extend([3])
    eager = DraftSession(draft, [5, 17, 42, 99, 3], params)
    assert lazy.propose(4).tokens == eager.propose(4).tokens
    lazy.close()
    eager.close()


@pytest.mark.parametrize("batch_tokens", [512, 32])  # 32: the prompt is longer than a decode takes
def test_drafting_at_once_alone_drafts_and_caches_what_a_gathered_round_does_on_the_threads_asked(
    tiny_checkpoint, monkeypatch, batch_tokens
):
    out, _, _ = tiny_checkpoint
    draft = LlamaCppDraft(out / "tiny.gguf", batch_tokens=batch_tokens)
    prompt = list(range(5, 45))
    gathered, now = DraftSession(draft, prompt, SamplingParams()), DraftSession(draft, prompt, SamplingParams())
    threads: list[int] = []
    real = draft._ctx.set_n_threads
    monkeypatch.setattr(draft._ctx, "set_n_threads", lambda n, n_batch: threads.append(n) or real(n, n_batch))
    try:
        for k, kept in ((3, 1), (2, 2), (4, 0)):  # rounds of k, the verifier keeping ``kept`` drafted tokens
            expected, got = gathered.propose(k), now.propose_now(k, threads=2)
            assert got.tokens == expected.tokens and got.caught_up == expected.caught_up
            for session, proposal in ((gathered, expected), (now, got)):
                session.accept(proposal, Verdict(kept, 99))
        assert now._ctx._tokens == gathered._ctx._tokens  # each sequence holds the same evaluated tokens
        assert gathered.propose(2).tokens == now.propose(2).tokens  # and drafts on alike
    finally:
        gathered.close()
        now.close()
    assert threads == [2, 1, 2, 1, 2, 1]  # its decodes on the threads asked, the gathered ones on the model's own
