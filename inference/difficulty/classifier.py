"""Prompt difficulty -> routing class: the committed classifier, its result type and the threshold policy.

``classify(prompt)`` answers with a :class:`Difficulty` (the argmax label and the three probabilities);
a routing policy applies its own :class:`Thresholds` with :meth:`Difficulty.label_with`. The model is a
linear (multinomial logistic) head over hashed character and word n-grams and static MiniLM-distilled
token embeddings of the prompt's instruction (plus its payload's n-grams and descriptors, :mod:`.payload`),
loaded once per process by
:func:`default_classifier` on first use, never at import.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from inference.difficulty.embedding import WINDOWS, WordPieceIds, clip_prompt, length_feature, load_tokenizer, windows
from inference.difficulty.errors import ArtifactError, InvalidThresholds
from inference.difficulty.labels import HARD_FRONTIER, HARD_OPEN, LABELS, ROUTINE, Label
from inference.difficulty.ngrams import BUCKETS, ngram_buckets, tfidf_weights
from inference.difficulty.payload import PAYLOAD_SEED, read_prompt

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "difficulty"
HEAD_FILE = "head.npz"
META_FILE = "head.json"  # labels, default thresholds, provenance, held-out figures


@dataclass(frozen=True)
class Thresholds:
    """A routing policy's cut-offs, applied in order.

    ``p(hard_frontier) >= cloud`` -> hard_frontier; else ``p(hard_open) + p(hard_frontier) >= hard`` ->
    hard_open; else routine. Low values trade cost for recall: a hard prompt answered on the edge is
    the expensive mistake, so the committed defaults are well below 0.5.
    """

    cloud: float
    hard: float

    def __post_init__(self) -> None:
        for name in ("cloud", "hard"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidThresholds(f"{name}={value} is outside [0, 1]")


@dataclass(frozen=True)
class Difficulty:
    """One prompt's classification: ``label`` is the argmax, ``probs`` maps every label to its probability."""

    label: Label
    probs: Mapping[str, float]

    def label_with(self, thresholds: Thresholds) -> Label:
        """The label under a policy's thresholds (see :class:`Thresholds`)."""
        if self.probs[HARD_FRONTIER] >= thresholds.cloud:
            return HARD_FRONTIER
        if self.probs[HARD_OPEN] + self.probs[HARD_FRONTIER] >= thresholds.hard:
            return HARD_OPEN
        return ROUTINE


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Head:
    """The trained linear head, folded for serving (see :mod:`.train`); shapes in the field comments."""

    bias: np.ndarray  # (labels,)
    token_logits: np.ndarray  # (windows, vocab, labels): static embeddings times the head, per window
    length_logits: np.ndarray  # (labels,): per unit of the length feature
    ngram_weights: np.ndarray  # (labels, buckets)
    idf: np.ndarray  # (buckets,)
    payload_weight: float = 0.0  # the payload's n-gram vector counts this much (see :mod:`.payload`)

    def __post_init__(self) -> None:
        k = len(LABELS)
        if (
            self.bias.shape != (k,)
            or self.token_logits.ndim != 3
            or self.token_logits.shape[0] != len(WINDOWS)
            or self.token_logits.shape[2] != k
            or self.length_logits.shape != (k,)
            or self.ngram_weights.shape != (k, BUCKETS)
            or self.idf.shape != (BUCKETS,)
        ):
            raise ArtifactError("head arrays have inconsistent shapes")

    def save(self, path: Path) -> None:
        arrays = {name: getattr(self, name) for name in HEAD_ARRAYS}
        np.savez_compressed(path, payload_weight=np.float32(self.payload_weight), **arrays)

    @classmethod
    def load(cls, path: Path) -> Head:
        try:
            with np.load(path, allow_pickle=False) as arrays:
                loaded = {name: np.ascontiguousarray(arrays[name], dtype=np.float32) for name in HEAD_ARRAYS}
                weight = float(arrays["payload_weight"]) if "payload_weight" in arrays.files else 0.0
                return cls(**loaded, payload_weight=weight)
        except (OSError, KeyError, ValueError) as exc:
            raise ArtifactError(f"cannot load head {path}: {exc}") from exc


