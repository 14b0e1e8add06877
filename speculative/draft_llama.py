"""The edge draft backend: a GGUF model run by llama.cpp (llama-cpp-python).

Each session gets its own llama.cpp context (its own KV cache) from a small pool, so
sessions draft in parallel threads (llama.cpp releases the GIL while it computes).
Rolling back removes the rejected tail from the KV cache (``kv_cache_seq_rm`` from
``n_keep`` on) and moves ``n_tokens`` back; the next evaluation then continues exactly
as a fresh evaluation of the kept prefix would.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from speculative.errors import ModelLoadError

log = logging.getLogger(__name__)


class LlamaCppContext:
    """One session's llama.cpp context."""

    def __init__(self, llm, owner: LlamaCppDraft):
        self._llm = llm
        self._owner = owner
        self.n_ctx: int = llm.n_ctx()

    def evaluate(self, tokens: Sequence[int]) -> np.ndarray:
        self._llm.eval(list(tokens))
        ptr = self._llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self._owner.vocab_size,)).copy()

    def truncate(self, n_keep: int) -> None:
        self._llm._ctx.kv_cache_seq_rm(-1, n_keep, -1)
        self._llm.n_tokens = n_keep

    def close(self) -> None:
        self._owner._release(self._llm)


class LlamaCppDraft:
    """A GGUF draft model; ``new_context()`` hands out per-session contexts."""

    def __init__(self, model_path: str | Path, *, n_ctx: int | None = None, n_threads: int = 1, pool_size: int = 64):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelLoadError(f"draft model {str(model_path)!r} does not exist (a .gguf file is needed)")
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._pool: list = []
        self._pool_size = pool_size
        self._lock = threading.Lock()
        first = self._load()
        self.vocab_size: int = first.n_vocab()
        self.context_length: int = first.n_ctx()
        self._pool.append(first)

    def _load(self):
        from llama_cpp import Llama

        try:
            return Llama(
                model_path=str(self.model_path),
                n_ctx=self._n_ctx or 0,
                n_batch=512,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp cannot load {str(self.model_path)!r}: {exc}") from exc

    def tokens(self) -> list[str]:
        """The draft's vocabulary, by id, as llama.cpp read it from the GGUF."""
        with self._lock:
            llm = self._pool[0] if self._pool else self._load()
        return [llm._model.token_get_text(i) for i in range(self.vocab_size)]

    def new_context(self) -> LlamaCppContext:
        with self._lock:
            llm = self._pool.pop() if self._pool else None
        if llm is None:
            llm = self._load()
        llm.reset()
        return LlamaCppContext(llm, self)

    def _release(self, llm) -> None:
        llm.reset()
        with self._lock:
            if len(self._pool) < self._pool_size:
                self._pool.append(llm)
