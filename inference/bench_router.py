"""``python -m inference.bench_router``: what the router's own checks cost a request, typical and 4,000 characters.

Times ``signals.check`` (the PII scan, the difficulty classifier, the prompt count) and
``router.decide`` together, as the gateway runs them for a request under the default
policy (difficulty routing on, PII kept off the cloud), on one thread. Prints one JSON
object: p50 and p99 in milliseconds, wall and CPU time, per prompt kind.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

TYPICAL = [
    "Write a short thank-you note to my colleague for covering my shift.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the main causes of the French Revolution in three bullet points.",
    "Please send the invoice to maria.lopez@example.org before Friday.",
    "Prove that the square root of 2 is irrational.",
]
PARAGRAPH = (
    "Our quarterly review covered the migration of the billing service, the new on-call rota and the "
    "customer feedback from the pilot. The team agreed to move the reporting jobs to the night window, "
    "to document the rollback steps, and to revisit the alert thresholds after two weeks of data. "
)


def long_prompt(with_pii: bool) -> str:
    text = (PARAGRAPH * 20)[:3900]
    tail = " Reach me at +44 20 7946 0958 if anything is unclear." if with_pii else " Thanks for reading."
    return (text + tail).ljust(4000, ".")[:4000]


def measure(prompts: list[str], repeats: int) -> dict:
    from inference.completion import CompletionCall
    from inference.router import decide
    from inference.router_eval import _demo_tokenizer, _evaluation_policy, percentile
    from inference.selectors import builtin_policy
    from inference.signals import check

    policy = _evaluation_policy(builtin_policy())
    tokenizer = _demo_tokenizer()
    entry = _entry()
    wall, cpu = [], []
    for i in range(repeats):
        prompt = prompts[i % len(prompts)]
        call = CompletionCall(model="m", prompt=prompt, max_tokens=64, messages=({"role": "user", "content": prompt},))
        started, started_cpu = time.perf_counter(), time.process_time()
        decide(entry, check(call, policy, tokenizer), policy, tenant_id=0)
        wall.append((time.perf_counter() - started) * 1e3)
        cpu.append((time.process_time() - started_cpu) * 1e3)
    return {
        "chars": max(len(p) for p in prompts),
        "p50_ms": round(percentile(wall, 50), 3),
        "p99_ms": round(percentile(wall, 99), 3),
        "cpu_p50_ms": round(percentile(cpu, 50), 3),
        "cpu_p99_ms": round(percentile(cpu, 99), 3),
        "calls": repeats,
    }


def _entry():
    from inference.engines import CharTokenizer, ModelEntry, TrivialEngine

    class EveryTenant:
        def allows(self, tenant_id):
            return True

        def available(self, tenant_id):
            return True

    engine = TrivialEngine()
    return ModelEntry("m", engine, engine, "b", "b", 1 << 20, CharTokenizer(), cloud=EveryTenant())  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    import django

    django.setup()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the aims are stated
    measure(TYPICAL, 50)  # loads the models
    gc.collect()
    gc.freeze()  # a long-lived server's objects are old: collections should not scan them (see docs/pii.md)
    report = {
        "cpus": 1,
        "policy": "default (difficulty routing on, PII kept off the cloud)",
        "typical": measure(TYPICAL, args.repeats),
        "chars_4000_no_pii": measure([long_prompt(False)], args.repeats),
        "chars_4000_pii": measure([long_prompt(True)], args.repeats),
    }
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
