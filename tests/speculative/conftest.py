"""Shared fixtures: the shipped demo pair, and tiny random Llamas for exact checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speculative.pair import DEMO_DRAFT_GGUF, DEMO_DRAFT_HF, DEMO_VERIFIER, DEMO_VERIFIER_GGUF, load_pair


class ByteTokenizer:
    """A stand-in tokenizer for tiny models: ids are bytes (mod vocab)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b % self.vocab for b in text.encode()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def tiny_llama(vocab: int = 64, hidden: int = 64, layers: int = 2, seed: int = 0, eos: int | None = None):
    """A random Llama whose argmax is far from degenerate: good for exactness tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharpen the random logits so argmax is stable under float noise
        model.lm_head.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="session")
def demo_pair():
    """(verifier, llama.cpp draft, tokenizer) of the shipped demo pair, loaded once."""
    if not DEMO_DRAFT_GGUF.exists():
        pytest.fail("the shipped demo pair is missing: rebuild it with python -m speculative.train_pair")
    return load_pair(DEMO_VERIFIER, DEMO_DRAFT_GGUF)


@pytest.fixture(scope="session")
def demo_pair_llama():
    """(verifier, llama.cpp draft, tokenizer) with the demo verifier's GGUF on the llama.cpp backend."""
    if not DEMO_VERIFIER_GGUF.exists():
        pytest.fail("the demo verifier's GGUF is missing: see python -m speculative.gguf_export --help")
    # one llama.cpp thread: ggml's threads spin at barriers, and on a shared 2-core runner a
    # second one waits out other processes' time slices (measured: 10x slower steps)
    return load_pair(DEMO_VERIFIER_GGUF, DEMO_DRAFT_GGUF, verifier_threads=1)


@pytest.fixture(scope="session", params=["torch", "llama.cpp"])
def demo_pair_any(request):
    """The demo pair on each verifier backend in turn: tests that take it run on both."""
    return request.getfixturevalue("demo_pair" if request.param == "torch" else "demo_pair_llama")


@pytest.fixture(scope="session")
def demo_paths() -> dict[str, Path]:
    return {"verifier": DEMO_VERIFIER, "draft_gguf": DEMO_DRAFT_GGUF, "draft_hf": DEMO_DRAFT_HF}
