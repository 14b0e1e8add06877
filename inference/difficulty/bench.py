"""Latency of ``classify`` on one core: ``python -m inference.difficulty.bench`` prints one JSON object.

Pinned to a single CPU (sched_setaffinity) with every BLAS/OpenMP pool at one thread, as the router
will call it inline. Short prompts and 4,000-character prompts are timed separately; the target is
p50 < 5 ms and p99 < 20 ms for both. ``--minilm`` also times the full MiniLM transformer (dev-only
dependencies) at 128 and 256 word pieces, the candidate this classifier was compared against.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: its thread pools read these once

import argparse  # noqa: E402 - the environment above must be set before numpy loads
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from inference.difficulty.classifier import DifficultyClassifier  # noqa: E402

SHORT_PROMPTS = (
    "hi!",
    "What is the capital of Peru?",
    "Is 2^127-1 prime? Prove it.",
    "Write a Python function that merges two sorted lists.",
    "Under Swiss law, is a 3-year non-compete for a sales manager enforceable? Cite cases.",
    "Traduis en anglais : je voudrais un café.",
    "Erkläre, wie ein Transistor funktioniert.",
    "What is the time complexity of heapsort?",
)
LONG_SENTENCES = (
    "Thanks everyone for joining the planning meeting on Tuesday, the notes are below. ",
    "The budget for the spring campaign was approved, with a small increase for social media. ",
    "Marta will contact the printer about the new brochures and report back by Friday. ",
    "We still need volunteers for the booth at the trade fair in April, please sign up. ",
    "Der Zug nach Köln fällt heute aus, bitte nehmen Sie den Regionalexpress um 14 Uhr. ",
    "def handler(event):\n    items = event.get('items', [])\n    return sum(i['price'] for i in items)\n",
)
LONG_CHARS = 4000


def long_prompts(n: int = 8) -> list[str]:
    """n different 4,000-character prompts: pasted notes with an instruction first or last."""
    out = []
    for i in range(n):
        body = "".join(LONG_SENTENCES[(i + j) % len(LONG_SENTENCES)] for j in range(80))
        text = ("Fix the typos in this:\n\n" + body) if i % 2 else (body + "\n\nSummarise this in one line.")
        out.append(text[:LONG_CHARS])
    return out


def percentiles(call: Callable[[str], object], prompts: Sequence[str], calls: int) -> dict[str, float]:
    for prompt in prompts:  # warm caches and allocator
        call(prompt)
    times = np.empty(calls)
    for i in range(calls):
        prompt = prompts[i % len(prompts)]
        started = time.perf_counter()
        call(prompt)
        times[i] = time.perf_counter() - started
    ms = times * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "calls": calls,
    }


def minilm_timings(prompts: Sequence[str], calls: int) -> dict[str, dict[str, float]]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from inference.difficulty.distill import minilm_dir

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = AutoModel.from_pretrained(str(minilm_dir())).eval()
    out = {}
    for length in (128, 256):

        def embed(prompt: str, length: int = length) -> object:
            with torch.inference_mode():
                batch = tokenizer(prompt, truncation=True, max_length=length, return_tensors="pt")
                return model(**batch).last_hidden_state.mean(dim=1)

        out[f"minilm{length}_4000_chars"] = percentiles(embed, prompts, calls)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--minilm", action="store_true", help="also time the MiniLM transformer (dev-only deps)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    started = time.perf_counter()
    classifier = DifficultyClassifier.load()
    report: dict[str, object] = {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_seconds": round(time.perf_counter() - started, 3),
        "short": percentiles(classifier.classify, SHORT_PROMPTS, args.calls),
        "chars_4000": percentiles(classifier.classify, long_prompts(), args.calls),
    }
    if args.minilm:
        report.update(minilm_timings(long_prompts(), max(20, args.calls // 20)))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
