"""Tandem's decoding core: speculative decoding across an edge draft and a batched verifier.

A plain library (torch, transformers, llama-cpp-python, httpx), never Django. Start at
``speculative.engine.SpeculativeEngine`` and ``speculative.pair.load_pair``.
"""
