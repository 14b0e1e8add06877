"""Benchmark: Tandem's speculative decoding against verifier-only and HF assisted generation.

``python -m speculative.bench`` prints one JSON object, every figure measured in this run
on this machine with the same prompts, so ratios are side by side:

- single session: verifier-only tokens/s (the same verifier, k = 0), Tandem speculative
  tokens/s (adaptive k), their ratio, and the acceptance rate; HF ``generate()`` plain and
  with ``assistant_model=`` (assisted generation, batch size 1 only) on the same pair;
- 1, 4 and 16 concurrent sessions: aggregate tokens/s of speculative decoding against
  the same verifier batching plain decoding across the sessions;
- an emulated network round trip of 0, 20 and 80 ms between the draft and the verifier;

each for every verifier backend (``--backends``: torch on the checkpoint, llama.cpp on the
shipped Q8_0 GGUF; HF's own ``generate()`` only beside torch), and how often the llama.cpp
backend's plain greedy output equals torch's on the prompts (``greedy_agreement_with_torch``).

Not a test: figures depend on the machine. The README's performance section quotes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as host_platform  # the stdlib module; Tandem's own platform/ is not a package
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median

import torch

from speculative.engine import SpeculativeEngine
from speculative.governor import GOVERNOR_CAPS
from speculative.pair import (
    DEMO_DRAFT_GGUF,
    DEMO_DRAFT_HF,
    DEMO_VERIFIER,
    DEMO_VERIFIER_GGUF,
    load_pair,
    load_tokenizer,
)
from speculative.types import SamplingParams
from speculative.verifier import Verifier, VerifyRequest, VerifyResult, attention_backends

log = logging.getLogger(__name__)

PROMPTS = [
    "Django's ORM lets you",
    "To define a model, create a subclass of",
    "The QuerySet API",
    "Middleware is a framework of hooks into",
    "When a request comes in, Django",
    "Class-based views provide",
    "The admin site",
    "A form field",
    "Migrations are Django's way of",
    "The template language",
    "Signals allow certain senders",
    "To run the tests, use",
    "The settings file",
    "Authentication in Django",
    "A URLconf maps",
    "Caching a page",
]


class DelayedVerifier:
    """A verifier behind an emulated network link: every call pays ``rtt_ms`` of waiting."""

    def __init__(self, inner: Verifier, rtt_ms: float):
        self._inner = inner
        self._rtt_s = rtt_ms / 1e3
        self.vocab_size = inner.vocab_size
        self.context_length = inner.context_length
        self.eos_token_id = inner.eos_token_id

    @property
    def open_sessions(self) -> int:
        return self._inner.open_sessions  # type: ignore[attr-defined]

    def open_session(self, session_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> float:
        time.sleep(self._rtt_s)
        return self._inner.open_session(session_id, prompt_ids, params)

    def verify(self, requests: Sequence[VerifyRequest]) -> VerifyResult:
        started = time.perf_counter()
        time.sleep(self._rtt_s)
        result = self._inner.verify(requests)
        network_ms = (time.perf_counter() - started) * 1e3 - result.verify_ms
        return VerifyResult(result.verdicts, result.verify_ms, network_ms)

    def close_session(self, session_id: str) -> None:
        self._inner.close_session(session_id)


def run_sessions(engine: SpeculativeEngine, n_sessions: int, max_tokens: int, k: int | None = None) -> dict:
    """Run ``n_sessions`` greedy completions at once; aggregate tokens/s over the wall time."""
    completions = [
        engine.stream(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, k=k, sampling=SamplingParams())
        for i in range(n_sessions)
    ]
    barrier = threading.Barrier(n_sessions + 1)
    errors: list[BaseException] = []

    def drive(completion) -> None:
        barrier.wait()
        try:
            for _ in completion:
                pass
        except BaseException as exc:  # noqa: BLE001 - reported below, never hidden
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(c,)) for c in completions]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    tokens = sum(c.stats.completion_tokens for c in completions)
    proposed = sum(c.stats.proposed for c in completions)
    accepted = sum(c.stats.accepted for c in completions)
    rounds = sum(c.stats.rounds for c in completions)
    rejections = sum(c.stats.rejections for c in completions)
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "acceptance_rate": round(accepted / proposed, 4) if proposed else None,
        # the chance that a draft token is accepted given that the ones before it were (what
        # the controller estimates): accepted / (accepted + rounds cut short by a rejection)
        "token_acceptance": round(accepted / (accepted + rejections), 4) if proposed else None,
        "mean_k": round(proposed / rounds, 2) if rounds else 0.0,
    }


def compare(spec: SpeculativeEngine, plain: SpeculativeEngine, n_sessions: int, max_tokens: int, repeats: int) -> dict:
    """Speculative vs plain in ``repeats`` back-to-back pairs; medians, and the median pair ratio.

    Pairing each speculative run with the plain run just before it, and taking medians,
    keeps a burst of load from another tenant of this shared machine out of the ratio.
    Untimed speculative runs first, one more than the governor has caps to try (at 16
    sessions a run is about one of its epochs): it learns, per concurrency level, which
    draft-length cap pays, as a long-running server would have by then.
    """
    for _ in range(len(GOVERNOR_CAPS) + 1):
        run_sessions(spec, n_sessions, max_tokens)
    pairs = [
        (run_sessions(plain, n_sessions, max_tokens), run_sessions(spec, n_sessions, max_tokens))
        for _ in range(repeats)
    ]
    plain_runs = [p for p, _ in pairs]
    spec_runs = [s for _, s in pairs]
    return {
        "sessions": n_sessions,
        "verifier_only_tokens_per_s": round(median(p["tokens_per_s"] for p in plain_runs), 2),
        "speculative_tokens_per_s": round(median(s["tokens_per_s"] for s in spec_runs), 2),
        "speedup": round(median(s["tokens_per_s"] / p["tokens_per_s"] for p, s in pairs), 3),
        "speedup_per_pair": [round(s["tokens_per_s"] / p["tokens_per_s"], 3) for p, s in pairs],
        "acceptance_rate": round(median(s["acceptance_rate"] or 0.0 for s in spec_runs), 4),
        "token_acceptance": round(median(s["token_acceptance"] or 0.0 for s in spec_runs), 4),
        "mean_k": round(median(s["mean_k"] for s in spec_runs), 2),
    }


def greedy_agreement(spec: SpeculativeEngine, plain: SpeculativeEngine, max_tokens: int) -> dict:
    """Lossless check on this machine: each prompt's greedy speculative tokens against plain decoding.

    On a CPU in fp32 they are identical (the tests assert it); in bf16 on a GPU a forward
    over k + 1 positions may round differently from a forward over one, and a near-tie
    can flip: the report says how often, and how many tokens in the first flip came.
    """
    identical, first_divergence = 0, []
    for prompt in PROMPTS:
        a = spec.generate(prompt, max_tokens=max_tokens).token_ids
        b = plain.generate(prompt, max_tokens=max_tokens).token_ids
        if a == b:
            identical += 1
        else:
            first_divergence.append(
                next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            )
    return {"prompts": len(PROMPTS), "identical": identical, "first_divergence_at": first_divergence}


@torch.inference_mode()
def hf_generate(verifier_model, draft_model, tokenizer, max_tokens: int, repeats: int) -> dict:
    """HF ``generate()`` alone and with ``assistant_model=`` (greedy), one prompt at a time."""
    results = {}
    device = verifier_model.device
    for name, assistant in (("hf_verifier_only", None), ("hf_assisted", draft_model)):
        best = 0.0
        for _ in range(repeats):
            tokens, seconds = 0, 0.0
            for prompt in PROMPTS[:8]:
                ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
                started = time.perf_counter()
                with attention_backends(device):  # the kernels Tandem's verifier uses, for a like-for-like baseline
                    out = verifier_model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        assistant_model=assistant,
                        do_sample=False,
                        max_new_tokens=max_tokens,
                        pad_token_id=tokenizer.eos_token_id,
                    )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - started
                tokens += out.shape[1] - ids.shape[1]
            best = max(best, tokens / seconds)
        results[name] = round(best, 2)
    return results


def backend_agreement(reference: SpeculativeEngine, others: dict[str, SpeculativeEngine], max_tokens: int) -> dict:
    """How often each other backend's plain greedy decoding equals the reference's, prompt by prompt.

    Different backends (torch in fp32 on the bf16 checkpoint, llama.cpp on an f32 or a quantised
    GGUF) round differently, so a near-tie may flip: each is lossless against its own plain
    decoding, and this says how close the backends are to one another.
    """
    expected = {p: reference.generate(p, max_tokens=max_tokens).token_ids for p in PROMPTS}
    report = {}
    for name, engine in others.items():
        identical, first_divergence = 0, []
        for prompt, want in expected.items():
            got = engine.generate(prompt, max_tokens=max_tokens).token_ids
            if got == want:
                identical += 1
            else:
                first_divergence.append(
                    next(
                        (i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), min(len(got), len(want))
                    )
                )
        report[name] = {"prompts": len(PROMPTS), "identical": identical, "first_divergence_at": first_divergence}
    return report


def bench_backend(args: argparse.Namespace, verifier_path: str) -> tuple[dict, SpeculativeEngine]:
    """Every figure for one verifier backend; returns the report and its plain engine (left open)."""
    verifier, draft, tokenizer = load_pair(
        verifier_path,
        args.draft,
        device=args.device,
        draft_threads=args.draft_threads,
        verifier_threads=args.verifier_threads,
    )
    spec = SpeculativeEngine(verifier, tokenizer, draft)
    plain = SpeculativeEngine(verifier, tokenizer, None, scheduler=spec.scheduler)  # one thread calls the model
    run_sessions(spec, 2, 16)  # warm up both paths (allocations, llama.cpp contexts)
    run_sessions(plain, 2, 16)
    torch_model = getattr(verifier, "model", None)  # the torch backend's; llama.cpp has none

    report: dict = {
        "verifier": verifier_path,
        "device": str(getattr(verifier, "device", "cpu")),
        "threads": getattr(verifier, "n_threads", torch.get_num_threads()),
    }
    sessions = [int(x) for x in args.sessions.split(",")]
    by_sessions = [compare(spec, plain, n, args.max_tokens, args.repeats) for n in sessions]
    report["concurrency"] = by_sessions
    single = next((r for r in by_sessions if r["sessions"] == 1), None)

    report["greedy_vs_verifier_only"] = greedy_agreement(spec, plain, args.max_tokens)

    if torch_model is not None and args.draft_hf and Path(args.draft_hf).exists():
        from transformers import AutoModelForCausalLM

        draft_hf = AutoModelForCausalLM.from_pretrained(args.draft_hf, dtype=torch_model.dtype)
        draft_hf = draft_hf.to(torch_model.device).eval()
        hf = hf_generate(torch_model, draft_hf, load_tokenizer(verifier_path), args.max_tokens, args.repeats)
        report["hf"] = hf
        if single:
            report["speedup_vs_hf_assisted"] = round(single["speculative_tokens_per_s"] / hf["hf_assisted"], 3)
            report["speedup_vs_hf_verifier_only"] = round(
                single["speculative_tokens_per_s"] / hf["hf_verifier_only"], 3
            )

    rtt_rows = []
    for rtt in [float(x) for x in args.rtts.split(",") if x]:
        remote = DelayedVerifier(verifier, rtt)
        spec_r = SpeculativeEngine(remote, tokenizer, draft)
        plain_r = SpeculativeEngine(remote, tokenizer, None, scheduler=spec_r.scheduler)
        row = compare(spec_r, plain_r, 1, args.max_tokens, max(1, args.repeats // 2))
        row["rtt_ms"] = rtt
        rtt_rows.append(row)
        spec_r.close()  # and plain_r's: they share a scheduler
    report["network"] = rtt_rows
    if single:
        report["single_session_speedup"] = single["speedup"]
    report["min_speedup_anywhere"] = min(r["speedup"] for r in by_sessions + rtt_rows)
    return report, plain  # spec's scheduler is plain's too: closed with it


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Benchmark Tandem's speculative decoding.")
    parser.add_argument("--verifier", default=str(DEMO_VERIFIER), help="the torch backend's checkpoint")
    parser.add_argument("--verifier-gguf", default=str(DEMO_VERIFIER_GGUF), help="the llama.cpp backend's GGUF")
    parser.add_argument("--backends", default="torch,llama.cpp", help="verifier backends to measure, in turn")
    parser.add_argument("--draft", default=str(DEMO_DRAFT_GGUF))
    parser.add_argument("--draft-hf", default=str(DEMO_DRAFT_HF), help="the same draft for HF assisted generation")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sessions", default="1,4,16")
    parser.add_argument("--rtts", default="0,20,80")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--draft-threads", type=int, default=1, help="llama.cpp threads for the draft")
    parser.add_argument(
        "--verifier-threads",
        type=int,
        default=None,
        help="llama.cpp threads for a GGUF verifier (default: half the cores)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    paths = {"torch": args.verifier, "llama.cpp": args.verifier_gguf}
    backends = [b for b in args.backends.split(",") if b]
    if unknown := [b for b in backends if b not in paths]:
        raise SystemExit(f"unknown backend(s) {unknown}: choose from {sorted(paths)}")
    report: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": host_platform.processor() or host_platform.machine(),
        },
        "pair": {"draft": args.draft},
        "max_tokens": args.max_tokens,
        "backends": {},
    }
    if len(backends) > 1:
        # Each backend timed in a process of its own, as it is served: one backend's threads (torch's
        # and llama.cpp's OpenMP teams) left in the process slowed the next one's by up to 2x.
        for backend in backends:
            report["backends"][backend] = _bench_in_subprocess(argv or sys.argv[1:], backend)
        plains = {b: _plain_engine(args, paths[b]) for b in backends}  # agreement only: not timed
    else:
        report["backends"][backends[0]], plain = bench_backend(args, paths[backends[0]])
        plains = {backends[0]: plain}
    if "torch" in plains and len(plains) > 1:
        others = {f"{b} ({Path(paths[b]).name})": e for b, e in plains.items() if b != "torch"}
        report["greedy_agreement_with_torch"] = backend_agreement(plains["torch"], others, args.max_tokens)
    for engine in plains.values():
        engine.close()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return report


def _bench_in_subprocess(argv: list[str], backend: str) -> dict:
    """This benchmark for one backend, in a fresh Python process; its report for that backend."""
    args = [a for a in argv]
    for flag in ("--out", "--backends"):  # dropped with their values: the child's are set here
        while flag in args:
            i = args.index(flag)
            del args[i : i + 2]
    args = [a for a in args if not a.startswith(("--out=", "--backends="))]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "speculative.bench", *args, "--backends", backend, "--out", str(out)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["backends"][backend]


def _plain_engine(args: argparse.Namespace, verifier_path: str) -> SpeculativeEngine:
    verifier, _, tokenizer = load_pair(verifier_path, None, device=args.device)
    return SpeculativeEngine(verifier, tokenizer, None)


if __name__ == "__main__":
    main()
