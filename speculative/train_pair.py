"""Rebuild Tandem's demo model pair, deterministically, from Django's documentation.

One command (``python -m speculative.train_pair``) fetches the corpus from the package
registry, trains a byte-level BPE tokenizer, trains a ~12M-parameter Llama verifier,
distils a ~1.7M-parameter Llama draft from the verifier's logits, exports the draft to
GGUF for llama.cpp, and writes a ``report.json`` with sizes, held-out perplexities and
the draft/verifier greedy agreement rate. Everything is seeded; on 2 CPU cores the
default schedule takes well under an hour.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from speculative.corpus import Corpus, load_corpus
from speculative.gguf_export import export_gguf
from speculative.pair import DEMO_DIR

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 4096
CONTEXT_LENGTH = 1024


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch: int
    seq_len: int
    lr: float
    warmup: int


VERIFIER_SHAPE = Shape(hidden=384, intermediate=1024, layers=6, heads=6)
DRAFT_SHAPE = Shape(hidden=192, intermediate=512, layers=2, heads=3)
VERIFIER_SCHEDULE = Schedule(steps=800, batch=16, seq_len=256, lr=1.5e-3, warmup=40)
DRAFT_SCHEDULE = Schedule(steps=600, batch=16, seq_len=256, lr=3e-3, warmup=30)


def train_tokenizer(corpus: Corpus, out_dir: Path):  # -> PreTrainedTokenizerFast
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus.train,
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=CONTEXT_LENGTH,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def encode_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def make_model(shape: Shape, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=CONTEXT_LENGTH,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


def batches(stream: torch.Tensor, schedule: Schedule, seed: int):
    """Yield ``schedule.steps`` batches of random windows, each (batch, seq_len + 1)."""
    gen = torch.Generator().manual_seed(seed)
    span = schedule.seq_len + 1
    for _ in range(schedule.steps):
        starts = torch.randint(0, len(stream) - span, (schedule.batch,), generator=gen)
        yield torch.stack([stream[s : s + span] for s in starts.tolist()])


def lr_at(step: int, schedule: Schedule) -> float:
    if step < schedule.warmup:
        return schedule.lr * (step + 1) / schedule.warmup
    progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
    return schedule.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, stream: torch.Tensor, schedule: Schedule, seed: int, teacher=None) -> None:
    """Next-token training; with a ``teacher``, distil its full distribution (KL) instead."""
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    started = time.perf_counter()
    for step, window in enumerate(batches(stream, schedule, seed)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        inputs, targets = window[:, :-1], window[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits.float()  # (batch, seq_len, vocab)
            if teacher is None:
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
            else:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=inputs).logits.float()
                loss = F.kl_div(
                    F.log_softmax(logits, -1),
                    F.log_softmax(teacher_logits, -1),
                    log_target=True,
                    reduction="batchmean",
                ) / inputs.size(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == schedule.steps - 1:
            log.info("step %d/%d loss %.4f (%.0fs)", step, schedule.steps, loss.item(), time.perf_counter() - started)
    model.eval()


def round_to_bf16(model) -> None:
    """Round weights to bf16 in place, so what we evaluate (and distil from) is what ships."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int = 256) -> float:
    n = (len(stream) - 1) // seq_len
    inputs = stream[: n * seq_len].view(n, seq_len)
    targets = stream[1 : n * seq_len + 1].view(n, seq_len)
    total = 0.0
    for i in range(0, n, 16):
        logits = model(input_ids=inputs[i : i + 16]).logits.float()
        total += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets[i : i + 16].reshape(-1), reduction="sum"
        ).item()
    return math.exp(total / (n * seq_len))


@torch.no_grad()
def greedy_agreement(draft, verifier, stream: torch.Tensor, seq_len: int = 256) -> float:
    """Share of held-out positions where the draft's argmax equals the verifier's."""
    n = min(64, (len(stream) - 1) // seq_len)
    inputs = stream[: n * seq_len].view(n, seq_len)
    agree = 0
    for i in range(0, n, 16):
        a = draft(input_ids=inputs[i : i + 16]).logits.argmax(-1)
        b = verifier(input_ids=inputs[i : i + 16]).logits.argmax(-1)
        agree += (a == b).sum().item()
    return agree / (n * seq_len)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_pair(out_dir: Path, cache_dir: Path, seed: int, scale: float = 1.0) -> dict:
    """Train and write the whole pair into ``out_dir``; return the report."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()
    corpus = load_corpus(cache_dir)
    verifier_dir, draft_dir = out_dir / "verifier", out_dir / "draft-hf"
    tokenizer = train_tokenizer(corpus, verifier_dir)
    tokenizer.save_pretrained(draft_dir)
    train_stream = encode_stream(tokenizer, corpus.train)
    held_out = encode_stream(tokenizer, corpus.held_out)
    log.info("corpus: %d train tokens, %d held-out tokens", len(train_stream), len(held_out))

    def scaled(s: Schedule) -> Schedule:
        return Schedule(**{**asdict(s), "steps": max(2, int(s.steps * scale))})

    verifier = make_model(VERIFIER_SHAPE, tokenizer.eos_token_id)
    train(verifier, train_stream, scaled(VERIFIER_SCHEDULE), seed)
    round_to_bf16(verifier)
    t_verifier = time.perf_counter() - started

    torch.manual_seed(seed + 1)
    draft = make_model(DRAFT_SHAPE, tokenizer.eos_token_id)
    train(draft, train_stream, scaled(DRAFT_SCHEDULE), seed + 1, teacher=verifier)
    round_to_bf16(draft)

    verifier.to(torch.bfloat16).save_pretrained(verifier_dir)
    draft.to(torch.bfloat16).save_pretrained(draft_dir)
    verifier.float()
    draft.float()
    export_gguf(draft_dir, out_dir / "draft.gguf")
    (out_dir / "CORPUS_LICENSE").write_text(
        "The demo pair was trained on the documentation of Django "
        f"(https://www.djangoproject.com/), whose licence follows.\n\n{corpus.licence}"
    )
    report = {
        "seed": seed,
        "corpus_tokens": {"train": len(train_stream), "held_out": len(held_out)},
        "verifier_params": n_params(verifier),
        "draft_params": n_params(draft),
        "verifier_heldout_ppl": round(perplexity(verifier, held_out), 3),
        "draft_heldout_ppl": round(perplexity(draft, held_out), 3),
        "greedy_agreement": round(greedy_agreement(draft, verifier, held_out), 4),
        "train_seconds_verifier": round(t_verifier, 1),
        "train_seconds_total": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "bytes": {str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(out_dir.rglob("*")) if p.is_file()},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the demo draft/verifier pair.")
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--cache", type=Path, default=Path(".cache/corpus"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2, help="fixed, so runs are bit-for-bit repeatable")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the step schedule (smoke runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    report = build_pair(args.out, args.cache, args.seed, args.scale)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
