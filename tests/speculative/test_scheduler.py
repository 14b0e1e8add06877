"""The verify scheduler: batches rounds, isolates a bad one, never leaves a session waiting."""

from __future__ import annotations

import threading
import time

import pytest

from speculative.arrivals import Arrivals
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
    """A verifier that also decodes plain runs: each session's token is its name's length, a step of 2 ms."""

    def run_greedy(self, runs, between, interrupt=None):
        from speculative.llama_runs import RunEnd

        self.calls.append([run.session_id for run in runs])
        if any(run.session_id == self.fail_on for run in runs):
            raise InvalidRequestError("bad run")
        members = {run.key: (run, RunEnd(run.key, [])) for run in runs}
        while members:
            n, ended = len(members), []
            for key, (run, end) in list(members.items()):
                end.tokens.append(len(run.session_id))
                end.verify_ms += 2.0
                end.gpu_ms += 2.0 / n
                if len(end.tokens) >= run.max_steps:
                    ended.append(end)
                    del members[key]
            adding, stop = between(ended, n, 2.0, 1)
            if stop:
                return [end for _, end in members.values()], 0.0
            members.update((run.key, (run, RunEnd(run.key, []))) for run in adding)
        return [], 0.0


def test_plain_runs_of_a_batch_run_together_each_for_its_own_steps_and_a_bad_one_fails_alone():
    from speculative.steps import PlainResult, PlainRun

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
    assert ok.tokens == [2] * 3 and ok.verify_ms == 6.0 and ok.gpu_ms == 6.0
    # together, each run takes its own steps: the second alone for its last two, its share of those whole
    for name, steps in (("a", 5), ("bb", 3)):
        futures[name] = scheduler.submit(PlainRun(VerifyRequest(name, ()), steps))  # type: ignore[arg-type]
    a, bb = (futures[name].result(timeout=5) for name in ("a", "bb"))
    scheduler.close()
    assert a.tokens == [1] * 5 and bb.tokens == [2] * 3
    assert (a.verify_ms, a.gpu_ms, bb.verify_ms, bb.gpu_ms) == (10.0, 3 * 1.0 + 2 * 2.0, 6.0, 3.0)
    assert bb.batch_size == 2 and a.batch_size == 1  # 10 ms of steps, 7 of them its share
    assert scheduler.batches == 5 + 3 + 5 and scheduler.rounds == 5 + 3 + 2 * 3 + 2


class Scripted:
    """A driven session: opens, then asks for plain runs of ``steps`` up to ``total`` tokens; one verify round instead
    once it has ``round_at`` tokens."""

    def __init__(self, scheduler: VerifyScheduler, name: str, total: int, steps: int, round_at: int | None = None):
        self.scheduler, self.name, self.total, self.steps, self.round_at = scheduler, name, total, steps, round_at
        self.runs: list[int] = []  # each answer's tokens
        self.error: BaseException | None = None
        self.done = threading.Event()

    def step(self, result=None, error=None):
        from speculative.steps import OpenOrder, PlainResult, PlainRun, RoundResult
        from speculative.types import SamplingParams

        if error is not None or (result is None and self.runs):
            self.error = error
            self.done.set()
            return None
        if result is None:
            return OpenOrder(self.name, [1, 2], SamplingParams())
        if isinstance(result, float):
            self.scheduler.join()
        elif isinstance(result, PlainResult):
            self.runs.append(len(result.tokens))
        else:
            assert isinstance(result, RoundResult)
            self.runs.append(1)
        have = sum(self.runs)
        if have >= self.total:
            self.scheduler.leave()
            self.done.set()
            return None
        request = VerifyRequest(self.name, (), None, have)
        if have == self.round_at:
            return request
        return PlainRun(request, min(self.steps, self.total - have))


