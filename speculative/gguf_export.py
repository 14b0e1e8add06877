"""Convert a transformers Llama checkpoint with a byte-level BPE tokenizer into a GGUF file.

This is how a verifier-side model becomes an edge draft that llama.cpp runs. It writes
the llama architecture's hyper-parameters, the tokenizer as llama.cpp's ``gpt2`` model
(token list, token types, merges) and the weights under llama.cpp's tensor names. The
q/k projections are permuted the way llama.cpp's own converter does, because HF stores
rotary halves split ("rotate_half") while GGUF expects them interleaved.

It converts verifiers too (the llama.cpp verifier backend runs the same files), and
``--type`` re-encodes the f32 file with llama.cpp's own quantiser (``llama_model_quantize``):
``f16``, ``bf16`` or ``q8_0``. The demo's shipped verifier GGUF is
``python -m speculative.gguf_export speculative/assets/demo/verifier
speculative/assets/demo/verifier-q8_0.gguf --type q8_0``; its f32 (49 MB, too large for
the repository) is the same command without ``--type``.

Usage: ``python -m speculative.gguf_export HF_DIR OUT.gguf [--type f32|f16|bf16|q8_0]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from speculative.errors import ModelLoadError

_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_UNUSED = 5

LAYER_TENSORS = {  # HF name inside a layer -> GGUF name inside a block
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from HF's split-halves rotary layout to llama.cpp's interleaved one.

    weight  # (n_head * head_dim, hidden)
    """
    rows = weight.shape[0]
    assert rows % (2 * n_head) == 0, f"{rows} rows do not split into {n_head} rotary heads"
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _pre_tokenizer(hf_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: ``gpt-2`` for a byte-level BPE split by GPT-2's regex.

    llama.cpp's ``default`` splits punctuation first ("Django's" -> "Django", "'", "s"),
    where GPT-2's regex keeps "'s" whole: a prompt tokenized by llama.cpp (llama-server)
    would then differ from the same prompt tokenized by transformers.
    """
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"


def _tokenizer_vocab(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (by id), their llama.cpp token types and BPE merges, from ``tokenizer.json``."""
    path = hf_dir / "tokenizer.json"
    if not path.exists():
        raise ModelLoadError(f"{hf_dir} has no tokenizer.json (a byte-level BPE tokenizer is needed)")
    spec = json.loads(path.read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ModelLoadError(f"{path}: only BPE tokenizers convert to GGUF, not {model.get('type')}")
    by_id: dict[int, str] = {idx: tok for tok, idx in model["vocab"].items()}
    special: set[int] = set()
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    tokens: list[str] = []
    types: list[int] = []
    for idx in range(vocab_size):
        if idx in by_id:
            tokens.append(by_id[idx])
            types.append(_TOKEN_TYPE_CONTROL if idx in special else _TOKEN_TYPE_NORMAL)
        else:
            tokens.append(f"[PAD{idx}]")
            types.append(_TOKEN_TYPE_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def export_gguf(hf_dir: Path, out_path: Path) -> Path:
    """Write ``out_path`` (f32 GGUF) from the Llama checkpoint and tokenizer in ``hf_dir``."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = Path(hf_dir)
    try:
        config = AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read a transformers config from {hf_dir}: {exc}") from exc
    if config.model_type != "llama":
        raise ModelLoadError(f"{hf_dir} is a {config.model_type!r} model; only llama converts")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    n_head = config.num_attention_heads
    n_head_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tokens, types, merges = _tokenizer_vocab(hf_dir, config.vocab_size)

    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(hf_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(hf_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    if config.eos_token_id is not None:
        writer.add_eos_token_id(config.eos_token_id)
    writer.add_add_bos_token(False)

    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            weight = state[f"model.layers.{layer}.{hf_name}"]
            if hf_name == "self_attn.q_proj.weight":
                weight = permute_rotary(weight, n_head)
            elif hf_name == "self_attn.k_proj.weight":
                weight = permute_rotary(weight, n_head_kv)
            writer.add_tensor(f"blk.{layer}.{gguf_name}", np.ascontiguousarray(weight))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


# llama.cpp's file types (llama.h: LLAMA_FTYPE_*) for --type
GGUF_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def quantize_gguf(src: Path, out_path: Path, gguf_type: str) -> Path:
    """Re-encode the f32 GGUF ``src`` as ``gguf_type`` with llama.cpp's quantiser."""
    import llama_cpp

    if gguf_type not in GGUF_TYPES:
        raise ModelLoadError(f"unknown GGUF type {gguf_type!r}: one of {', '.join(GGUF_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[gguf_type]
    params.nthread = 1
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(out_path).encode(), params)
    if status != 0:
        raise ModelLoadError(f"llama.cpp could not quantise {src} to {gguf_type} (status {status})")
    return out_path


def export_gguf_as(hf_dir: Path, out_path: Path, gguf_type: str = "f32") -> Path:
    """Write ``out_path`` from ``hf_dir`` in ``gguf_type`` (via an f32 file when quantising)."""
    if gguf_type == "f32":
        return export_gguf(hf_dir, out_path)
    if gguf_type not in GGUF_TYPES:
        raise ModelLoadError(f"unknown GGUF type {gguf_type!r}: one of {', '.join(GGUF_TYPES)}")
    with tempfile.TemporaryDirectory() as tmp:
        f32 = export_gguf(hf_dir, Path(tmp) / "f32.gguf")
        return quantize_gguf(f32, out_path, gguf_type)


def _rope_theta(config: object) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        params = getattr(config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=sorted(GGUF_TYPES), default="f32", help="weights' encoding (default f32)")
    args = parser.parse_args(argv)
    export_gguf_as(args.hf_dir, args.out, args.type)


if __name__ == "__main__":
    main()
