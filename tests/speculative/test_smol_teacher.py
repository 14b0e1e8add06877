"""The SmolLM2 teacher's answer store (shards that outlive a machine) and its scoring pass (``smol_teacher``)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from speculative.smol_teacher import UBATCH_TOKENS, AnswerStore, StoredAnswer


def answers(n: int, start: int = 0) -> list[StoredAnswer]:
    return [StoredAnswer(f"p{i}", [i, i + 1, 7] * (1 + i % 3)) for i in range(start, start + n)]


def test_store_closes_a_gzip_shard_every_n_answers_and_reads_all_back_in_order(tmp_path):
    store = AnswerStore(tmp_path, "train", shard_answers=3)
    for a in answers(7):
        store.append(a)
    assert [p.name for p in store.shards()] == ["train-00000.jsonl.gz", "train-00001.jsonl.gz"]
    assert store.open_path.read_text().count("\n") == 1  # the seventh, not yet in a shard
    assert store.read() == answers(7) and store.done_ids() == {f"p{i}" for i in range(7)}
    assert store.close_shard() == tmp_path / "train-00002.jsonl.gz" and not store.open_path.exists()
    assert store.read() == answers(7) and store.close_shard() is None
    assert AnswerStore(tmp_path, "held_out").read() == []  # another split's files are not its own


def test_store_shards_are_the_same_bytes_for_the_same_answers(tmp_path):
    for name in ("a", "b"):
        store = AnswerStore(tmp_path / name, "train", shard_answers=2)
        for a in answers(2):
            store.append(a)
    first, second = (tmp_path / name / "train-00000.jsonl.gz" for name in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()  # no timestamp in the gzip header: a clean git diff


def test_store_cuts_a_torn_last_line_of_its_tail_and_appends_after_it(tmp_path):
    store = AnswerStore(tmp_path, "train")
    for a in answers(2):
        store.append(a)
    whole = store.open_path.read_text()
    store.open_path.write_text(whole + answers(1, 2)[0].to_json()[:9])  # killed mid-write
    assert store.read() == answers(2)
    store.append(answers(1, 5)[0])
    assert store.open_path.read_text() == whole + answers(1, 5)[0].to_json() + "\n"


def test_store_skips_the_tail_a_kill_left_after_closing_it_into_a_shard(tmp_path):
    store = AnswerStore(tmp_path, "train", shard_answers=10)
    for a in answers(3):
        store.append(a)
    tail = store.open_path.read_text()
    store.close_shard()
    store.open_path.write_text(tail)  # as if killed between writing the shard and removing the tail
    assert store.read() == answers(3)
    assert [len(s.answers) for s in store.sources()] == [3, 0]


def test_store_refuses_a_shard_with_a_broken_line(tmp_path):
    (tmp_path / "train-00000.jsonl.gz").write_bytes(gzip.compress(b'{"id": "p0", "answer": [1]}\n{"id": \n'))
    with pytest.raises(ValueError, match="line 2"):
        AnswerStore(tmp_path, "train").read()


def test_scoring_pass_reproduces_the_top_k_the_decode_saw(smollm2_verifier):
    """Teacher forcing, several sequences a decode and a prompt longer than a ubatch, gives the decode's top-k."""
    from speculative.smol_teacher import LlamaRunner, LlamaScorer

    runner = LlamaRunner(smollm2_verifier, batch=3, max_context=256)
    texts = ["What is 12 times 7?", "Write a haiku about the Moon.", "Translate into French: the cat sat on the mat.",
             "Summarise this: " + "The meeting is moved to Thursday because the room was double booked. " * 4]  # fmt: skip
    prompts = [(str(i), runner.chat_prompt_ids(t)) for i, t in enumerate(texts)]
    assert max(len(p) for _, p in prompts) > UBATCH_TOKENS
    decoded = sorted(runner.answer_stream(prompts, max_new=12, k=8), key=lambda a: a.id)
    scorer = LlamaScorer(smollm2_verifier, max_context=256, tokens=256, sequences=2)  # two packs of two
    scored = list(scorer.score([(a.prompt_ids, a.answer_ids) for a in decoded], k=8))
    for a, (ids, logprobs) in zip(decoded, scored, strict=True):
        assert ids.shape == a.top_ids.shape == (len(a.answer_ids), 8)
        assert np.array_equal(ids, a.top_ids)
        assert np.allclose(logprobs.astype(np.float32), a.top_logprobs.astype(np.float32), atol=1e-2)
