"""The SmolLM2 draft in torch: built from the verifier's GGUF, distilled against its top-k, checkpointed.

The draft is a Llama with the verifier's own widths, tokenizer, embedding and final norm,
and a few transformer layers, each initialised from one of the verifier's (``init_layers``).
The embedding, which is also the output matrix (SmolLM2 ties them), is dequantised from the
GGUF and frozen: a 49,152 x 576 matrix is most of the model, and keeping it the verifier's
is what lets the export copy its very bytes. Only the layers and the final norm train.

The loss is the forward KL from the teacher's top-k to the draft, with the probability the
teacher leaves outside its top-k as one more bucket (the draft's own mass outside those
ids), computed only at answer positions. Every ``checkpoint_every`` steps the trainable
weights, the optimizer state and the step go to ``checkpoint.pt`` (written beside and
renamed, so a kill never leaves a torn file); the batch of a step is drawn from a generator
seeded by the step, so a resumed run trains on exactly the batches an unbroken one would.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from speculative.errors import ModelLoadError
from speculative.gguf_export import LAYER_TENSORS
from speculative.smol_teacher import Answer
from speculative.train_pair import Schedule, lr_at

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FINAL = "draft-trained.pt"


@dataclass(frozen=True)
class LlamaShape:
    """The verifier's hyper-parameters, as its GGUF states them."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    rms_eps: float
    rope_theta: float
    context: int
    vocab: int


@functools.lru_cache(maxsize=2)
def _reader(path: str, size: int, mtime_ns: int):
    import gguf

    reader = gguf.GGUFReader(path)
    reader.path = path  # type: ignore[attr-defined]  # GGUFReader keeps no name: the errors here name the file
    return reader


def open_gguf(path: Path):
    """A GGUFReader of ``path``, kept for the process: parsing the 49,152-token vocabulary takes seconds."""
    stat = Path(path).stat()
    return _reader(str(path), stat.st_size, stat.st_mtime_ns)


def read_shape(reader) -> LlamaShape:  # reader: gguf.GGUFReader
    def value(key: str):
        field = reader.fields.get(f"llama.{key}")
        if field is None:
            raise ModelLoadError(f"{reader.path}: no llama.{key} (only llama-architecture GGUFs are supported)")
        return field.contents()

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelLoadError(f"{reader.path}: no tokenizer.ggml.tokens (a model's GGUF carries its vocabulary)")
    vocab = len(tokens.data)
    return LlamaShape(
        hidden=int(value("embedding_length")),
        intermediate=int(value("feed_forward_length")),
        layers=int(value("block_count")),
        heads=int(value("attention.head_count")),
        kv_heads=int(value("attention.head_count_kv")),
        rms_eps=float(value("attention.layer_norm_rms_epsilon")),
        rope_theta=float(value("rope.freq_base")),
        context=int(value("context_length")),
        vocab=vocab,
    )


