"""Stream one speculative completion from the shipped demo pair in the terminal.

``python -m speculative.demo "prompt"``: draft tokens the verifier accepted are shown in
green, tokens the verifier produced itself in plain text; the stats follow as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from speculative.engine import SpeculativeEngine
from speculative.pair import DEMO_DRAFT_GGUF, DEMO_VERIFIER, load_pair
from speculative.types import Provenance, SamplingParams

GREEN, RESET = "\033[32m", "\033[0m"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="To define a model in Django,")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verifier", default=str(DEMO_VERIFIER))
    parser.add_argument("--draft", default=str(DEMO_DRAFT_GGUF))
    args = parser.parse_args(argv)
    verifier, draft, tokenizer = load_pair(args.verifier, args.draft)
    engine = SpeculativeEngine(verifier, tokenizer, draft)
    colour = sys.stdout.isatty()
    completion = engine.stream(
        args.prompt, max_tokens=args.max_tokens, sampling=SamplingParams(args.temperature, seed=args.seed)
    )
    sys.stdout.write(args.prompt)
    for event in completion:
        drafted = colour and event.provenance is Provenance.DRAFTED
        sys.stdout.write(f"{GREEN}{event.text}{RESET}" if drafted else event.text)
        sys.stdout.flush()
    stats = completion.stats.as_dict()
    stats.pop("provenance")
    sys.stdout.write("\n\n" + json.dumps(stats, indent=2) + "\n")
    engine.close()


if __name__ == "__main__":
    main()
