"""Measure the detector on the generated test split and print one JSON object (dev only: needs Faker).

    python -m inference.pii.evaluate [--per-kind 300] [--seed 7]

recall[kind]: share of gold values of that kind with an overlapping finding of the same kind;
recall_any_kind[kind]: the same, counting a finding of any kind (what the router's hard constraint needs);
by_variant: recall per way of writing the value (spelled, spaced, country, seen/unseen names ...);
precision: share of findings on the PII texts that overlap a gold value;
pii_free_clean_rate: share of PII-free texts (look-alikes, public figures, test cards) with no finding;
coverage: the same measures on the coverage categories (``coverage_set``: phones of any region, national ids
with unusual separators, credentials in headers and config, cased and non-Latin names, dates of birth in more
languages), recall per category and per variant (counting a finding of any kind), and its look-alikes' clean
rate;
clean_prompts: PII-free prompts of the name model's usual false alarms (``clean_set``: places, products, example
names in teaching questions, capitalised sentence openers in five languages, historical figures, eponyms, one-letter
tokens, lone capitalised words such as German nouns and months, documentation values, secret variables in code):
clean rate overall and per category, and the share of personal counterparts (a placeholder-like or place-like name
with personal details, a real value next to its documentation look-alike) still found;
obfuscation: the same for the obfuscation categories (``obfuscation_set``: e-mail words and numbers spelled
out in seven languages, ids a clause after their cue, defanged IPs and e-mails) and their look-alikes (prices,
counts, "Punkt", "at", bracketed dots in versions and documentation values).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from inference.pii.clean_set import clean_examples, personal_counterparts
from inference.pii.coverage_set import coverage_examples
from inference.pii.detector import Detector
from inference.pii.obfuscation_set import obfuscation_examples
from inference.pii.synthetic import Example, reexec_with_fixed_hash_seed, test_examples

EVAL_SEED = 7


def evaluate(detector: Detector, seed: int = EVAL_SEED, per_kind: int = 300) -> dict[str, object]:
    positives, negatives = test_examples(seed, per_kind)
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    hits_any: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    variants: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    findings_total = findings_true = 0
    misses: dict[str, list[str]] = defaultdict(list)
    for example in positives:
        report = detector.scan(example.text)
        for gold in example.gold:
            same = any(f.kind == gold.kind and f.start < gold.end and gold.start < f.end for f in report.findings)
            anything = any(f.start < gold.end and gold.start < f.end for f in report.findings)
            for table, hit in ((hits, same), (hits_any, anything)):
                table[gold.kind][0] += hit
                table[gold.kind][1] += 1
            variants[f"{gold.kind}/{gold.variant}"][0] += same
            variants[f"{gold.kind}/{gold.variant}"][1] += 1
            if not same and len(misses[gold.kind]) < 3:
                misses[gold.kind].append(example.text)
        for finding in report.findings:
            findings_total += 1
            findings_true += any(finding.start < g.end and g.start < finding.end for g in example.gold)
    false_alarms = [e for e in negatives if detector.scan(e.text)]
    return {
        "seed": seed,
        "positives": len(positives),
        "pii_free": len(negatives),
        "recall": {k: round(h / n, 3) for k, (h, n) in sorted(hits.items())},
        "recall_any_kind": {k: round(h / n, 3) for k, (h, n) in sorted(hits_any.items())},
        "by_variant": {k: round(h / n, 3) for k, (h, n) in sorted(variants.items())},
        "precision": round(findings_true / max(1, findings_total), 3),
        "pii_free_clean_rate": round(1 - len(false_alarms) / max(1, len(negatives)), 3),
        "examples_missed": dict(misses),
        "examples_false_alarm": [_describe(detector, e) for e in false_alarms[:5]],
    }


def evaluate_coverage(detector: Detector, seed: int = EVAL_SEED, per_category: int = 200) -> dict[str, object]:
    return _evaluate_categories(detector, *coverage_examples(seed, per_category))


def evaluate_obfuscation(detector: Detector, seed: int = EVAL_SEED, per_category: int = 200) -> dict[str, object]:
    return _evaluate_categories(detector, *obfuscation_examples(seed, per_category))


def evaluate_clean_prompts(detector: Detector, seed: int = EVAL_SEED, per_category: int = 200) -> dict[str, object]:
    categories: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    false_alarms: list[str] = []
    for category, example in clean_examples(seed, per_category):
        report = detector.scan(example.text)
        categories[category][0] += not report.findings
        categories[category][1] += 1
        if report.findings and len(false_alarms) < 12:
            false_alarms.append(_describe(detector, example))
    counterparts = personal_counterparts(seed, max(20, per_category // 4))
    found = sum(
        any(f.start < g.end and g.start < f.end for f in detector.scan(e.text).findings)
        for e in counterparts
        for g in e.gold
    )
    clean = sum(c for c, _ in categories.values())
    total = sum(n for _, n in categories.values())
    return {
        "pii_free": total,
        "pii_free_clean_rate": round(clean / max(1, total), 3),
        "clean_rate_by_category": {k: round(c / n, 3) for k, (c, n) in sorted(categories.items())},
        "counterparts_found": round(found / max(1, len(counterparts)), 3),
        "examples_false_alarm": false_alarms,
    }


def _evaluate_categories(detector: Detector, positives: list[Example], negatives: list[Example]) -> dict[str, object]:
    categories: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    variants: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    misses: dict[str, list[str]] = defaultdict(list)
    for example in positives:
        report = detector.scan(example.text)
        for gold in example.gold:
            # Any kind counts (the routing constraint): a Basic header read as an e-mail still keeps it local.
            hit = any(f.start < gold.end and gold.start < f.end for f in report.findings)
            for table, key in ((categories, gold.variant.split("/")[0]), (variants, gold.variant)):
                table[key][0] += hit
                table[key][1] += 1
            if not hit and len(misses[gold.variant]) < 2:
                misses[gold.variant].append(example.text)
    false_alarms = [e for e in negatives if detector.scan(e.text)]
    return {
        "recall": {k: round(h / n, 3) for k, (h, n) in sorted(categories.items())},
        "by_variant": {k: round(h / n, 3) for k, (h, n) in sorted(variants.items())},
        "pii_free": len(negatives),
        "pii_free_clean_rate": round(1 - len(false_alarms) / max(1, len(negatives)), 3),
        "examples_missed": dict(misses),
        "examples_false_alarm": [_describe(detector, e) for e in false_alarms[:8]],
    }


def _describe(detector: Detector, example: Example) -> str:
    found = ", ".join(f"{f.kind}:{f.text!r}" for f in detector.scan(example.text).findings)
    return f"{example.text!r} -> {found}"


def main() -> None:
    reexec_with_fixed_hash_seed("inference.pii.evaluate")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=300)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--examples", action="store_true", help="include missed and false-alarm examples")
    args = parser.parse_args()
    detector = Detector()
    result = evaluate(detector, args.seed, args.per_kind)
    coverage = evaluate_coverage(detector, args.seed, args.per_kind)
    obfuscation = evaluate_obfuscation(detector, args.seed, args.per_kind)
    clean_prompts = evaluate_clean_prompts(detector, args.seed, args.per_kind)
    if not args.examples:
        for section in (result, coverage, obfuscation, clean_prompts):
            section.pop("examples_missed", None)
            section.pop("examples_false_alarm")
    result["coverage"] = coverage
    result["obfuscation"] = obfuscation
    result["clean_prompts"] = clean_prompts
    json.dump(result, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
