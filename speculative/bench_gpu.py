"""Benchmark on a GPU: the demo pair end to end, and an 8B-shaped verifier for the cost side.

``python -m speculative.bench_gpu --out DIR`` runs two parts and writes one JSON file each:

1. ``demo.json``: :mod:`speculative.bench` itself with the verifier on the GPU (bf16) and
   the llama.cpp draft on the host's CPU (the edge): speculative against verifier-only at
   1, 4 and 16 sessions, emulated round trips, HF generate and assisted generation on the
   same GPU, and how many prompts' greedy outputs equal verifier-only decoding.
2. ``llama8b.json``: a verifier of Llama-3-8B's shape (32 layers, hidden 4096, GQA 32/8,
   MLP 14336, vocabulary 128256) with random bf16 weights, which is what decides the cost
   of a verify step on a real deployment. Random weights agree with no draft, so
   acceptance is emulated: the real forward pass runs over every draft token, then each
   token is accepted with the probability the demo pair measured in part 1 (i.i.d.), and
   the verifier's own argmax follows. Drafting is the real llama.cpp draft. Reported: the
   verify step's time over (sessions, k), and speculative against verifier-only tokens/s
   at 1, 4 and 16 sessions. These are cost figures, not a losslessness claim: accepted
   tokens here are the draft's, not the random model's.

The random model's logits for ids past the demo tokenizer are zeroed (lm_head rows), so
every token it emits is one the draft can read back; the full 128256-wide head still runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

import torch

from speculative import bench
from speculative.engine import SpeculativeEngine
from speculative.pair import DEMO_DRAFT_GGUF, DEMO_DRAFT_HF, DEMO_VERIFIER, load_tokenizer
from speculative.types import SamplingParams, Verdict
from speculative.verifier import TransformersVerifier, VerifyRequest, attention_backends

log = logging.getLogger(__name__)

# Llama-3-8B's shape; the context is cut to what the benchmark needs (the slot cache
# preallocates max_position_embeddings positions per session).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    # for a smoke run of this module on a CPU
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
CONTEXT = 1024
GRID_SESSIONS = (1, 4, 16)
GRID_K = (0, 1, 2, 4, 8)


class EmulatedAcceptanceVerifier(TransformersVerifier):
    """The real forward pass over every draft token; acceptance drawn i.i.d. at ``acceptance``.

    Greedy only. After ``n`` accepted draft tokens the verifier's token is the model's
    argmax at position ``n``, as in a real round, so both caches roll back as they would.
    """

    def __init__(self, *args, acceptance: float, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.acceptance = acceptance
        self._rng = random.Random(seed)

    def _judge(self, s, req: VerifyRequest, logits: torch.Tensor, argmax: torch.Tensor) -> Verdict:
        k = len(req.tokens)
        n = 0
        while n < k and self._rng.random() < self.acceptance:
            n += 1
        return Verdict(n_matches=n, verifier_token=int(argmax[n]))


def random_llama(shape: str, vocab_used: int, device: torch.device, seed: int = 0):
    """A Llama of ``shape`` with random bf16 weights, built on ``device``; ids >= vocab_used never win."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        eos_token_id=None,  # cost side: every completion runs to max_tokens
        bos_token_id=None,
        pad_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, param in model.named_parameters():  # what the checkpoint would hold: no NaN, no garbage
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
        model.lm_head.weight[vocab_used:].zero_()  # ~N(0, 1) logits elsewhere: max of thousands is > 0
    return model.eval()


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    """Wall time of ``fn()`` in ms, the device synchronised after each call; median after 3 warm-ups."""
    times = []
    for i in range(repeats + 3):
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append((time.perf_counter() - started) * 1e3)
    return round(median(times), 3)


@torch.inference_mode()
def forward_floors(model, device: torch.device) -> dict:
    """Where a verify step's time goes: kernel launches, the weights' matmuls, HF's own decode step.

    - ``launch_us``: one tiny kernel, 1000 in a row, per launch: the host's cost to start work.
    - ``linears_ms``: every linear layer of the model applied to one row, nothing else: the
      weights read once (memory-bound) plus one launch each; a decode step's floor.
    - ``hf_decode_step_ms``: transformers' own forward of one token with its DynamicCache.
    """
    from transformers import DynamicCache

    x = torch.zeros(1, device=device)
    launch_ms = _median_ms(lambda: [x.add_(1) for _ in range(1000)], 5, device)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    row = torch.randn(1, model.config.hidden_size, device=device, dtype=torch.bfloat16)
    wide = torch.randn(1, model.config.intermediate_size, device=device, dtype=torch.bfloat16)

    def linears_only() -> None:
        for m in linears:
            m(wide if m.in_features == wide.shape[1] else row)

    cache = DynamicCache(config=model.config)
    prompt = torch.arange(1, 17, device=device).unsqueeze(0)
    model(input_ids=prompt, past_key_values=cache, use_cache=True)
    step = torch.tensor([[5]], device=device)
    return {
        "launch_us": round(launch_ms, 3),  # ms for 1000 launches = us per launch
        "linears": len(linears),
        "linears_ms": _median_ms(linears_only, 10, device),
        "hf_decode_step_ms": _median_ms(
            lambda: model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1), 10, device
        ),
    }