class Opening(FakeRunner):
    """A runner whose sessions open in ``open_many`` calls (recorded), steps taking ``step_s`` each."""

    def __init__(self, step_s: float = 0.0):
        super().__init__()
        self.openings: list[list[str]] = []
        self.step_s = step_s

    def open_many(self, items):
        self.openings.append(sorted(session_id for session_id, _, _ in items))
        return [0.5] * len(items)

    def run_greedy(self, runs, between, interrupt=None):
        def slow(ended, n, ms, steps=1):
            time.sleep(self.step_s)
            return between(ended, n, ms, steps)

        return super().run_greedy(runs, slow, interrupt)


def test_a_session_still_running_when_another_asks_for_a_verify_round_goes_on_after_it():
    verifier = Opening()
    scheduler = VerifyScheduler(verifier, window_ms=500)
    # a's runs take 3 steps, b's 4: when b asks for a verify round, a is a step into its second run
    a, b = Scripted(scheduler, "a", 12, 3), Scripted(scheduler, "b", 12, 4, round_at=4)
    for session in (a, b):
        scheduler.start_driven(session)
    finished = a.done.wait(timeout=5) and b.done.wait(timeout=5)
    scheduler.close()
    assert finished and a.error is None and b.error is None
    assert a.runs[:2] == [3, 1] and sum(a.runs) == 12  # its run ended with the lot, and it went on
    assert b.runs[:2] == [4, 1] and sum(b.runs) == 12


def test_the_worker_survives_an_unexpected_error():
    scheduler = VerifyScheduler(FakeVerifier(crash=True))
    scheduler.join()
    with pytest.raises(RuntimeError):
        scheduler.submit(VerifyRequest("a", ())).result(timeout=5)
    assert scheduler.submit(VerifyRequest("a", (), round=1)).result(timeout=5).verdict == Verdict(0, 1)
    scheduler.close()


def test_the_batch_cost_line_from_running_sums_is_the_least_squares_line_of_its_window():
    import random

    from speculative.batch_cost import BatchCostModel
    from speculative.controller import cost_line

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

    def speculate_greedy(
        self, session_id, first_round, max_tokens, drafter, k, stop=lambda: False, deadline=None, interrupt=None
    ):
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
    from speculative.steps import PlainResult, PlainRun, RoundResult, SpecResult, SpecRun

    verifier = FakeSpeculator(fail_on="bad")
    scheduler = VerifyScheduler(verifier, window_ms=500)
    scheduler.join()
    alone = scheduler.submit(SpecRun(VerifyRequest("lone", (), round=5), 4, DRAFTER, 2, 10))  # type: ignore[arg-type]
    result = alone.result(timeout=5)
    assert isinstance(result, SpecResult) and verifier.spec_calls == [("lone", 5, 10, 2)]
    assert [len(r.proposal.tokens) for r in result.rounds] == [2, 2, 2, 0]  # 3 + 3 + 3 + 1 tokens: 10
    assert scheduler.batches == scheduler.rounds == 4  # each round counted as the round it is
    assert list(scheduler.governor._lone_rounds) == [(2, 2.0)] * 3  # what its drafting rounds cost, for the governor
    assert list(scheduler.draft_cost._points) == []  # lockstep draft steps only: none here
    with pytest.raises(InvalidRequestError, match="bad run of rounds"):  # its session hears of a failure
        scheduler.submit(SpecRun(VerifyRequest("bad", ()), 4, DRAFTER, 2, 10)).result(timeout=5)  # type: ignore[arg-type]
    # beside another plain run: both decode plainly together, the run of rounds as its plain run would
    scheduler.join()
    spec = scheduler.submit(SpecRun(VerifyRequest("spec", ()), 3, DRAFTER, 2, 10))  # type: ignore[arg-type]
    plain = scheduler.submit(PlainRun(VerifyRequest("plain", ()), 5))  # type: ignore[arg-type]
    both = spec.result(timeout=5), plain.result(timeout=5)
    assert all(isinstance(r, PlainResult) for r in both)
    assert both[0].tokens == [4] * 3 and both[0].batch_size == 2 and verifier.calls[-1] == ["spec", "plain"]
    assert both[1].tokens == [5] * 5 and both[1].gpu_ms == 3 * 1.0 + 2 * 2.0  # its last two steps alone
    # beside a drafting round: one plain round of the same verify call
    spec = scheduler.submit(SpecRun(VerifyRequest("spec", (), round=3), 3, DRAFTER, 2, 10))  # type: ignore[arg-type]
    drafting = scheduler.submit(VerifyRequest("drafting", (1, 2)))
    mixed = spec.result(timeout=5), drafting.result(timeout=5)
    scheduler.close()
    assert all(isinstance(r, RoundResult) and r.batch_size == 2 for r in mixed)
    assert mixed[0].verdict == Verdict(0, 1) and len(verifier.spec_calls) == 2


