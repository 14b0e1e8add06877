"""How a llama.cpp decode's logits are read: numpy views of llama.cpp's own output buffer, no copy.

Both llama.cpp backends (``verifier_llama``, ``draft_llama``) read their decodes' logits here; the
verifier's decodes (Python's and the native steps') are checked by ``check_decode``.
"""

from __future__ import annotations

import ctypes

import numpy as np

from speculative.errors import SpeculativeError

MAX_LOGITS_VIEWS = 256  # views a LogitsReader keeps (row views of every batch position, outputs of every size)
# ctypes array types by length, for every reader of the process: a type is a few reference cycles, which a
# reader's own cache left for the collector whenever a reader (a model) was dropped
_FLOAT_ARRAYS: dict[int, type[ctypes.Array[ctypes.c_float]]] = {}


def check_decode(rc: int) -> None:
    """Raise for a ``llama_decode`` status that is not 0 (its logits and the batch's cache entries are not to be used)."""
    if rc != 0:
        raise SpeculativeError(f"llama_decode failed with status {rc} (the KV cache may be full)")


class LogitsReader:
    """A llama.cpp context's logits after a decode, as numpy views read at their addresses.

    Not ``np.ctypeslib.as_array`` on the pointer ``llama_get_logits`` returns: that casts the
    pointer, and ``ctypes.cast`` left a reference cycle (the pointer, its objects' dict) for
    the collector at every read: 1,037 of them among the cyclic garbage of 36 requests served
    by the verifier, 2,771 with the draft drafting. Read at the address: 2.2 us a read and no
    cycle, against 6.6 us. The functions are objects of their own (``_lib[name]`` makes a new
    one), so llama-cpp-python's keep their pointer results. A view is valid until the next decode.
    """

    def __init__(self, ctx: object, vocab_size: int):
        import llama_cpp

        lib = llama_cpp.llama_cpp._lib
        self._all = lib["llama_get_logits"]
        self._all.argtypes, self._all.restype = [ctypes.c_void_p], ctypes.c_void_p
        self._ith = lib["llama_get_logits_ith"]
        self._ith.argtypes, self._ith.restype = [ctypes.c_void_p, ctypes.c_int32], ctypes.c_void_p
        self._ctx = ctx
        self.vocab_size = vocab_size
        # views by (address, rows): llama.cpp keeps its output buffer from decode to decode, so a step reads
        # through the view it made last time (10 us less a step at one session, where a new view's few
        # objects met caches a decode had just emptied: 28 us a read and an argmax against 18)
        self._views: dict[tuple[int, int], np.ndarray] = {}

    def first(self, n_out: int) -> np.ndarray:
        """The decode's ``n_out`` outputs, in the order their tokens sat in the batch. returns  # (n_out, vocab)"""
        return self._view(self._all(self._ctx), n_out)

    def row(self, i: int) -> np.ndarray:
        """The logits of the batch's token ``i`` (it asked for them). returns  # (vocab,)"""
        return self._view(self._ith(self._ctx, i), 0)

    def _view(self, address: int | None, rows: int) -> np.ndarray:
        """A view of ``rows`` rows of logits at ``address`` (0: one row, as a vector): llama.cpp's buffer, not a copy."""
        if not address:
            raise RuntimeError("llama.cpp holds no such logits (the batch did not ask for them)")
        view = self._views.get((address, rows))
        if view is None:
            if len(self._views) >= MAX_LOGITS_VIEWS:  # the buffer moved (it grew) or rows vary a lot: start over
                self._views.clear()
            size = max(rows, 1) * self.vocab_size
            floats = _FLOAT_ARRAYS.get(size)
            if floats is None:
                floats = _FLOAT_ARRAYS[size] = ctypes.c_float * size
            view = np.frombuffer(memoryview(floats.from_address(address)), dtype=np.float32)
            view = view.reshape(rows, self.vocab_size) if rows else view
            self._views[(address, rows)] = view
        return view
