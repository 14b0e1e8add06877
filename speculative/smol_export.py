"""Write the SmolLM2 draft as a GGUF that shares the verifier's tokenizer and embedding byte for byte.

The draft is the verifier's file with fewer blocks: every metadata key is copied from the
verifier's GGUF (the tokenizer's tokens, merges, special ids and chat template included, so
``speculative.pair.check_vocabularies`` sees the same vocabulary), but ``llama.block_count``
and the name; the embedding (and an untied output matrix, if the verifier has one) is the
verifier's tensor copied as the same quantised bytes; the trained final norm and blocks are
written from torch, the blocks' matrices re-encoded (``q8_0`` by default) by gguf's own
quantiser and the q/k rows permuted the way ``gguf_export`` permutes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from speculative.gguf_export import LAYER_TENSORS, permute_rotary
from speculative.smol_draft import open_gguf, read_shape

MATRIX_TYPES = ("f32", "f16", "q8_0")
SHARED_TENSORS = ("token_embd.weight", "output.weight")  # copied from the verifier as they are
SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.name", "general.file_type", "llama.block_count")


def _copy_metadata(reader, writer) -> None:
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key.startswith(SKIPPED_KEYS):
            continue
        main = field.types[0]
        if main == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), main, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), main)


def _matrix(weight: np.ndarray, matrix_type: str):
    """(data, raw dtype) of a 2-D weight in ``matrix_type``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if matrix_type == "f32":
        return weight.astype(np.float32), GGMLQuantizationType.F32
    if matrix_type == "f16":
        return weight.astype(np.float16), GGMLQuantizationType.F16
    return quantize(weight.astype(np.float32), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


def export_draft(
    verifier_gguf: Path, trained: dict[str, torch.Tensor], out_path: Path, matrix_type: str = "q8_0"
) -> Path:
    """Write ``out_path`` from the verifier's GGUF and the draft's trained tensors (HF names).

    trained: ``model.norm.weight`` and ``model.layers.{i}.*`` for each of the draft's layers.
    """
    import gguf

    if matrix_type not in MATRIX_TYPES:
        raise ValueError(f"matrix_type must be one of {MATRIX_TYPES}, not {matrix_type!r}")
    reader = open_gguf(verifier_gguf)
    shape = read_shape(reader)
    n_layers = len({name.split(".")[2] for name in trained if name.startswith("model.layers.")})
    state = {name: t.detach().float().numpy() for name, t in trained.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(out_path.stem)
    writer.add_block_count(n_layers)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if matrix_type == "q8_0" else gguf.LlamaFileType.ALL_F32)
    _copy_metadata(reader, writer)
    tensors = {t.name: t for t in reader.tensors}
    for name in SHARED_TENSORS:
        if name in tensors:
            writer.add_tensor(name, tensors[name].data, raw_dtype=tensors[name].tensor_type)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].astype(np.float32))
    for layer in range(n_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            weight = state[f"model.layers.{layer}.{hf_name}"]
            if weight.ndim == 1:  # a norm: llama.cpp wants f32
                writer.add_tensor(f"blk.{layer}.{gguf_name}", weight.astype(np.float32))
                continue
            if hf_name == "self_attn.q_proj.weight":
                weight = permute_rotary(weight, shape.heads)
            elif hf_name == "self_attn.k_proj.weight":
                weight = permute_rotary(weight, shape.kv_heads)
            data, raw_dtype = _matrix(np.ascontiguousarray(weight), matrix_type)
            writer.add_tensor(f"blk.{layer}.{gguf_name}", data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
