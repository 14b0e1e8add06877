"""The prompt difficulty classifier: committed model, thresholds, robustness, reproducible training."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.difficulty import classifier as classifier_module
from inference.difficulty.classifier import Difficulty, DifficultyClassifier, Thresholds, default_classifier
from inference.difficulty.corpus import GENERATED_PATH, generate, read_jsonl
from inference.difficulty.errors import InvalidThresholds
from inference.difficulty.labels import HARD_FRONTIER, HARD_OPEN, LABELS, ROUTINE

# Clear examples of each class, written for this test: none is in the training files.
CLEAR_EXAMPLES = [
    ("Hello! How are you doing today?", ROUTINE),
    ("What is the capital of Italy?", ROUTINE),
    ("Translate to French: good morning, my friend.", ROUTINE),
    ("fix the spelling: I realy liked the moovie we saw yesterday, thank you for inviting me!", ROUTINE),
    ("Solve the equation 3x^2 - 7x + 2 = 0 and show each step.", HARD_OPEN),
    ("Explain the difference between a stock and a bond with an example.", HARD_OPEN),
    ("Explain how a hash table handles collisions, with an example.", HARD_OPEN),
    (
        "Prove that every finite integral domain is a field, then classify all finite fields up to isomorphism.",
        HARD_FRONTIER,
    ),
    (
        "A 70-year-old on warfarin and amiodarone has an INR of 8 and melena. What is the management, with doses?",
        HARD_FRONTIER,
    ),
    ("Design a lock-free concurrent skip list and prove that it is linearizable.", HARD_FRONTIER),
]


@pytest.fixture(scope="module")
def model() -> DifficultyClassifier:
    return default_classifier()


def test_training_files_do_not_contain_the_test_examples():
    from inference.difficulty.train import load_training_rows

    trained = {row.prompt.strip().lower() for row in load_training_rows()}
    assert not trained & {prompt.strip().lower() for prompt, _ in CLEAR_EXAMPLES}


@pytest.mark.parametrize(("prompt", "expected"), CLEAR_EXAMPLES)
def test_committed_classifier_labels_clear_examples(model, prompt, expected):
    assert model.classify(prompt).label == expected


def test_probabilities_cover_every_label_and_sum_to_one(model):
    probs = model.classify("What is the capital of Italy?").probs
    assert tuple(probs) == LABELS
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)


def test_thresholds_apply_cloud_first_then_hard():
    difficulty = Difficulty(ROUTINE, {ROUTINE: 0.6, HARD_OPEN: 0.25, HARD_FRONTIER: 0.15})
    assert difficulty.label_with(Thresholds(cloud=0.1, hard=0.3)) == HARD_FRONTIER
    assert difficulty.label_with(Thresholds(cloud=0.2, hard=0.3)) == HARD_OPEN  # 0.25 + 0.15 >= 0.3
    assert difficulty.label_with(Thresholds(cloud=0.2, hard=0.5)) == ROUTINE


def test_committed_default_thresholds_favour_recall_of_hard_prompts(model):
    assert model.thresholds.cloud < 0.5 and model.thresholds.hard < 0.5
    # a prompt that is only somewhat likely to be hard is not left on the edge
    assert (
        Difficulty(ROUTINE, {ROUTINE: 0.55, HARD_OPEN: 0.25, HARD_FRONTIER: 0.2}).label_with(model.thresholds)
        != ROUTINE
    )


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_thresholds_outside_unit_interval_are_refused(bad):
    with pytest.raises(InvalidThresholds):
        Thresholds(cloud=bad, hard=0.5)


def test_difficulty_is_immutable(model):
    difficulty = model.classify("hi")
    with pytest.raises(dataclasses.FrozenInstanceError):
        difficulty.label = HARD_FRONTIER  # type: ignore[misc]
    with pytest.raises(TypeError):
        difficulty.probs[ROUTINE] = 0.0  # type: ignore[index]


def test_classification_is_deterministic_across_calls_and_loads(model):
    prompt = "Compute the eigenvalues of [[2, 1], [1, 3]] and explain."
    again = DifficultyClassifier.load()
    assert model.classify(prompt) == model.classify(prompt) == again.classify(prompt)


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        " \n\t ",
        "\x00\x01\x02",
        "a" * 1_000_000,
        "word " * 200_000,
        "这个定理的证明是什么？请详细解释。",
        "ما هي عاصمة فرنسا؟",
        "Привет, как дела? 🙂🚀",
        "\ud800 lone surrogate",
    ],
)
def test_unusual_input_gives_a_valid_result(model, prompt):
    difficulty = model.classify(prompt)
    assert difficulty.label in LABELS
    assert all(np.isfinite(p) and 0.0 <= p <= 1.0 for p in difficulty.probs.values())


def test_default_classifier_is_loaded_lazily_and_once(monkeypatch):
    monkeypatch.setattr(classifier_module, "_default", None)
    loads = []
    real_load = DifficultyClassifier.load
    monkeypatch.setattr(DifficultyClassifier, "load", classmethod(lambda cls: loads.append(1) or real_load()))
    first = default_classifier()
    assert default_classifier() is first
    assert loads == [1]


def test_committed_model_was_trained_on_the_committed_data():
    import json

    from inference.difficulty.classifier import ASSET_DIR, META_FILE
    from inference.difficulty.train import load_training_rows, rows_sha256

    meta = json.loads((ASSET_DIR / META_FILE).read_text())
    assert meta["provenance"]["rows_sha256"] == rows_sha256(load_training_rows())


def test_generator_reproduces_the_committed_generated_rows():
    assert list(generate()) == read_jsonl(GENERATED_PATH)


def test_training_twice_on_a_tiny_subset_gives_the_same_model():
    from inference.difficulty.train import load_training_rows, train

    rows = [r for r in load_training_rows() if r.family in ("math", "law")][::4]  # three labels, two families
    table = np.random.default_rng(0).standard_normal((30522, 8)).astype(np.float16)  # stands in for MiniLM's
    head_a, meta_a = train(rows=rows, table=table)
    head_b, meta_b = train(rows=rows, table=table)
    assert meta_a == meta_b
    for name in ("bias", "token_logits", "length_logits", "ngram_weights", "idf"):
        np.testing.assert_array_equal(getattr(head_a, name), getattr(head_b, name))


def test_training_files_do_not_contain_the_ood_prompts():
    from inference.difficulty.classifier import ASSET_DIR
    from inference.difficulty.evaluate import OOD_FILE
    from inference.difficulty.train import load_training_rows

    trained = {row.prompt.strip().lower() for row in load_training_rows()}
    assert not trained & {row.prompt.strip().lower() for row in read_jsonl(ASSET_DIR / OOD_FILE)}


def test_word_ngrams_add_buckets_and_are_stable_across_processes():
    import subprocess
    import sys

    from inference.difficulty.ngrams import ngram_buckets

    prompt = "Summarise this email in two sentences, please."
    with_words, _ = ngram_buckets(prompt)
    chars_only, _ = ngram_buckets(prompt, words=False)
    assert len(with_words) > len(chars_only)
    code = f"from inference.difficulty.ngrams import ngram_buckets; print(ngram_buckets({prompt!r})[0].tolist())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == str(with_words.tolist())  # no per-process hash salt


# Instruction / payload split and personal-data masking (2026-12-01, second update) -------------------
def test_a_pasted_block_after_a_colon_line_is_payload():
    from inference.difficulty.payload import split_prompt

    paste = "Hi team, the printer on the third floor is broken again.\nPlease use the one on the second floor."
    split = split_prompt(f"Fix the typos in this text:\n\n{paste}")
    assert split.instruction == "Fix the typos in this text:"
    assert split.payload == paste


def test_fenced_code_and_long_quotes_are_payload_short_quotes_are_not():
    from inference.difficulty.payload import split_prompt

    split = split_prompt("What does this print?\n```python\nprint(sum(range(10)))\n```")
    assert "print(sum" in split.payload and "print(sum" not in split.instruction
    split = split_prompt('Summarise in one sentence: "The library closes early on Friday for staff training."')
    assert split.payload == "The library closes early on Friday for staff training."
    assert "library" not in split.instruction
    for prompt in ("Translate 'hello' into German.", "Is 221 prime?", "It's John's car, isn't it?"):
        assert split_prompt(prompt).instruction == prompt and split_prompt(prompt).payload == ""


def test_a_long_paste_with_the_request_last_keeps_the_request_as_instruction():
    from inference.difficulty.payload import split_prompt

    body = "\n\n".join(["We drove to the coast and stayed at a small campsite near the lighthouse. " * 5] * 3)
    split = split_prompt(body + "\n\nCan you summarise the above in two sentences?")
    assert split.instruction == "Can you summarise the above in two sentences?"
    assert split.payload.startswith("We drove")


def test_personal_data_is_masked_to_class_words():
    from inference.difficulty.payload import mask_personal_data

    masked = mask_personal_data(
        "Call Anna on +49 151 2345 6789 or anna.k@example.com, IBAN DE89 3704 0044 0532 0130 00."
    )
    assert "phonenum" in masked and "emailaddr" in masked and "ibancode" in masked
    assert not any(c.isdigit() for c in masked.replace("DE", ""))
    assert mask_personal_data("Is 221 prime? Solve 3x^2 - 7x + 2 = 0.") == "Is 221 prime? Solve 3x^2 - 7x + 2 = 0."


def test_a_routine_instruction_over_a_long_paste_reads_like_the_instruction(model):
    """The pasted body no longer dominates: a long paste behind "fix the typos" stays off the cloud."""
    paste = (
        "Dear all, the quarterly review moved to Thursday. Please bring your figures, the slides from last "
        "time and any questions about the new travel policy. Lunch will be provided in the big meeting room. "
    ) * 12
    assert model.classify(f"Fix the typos in this email:\n\n{paste}").label_with(model.thresholds) != HARD_FRONTIER


def test_serving_reads_prompts_as_training_does():
    from inference.difficulty.classifier import ASSET_DIR
    from inference.difficulty.payload import PAYLOAD_WEIGHT, read_prompt

    head = classifier_module.Head.load(ASSET_DIR / classifier_module.HEAD_FILE)
    assert head.payload_weight == pytest.approx(PAYLOAD_WEIGHT)
    reading = read_prompt("Reformat this phone number: 02079460958")
    assert "phonenum" in reading.instruction and reading.payload == ""


@pytest.mark.parametrize(
    "prompt",
    [
        "a." * 8000 + "@",
        "«" * 16000,
        "„" * 16000,
        "“" * 16000,
        "「" * 16000,
        '"' * 16000,
        ":\n" * 8000,
        "1 " * 8000 + "x",
    ],
)
def test_reading_a_pathological_prompt_stays_fast(prompt):
    """The masking and splitting regexes must stay linear: a quadratic scan of 16,000 characters takes ~0.5 s."""
    import time

    from inference.difficulty.payload import read_prompt

    started = time.perf_counter()
    read_prompt(prompt)
    assert time.perf_counter() - started < 0.1


# Data hygiene and the threshold protocol (2026-12-02) -------------------------------------------------
def test_training_files_do_not_contain_the_router_evaluation_prompts():
    """The router's evaluation set stays unseen by training (ten common look-ups had crept in before 2026-12-02)."""
    import json

    from inference.difficulty.classifier import ASSET_DIR
    from inference.difficulty.train import load_training_rows

    lines = (ASSET_DIR.parent / "router_eval" / "tandem-router-eval.jsonl").read_text(encoding="utf-8").splitlines()
    evaluated = {json.loads(line)["prompt"].strip().lower() for line in lines if line.strip()}
    trained = {row.prompt.strip().lower() for row in load_training_rows()}
    assert evaluated and not trained & evaluated