def test_a_run_of_drafting_rounds_on_a_verifier_without_them_is_its_plain_run():
    from speculative.steps import PlainResult, SpecRun

    scheduler = VerifyScheduler(FakeRunner(), window_ms=500)
    scheduler.join()
    result = scheduler.submit(SpecRun(VerifyRequest("lone", ()), 4, DRAFTER, 2, 10)).result(timeout=5)  # type: ignore[arg-type]
    scheduler.close()
    assert isinstance(result, PlainResult) and result.tokens == [4] * 4


def test_a_lockstep_tells_the_cost_line_one_point_per_batch_size():
    from speculative.lockstep_runs import LockstepRuns

    scheduler = VerifyScheduler(FakeRunner())
    try:
        runs = LockstepRuns(scheduler)
        before = len(scheduler.cost._points)
        for n, ms in ((2, 2.0), (2, 2.2), (3, 3.0), (3, 3.4)):  # a session joined between steps, none ended
            assert runs.between([], n, ms) == ([], False)
        runs.flush()
        points = list(scheduler.cost._points)[before:]
    finally:
        scheduler.close()
    assert [(n, round(ms, 3)) for n, ms in points] == [(2, 2.1), (3, 3.2)]
    assert scheduler.batches == 4 and scheduler.rounds == 2 + 2 + 3 + 3


def test_a_lockstep_draft_round_tells_the_draft_cost_its_ms_a_drafted_token_by_sessions():
    from speculative.types import Proposal

    scheduler = VerifyScheduler(FakeRunner())
    steady = [Proposal(tokens=(3, 3), q=None, draft_ms=0.9, caught_up=1), Proposal(tokens=(3,), q=None, draft_ms=0.9)]
    scheduler._draft_step_cost([*steady, Proposal(tokens=(), q=None, draft_ms=0.0), ValueError("failed")], 1.2)
    assert list(scheduler.draft_cost._points) == [(2, 0.6)]  # two sessions drafted, the longest two tokens
    # a round where a session caught up on the tokens of a plain run prices no drafting
    catching_up = Proposal(tokens=(3, 3), q=None, draft_ms=5.0, caught_up=40)
    scheduler._draft_step_cost([*steady, catching_up], 6.0)
    scheduler._draft_step_cost([ValueError("failed")], 0.1)
    scheduler.close()
    assert list(scheduler.draft_cost._points) == [(2, 0.6)]


def test_an_idle_worker_opens_a_burst_on_its_way_in_one_prefill(monkeypatch):
    monkeypatch.setattr("speculative.scheduler.ARRIVAL_WAIT_MS", 10_000.0)  # only the arrivals end the wait here
    arrivals = Arrivals()
    verifier = Opening()
    scheduler = VerifyScheduler(verifier, window_ms=1, arrivals=arrivals)
    coming = [arrivals.arrival() for _ in range(3)]  # three requests being read, say
    sessions = [Scripted(scheduler, name, 4, 2) for name in "abc"]
    scheduler.start_driven(sessions[0])
    coming[0].came()
    time.sleep(0.05)  # the first would have opened alone by now
    assert verifier.openings == []
    for session, arrival in zip(sessions[1:], coming[1:], strict=True):
        scheduler.start_driven(session)
        arrival.came()
        arrival.came()  # idempotent
    assert all(s.done.wait(5) for s in sessions)
    scheduler.close()
    assert verifier.openings == [["a", "b", "c"]] and arrivals.coming == 0
    assert all(s.error is None and sum(s.runs) == 4 for s in sessions)


