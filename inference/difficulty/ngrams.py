"""Hashed character and word n-grams of a prompt: the sparse half of the classifier's features.

Character 2-5-grams catch what word embeddings miss on short, plain-looking hard prompts and
across languages ("beweise", "prouve", "demuestra", "§ 15b", "O(n log n)", "eGFR"), and in the
evaluation they generalised to unseen task families better than any embedding alone. They are
hashed into a fixed number of buckets with a vectorised polynomial hash, so that there is no
vocabulary to ship and a 4,000-character prompt takes well under a millisecond in numpy.
Word 1-2-grams ("summarise this", "prove that", "write a") are hashed into the same buckets with a
different seed: they carry the instruction's wording, which character n-grams only see in pieces.
"""

from __future__ import annotations

import functools
import re
import zlib

import numpy as np

NGRAM_MIN = 2
NGRAM_MAX = 5
BUCKET_BITS = 16
BUCKETS = 1 << BUCKET_BITS
# odd 64-bit multipliers: a polynomial rolling hash, then Fibonacci hashing into the top bits
_BASE = np.uint64(0x100000001B3)
_MIX = np.uint64(0x9E3779B97F4A7C15)
# seeds that keep word unigrams and bigrams apart from each other and from the character n-grams
_WORD_SEED = np.uint64(0x5BD1E995)
_BIGRAM_SEED = np.uint64(0xC2B2AE35)
_WORD = re.compile(r"\w+")


SORT_BELOW = 32768  # n-grams: below this many, np.unique's sort; above, a bincount over the 65,536 buckets


def normalise(prompt: str) -> str:
    """Lower-case, whitespace collapsed, padded with one space so that word starts and ends are n-grams."""
    return " " + " ".join(prompt.lower().split()) + " "


def word_hashes(text: str, seed: int = 0) -> list[np.ndarray]:
    """64-bit hashes of the word unigrams and bigrams of normalised text: [(w,), (w - 1,)] (empty if no word)."""
    words = _WORD.findall(text)
    if not words:
        return []
    # crc32 is stable across processes (str.__hash__ is salted per process)
    h = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
    s = np.uint64(seed)
    return [h * _BASE + (_WORD_SEED ^ s), (h[:-1] * _BASE + h[1:]) * _BASE + (_BIGRAM_SEED ^ s)]


def ngram_buckets(prompt: str, words: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(bucket ids, counts), both shape (k,), for every character n-gram (and word 1-2-gram) of the prompt.

    A non-zero ``seed`` hashes the same n-grams to other buckets (the payload's, apart from the instruction's).
    """
    if not prompt:  # an empty payload has no n-grams (not even the padding's)
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    text = normalise(prompt)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    hashes = word_hashes(text, seed) if words else []
    # The hash of the n-gram at i is (n + seed) * B**n + sum_k codes[i + k] * B**(n - 1 - k), modulo 2**64.
    # The sum (``poly``) of the (n + 1)-gram at i is the n-gram's times B plus the next code, so each
    # length costs one multiply-add over the previous one's, and the seeded lead is added last.
    poly = codes
    for n in range(2, NGRAM_MAX + 1):
        count = len(codes) - n + 1
        if count <= 0:
            break
        poly = poly[:count] * _BASE + codes[n - 1 :]  # wraps modulo 2**64, as intended
        if n >= NGRAM_MIN:
            hashes.append(poly + _lead(n, seed))
    if not any(len(h) for h in hashes):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    buckets = ((np.concatenate(hashes) * _MIX) >> np.uint64(64 - BUCKET_BITS)).astype(np.intp)
    if len(buckets) < SORT_BELOW:
        # sorting the n-grams beats scanning all 65,536 buckets for the non-zero ones below ~40,000
        # n-grams (measured: 500 of them 10 against 128 us, 16,000 140 against 274 us; 64,000 782
        # against 455 us); np.unique's ids and counts, without its wrapper's dozen calls
        buckets.sort()
        starts = np.empty(len(buckets), dtype=bool)
        starts[0] = True
        np.not_equal(buckets[1:], buckets[:-1], out=starts[1:])
        first = np.flatnonzero(starts)
        return buckets[first], np.diff(first, append=len(buckets))
    # bincount over the fixed bucket range: linear time, the faster for the longest prompts
    all_counts = np.bincount(buckets, minlength=BUCKETS)
    ids = np.flatnonzero(all_counts)
    return ids, all_counts[ids]


@functools.cache
def _lead(n: int, seed: int) -> np.uint64:
    """(n + seed) * B**n modulo 2**64: the seeded part of every n-gram's hash."""
    return np.uint64((n + seed) * pow(int(_BASE), n, 1 << 64) % (1 << 64))


def tfidf_weights(counts: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """Sublinear TF times IDF, L2-normalised: the values that go with ``ngram_buckets``' ids, shape (k,).

    ``idf`` is already gathered at the ids, shape (k,).
    """
    values = (1.0 + np.log(counts)) * idf
    norm = float(np.sqrt(values @ values))
    return values / norm if norm > 0 else values


def idf_from_counts(document_frequency: np.ndarray, n_documents: int) -> np.ndarray:
    """Smoothed IDF, log((1 + n) / (1 + df)) + 1, shape (BUCKETS,): never zero, so unseen buckets count too."""
    return np.log((1.0 + n_documents) / (1.0 + document_frequency)) + 1.0


def count_matrix(prompts: list[str], words: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training-time counts as CSR parts (data, indices, indptr) of an (n, BUCKETS) matrix."""
    data: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    indptr = [0]
    for prompt in prompts:
        ids, counts = ngram_buckets(prompt, words, seed)
        indices.append(ids)
        data.append(counts.astype(np.float64))
        indptr.append(indptr[-1] + len(ids))
    if not data:
        return np.zeros(0), np.zeros(0, dtype=np.int64), np.asarray(indptr)
    return np.concatenate(data), np.concatenate(indices), np.asarray(indptr)