def test_no_prompt_is_trained_on_twice():
    from inference.difficulty.train import load_training_rows

    prompts = [row.prompt.strip().lower() for row in load_training_rows()]
    assert len(prompts) == len(set(prompts))


def test_every_training_row_names_its_label_family_template_and_language():
    from inference.difficulty.train import TRAIN_FILES, load_training_rows

    assert "written_lookalikes.jsonl" in TRAIN_FILES
    for row in load_training_rows():
        assert row.label in LABELS and row.family and row.template and row.lang


def test_default_thresholds_keep_the_routers_limits_on_held_out_families():
    import json

    from inference.difficulty.classifier import ASSET_DIR, META_FILE
    from inference.difficulty.metrics import MAX_HARD_TO_EDGE, MIN_FRONTIER_TO_CLOUD

    held_out = json.loads((ASSET_DIR / META_FILE).read_text())["family_holdout"]
    assert held_out["hard_to_edge"] <= MAX_HARD_TO_EDGE
    assert held_out["frontier_to_cloud"] >= MIN_FRONTIER_TO_CLOUD


def _every_corpus_prompt() -> list[str]:
    from inference.difficulty.corpus import ASSETS

    return [row.prompt for path in sorted(ASSETS.glob("*.jsonl")) for row in read_jsonl(path)]