def test_an_idle_worker_waits_for_a_request_that_never_arrives_no_longer_than_the_cap(monkeypatch):
    monkeypatch.setattr("speculative.scheduler.ARRIVAL_WAIT_MS", 100.0)
    arrivals = Arrivals()
    arrivals.arrival()  # refused, say, without telling
    scheduler = VerifyScheduler(Opening(), arrivals=arrivals)
    session = Scripted(scheduler, "a", 2, 2)
    started = time.perf_counter()
    scheduler.start_driven(session)
    assert session.done.wait(5) and session.error is None
    scheduler.close()
    assert 0.09 <= time.perf_counter() - started < 2


def test_only_sessions_that_ended_together_are_waited_for():
    from speculative.arrivals import Returning

    returning = Returning()
    for _ in range(3):  # a wave
        returning.ended(0.05)
    assert returning.expected(0.05)[0] == 3
    time.sleep(0.06)
    returning.ended(0.05)  # a session ending alone, a while later
    expected, until = returning.expected(0.05)
    assert expected == 1 and until > time.perf_counter()
    returning.opened()
    assert returning.expected(0.05)[0] == 0
    time.sleep(0.06)
    assert returning.expected(0.05)[0] == 0  # (past the window, whatever ended)


def _after_a_wave(verifier: Opening) -> VerifyScheduler:
    """A scheduler (counting no arrivals) whose three sessions just ended together."""
    scheduler = VerifyScheduler(verifier, window_ms=1, arrivals=Arrivals())
    first = [Scripted(scheduler, name, 4, 4) for name in "abc"]
    for session in first:
        scheduler.start_driven(session)
    assert all(s.done.wait(5) for s in first)
    return scheduler


def test_an_idle_worker_waits_for_as_many_sessions_as_just_ended_and_opens_them_together(monkeypatch):
    # closed-loop clients whose answers went out together: their next requests come one by one, uncounted
    monkeypatch.setattr("speculative.scheduler.ARRIVAL_WAIT_MS", 10_000.0)
    verifier = Opening()
    scheduler = _after_a_wave(verifier)
    verifier.openings.clear()
    second = [Scripted(scheduler, name, 4, 4) for name in "def"]
    for session in second:
        scheduler.start_driven(session)
        time.sleep(0.03)  # each client's next request a little after the last
    assert all(s.done.wait(5) and s.error is None for s in second)
    scheduler.close()
    assert verifier.openings == [["d", "e", "f"]]


def test_sessions_that_ended_longer_ago_than_the_cap_are_not_waited_for(monkeypatch):
    monkeypatch.setattr("speculative.scheduler.ARRIVAL_WAIT_MS", 100.0)
    scheduler = _after_a_wave(Opening())
    time.sleep(0.15)  # past the cap: the clients did not come back
    started = time.perf_counter()
    alone = Scripted(scheduler, "d", 4, 4)
    scheduler.start_driven(alone)
    assert alone.done.wait(5) and alone.error is None
    assert time.perf_counter() - started < 0.09  # it opened at once, not a cap later
    scheduler.close()


def test_a_wave_that_does_not_come_back_and_a_request_that_never_arrives_hold_an_opening_one_cap_in_all(
    monkeypatch,
):
    monkeypatch.setattr("speculative.scheduler.ARRIVAL_WAIT_MS", 150.0)
    arrivals = Arrivals()
    scheduler = VerifyScheduler(Opening(), window_ms=1, arrivals=arrivals)
    first = [Scripted(scheduler, name, 4, 4) for name in "abc"]
    for session in first:
        scheduler.start_driven(session)
    assert all(s.done.wait(5) for s in first)  # three ended together: the scheduler waits for three
    arrivals.arrival()  # and one request is on its way, never arriving
    started = time.perf_counter()
    alone = Scripted(scheduler, "d", 4, 4)
    scheduler.start_driven(alone)
    assert alone.done.wait(5) and alone.error is None
    scheduler.close()
    assert time.perf_counter() - started < 0.25  # one cap (0.15 s), not one for each wait


