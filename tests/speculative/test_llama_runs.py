"""The lockstep's batch writes: numpy views over llama.cpp's own batch arrays."""

from __future__ import annotations

from types import SimpleNamespace

from speculative.llama_runs import BatchViews


def test_one_each_writes_what_the_structures_fields_then_hold():
    from llama_cpp import _internals as internals

    batch = internals.LlamaBatch(n_tokens=8, embd=0, n_seq_max=1, verbose=False)
    b = batch.batch
    views = BatchViews(b, 8)
    sessions = [SimpleNamespace(pending=p, tokens=[0] * length, seq=seq) for p, length, seq in [(5, 3, 0), (7, 9, 4)]]
    for i in range(8):  # leftovers of an earlier, wider batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = 99, 99, 3, 31, False
    views.one_each(sessions)  # type: ignore[arg-type]
    written = [(b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], bool(b.logits[i])) for i in range(3)]
    assert written == [(5, 3, 1, 0, True), (7, 9, 1, 4, True), (99, 99, 3, 31, False)]  # the rest untouched