@functools.cache
def _serving_ids():
    from inference.difficulty.embedding import WordPieceIds

    return WordPieceIds(default_classifier()._tokenizer)


def test_serving_token_ids_equal_the_tokenizers_on_every_corpus_prompt(model):
    from inference.difficulty.embedding import token_ids

    fast = _serving_ids()
    prompts = _every_corpus_prompt()
    plain = [p for p in prompts if p.isascii()]
    assert len(plain) > 1000  # the fast path is exercised, not only the fallback
    special = ["classify [MASK] as [CLS] or [SEP]", "x" * 2500 + " [PAD] " + "y" * 10, "a" * 150 + " b", "\x07bell"]
    for prompt in prompts + special + [p * 9 for p in plain[:50]]:  # and beyond the tokenized clip
        assert np.array_equal(fast(prompt), token_ids(model._tokenizer, prompt)), prompt[:80]
    assert len(fast._words) > 1000  # the words the fast path split and remembered: it ran


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127) | st.sampled_from("éß中 "), max_size=120))
def test_serving_token_ids_equal_the_tokenizers_on_generated_text(prompt):
    from inference.difficulty.embedding import token_ids

    assert np.array_equal(_serving_ids()(prompt), token_ids(default_classifier()._tokenizer, prompt))


def _reference_ngram_buckets(prompt: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The n-gram hash written out as defined (each n-gram's polynomial from its own codes), np.unique's counts."""
    from inference.difficulty.ngrams import _BASE, _MIX, BUCKET_BITS, NGRAM_MAX, NGRAM_MIN, normalise, word_hashes

    if not prompt:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    text = normalise(prompt)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    hashes = word_hashes(text, seed)
    for n in range(NGRAM_MIN, NGRAM_MAX + 1):
        count = len(codes) - n + 1
        if count <= 0:
            continue
        h = np.full(count, n + seed, dtype=np.uint64)
        for k in range(n):
            h = h * _BASE + codes[k : k + count]
        hashes.append(h)
    buckets = ((np.concatenate(hashes) * _MIX) >> np.uint64(64 - BUCKET_BITS)).astype(np.intp)
    return np.unique(buckets, return_counts=True)


def test_ngram_buckets_equal_the_hash_as_defined_on_every_corpus_prompt():
    from inference.difficulty.ngrams import ngram_buckets
    from inference.difficulty.payload import PAYLOAD_SEED

    for prompt in [*_every_corpus_prompt()[::3], "a", "ab", "x" * 40_000]:
        for seed in (0, PAYLOAD_SEED):
            ids, counts = ngram_buckets(prompt, seed=seed)
            expected_ids, expected_counts = _reference_ngram_buckets(prompt, seed)
            assert np.array_equal(ids, expected_ids) and np.array_equal(counts, expected_counts), prompt[:80]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_ngram_buckets_equal_the_hash_as_defined_on_generated_text(prompt):
    from inference.difficulty.ngrams import ngram_buckets

    ids, counts = ngram_buckets(prompt)
    expected_ids, expected_counts = _reference_ngram_buckets(prompt)
    assert np.array_equal(ids, expected_ids) and np.array_equal(counts, expected_counts)


def _reference_logits(model: DifficultyClassifier, prompt: str) -> np.ndarray:
    """The folded head's sum as written at training: the tokenizer's ids, a gather per window from its own table.

    The n-gram scores are the classifier's own (their buckets have a reference test of their own above).
    """
    from inference.difficulty.embedding import clip_prompt, length_feature, token_ids, windows
    from inference.difficulty.payload import PAYLOAD_SEED, read_prompt

    head = model._head
    reading = read_prompt(clip_prompt(prompt))
    ids = token_ids(model._tokenizer, reading.instruction)
    out = head.bias.astype(np.float64) + head.length_logits * length_feature(reading.instruction)
    for table, window in zip(head.token_logits, windows(ids), strict=True):
        if len(window):
            out += table[window].mean(axis=0)
    out += model.ngram_scores(reading.instruction + reading.markers)
    if reading.payload and head.payload_weight:
        out += head.payload_weight * model.ngram_scores(reading.payload, seed=PAYLOAD_SEED)
    return out


def test_serving_scores_equal_the_heads_sum_as_written_bit_for_bit(model):
    for prompt in _every_corpus_prompt()[::2]:
        logits = model.logits(prompt)
        assert np.array_equal(logits, _reference_logits(model, prompt)), prompt[:80]
        verdict = model.classify(prompt)  # and classify's probabilities are probabilities'
        assert [verdict.probs[label] for label in LABELS] == model.probabilities([prompt])[0].tolist()