def test_sessions_opening_beside_running_ones_never_wait_for_arrivals(monkeypatch):
    monkeypatch.setattr("speculative.scheduler.ARRIVAL_WAIT_MS", 10_000.0)
    arrivals = Arrivals()
    verifier = Opening(step_s=0.001)
    scheduler = VerifyScheduler(verifier, arrivals=arrivals)
    running = Scripted(scheduler, "long", 2_000, 16)
    scheduler.start_driven(running)
    deadline = time.perf_counter() + 5
    while not running.runs and time.perf_counter() < deadline:  # it runs its steps
        time.sleep(0.001)
    arrivals.arrival()  # on its way, and never arriving
    started = time.perf_counter()
    joining = Scripted(scheduler, "short", 4, 2)
    scheduler.start_driven(joining)
    assert joining.done.wait(5) and joining.error is None
    assert time.perf_counter() - started < 2 and not running.done.is_set()  # it joined the running steps
    assert running.done.wait(10)
    scheduler.close()
    assert verifier.openings == [["long"], ["short"]]


class HandingOver(Scripted):
    """A lone session that, as the engine's completion does, hands over to its consumer at its end (timed)."""

    waited: list[float] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handed = threading.Event()  # its hand-over ended

    def step(self, result=None, error=None):
        from speculative.steps import PlainResult

        following = super().step(result, error)
        if isinstance(result, PlainResult) and following is None:  # it ended and left
            started = time.perf_counter()
            self.scheduler.hand_over()  # on the scheduler's thread
            self.waited.append(time.perf_counter() - started)
            self.handed.set()
        return following


def test_a_lone_sessions_end_lets_its_consumer_go_first_until_another_session_comes(monkeypatch):
    monkeypatch.setattr("speculative.scheduler.HAND_OVER_MS", 200.0)
    HandingOver.waited = []
    scheduler = VerifyScheduler(Opening(), window_ms=1)
    try:
        alone = HandingOver(scheduler, "alone", 2, 2)
        scheduler.start_driven(alone)
        assert alone.handed.wait(5)
        assert 0.15 < HandingOver.waited[-1] < 2  # nobody came: the whole wait
        first, second = HandingOver(scheduler, "first", 2, 2), HandingOver(scheduler, "second", 2, 2)
        scheduler.start_driven(first)
        time.sleep(0.02)  # first is handing over now
        scheduler.start_driven(second)  # a session comes: the wait ends
        assert first.handed.wait(5) and second.done.wait(5)
        assert HandingOver.waited[1] < 0.15
    finally:
        scheduler.close()


def test_the_governor_hears_a_lockstep_steps_end_not_when_its_ended_sessions_were_answered(monkeypatch):
    from speculative.lockstep_runs import LockstepRuns
    from speculative.steps import PlainRun

    scheduler = VerifyScheduler(FakeRunner())
    heard: list[float] = []
    real = scheduler.governor.on_batch
    monkeypatch.setattr(scheduler.governor, "on_batch", lambda **kw: heard.append(kw["now"]) or real(**kw))

    class SlowToAnswer:  # a lone session whose end waits for its reply (``hand_over``)
        def step(self, result=None, error=None):
            time.sleep(0.1)
            return None

    try:
        runs = LockstepRuns(scheduler)
        run = runs.add((PlainRun(VerifyRequest("s", ()), 1), SlowToAnswer()))
        from speculative.llama_runs import RunEnd

        before = time.perf_counter()
        runs.between([RunEnd(run.key, [3], 2.0, 2.0)], 1, 2.0)
        after = time.perf_counter()
    finally:
        scheduler.close()
    assert heard and before <= heard[-1] < before + 0.05 and after - before >= 0.1
