"""Tandem's decoding core: speculative decoding across an edge draft and a batched verifier.

A plain library (torch, transformers, llama-cpp-python, httpx), never Django. Start at
``speculative.engine.SpeculativeEngine`` and ``speculative.pair.load_pair``.
"""

import os

# llama.cpp decodes on the CPU with an OpenMP team (libgomp), whose workers spin after each parallel region
# for GOMP_SPINCOUNT turns before they sleep. libgomp reads it once, as it loads (with llama.cpp's library), so
# it is set here, before any module of this package imports llama_cpp; a value already set is kept.
GOMP_SPINCOUNT = os.environ.get("TANDEM_GOMP_SPINCOUNT") or "30000"
if not GOMP_SPINCOUNT.isdecimal():  # libgomp would warn and spin its default: say so where it is set
    raise ValueError(f"TANDEM_GOMP_SPINCOUNT={GOMP_SPINCOUNT!r} is not valid: expected a whole number of spins")
SPINCOUNT_SET_HERE = "GOMP_SPINCOUNT" not in os.environ
if SPINCOUNT_SET_HERE:
    os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
