"""Write the SmolLM2 draft as a GGUF that shares the verifier's tokenizer and embedding byte for byte.

The draft is the verifier's file with fewer blocks: every metadata key is copied from the
verifier's GGUF (the tokenizer's tokens, merges, special ids and chat template included, so
``speculative.pair.check_vocabularies`` sees the same vocabulary), but ``llama.block_count``
and the name; the embedding (and an untied output matrix, if the verifier has one) is the
verifier's tensor copied as the same quantised bytes; the trained final norm and blocks are
written from torch, the blocks' matrices re-encoded (``q8_0`` by default) by gguf's own
quantiser and the q/k rows permuted the way ``gguf_export`` permutes them.

The repository keeps only the trained part (``export_blocks``: final norm and blocks, with the
verifier file's SHA-256); ``assemble_draft`` writes the whole draft again from it beside the
verifier, byte for byte what ``export_draft`` writes.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speculative.errors import ModelLoadError
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


BLOCKS_VERIFIER_KEY = "tandem.draft.verifier_sha256"  # the verifier file a blocks file was trained on
BLOCKS_TYPE_KEY = "tandem.draft.matrix_type"


def export_draft(
    verifier_gguf: Path, trained: dict[str, torch.Tensor], out_path: Path, matrix_type: str = "q8_0"
) -> Path:
    """Write ``out_path`` from the verifier's GGUF and the draft's trained tensors (HF names).

    trained: ``model.norm.weight`` and ``model.layers.{i}.*`` for each of the draft's layers.
    """
    reader = open_gguf(verifier_gguf)
    return _write_draft(reader, _trained_tensors(reader, trained, matrix_type), matrix_type, out_path)


def export_blocks(
    verifier_gguf: Path, trained: dict[str, torch.Tensor], out_path: Path, matrix_type: str = "q8_0"
) -> Path:
    """Write only what training made (final norm, blocks), as ``export_draft`` encodes it, to ``out_path``.

    A few megabytes where the whole draft is tens (the verifier's embedding and vocabulary): the
    file the repository keeps, turned into the draft by ``assemble_draft`` beside the verifier it
    names (its file's SHA-256), which comes from its package.
    """
    import gguf

    tensors = _trained_tensors(open_gguf(verifier_gguf), trained, matrix_type)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(out_path.stem)
    writer.add_block_count(_block_count(tensors))
    writer.add_string(BLOCKS_VERIFIER_KEY, file_sha256(verifier_gguf))
    writer.add_string(BLOCKS_TYPE_KEY, matrix_type)
    for name, data, raw_dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    _finish(writer)
    return out_path


def assemble_draft(verifier_gguf: Path, blocks_gguf: Path, out_path: Path) -> Path:
    """The draft ``export_draft`` wrote, byte for byte, from the verifier's GGUF and ``export_blocks``' file.

    Refuses (``ModelLoadError``) blocks trained on another verifier file: their layers would
    read another embedding's space. Written to a temporary name, then moved into place.
    """
    import os

    blocks = open_gguf(blocks_gguf)
    wanted, matrix_type = (_text_field(blocks, key) for key in (BLOCKS_VERIFIER_KEY, BLOCKS_TYPE_KEY))
    if wanted != file_sha256(verifier_gguf):
        raise ModelLoadError(f"{blocks_gguf} was trained on a verifier with SHA-256 {wanted[:12]}..., "
                             f"not {verifier_gguf}: rebuild the draft (python -m speculative.train_smol)")  # fmt: skip
    tensors = [(t.name, t.data, t.tensor_type) for t in blocks.tensors]
    tmp = out_path.with_name(out_path.name + f".{os.getpid()}.tmp")
    try:
        _write_draft(open_gguf(verifier_gguf), tensors, matrix_type, tmp, name=out_path.stem)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no half file behind
    return out_path


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, computed once per process while its size and mtime stay (the verifier is 98 MB)."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _text_field(reader, key: str) -> str:
    field = reader.fields.get(key)
    if field is None:
        raise ModelLoadError(f"{reader.path} has no {key}: not a draft blocks file (speculative.smol_export)")
    return str(field.contents())


def _trained_tensors(reader, trained: dict[str, torch.Tensor], matrix_type: str) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, raw dtype) of the trained final norm and blocks, as llama.cpp lays them out."""
    if matrix_type not in MATRIX_TYPES:
        raise ValueError(f"matrix_type must be one of {MATRIX_TYPES}, not {matrix_type!r}")
    from gguf import GGMLQuantizationType

    shape = read_shape(reader)
    n_layers = len({name.split(".")[2] for name in trained if name.startswith("model.layers.")})
    state = {name: t.detach().float().numpy() for name, t in trained.items()}
    out = [("output_norm.weight", state["model.norm.weight"].astype(np.float32), GGMLQuantizationType.F32)]
    for layer in range(n_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            weight = state[f"model.layers.{layer}.{hf_name}"]
            if weight.ndim == 1:  # a norm: llama.cpp wants f32
                out.append((f"blk.{layer}.{gguf_name}", weight.astype(np.float32), GGMLQuantizationType.F32))
                continue
            if hf_name == "self_attn.q_proj.weight":
                weight = permute_rotary(weight, shape.heads)
            elif hf_name == "self_attn.k_proj.weight":
                weight = permute_rotary(weight, shape.kv_heads)
            out.append((f"blk.{layer}.{gguf_name}", *_matrix(np.ascontiguousarray(weight), matrix_type)))
    return out


def _write_draft(reader, tensors: list[tuple[str, np.ndarray, Any]], matrix_type: str, out_path: Path,
                 name: str | None = None) -> Path:  # fmt: skip
    """The verifier's metadata and shared tensors (``reader``) with the draft's ``tensors``, to ``out_path``."""
    import gguf

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(name or out_path.stem)
    writer.add_block_count(_block_count(tensors))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if matrix_type == "q8_0" else gguf.LlamaFileType.ALL_F32)
    _copy_metadata(reader, writer)
    shared = {t.name: t for t in reader.tensors}
    for shared_name in SHARED_TENSORS:
        if shared_name in shared:
            writer.add_tensor(shared_name, shared[shared_name].data, raw_dtype=shared[shared_name].tensor_type)
    for tensor_name, data, raw_dtype in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    _finish(writer)
    return out_path


def _block_count(tensors: list[tuple[str, np.ndarray, Any]]) -> int:
    return len({name.split(".")[1] for name, _, _ in tensors if name.startswith("blk.")})


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
