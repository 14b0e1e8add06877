"""How well the semantic cache tells a paraphrase from a near miss: ``python -m inference.semantic_eval``.

Runs the embedder (``inference.semantic_cache.Embedder``) over a labelled set of prompt pairs
(``inference/assets/semantic/pairs.jsonl``: paraphrases that should replay each other's answer,
and near misses, one word apart, that must not) and prints, as JSON, each threshold's false
hits (a near miss that would be replayed: a wrong answer served) and hits (paraphrases
replayed: the saving), plus the lowest threshold with no false hit, for the embedding alone
and with the word guard the cache applies (``compatible``). Pairs whose numbers
differ never meet (they are in different buckets), so none is in the set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PAIRS = Path(__file__).parent / "assets" / "semantic" / "pairs.jsonl"
THRESHOLDS = (0.7, 0.75, 0.8, 0.85, 0.9, 0.92, 0.94, 0.96)


def load_pairs(path: Path = PAIRS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def similarities(pairs: list[dict], embed) -> list[float]:
    return [float(embed(pair["a"]) @ embed(pair["b"])) for pair in pairs]


def guarded(pairs: list[dict], scores: list[float]) -> list[float]:
    """The scores the cache acts on: a pair whose content words swap one for another never matches (-1)."""
    from inference.semantic_cache import compatible, content_words

    return [
        score if compatible(content_words(pair["a"]), content_words(pair["b"])) else -1.0
        for pair, score in zip(pairs, scores, strict=True)
    ]


def evaluate(pairs: list[dict], scores: list[float]) -> dict:
    """False hits and hits at each threshold, and the lowest threshold that serves no wrong answer."""
    same = [s for s, p in zip(scores, pairs, strict=True) if p["same"]]
    different = [s for s, p in zip(scores, pairs, strict=True) if not p["same"]]
    rows = [
        {
            "threshold": t,
            "false_hits": sum(s >= t for s in different),
            "hits": sum(s >= t for s in same),
            "recall": round(sum(s >= t for s in same) / len(same), 3),
        }
        for t in THRESHOLDS
    ]
    safe = [row["threshold"] for row in rows if row["false_hits"] == 0]
    return {
        "highest_near_miss": round(max(different), 3),
        "lowest_paraphrase": round(min(same), 3),
        "thresholds": rows,
        "lowest_safe_threshold": min(safe) if safe else None,
    }


def main(argv: list[str] | None = None) -> None:
    import django

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=PAIRS)
    args = parser.parse_args(argv)
    django.setup()
    from inference.semantic_cache import Embedder

    embedder = Embedder()
    started = time.perf_counter()
    embedder.embed("warm up")
    loaded_s = time.perf_counter() - started
    pairs = load_pairs(args.pairs)
    started = time.perf_counter()
    scores = similarities(pairs, embedder.embed)
    per_prompt_ms = (time.perf_counter() - started) * 1e3 / (2 * len(pairs))
    report = {
        "embedder": embedder.version,
        "pairs": len(pairs),
        "paraphrases": sum(p["same"] for p in pairs),
        "load_s": round(loaded_s, 2),
        "embed_ms_per_prompt": round(per_prompt_ms, 1),
        "embedding_only": evaluate(pairs, scores),
        "with_word_guard": evaluate(pairs, guarded(pairs, scores)),  # what the cache does
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    main()
