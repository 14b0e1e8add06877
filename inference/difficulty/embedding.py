"""Static token embeddings (a distillation of MiniLM) pooled over parts of a prompt: the dense features.

A static embedding is one table row per word piece, so a prompt's features are means of rows: no
transformer runs at inference. Three windows are pooled: the whole prompt, its first and its last
``WINDOW_TOKENS`` word pieces, because the instruction usually sits at one end ("fix the typos:"
before a long paste, "prove it" after a short claim); plus the log of its length in characters. Means of rows are
linear in the table, so the trained head folds into one (vocab, labels) table per window
(:mod:`.train`), and serving gathers rows of that folded table instead of the embeddings.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from inference.difficulty.errors import ArtifactError

TOKENIZER_FILE = "tokenizer.json"
# Beyond this many characters only the head and the tail are read: bounds the cost of a
# pathological (megabyte) prompt while keeping both places where instructions sit.
MAX_CHARS = 16_000
# The word-piece tokenizer is the slowest step (about 1 ms per 1,000 characters on one core), so the
# embeddings read a shorter head and tail than the n-grams; the length feature still sees it all.
TOKENIZED_CHARS = 2_000
WINDOW_TOKENS = 24
WINDOWS = ("mean", "head", "tail")
# log1p(characters) / LENGTH_SCALE keeps the length feature near [0, 1] for ordinary prompts
LENGTH_SCALE = math.log1p(4096)


def clip_prompt(prompt: str, max_chars: int = MAX_CHARS) -> str:
    """The part of a prompt that is read: all of it, or its first and last max_chars / 2 characters.

    Lone surrogates (possible in a Python str, not in UTF-8) become "?": the tokenizer and the
    n-gram hash both need encodable text, and a prompt must never make the router fail.
    """
    if len(prompt) > max_chars:
        half = max_chars // 2
        prompt = prompt[:half] + " " + prompt[-half:]
    if not prompt.isascii():
        prompt = prompt.encode("utf-8", "replace").decode("utf-8")
    return prompt


def load_tokenizer(directory: Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    except Exception as exc:  # tokenizers raises a bare Exception for a missing or bad file
        raise ArtifactError(f"cannot load {directory / TOKENIZER_FILE}: {exc}") from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def token_ids(tokenizer: Tokenizer, prompt: str) -> np.ndarray:
    """Word-piece ids of the prompt's first and last TOKENIZED_CHARS / 2 characters, no special tokens,
    [UNK] dropped; shape (t,)."""
    encoding = tokenizer.encode(clip_prompt(prompt, TOKENIZED_CHARS), add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.intp)
    unk = tokenizer.token_to_id("[UNK]")
    return ids[ids != unk] if unk is not None else ids


# Printable ASCII and the three whitespace controls: text on which BERT's normaliser only lower-cases
# (nothing to clean, no accents, no CJK) and its pre-tokenizer splits at spaces and at each ASCII punctuation mark
_PLAIN_ASCII = re.compile(r"[\t\n\r\x20-\x7e]*\Z")
_BERT_WORDS = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
MAX_CACHED_WORDS = 100_000  # then the cache starts again: a bound on memory, never on correctness


class WordPieceIds:
    """``token_ids`` for serving: plain ASCII prompts split here and each word's pieces remembered.

    The Rust tokenizer's call costs more than its work on a short prompt (it builds offsets,
    masks and token strings for every piece); on plain ASCII text BERT's normaliser and
    pre-tokenizer reduce to lower-casing and a split at spaces and punctuation, and WordPiece
    works word by word, so a word's ids are the same wherever it stands. Other text (and text
    holding one of the tokenizer's added tokens, such as ``[MASK]``), and a tokenizer that is
    not that pipeline, goes to :func:`token_ids`. The two agree id for id
    (tested on the corpus and on generated text).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._unk = tokenizer.token_to_id("[UNK]")
        config = json.loads(tokenizer.to_str())
        normalizer, pre_tokenizer = config.get("normalizer") or {}, config.get("pre_tokenizer") or {}
        self._plain = (
            normalizer.get("type") == "BertNormalizer"
            and normalizer.get("lowercase") is True
            and pre_tokenizer.get("type") == "BertPreTokenizer"
            and (config.get("model") or {}).get("type") == "WordPiece"
        )
        # the tokenizer matches these in the raw text before anything else ("[MASK]" is one id, not three)
        self._added = tuple(token["content"] for token in config.get("added_tokens") or ())
        self._words: dict[str, tuple[int, ...]] = {}

    def __call__(self, prompt: str) -> np.ndarray:
        text = clip_prompt(prompt, TOKENIZED_CHARS)
        if not self._plain or not _PLAIN_ASCII.match(text) or any(token in text for token in self._added):
            return token_ids(self._tokenizer, prompt)
        words, model, unk = self._words, self._tokenizer.model, self._unk
        if len(words) > MAX_CACHED_WORDS:
            words.clear()
        ids: list[int] = []
        for word in _BERT_WORDS.findall(text.lower()):
            pieces = words.get(word)
            if pieces is None:
                pieces = words[word] = tuple(t.id for t in model.tokenize(word) if t.id != unk)
            ids.extend(pieces)
        return np.array(ids, dtype=np.intp)


def windows(ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """The token ids (or any per-token rows) of each window in ``WINDOWS`` order."""
    return ids, ids[:WINDOW_TOKENS], ids[-WINDOW_TOKENS:]


def length_feature(prompt: str) -> float:
    return math.log1p(len(prompt)) / LENGTH_SCALE


def pool(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per window, the mean of the table rows at the window's ids (zeros when empty); shape (3, dim)."""
    assert table.ndim == 2, table.shape  # (vocab, dim)
    out = np.zeros((len(WINDOWS), table.shape[1]), dtype=np.float64)
    for i, window in enumerate(windows(ids)):
        if len(window):
            out[i] = table[window].mean(axis=0)
    return out


def dense_features(tokenizer: Tokenizer, table: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Training-time dense features: pooled windows then the length, shape (n, 3 * dim + 1)."""
    out = np.zeros((len(prompts), len(WINDOWS) * table.shape[1] + 1))
    for row, prompt in enumerate(prompts):
        prompt = clip_prompt(prompt)
        out[row, :-1] = pool(table, token_ids(tokenizer, prompt)).ravel()
        out[row, -1] = length_feature(prompt)
    return out
