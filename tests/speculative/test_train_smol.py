"""The SmolLM2 draft's pipeline (``speculative.train_smol``) end to end at tiny sizes, resumed after stops."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from speculative.smol_teacher import StoredAnswer

TINY = dict(
    prompts=6, held_out=2, max_new=6, max_context=256, top_k=4, teacher_batch=2, init_layers=(0,),
    steps=2, batch=2, lr=1e-3, warmup=1, checkpoint_every=1, eval_every=2, speed_tokens=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def taught(tmp_path_factory, smollm2_verifier):
    """A store and a work folder whose prompts and teacher stages are done."""
    from speculative.train_smol import Run, Settings

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("smol") / "work"
    run = Run(work, work.parent / "out", work.parent / "store", Settings(**TINY), smollm2_verifier)
    run.teacher()
    return run


def test_teacher_answers_scored_again_are_its_greedy_tokens_with_their_top_k(taught):
    answers = taught.train_answers()
    assert len(answers) == 4 and len(taught.held_answers()) == 2
    for a in answers:
        assert 0 < len(a.answer_ids) <= TINY["max_new"] and a.top_ids.shape == (len(a.answer_ids), TINY["top_k"])
        assert a.top_ids[:, 0].tolist() == a.answer_ids  # greedy: each answer token is the best of its top-k
        logprobs = a.top_logprobs.astype(np.float32)
        assert (logprobs <= 0).all() and (np.diff(logprobs, axis=1) <= 0).all()
        assert np.exp(logprobs).sum(axis=1).max() <= 1.01
    assert {p.name for p in (taught.work / "scored").glob("*.npz")} == {"train-00000.npz"}  # cached per shard


def test_top_k_kept_from_this_machines_decode_equals_another_machines_scoring_pass(taught, tmp_path):
    from speculative.train_smol import Run

    assert len(taught.decoded.read(TINY["top_k"])) == 4
    elsewhere = Run(tmp_path / "work", tmp_path / "out", taught.store, taught.settings, taught.verifier)
    assert elsewhere.decoded.read(TINY["top_k"]) == {}
    for mine, theirs in zip(taught.train_answers(), elsewhere.train_answers(), strict=True):
        assert mine.id == theirs.id and np.array_equal(mine.top_ids, theirs.top_ids)
        assert np.allclose(mine.top_logprobs.astype(np.float32), theirs.top_logprobs.astype(np.float32), atol=1e-2)
    assert json.loads((elsewhere.work / "scored" / "stats.json").read_text())["tokens"] == sum(
        len(a.answer_ids) for a in elsewhere.train_answers()
    )


def test_teacher_store_keeps_only_answer_ids_in_closed_gzip_shards(taught):
    assert sorted(p.name for p in taught.store.iterdir() if "-" in p.name) == [
        "held_out-00000.jsonl.gz", "train-00000.jsonl.gz"]  # fmt: skip
    rows = [
        json.loads(line) for line in gzip.decompress((taught.store / "train-00000.jsonl.gz").read_bytes()).splitlines()
    ]
    assert [set(r) for r in rows] == [{"id", "answer"}] * 4
    assert [r["answer"] for r in rows] == [a.answer_ids for a in taught.train_answers()]
    stats = json.loads((taught.store / "stats.json").read_text())["runs"]
    assert [(r["split"], r["answers"]) for r in stats][:2] == [("held_out", 2), ("train", 4)]  # then any rerun's


def test_teacher_stage_resumes_skipping_answered_prompts_and_a_torn_line(taught):
    shard = taught.store / "train-00000.jsonl.gz"
    whole = gzip.decompress(shard.read_bytes()).decode().splitlines(keepends=True)
    # a run killed while writing its fourth answer to the open tail, before closing it into a shard
    shard.unlink()
    taught.train_store.open_path.write_text("".join(whole[:-1]) + whole[-1][:30])
    taught.teacher()
    assert not taught.train_store.open_path.exists()
    again = gzip.decompress(shard.read_bytes()).decode().splitlines(keepends=True)
    assert again[:-1] == whole[:-1]  # what was done is kept as it was
    redone, before = StoredAnswer.from_json(again[-1]), StoredAnswer.from_json(whole[-1])
    assert redone == before  # the torn answer, redone alone rather than in a batch of two: the same tokens


def test_prompt_list_is_kept_from_the_first_run_when_the_sources_change(taught, monkeypatch):
    import speculative.train_smol as train_smol

    before = taught.prompts()
    monkeypatch.setattr(train_smol, "chat_prompts", lambda seed, limit=None: [])  # the difficulty set grew
    assert taught.prompts() == before
    assert {a.id for a in taught.train_store.read()} <= {p.id for p in before[0]}


def test_work_folder_and_store_refuse_other_settings(taught, smollm2_verifier, tmp_path):
    from speculative.train_smol import Run, Settings

    with pytest.raises(ValueError, match="other settings.*--work"):
        Run(taught.work, taught.out, taught.store, Settings(**{**TINY, "top_k": 8}), smollm2_verifier)
    with pytest.raises(ValueError, match="other settings.*--store"):  # its answers were cut at another length
        Run(tmp_path / "work", taught.out, taught.store, Settings(**{**TINY, "max_new": 8}), smollm2_verifier)


def test_a_steps_rows_are_of_neighbouring_lengths_and_depend_on_the_step_alone():
    from speculative.smol_draft import step_index

    lengths = [50, 10, 40, 20, 30, 60, 70, 5]
    drawn = [step_index(lengths, step, 3, seed=1) for step in range(20)]
    assert drawn == [step_index(lengths, step, 3, seed=1) for step in range(20)]
    by_length = sorted(range(8), key=lambda i: lengths[i])
    assert all(len(rows) == 3 and any(by_length[s : s + 3] == rows for s in range(6)) for rows in drawn)
    assert len({tuple(rows) for rows in drawn}) > 1


def test_training_resumed_from_a_checkpoint_equals_an_unbroken_run(taught, tmp_path):
    from speculative.smol_draft import CHECKPOINT, FINAL
    from speculative.train_smol import Run

    # another machine: the same store, a fresh work folder (its top-k scored again)
    unbroken = Run(tmp_path / "work", tmp_path / "out", taught.store, taught.settings, taught.verifier)
    assert unbroken.train()["step"] == 2

    assert taught.train(stop_after=1)["step"] == 1  # a stop, after 1 of 2 steps
    assert torch.load(taught.work / "train" / CHECKPOINT, weights_only=False)["step"] == 1
    resumed = taught.train()
    assert resumed["step"] == 2 and [h["step"] for h in resumed["history"]] == [1, 2]
    a = torch.load(taught.work / "train" / FINAL, weights_only=False)["trainable"]
    b = torch.load(unbroken.work / "train" / FINAL, weights_only=False)["trainable"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_draft_shares_the_verifiers_vocabulary_and_embedding_bytes_and_reports(taught):
    from speculative.pair import check_vocabularies
    from speculative.smol_draft import open_gguf
    from speculative.smol_teacher import LlamaRunner

    if not (taught.work / "train" / "draft-trained.pt").exists():
        taught.train()
    path = taught.export()
    # the blocks go where the repository keeps them; the whole draft, assembled from them, stays in the work folder
    assert path == taught.work / "draft.gguf" and (taught.out / "draft-blocks.gguf").is_file()
    draft, verifier = open_gguf(path), open_gguf(taught.verifier)
    mine, theirs = (next(t for t in r.tensors if t.name == "token_embd.weight") for r in (draft, verifier))
    assert mine.tensor_type == theirs.tensor_type and np.array_equal(mine.data, theirs.data)
    assert draft.fields["tokenizer.chat_template"].contents() == verifier.fields["tokenizer.chat_template"].contents()
    runner = LlamaRunner(path, batch=1, max_context=64)
    check_vocabularies(LlamaRunner(taught.verifier, batch=1, max_context=64).tokens(), runner.tokens(), draft_name="d")

    report = taught.report()
    assert (taught.out / "report.json").exists()
    assert 0 <= report["held_out"]["greedy_acceptance"] <= 1 and report["held_out"]["prompts"] == 2
    assert report["tokens_per_second"]["draft"] > 0 and report["train"]["steps"] == 2
    assert report["draft"]["blocks_bytes"] == (taught.out / "draft-blocks.gguf").stat().st_size


def test_verifier_layers_read_into_torch_compute_what_llama_cpp_computes(taught):
    """All 30 layers read from the GGUF (q/k rows un-permuted) make the verifier again, in torch.

    With the rows left as the GGUF orders them, the argmaxes agreed at 12% of positions, not 96%.
    """
    from speculative.smol_draft import build_draft, draft_logits_at
    from speculative.smol_teacher import LlamaRunner

    model = build_draft(taught.verifier, tuple(range(30)))
    a = taught.held_answers()[0]
    tokens, first = a.prompt_ids + a.answer_ids, len(a.prompt_ids) - 1
    theirs = LlamaRunner(taught.verifier, batch=1, max_context=len(tokens)).logits_after(tokens, first)
    at = torch.zeros(1, len(tokens), dtype=torch.bool)
    at[0, first:] = True
    with torch.no_grad():
        mine = draft_logits_at(model, torch.tensor([tokens]), at).numpy()
    assert mine.shape == theirs.shape
    # llama.cpp multiplies Q4_1 weights by 8-bit activations: close, not equal
    assert np.abs(mine - theirs).max() < 0.1 * np.abs(theirs).max()
    assert (mine.argmax(1) == theirs.argmax(1)).mean() >= 0.8


def test_export_writes_the_verifiers_layers_back_in_its_own_layout(taught, tmp_path):
    from speculative.smol_draft import build_draft, dequantized, open_gguf, trainable_state
    from speculative.smol_export import export_draft

    model = build_draft(taught.verifier, (3, 7))
    path = export_draft(taught.verifier, trainable_state(model), tmp_path / "d.gguf", matrix_type="f32")
    draft, verifier = open_gguf(path), open_gguf(taught.verifier)
    for mine, theirs in ((0, 3), (1, 7)):
        for name in ("attn_q", "attn_k", "attn_v", "ffn_down", "attn_norm"):
            assert np.array_equal(
                dequantized(draft, f"blk.{mine}.{name}.weight"), dequantized(verifier, f"blk.{theirs}.{name}.weight")
            )


def test_the_draft_assembled_from_its_trained_blocks_is_the_exported_draft_byte_for_byte(taught, tmp_path):
    """The repository keeps only what training made; beside the package's verifier it is the whole draft again."""
    from speculative.smol_draft import build_draft, open_gguf, trainable_state
    from speculative.smol_export import assemble_draft, export_blocks, export_draft

    trained = trainable_state(build_draft(taught.verifier, (0, 29)))
    whole = export_draft(taught.verifier, trained, tmp_path / "whole" / "draft.gguf")
    blocks = export_blocks(taught.verifier, trained, tmp_path / "draft-blocks.gguf")
    assert blocks.stat().st_size < whole.stat().st_size / 4  # no embedding, no vocabulary
    assert {t.name for t in open_gguf(blocks).tensors} == {t.name for t in open_gguf(whole).tensors} - {
        "token_embd.weight"
    }
    again = assemble_draft(taught.verifier, blocks, tmp_path / "again" / "draft.gguf")
    assert again.read_bytes() == whole.read_bytes()
    assert not list(again.parent.glob("*.tmp"))


