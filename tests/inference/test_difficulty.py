"""The prompt difficulty classifier: committed model, thresholds, robustness, reproducible training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

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
