"""What the SmolLM2 draft is worth: greedy acceptance on held-out chat prompts, speeds and sizes, on llama.cpp.

Acceptance is measured on the shipped artefact (the draft GGUF on llama.cpp), against the
verifier's greedy answers to prompts the draft never trained on: at each answer position
the draft reads the verifier's tokens so far and proposes its argmax, which greedy
speculative decoding accepts exactly when it is the verifier's next token. From those
matches ``tokens_per_round`` follows without running the decoder: a round drafting ``k``
keeps the leading matches (up to ``k``) and adds the verifier's own next token.
"""

from __future__ import annotations

from collections.abc import Sequence

from speculative.pair import check_vocabularies
from speculative.smol_teacher import Answer, LlamaRunner

DRAFT_LENGTHS = (2, 4, 6, 8)


def draft_matches(draft: LlamaRunner, answers: Sequence[Answer]) -> list[list[bool]]:
    """For each answer, whether the draft's argmax at each position is the verifier's token there."""
    out = []
    for a in answers:
        row = a.prompt_ids + a.answer_ids
        predicted = draft.argmax_after(row[:-1], len(a.prompt_ids) - 1)
        out.append([p == t for p, t in zip(predicted, a.answer_ids, strict=True)])
    return out


def tokens_per_round(matches: Sequence[Sequence[bool]], k: int) -> float:
    """Mean tokens one verify round emits with ``k`` drafted tokens, greedy, replaying the matches."""
    tokens = rounds = 0
    for row in matches:
        i = 0
        while i < len(row):
            run = 0
            while run < k and i + run < len(row) and row[i + run]:
                run += 1
            emitted = min(run + 1, len(row) - i)  # the accepted tokens and the verifier's next one
            tokens, rounds, i = tokens + emitted, rounds + 1, i + emitted
    return tokens / max(1, rounds)


def measure(verifier: LlamaRunner, draft: LlamaRunner, held: Sequence[Answer], speed_tokens: int) -> dict:
    """The report's measured part: vocabularies checked, acceptance on ``held``, tokens a second of each model."""
    check_vocabularies(verifier.tokens(), draft.tokens(), draft_name="the SmolLM2 draft")
    matches = draft_matches(draft, held)
    n = sum(len(m) for m in matches)
    prompt = held[0].prompt_ids
    speed_tokens = min(speed_tokens, verifier.max_context - len(prompt), draft.max_context - len(prompt))
    verifier_speed = verifier.decode_speed(prompt, speed_tokens)
    draft_speed = draft.decode_speed(prompt, speed_tokens)
    return {
        "held_out": {
            "prompts": len(held),
            "answer_tokens": n,
            # per-token acceptance of greedy speculative decoding on the verifier's own answers
            "greedy_acceptance": round(sum(sum(m) for m in matches) / max(1, n), 4),
            "tokens_per_round": {str(k): round(tokens_per_round(matches, k), 3) for k in DRAFT_LENGTHS},
        },
        "tokens_per_second": {
            "verifier": round(verifier_speed, 1),
            "draft": round(draft_speed, 1),
            "draft_over_verifier": round(draft_speed / verifier_speed, 2),
            "decoded_tokens": speed_tokens,
        },
    }