def test_a_failed_assembly_leaves_no_file_behind(taught, tmp_path, monkeypatch):
    from speculative.smol_draft import build_draft, trainable_state
    from speculative.smol_export import assemble_draft, export_blocks

    blocks = export_blocks(taught.verifier, trainable_state(build_draft(taught.verifier, (0,))), tmp_path / "b.gguf")

    def full_disk(reader, tensors, matrix_type, out_path, name=None):
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(b"half a draft")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("speculative.smol_export._write_draft", full_disk)
    with pytest.raises(OSError, match="No space left"):
        assemble_draft(taught.verifier, blocks, tmp_path / "out" / "d.gguf")
    assert not (tmp_path / "out" / "d.gguf").exists() and not list(tmp_path.glob("**/*.tmp"))


def test_blocks_trained_on_another_verifier_or_not_blocks_at_all_are_refused(taught, tmp_path):
    import gguf

    from speculative.errors import ModelLoadError
    from speculative.smol_draft import build_draft, trainable_state
    from speculative.smol_export import BLOCKS_VERIFIER_KEY, assemble_draft, export_blocks

    blocks = export_blocks(taught.verifier, trainable_state(build_draft(taught.verifier, (0,))), tmp_path / "b.gguf")
    other = tmp_path / "other.gguf"
    other.write_bytes(taught.verifier.read_bytes() + b"\0")  # the same weights in another file
    with pytest.raises(ModelLoadError, match="was trained on a verifier with SHA-256"):
        assemble_draft(other, blocks, tmp_path / "d.gguf")
    plain = gguf.GGUFWriter(str(tmp_path / "plain.gguf"), "llama")
    plain.write_header_to_file()
    plain.write_kv_data_to_file()
    plain.write_tensors_to_file()
    plain.close()
    with pytest.raises(ModelLoadError, match=f"has no {BLOCKS_VERIFIER_KEY}: not a draft blocks file"):
        assemble_draft(taught.verifier, tmp_path / "plain.gguf", tmp_path / "d.gguf")
    assert not (tmp_path / "d.gguf").exists()
    with pytest.raises(ModelLoadError, match="plain.gguf: no tokenizer.ggml.tokens"):
        build_draft(tmp_path / "plain.gguf", (0,))