HEAD_ARRAYS = ("bias", "token_logits", "length_logits", "ngram_weights", "idf")


class DifficultyClassifier:
    """Tokenizer + folded linear head; thread-safe to call (it holds no per-call state)."""

    def __init__(self, tokenizer: Tokenizer, head: Head, thresholds: Thresholds) -> None:
        if head.token_logits.shape[1] < tokenizer.get_vocab_size():
            raise ArtifactError("token tables are smaller than the tokenizer's vocabulary")
        self._tokenizer = tokenizer
        self._token_ids = WordPieceIds(tokenizer)
        self._head = head
        # the windows' tables side by side, (vocab, windows * labels): a prompt's rows are gathered once
        vocab = head.token_logits.shape[1]
        self._window_rows = np.ascontiguousarray(head.token_logits.transpose(1, 0, 2).reshape(vocab, -1))
        self.thresholds = thresholds

    @classmethod
    def load(cls, directory: Path = ASSET_DIR) -> DifficultyClassifier:
        """Load the tokenizer, head and default thresholds committed under ``directory``."""
        try:
            meta: dict[str, Any] = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read {directory / META_FILE}: {exc}") from exc
        if tuple(meta.get("labels", ())) != LABELS:
            raise ArtifactError(f"artifact labels {meta.get('labels')} differ from {LABELS}")
        return cls(load_tokenizer(directory), Head.load(directory / HEAD_FILE), Thresholds(**meta["thresholds"]))

    def logits(self, prompt: str) -> np.ndarray:
        """Unnormalised scores, shape (labels,): the same sum the unfolded head computes at training."""
        head = self._head
        reading = read_prompt(clip_prompt(prompt))
        ids = self._token_ids(reading.instruction)
        out = head.bias.astype(np.float64) + head.length_logits * length_feature(reading.instruction)
        rows = self._window_rows[ids]  # (tokens, windows * labels)
        k = len(LABELS)
        for w, window in enumerate(windows(rows)):
            if len(window):  # the window's mean: sum / count is ndarray.mean's float32 result, without its wrapper
                out += window[:, w * k : (w + 1) * k].sum(axis=0) / len(window)  # (labels,)
        out += self.ngram_scores(reading.instruction + reading.markers)
        if reading.payload and head.payload_weight:
            out += head.payload_weight * self.ngram_scores(reading.payload, seed=PAYLOAD_SEED)
        return out

    def ngram_scores(self, text: str, seed: int = 0) -> np.ndarray:
        """The head's scores of ``text``'s n-gram vector (TF-IDF over its buckets), shape (labels,)."""
        buckets, counts = ngram_buckets(text, seed=seed)
        return self._head.ngram_weights[:, buckets] @ tfidf_weights(counts, self._head.idf[buckets])

    def probabilities(self, prompts: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape (len(prompts), len(LABELS)), columns in ``LABELS`` order."""
        return _softmax(np.stack([self.logits(p) for p in prompts])) if prompts else np.zeros((0, len(LABELS)))

    def classify(self, prompt: str) -> Difficulty:
        # _softmax's arithmetic on three floats in Python: numpy's exp, then the same sum (in order) and
        # divisions, so the same probabilities bit for bit as ``probabilities``, for a fifth of the calls
        logits = self.logits(prompt)
        e = np.exp(logits - logits.max()).tolist()
        total = sum(e)
        probs = [x / total for x in e]
        label = LABELS[probs.index(max(probs))]  # the first of equals, as argmax
        return Difficulty(label, MappingProxyType(dict(zip(LABELS, probs, strict=True))))

    def route_label(self, prompt: str) -> Label:
        """The label under this classifier's committed default thresholds."""
        return self.classify(prompt).label_with(self.thresholds)


_default: DifficultyClassifier | None = None
_default_lock = threading.Lock()


def default_classifier() -> DifficultyClassifier:
    """The process-wide classifier, loaded from the committed assets on the first call."""
    global _default
    if _default is None:
        with _default_lock:  # two first requests at once load it once
            if _default is None:
                _default = DifficultyClassifier.load()
    return _default


def classify(prompt: str) -> Difficulty:
    """Classify with the process-wide classifier (see :func:`default_classifier`)."""
    return default_classifier().classify(prompt)
