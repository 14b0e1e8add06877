"""Kept prompts' KV streams in host memory: what a sequence id held before a new session overwrote it.

``SequenceIds`` keeps a closed session's tokens in its stream and copies a prompt apart before
a new session overwrites it, while a free id apart from the open sessions is left; under a load
of many sessions none is, or a move that closes a gap (``Compaction``) lands on it, and the
prompt was evaluated again when it came back. That is dear for a real model on a CPU: measured
on SmolLM2-135M-Instruct's chat prompts served at 1 and 16 sessions (two threads, 2026-12-04),
prompts evaluated again took 5% of the time at one session after a wave of 16 and 5-10% during
the waves, at about 4.7 ms a position, where ``llama-server`` keeps them in its prompt cache in
host memory (``--cache-ram``). Here a stream is stashed the same way before it is lost
(``llama_state_seq_get_data``: 0.2-0.5 ms for 60 positions of SmolLM2, 23 KB a position) and
written back into the id a session takes when it holds a longer prefix of the session's prompt
than any id keeps (``llama_state_seq_set_data``, 0.4 ms). The stream is a copy of the cells, so
a session decodes on it exactly as on the stream it came from.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from speculative.llama_sequences import common_prefix

DEFAULT_STASH_BYTES = 256 * 1024 * 1024  # host memory for stashed streams, the least recently used going first
# and at most this many: a session's prompt is compared with each (4 us a stash, under the verifier's lock)
MAX_STASHED = 64


class PromptStash:
    """Streams of a llama.cpp context's sequences, saved by the tokens they hold, within ``budget`` bytes."""

    def __init__(self, ctx: Any, budget: int = DEFAULT_STASH_BYTES):
        import llama_cpp

        self._lib = llama_cpp
        self._ctx = ctx  # llama-cpp-python's ``LlamaContext``
        self.budget = budget
        self._entries: OrderedDict[tuple[int, ...], bytearray] = OrderedDict()  # tokens -> state, oldest use first
        self.bytes = 0
        self.saved = self.restored = 0

    def save(self, seq: int, tokens: Sequence[int]) -> None:
        """Stash what ``seq``'s stream holds: ``tokens`` at positions 0.. (its data must be in place: no copy
        into it may wait for the next decode). A stash of tokens another one starts with replaces that one."""
        key = tuple(tokens)
        covering = next((k for k in self._entries if len(k) >= len(key) and k[: len(key)] == key), None)
        if not key or covering is not None:  # held already, maybe with more after it
            if covering is not None:
                self._entries.move_to_end(covering)
            return
        lib, ctx = self._lib, self._ctx.ctx
        size = lib.llama_state_seq_get_size(ctx, seq)
        if not size or size > self.budget:
            return
        state = bytearray(size)
        if lib.llama_state_seq_get_data(ctx, (ctypes.c_uint8 * size).from_buffer(state), size, seq) != size:
            return
        for other in [k for k in self._entries if len(k) < len(key) and key[: len(k)] == k]:
            self._drop(other)
        self._entries[key] = state
        self.bytes += size
        self.saved += 1
        while self.bytes > self.budget or len(self._entries) > MAX_STASHED:
            self._drop(next(iter(self._entries)))

    def longest(self, want: Sequence[int]) -> tuple[int, tuple[int, ...] | None]:
        """The most leading positions of ``want`` a stash holds, and that stash's tokens (None: no stash holds any)."""
        best: tuple[int, tuple[int, ...] | None] = (0, None)
        for key in self._entries:
            shared = common_prefix(key, want)
            if shared > best[0]:
                best = (shared, key)
        return best

    def restore(self, key: tuple[int, ...], seq: int, keep: int) -> bool:
        """Write the stash of ``key`` into ``seq``'s empty stream and keep its first ``keep`` positions."""
        state = self._entries.get(key)
        if state is None:
            return False
        lib, ctx = self._lib, self._ctx.ctx
        size = len(state)
        if lib.llama_state_seq_set_data(ctx, (ctypes.c_uint8 * size).from_buffer(state), size, seq) != size:
            self._ctx.kv_cache_seq_rm(seq, 0, -1)  # whatever part was written goes
            self._drop(key)
            return False
        if keep < len(key):
            self._ctx.kv_cache_seq_rm(seq, keep, -1)
        self._entries.move_to_end(key)
        self.restored += 1
        return True

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes -= len(self._entries.pop(key))