def dequantized(reader, name: str) -> np.ndarray:
    """Tensor ``name`` as float32 in numpy order: (rows, cols) for a matrix, (cols,) for a norm."""
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    if name not in tensors:
        raise ModelLoadError(f"{reader.path} has no tensor {name!r}")
    tensor = tensors[name]
    return np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of ``gguf_export.permute_rotary``: llama.cpp's interleaved rotary rows back to HF's halves.

    weight  # (n_head * head_dim, hidden)
    """
    rows = weight.shape[0]
    assert rows % (2 * n_head) == 0, f"{rows} rows do not split into {n_head} rotary heads"
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def build_draft(gguf_path: Path, init_layers: Sequence[int]):
    """A LlamaForCausalLM with the verifier's embedding (frozen) and norm, and its layers ``init_layers``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    reader = open_gguf(gguf_path)
    shape = read_shape(reader)
    if not init_layers or any(not 0 <= i < shape.layers for i in init_layers):
        raise ValueError(f"init_layers {list(init_layers)} must name some of the verifier's {shape.layers} layers")
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=len(init_layers),
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.context,
        rms_norm_eps=shape.rms_eps,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        tie_word_embeddings=True,
    )
    with no_init_weights():  # every weight is copied in below
        model = LlamaForCausalLM(config)
    state = {
        "model.embed_tokens.weight": dequantized(reader, "token_embd.weight"),
        "model.norm.weight": dequantized(reader, "output_norm.weight"),
    }
    for mine, theirs in enumerate(init_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            weight = dequantized(reader, f"blk.{theirs}.{gguf_name}")
            if hf_name == "self_attn.q_proj.weight":
                weight = unpermute_rotary(weight, shape.heads)
            elif hf_name == "self_attn.k_proj.weight":
                weight = unpermute_rotary(weight, shape.kv_heads)
            state[f"model.layers.{mine}.{hf_name}"] = weight
    assert {n for n, _ in model.named_parameters()} <= state.keys() | {"lm_head.weight"}, "a weight left unset"
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(torch.from_numpy(np.array(state[name])).view_as(param))
    model.model.embed_tokens.weight.requires_grad_(False)  # also the (tied) output matrix
    return model.eval()


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class Rows:
    """Teacher answers as training rows: ``tokens[i]`` is prompt + answer; its answer starts at ``starts[i]``."""

    tokens: list[torch.Tensor]
    starts: list[int]
    top_ids: list[torch.Tensor]  # (answer length, k)
    top_logprobs: list[torch.Tensor]  # (answer length, k) float32

    @classmethod
    def of(cls, answers: Sequence[Answer]) -> Rows:
        return cls(
            [torch.tensor(a.prompt_ids + a.answer_ids) for a in answers],
            [len(a.prompt_ids) for a in answers],
            [torch.from_numpy(a.top_ids.astype(np.int64)) for a in answers],
            [torch.from_numpy(a.top_logprobs.astype(np.float32)) for a in answers],
        )

    def batch(self, index: Sequence[int]):
        """(inputs (B, T), at (B, T) bool: the positions that predict an answer token, top ids (n, k), logprobs (n, k))."""
        width = max(len(self.tokens[i]) - 1 for i in index)
        inputs = torch.zeros(len(index), width, dtype=torch.long)  # right padding: causal, so never attended
        at = torch.zeros(len(index), width, dtype=torch.bool)
        for r, i in enumerate(index):
            row = self.tokens[i][:-1]
            inputs[r, : len(row)] = row
            at[r, self.starts[i] - 1 : len(row)] = True
        ids = torch.cat([self.top_ids[i] for i in index])
        logprobs = torch.cat([self.top_logprobs[i] for i in index])
        assert int(at.sum()) == len(ids), "one teacher top-k per answer position"
        return inputs, at, ids, logprobs


def topk_kl(logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || draft) over positions, the teacher known by its top-k and the mass it leaves outside.

    logits  # (n, vocab) the draft's; top_ids, top_logprobs  # (n, k) the teacher's
    """
    assert logits.dim() == 2 and top_ids.shape == top_logprobs.shape and top_ids.size(0) == logits.size(0)
    log_q = F.log_softmax(logits.float(), dim=-1).gather(1, top_ids)  # (n, k)
    p = top_logprobs.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    log_q_rest = torch.log1p(-log_q.exp().sum(-1).clamp(max=1 - 1e-6))
    log_p_rest = torch.log(p_rest.clamp_min(1e-12))
    kl = (p * (top_logprobs - log_q)).sum(-1) + p_rest * (log_p_rest - log_q_rest)
    return kl.mean()


def draft_logits_at(model, inputs: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The draft's logits at the positions ``at`` only: (n, vocab); the output matrix skips every other position."""
    hidden = model.model(input_ids=inputs).last_hidden_state  # (B, T, hidden)
    return F.linear(hidden[at], model.model.embed_tokens.weight)


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch: int  # rows a step
    lr: float
    warmup: int
    checkpoint_every: int
    eval_every: int


def step_index(lengths: Sequence[int], step: int, batch: int, seed: int) -> list[int]:
    """The rows of ``step``: ``batch`` rows of neighbouring lengths from a random place in the length order.

    Rows of like length pad little (a 600-token row among 150-token ones would quadruple the
    step's work). The draw depends on the seed and the step alone, so a resumed run draws
    what an unbroken one would.
    """
    by_length = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = int(torch.randint(0, max(1, len(lengths) - batch + 1), (1,), generator=gen))
    return by_length[start : start + batch]


@torch.no_grad()
def agreement(model, rows: Rows) -> float:
    """Share of the teacher's greedy answer tokens that the draft's argmax predicts (teacher-forced)."""
    hits = total = 0
    for i in range(len(rows.tokens)):
        inputs, at, ids, _ = rows.batch([i])
        predicted = draft_logits_at(model, inputs, at).argmax(-1)
        hits += int((predicted == rows.tokens[i][rows.starts[i] :]).sum())
        total += len(ids)
    return hits / max(1, total)


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def train_draft(
    model,
    rows: Rows,
    settings: TrainSettings,
    work: Path,
    *,
    seed: int,
    identity: dict,
    held: Rows | None = None,
    stop_after: int | None = None,
) -> dict:
    """Distil ``model`` on ``rows``, resuming from ``work/checkpoint.pt``; returns the run's stats.

    ``identity`` (verifier file, init layers...) must equal the checkpoint's, or the run refuses to
    resume. ``stop_after`` ends the call after that many steps of this call (for tests and slices).
    """
    work.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = Schedule(steps=settings.steps, batch=settings.batch, seq_len=0, lr=settings.lr, warmup=settings.warmup)
    start, seconds, history = 0, 0.0, []
    if (work / CHECKPOINT).exists():
        saved = torch.load(work / CHECKPOINT, weights_only=False)
        if saved["identity"] != identity or saved["settings"] != asdict(settings):
            raise ValueError(
                f"{work / CHECKPOINT} is another run's ({saved['identity']}); remove it or use another --work"
            )
        model.load_state_dict(saved["trainable"], strict=False)
        opt.load_state_dict(saved["optimizer"])
        start, seconds, history = saved["step"], saved["seconds"], saved["history"]
        log.info("resuming at step %d of %d", start, settings.steps)
    lengths = [len(t) for t in rows.tokens]
    model.train()
    began = time.perf_counter()
    step = start
    while step < settings.steps and (stop_after is None or step - start < stop_after):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        inputs, at, ids, logprobs = rows.batch(step_index(lengths, step, settings.batch, seed))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = draft_logits_at(model, inputs, at)
        loss = topk_kl(logits, ids, logprobs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        entry = {"step": step, "kl": round(loss.item(), 4), "positions": len(ids)}
        if held is not None and (step % settings.eval_every == 0 or step == settings.steps):
            model.eval()
            entry["held_out_agreement"] = round(agreement(model, held), 4)
            model.train()
        history.append(entry)
        elapsed = seconds + time.perf_counter() - began
        log.info("step %d/%d kl %.4f %s(%.1f s/step)", step, settings.steps, loss.item(),
                 f"agreement {entry['held_out_agreement']} " if "held_out_agreement" in entry else "",
                 elapsed / max(1, step))  # fmt: skip
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            _save(work / CHECKPOINT, {
                "step": step, "seconds": elapsed, "history": history, "identity": identity,
                "settings": asdict(settings), "trainable": trainable_state(model), "optimizer": opt.state_dict(),
            })  # fmt: skip
    model.eval()
    if step == settings.steps:
        _save(work / FINAL, {"identity": identity, "trainable": trainable_state(model)})
    return {"step": step, "of": settings.steps, "seconds": round(seconds + time.perf_counter() - began, 1),
            "history": history}  # fmt: skip
