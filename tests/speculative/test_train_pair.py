"""The demo pair's training steps that shape the draft (``speculative.train_pair``), on tiny models."""

from __future__ import annotations

import torch

from speculative.train_pair import (
    Schedule,
    Shape,
    continuation_agreement,
    make_model,
    row_batches,
    train,
    verifier_continuations,
)

TINY = Shape(hidden=32, intermediate=64, layers=1, heads=2)


def tiny(seed: int):
    torch.manual_seed(seed)
    return make_model(TINY, eos_id=0).eval()


def test_continuations_are_a_corpus_prompt_and_the_verifiers_own_greedy_tokens():
    verifier = tiny(0)
    stream = torch.randint(1, 4096, (500,), generator=torch.Generator().manual_seed(1))
    rows = verifier_continuations(verifier, stream, n=10, length=24, seed=3, prompt_len=8, batch=4)
    assert rows.shape == (10, 24)
    text = stream.tolist()
    for row in rows.tolist():  # the prompt is a window of the corpus
        assert any(text[i : i + 8] == row[:8] for i in range(len(text) - 8))
    with torch.no_grad():  # and every later token is the verifier's argmax after what precedes it
        greedy = verifier(input_ids=rows[:, :-1]).logits.argmax(-1)
    assert torch.equal(greedy[:, 7:], rows[:, 8:])
    assert continuation_agreement(verifier, rows, 8) == 1.0
    again = verifier_continuations(verifier, stream, n=10, length=24, seed=3, prompt_len=8, batch=4)
    assert torch.equal(rows, again)  # seeded


def test_default_prompts_vary_in_length_between_batches_of_rows():
    verifier = tiny(0)
    stream = torch.randint(1, 4096, (500,), generator=torch.Generator().manual_seed(1))
    rows = verifier_continuations(verifier, stream, n=64, length=40, seed=5, batch=8)
    assert rows.shape == (64, 40)
    text = stream.tolist()

    def prompt_len(row: list[int]) -> int:  # the longest prefix that is a window of the corpus
        return max(n for n in range(1, 33) if any(text[i : i + n] == row[:n] for i in range(len(text) - n)))

    assert len({prompt_len(rows[i].tolist()) for i in range(0, 64, 8)}) > 1


def test_row_batches_draw_whole_rows_seeded():
    rows = torch.arange(50).view(10, 5)
    schedule = Schedule(steps=3, batch=4, seq_len=4, lr=1e-3, warmup=1)
    drawn = list(row_batches(rows, schedule, seed=7))
    assert len(drawn) == 3 and all(b.shape == (4, 5) for b in drawn)
    assert all(int(r[0]) % 5 == 0 and r.tolist() == list(range(int(r[0]), int(r[0]) + 5)) for b in drawn for r in b)
    assert all(torch.equal(a, b) for a, b in zip(drawn, row_batches(rows, schedule, seed=7), strict=True))


def test_distilling_on_the_verifiers_continuations_raises_the_drafts_agreement_on_them():
    verifier, draft = tiny(0), tiny(1)
    with torch.no_grad():  # sharper weights: a verifier whose greedy text depends on its context
        for param in verifier.parameters():
            param.mul_(8)
    stream = torch.randint(1, 4096, (2000,), generator=torch.Generator().manual_seed(1))
    rows = verifier_continuations(verifier, stream, n=32, length=24, seed=3, prompt_len=8, batch=16)
    before = continuation_agreement(draft, rows, 8)
    schedule = Schedule(steps=150, batch=8, seq_len=23, lr=1e-2, warmup=5)
    train(draft, row_batches(rows, schedule, seed=4), schedule, teacher=verifier)
    after = continuation_agreement(draft, rows, 8)
    assert after > before + 0.3, (before, after)  # measured: 0.02 -> 0.71
