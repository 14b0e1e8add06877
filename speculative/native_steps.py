"""Greedy lockstep steps and a lone session's drafting rounds in C (``lockstep.c``): built with the machine's C
compiler on first use, cached, optional.

``speculative.llama_runs`` decodes plain greedy steps through :func:`lockstep` where this
module could build and load it, and ``speculative.lone_rounds`` a lone greedy session's
drafting rounds (``tandem_speculate``); both in Python otherwise (same tokens: the tests run both).
Measured in process on SmolLM2-135M-Instruct (Q4_1, two threads, 2026-12-05): the Python
between two 6.7 ms decodes took 60 us a step (the interpreter cold after a decode has
streamed the weights through the caches), the C loop 1.5 us besides its argmax.

The library is built once per source and compiler into ``$TANDEM_NATIVE_DIR`` (default
``~/.cache/tandem/native``) with ``$CC`` (default ``cc``), ``-O3``, for the baseline of the
compiler's target (no ``-march=native``: a cache shared by machines stays valid). Any failure
(no compiler, no writable cache, another ``llama_batch`` layout) leaves the Python loops, said
once in the log. ``TANDEM_NATIVE_STEPS=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lockstep.c")
CFLAGS = ("-O3", "-std=c11", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 60
CHUNK_TOKENS = 4096  # tokens one call may decode (its steps times the batch's sessions)
# llama.h's llama_batch as llama-cpp-python mirrors it: ``lockstep.c`` declares the same fields
BATCH_FIELDS = (
    ("n_tokens", ctypes.c_int32),
    ("token", ctypes.POINTER(ctypes.c_int32)),
    ("embd", ctypes.POINTER(ctypes.c_float)),
    ("pos", ctypes.POINTER(ctypes.c_int32)),
    ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
    ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
    ("logits", ctypes.POINTER(ctypes.c_int8)),
)


@dataclass(frozen=True)
class Lockstep:
    """``tandem_lockstep`` and ``tandem_speculate``, with llama.cpp's ``llama_decode``, ``llama_get_logits`` and
    ``llama_memory_seq_rm`` to bind them to."""

    call: ctypes._CFuncPtr  # type: ignore[name-defined]
    speculate: ctypes._CFuncPtr  # type: ignore[name-defined]
    decode: int  # the functions' addresses, passed to each call
    logits: int
    seq_rm: int
    layout: tuple[int, int]  # sizeof tandem_side, sizeof tandem_round


_loaded: Lockstep | None = None
_tried = False
_lock = threading.Lock()


def lockstep() -> Lockstep | None:
    """The C loop, built and loaded once per process; None where it cannot be (logged once)."""
    global _loaded, _tried
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("TANDEM_NATIVE_STEPS", "1") == "0":
                log.info("native lockstep steps off (TANDEM_NATIVE_STEPS=0): plain steps run in Python")
            else:
                try:
                    _loaded = _load(build())
                except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
                    log.warning("native lockstep steps unavailable (%s): plain steps run in Python", exc)
        return _loaded


def native_dir() -> Path:
    return Path(os.environ.get("TANDEM_NATIVE_DIR") or Path.home() / ".cache" / "tandem" / "native")


def build(directory: Path | None = None, compiler: str | None = None) -> Path:
    """The shared library for this source and compiler, compiled into ``directory`` unless it is there."""
    cc = compiler or os.environ.get("CC") or "cc"
    found = shutil.which(cc)
    if found is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH")
    source = SOURCE.read_bytes()
    version = subprocess.run([found, "--version"], capture_output=True, timeout=BUILD_TIMEOUT_S).stdout
    key = hashlib.sha256(source + version + " ".join(CFLAGS).encode()).hexdigest()[:16]
    directory = directory or native_dir()
    target = directory / f"lockstep-{key}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix="lockstep-", suffix=".so", dir=directory)  # processes may build at once
    os.close(fd)
    try:
        done = subprocess.run(
            [found, *CFLAGS, "-o", scratch, str(SOURCE)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


def _load(path: Path) -> Lockstep:
    import llama_cpp

    fields = tuple((field[0], field[1]) for field in llama_cpp.llama_batch._fields_)
    if fields != BATCH_FIELDS:  # (ctypes keeps one POINTER type per type: they compare as themselves)
        raise RuntimeError(f"llama_batch is not the layout lockstep.c declares: {fields}")
    native = ctypes.CDLL(str(path))  # a CDLL call releases the GIL
    pointer, i32, f64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_double
    call = native.tandem_lockstep
    call.restype = i32
    # decode, logits, ctx, batch, n_vocab, eos, max_steps, deadline, interrupt, tokens, rc
    call.argtypes = [pointer, pointer, pointer, pointer, i32, i32, i32, f64, pointer, pointer, pointer]
    speculate = native.tandem_speculate
    speculate.restype = i32
    # decode, logits, seq_rm, verifier, draft, pending, feed, n_feed, feed_cap, k, max_tokens, eos, deadline,
    # interrupt, interrupt_draft, rounds, max_rounds, rc
    speculate.argtypes = [*[pointer] * 5, i32, pointer, *[i32] * 5, f64, pointer, pointer, pointer, i32, pointer]
    lib = llama_cpp.llama_cpp._lib
    addresses = [
        ctypes.cast(f, ctypes.c_void_p).value for f in (lib.llama_decode, lib.llama_get_logits, lib.llama_memory_seq_rm)
    ]
    if not all(addresses):
        raise RuntimeError("llama.cpp's llama_decode, llama_get_logits or llama_memory_seq_rm has no address")
    if time.get_clock_info("perf_counter").implementation != "clock_gettime(CLOCK_MONOTONIC)":
        raise RuntimeError("time.perf_counter is not CLOCK_MONOTONIC, the clock of lockstep.c's deadlines")
    decode, logits, seq_rm = (int(a or 0) for a in addresses)
    side, round_ = ctypes.c_int32(), ctypes.c_int32()
    native.tandem_layout(ctypes.byref(side), ctypes.byref(round_))
    return Lockstep(call, speculate, decode, logits, seq_rm, (side.value, round_.value))


class NativeLockstep:
    """The C loop bound to one llama.cpp context and batch, with its output buffers."""

    def __init__(self, lib: Lockstep, ctx: object, batch: ctypes.Structure, vocab_size: int, eos: int | None):
        self.tokens = (ctypes.c_int32 * CHUNK_TOKENS)()  # each step's tokens, in batch order
        self.rc = ctypes.c_int32()
        self._call = lib.call
        self._args = (lib.decode, lib.logits, ctx, ctypes.addressof(batch), vocab_size, -1 if eos is None else eos)
        self._rc = ctypes.byref(self.rc)

    def run(self, max_steps: int, deadline: float, interrupt: ctypes.c_int32) -> int:
        """Steps of the batch as it is filled (at most ``max_steps``, until ``deadline`` on ``time.perf_counter``'s
        clock, or ``interrupt`` set, or a token is the end of sequence): the steps decoded; ``rc`` a failure's."""
        return self._call(*self._args, max_steps, deadline, ctypes.addressof(interrupt), self.tokens, self._rc)


def bind(ctx: object, batch: ctypes.Structure, vocab_size: int, eos: int | None) -> NativeLockstep | None:
    """The C loop for a context and its batch, or None where it is unavailable (``lockstep``)."""
    lib = lockstep()
    return None if lib is None else NativeLockstep(lib, ctx, batch, vocab_size, eos)
