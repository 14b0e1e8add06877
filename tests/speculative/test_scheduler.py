"""The verify scheduler: batches rounds, isolates a bad one, never leaves a session waiting."""

from __future__ import annotations

import threading

import pytest

from speculative.errors import InvalidRequestError
from speculative.scheduler import VerifyScheduler
from speculative.types import Verdict
from speculative.verifier import VerifyRequest, VerifyResult


class FakeVerifier:
    vocab_size, context_length, eos_token_id = 10, 100, None

    def __init__(self, fail_on: str | None = None, crash: bool = False):
        self.calls: list[list[str]] = []
        self.fail_on, self.crash = fail_on, crash

    def verify(self, requests):
        self.calls.append([r.session_id for r in requests])
        if self.crash:
            self.crash = False
            raise RuntimeError("a bug in the verifier")
        if any(r.session_id == self.fail_on for r in requests):
            raise InvalidRequestError("bad round")
        return VerifyResult([Verdict(len(r.tokens), 1) for r in requests], verify_ms=1.0)


def test_rounds_of_sessions_that_joined_are_verified_together():
    verifier = FakeVerifier()
    scheduler = VerifyScheduler(verifier, window_ms=500)
    for _ in range(3):
        scheduler.join()
    futures = []
    threads = [
        threading.Thread(target=lambda s=s: futures.append(scheduler.submit(VerifyRequest(s, (1, 2))))) for s in "abc"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [f.result(timeout=5) for f in futures]
    scheduler.close()
    assert sorted(map(sorted, verifier.calls)) == [["a", "b", "c"]]
    assert all(r.batch_size == 3 and r.verdict.n_matches == 2 for r in results)


def test_a_bad_round_fails_alone():
    verifier = FakeVerifier(fail_on="bad")
    scheduler = VerifyScheduler(verifier, window_ms=500)
    scheduler.join()
    scheduler.join()
    good = scheduler.submit(VerifyRequest("good", ()))
    bad = scheduler.submit(VerifyRequest("bad", ()))
    assert good.result(timeout=5).verdict == Verdict(0, 1)
    with pytest.raises(InvalidRequestError):
        bad.result(timeout=5)
    scheduler.close()


class FakeRunner(FakeVerifier):
    """A verifier that also decodes plain runs: each session's token is its name's length, a step."""

    def decode_greedy(self, runs, stop=lambda: False):
        self.calls.append([session_id for session_id, _, _ in runs])
        if any(session_id == self.fail_on for session_id, _, _ in runs):
            raise InvalidRequestError("bad run")
        steps = min(max_steps for _, _, max_steps in runs)
        return [[len(session_id)] * steps for session_id, _, _ in runs], 2.0


def test_plain_runs_of_a_batch_run_together_and_a_bad_one_fails_alone():
    from speculative.scheduler import PlainResult, PlainRun

    verifier = FakeRunner(fail_on="bad")
    scheduler = VerifyScheduler(verifier, window_ms=500)
    for _ in range(3):
        scheduler.join()
    runs = {name: PlainRun(VerifyRequest(name, ()), steps) for name, steps in (("good", 5), ("ok", 3), ("bad", 4))}
    futures = {name: scheduler.submit(run) for name, run in runs.items()}  # type: ignore[arg-type]
    good, ok = futures["good"].result(timeout=5), futures["ok"].result(timeout=5)
    with pytest.raises(InvalidRequestError, match="bad run"):
        futures["bad"].result(timeout=5)
    assert sorted(map(sorted, verifier.calls)) == [["bad"], ["bad", "good", "ok"], ["good"], ["ok"]]
    assert isinstance(good, PlainResult) and good.tokens == [4] * 5 and good.batch_size == 1
    assert ok.tokens == [2] * 3 and ok.verify_ms == 2.0
    # together, the run takes the fewest steps any may: three
    for name, steps in (("a", 5), ("bb", 3)):
        futures[name] = scheduler.submit(PlainRun(VerifyRequest(name, ()), steps))  # type: ignore[arg-type]
    together = [futures[name].result(timeout=5) for name in ("a", "bb")]
    scheduler.close()
    assert [r.tokens for r in together] == [[1] * 3, [2] * 3] and {r.batch_size for r in together} == {2}
    assert scheduler.batches == 5 + 3 + 3 and scheduler.rounds == 5 + 3 + 2 * 3


def test_the_worker_survives_an_unexpected_error():
    scheduler = VerifyScheduler(FakeVerifier(crash=True))
    scheduler.join()
    with pytest.raises(RuntimeError):
        scheduler.submit(VerifyRequest("a", ())).result(timeout=5)
    assert scheduler.submit(VerifyRequest("a", (), round=1)).result(timeout=5).verdict == Verdict(0, 1)
    scheduler.close()


def test_the_batch_cost_line_from_running_sums_is_the_least_squares_line_of_its_window():
    import random

    from speculative.controller import cost_line
    from speculative.scheduler import BatchCostModel

    rng = random.Random(7)
    model = BatchCostModel(window=16)
    points: list[tuple[int, float]] = []
    assert model.line() is None
    for i in range(200):  # many times the window: points leave it, sizes come and go
        tokens = rng.choice([1, 2, 5, 16, 17, 80]) if i > 3 else 4  # one size only at first: no line yet
        verify_ms = 0.4 + 0.05 * tokens + rng.uniform(0, 0.3)
        model.record(tokens, verify_ms)
        points = [*points, (tokens, verify_ms)][-16:]
        if len({x for x, _ in points}) < 2:
            assert model.line() is None
            continue
        got, want = model.line(), cost_line(points)
        assert got is not None
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


class UnusedDrafter:
    """A run's drafter that the fake verifiers never call."""

    def propose_now(self, k, threads=None):
        raise AssertionError("not called")

    def accept(self, proposal, verdict):
        raise AssertionError("not called")


DRAFTER = UnusedDrafter()


class FakeSpeculator(FakeRunner):
    """A verifier that also runs a lone session's drafting rounds: each round accepts its whole draft of k."""

    def __init__(self, fail_on: str | None = None):
        super().__init__(fail_on)
        self.spec_calls: list[tuple[str, int, int, int]] = []  # (session, first round, max tokens, k)

    def speculate_greedy(self, session_id, first_round, max_tokens, drafter, k, stop=lambda: False):
        from speculative.types import Proposal, SpeculatedRound

        self.spec_calls.append((session_id, first_round, max_tokens, k))
        if session_id == self.fail_on:
            raise InvalidRequestError("bad run of rounds")
        rounds, emitted = [], 0
        while emitted < max_tokens:
            want = min(k, max_tokens - emitted - 1)
            proposal = Proposal(tokens=(3,) * want, q=None, draft_ms=0.5)
            rounds.append(SpeculatedRound(proposal, Verdict(want, 4), verify_ms=1.5))
            emitted += want + 1
        return rounds


def test_a_lone_run_of_drafting_rounds_is_one_call_and_beside_others_it_is_their_plain_decoding():
    from speculative.scheduler import PlainResult, PlainRun, RoundResult, SpecResult, SpecRun

    verifier = FakeSpeculator(fail_on="bad")
    scheduler = VerifyScheduler(verifier, window_ms=500)
    scheduler.join()
    alone = scheduler.submit(SpecRun(VerifyRequest("lone", (), round=5), 4, DRAFTER, 2, 10))  # type: ignore[arg-type]
    result = alone.result(timeout=5)
    assert isinstance(result, SpecResult) and verifier.spec_calls == [("lone", 5, 10, 2)]
    assert [len(r.proposal.tokens) for r in result.rounds] == [2, 2, 2, 0]  # 3 + 3 + 3 + 1 tokens: 10
    assert scheduler.batches == scheduler.rounds == 4  # each round counted as the round it is
    with pytest.raises(InvalidRequestError, match="bad run of rounds"):  # its session hears of a failure
        scheduler.submit(SpecRun(VerifyRequest("bad", ()), 4, DRAFTER, 2, 10)).result(timeout=5)  # type: ignore[arg-type]
    # beside another plain run: both decode plainly together, the run of rounds as its plain run would
    scheduler.join()
    spec = scheduler.submit(SpecRun(VerifyRequest("spec", ()), 3, DRAFTER, 2, 10))  # type: ignore[arg-type]
    plain = scheduler.submit(PlainRun(VerifyRequest("plain", ()), 5))  # type: ignore[arg-type]
    both = spec.result(timeout=5), plain.result(timeout=5)
    assert all(isinstance(r, PlainResult) and r.batch_size == 2 for r in both)
    assert both[0].tokens == [4] * 3 and verifier.calls[-1] == ["spec", "plain"]
    # beside a drafting round: one plain round of the same verify call
    spec = scheduler.submit(SpecRun(VerifyRequest("spec", (), round=3), 3, DRAFTER, 2, 10))  # type: ignore[arg-type]
    drafting = scheduler.submit(VerifyRequest("drafting", (1, 2)))
    mixed = spec.result(timeout=5), drafting.result(timeout=5)
    scheduler.close()
    assert all(isinstance(r, RoundResult) and r.batch_size == 2 for r in mixed)
    assert mixed[0].verdict == Verdict(0, 1) and len(verifier.spec_calls) == 2


def test_a_run_of_drafting_rounds_on_a_verifier_without_them_is_its_plain_run():
    from speculative.scheduler import PlainResult, SpecRun

    scheduler = VerifyScheduler(FakeRunner(), window_ms=500)
    scheduler.join()
    result = scheduler.submit(SpecRun(VerifyRequest("lone", ()), 4, DRAFTER, 2, 10)).result(timeout=5)  # type: ignore[arg-type]
    scheduler.close()
    assert isinstance(result, PlainResult) and result.tokens == [4] * 4