def verify_grid(verifier: TransformersVerifier, vocab_used: int, repeats: int = 5) -> list[dict]:
    """The time of one verify step over (open sessions, draft length k), median of ``repeats``."""
    rows = []
    prompt = list(range(1, 17))
    for n in GRID_SESSIONS:
        ids = [f"grid-{n}-{i}" for i in range(n)]
        for sid in ids:
            verifier.open_session(sid, prompt, SamplingParams())
        round_no = 0
        for k in GRID_K:
            times = []
            for rep in range(repeats + 2):
                requests = [
                    VerifyRequest(sid, tuple((7 * j + i) % vocab_used for j in range(k)), None, round_no)
                    for i, sid in enumerate(ids)
                ]
                round_no += 1
                started = time.perf_counter()
                verifier.verify(requests)  # ends with a device-to-host copy: the step is done
                if rep >= 2:  # two warm-ups per shape
                    times.append((time.perf_counter() - started) * 1e3)
            rows.append({"sessions": n, "k": k, "verify_ms": round(median(times), 3)})
        for sid in ids:
            verifier.close_session(sid)
    return rows


def draft_path(requested: str) -> str:
    """The GGUF draft for llama.cpp, or its transformers twin where llama-cpp-python is missing."""
    if requested.endswith(".gguf"):
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:
            log.warning("llama-cpp-python is missing (%s): the draft runs on transformers instead", exc)
            return str(DEMO_DRAFT_HF)
    return requested


def load_draft(path: str, threads: int, device: torch.device):
    """The llama.cpp draft on the host CPU, or a transformers draft on ``device``."""
    if path.endswith(".gguf"):
        from speculative.draft_llama import LlamaCppDraft

        return LlamaCppDraft(path, n_threads=threads), "llama.cpp (host CPU)"
    from speculative.draft_hf import TransformersDraft

    return TransformersDraft(path, device=str(device)), f"transformers ({device})"


def cost_side(args, acceptance: float) -> dict:
    device = torch.device(args.device)
    tokenizer = load_tokenizer(DEMO_VERIFIER)
    vocab_used = len(tokenizer)
    started = time.perf_counter()
    model = random_llama(args.shape, vocab_used, device)
    params = sum(p.numel() for p in model.parameters())
    verifier = EmulatedAcceptanceVerifier(
        args.shape, device=str(device), dtype=torch.bfloat16, model=model, acceptance=acceptance
    )
    build_s = time.perf_counter() - started
    draft, draft_kind = load_draft(args.draft, args.draft_threads, device)
    report: dict = {
        "shape": args.shape,
        "parameters": params,
        "build_s": round(build_s, 1),
        "draft": draft_kind,
        "emulated_acceptance": acceptance,
        "max_tokens": args.max_tokens,
    }
    with attention_backends(device):  # as the verifier runs it
        report["floors"] = forward_floors(model, device)
    report["verify_step_ms"] = verify_grid(verifier, vocab_used)
    spec = SpeculativeEngine(verifier, tokenizer, draft)
    plain = SpeculativeEngine(verifier, tokenizer, None, scheduler=spec.scheduler)  # one thread calls the model
    bench.run_sessions(spec, 2, 16)
    bench.run_sessions(plain, 2, 16)
    sessions = [int(x) for x in args.sessions.split(",")]
    report["concurrency"] = [bench.compare(spec, plain, n, args.max_tokens, args.repeats) for n in sessions]
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    spec.close()
    plain.close()
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tandem's decoding benchmark on a GPU.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    parser.add_argument("--draft", default=str(DEMO_DRAFT_GGUF))
    parser.add_argument("--draft-threads", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sessions", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--acceptance", type=float, default=None, help="skip the demo part; emulate this rate")
    parser.add_argument("--out", type=Path, required=True, help="a folder for demo.json and the cost file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    args.draft = draft_path(args.draft)

    acceptance = args.acceptance
    if acceptance is None:
        demo = bench.main(
            [
                "--device", args.device,
                "--draft", args.draft,
                "--draft-threads", str(args.draft_threads),
                "--max-tokens", str(args.max_tokens),
                "--sessions", args.sessions,
                "--repeats", str(args.repeats),
                "--out", str(args.out / "demo.json"),
            ]
        )  # fmt: skip
        single = next(r for r in demo["concurrency"] if r["sessions"] == 1)
        acceptance = single["token_acceptance"]
    report = cost_side(args, acceptance)
    text = json.dumps(report, indent=2)
    (args.out / f"{args.shape.replace('-', '')}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
