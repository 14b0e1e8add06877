"""The adaptive draft length: k follows acceptance, draft cost and the network."""

from __future__ import annotations

import pytest

from speculative.batch_cost import BatchCostModel
from speculative.controller import (
    PRIOR_SEED_WEIGHT,
    PROBE_EVERY,
    STEADY_CATCH_UP,
    ControllerPrior,
    ControllerPriors,
    DraftLengthController,
    best_k,
    expected_tokens,
    load_bucket,
)
from speculative.governor import (
    EPOCH_BATCHES,
    EPOCH_MIN_BATCHES,
    EPOCH_MIN_S,
    GOVERNOR_CAPS,
    LONE_EPOCH_MIN_S,
    LONE_ROUNDS_MIN,
    LONE_ROUNDS_TTL_S,
    SpeculationGovernor,
)


def test_expected_tokens_follows_the_geometric_formula():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_a_slower_link_makes_longer_drafts_pay():
    args = dict(a=0.8, t_draft=0.3, t_verify_0=10.0, t_verify_slope=0.5, k_max=16)
    k_fast = best_k(rtt=0.0, **args)
    k_slow = best_k(rtt=80.0, **args)
    assert k_slow > k_fast >= 1


def test_a_round_that_measured_no_cost_at_all_still_gets_a_k():
    # a fast local verifier whose fitted cost line clamped to zero, with no network: the
    # rate of k = 0 must not divide by zero (it once raised inside a completion)
    assert best_k(a=0.7, t_draft=0.0, rtt=0.0, t_verify_0=0.0, t_verify_slope=0.0, k_max=8) == 8


def test_poor_agreement_falls_back_to_plain_decoding():
    assert best_k(a=0.05, t_draft=2.0, rtt=0.0, t_verify_0=10.0, t_verify_slope=1.0, k_max=16) == 0


def test_a_drafting_rounds_fixed_cost_makes_short_drafts_dear():
    # the demo pair on llama.cpp: a 1-token draft costs about a whole verify step, so drafting
    # does not pay although most draft tokens are accepted; priced per token alone it looked cheap
    args = dict(a=0.8, rtt=0.0, t_verify_0=0.9, t_verify_slope=0.1, k_max=8)
    assert best_k(t_draft=0.3, **args) > 0
    assert best_k(t_draft=0.25, t_round=1.8, **args) == 0


def test_the_draft_cost_line_separates_a_rounds_fixed_cost_from_its_tokens():
    controller = DraftLengthController()
    for k, draft_ms in ((4, 2.8), (2, 2.3), (4, 2.8), (2, 2.3)):
        controller.record(k=k, n_matches=k, draft_ms=draft_ms, verify_ms=1.0 + 0.3 * k, network_ms=0.0)
    t_round, t_token = controller._draft_line()
    assert t_round == pytest.approx(1.8, abs=0.05) and t_token == pytest.approx(0.25, abs=0.02)


def test_a_round_that_first_caught_up_on_many_tokens_does_not_price_drafting():
    # a session's first round evaluates its prompt in the draft, a round after plain decoding every
    # token since: a one-off, not what each drafted token costs from then on
    controller = DraftLengthController()
    controller.record(k=4, n_matches=4, draft_ms=4.0, verify_ms=1.5, network_ms=0.0, caught_up=40)
    assert controller.t_draft is None and not controller.draft_by_k  # not priced
    assert controller.acceptance > 0.6  # but its agreement counts
    assert controller.next_k() == 4  # still nothing measured: the first guess again
    controller.record(k=4, n_matches=3, draft_ms=0.8, verify_ms=1.5, network_ms=0.0, caught_up=STEADY_CATCH_UP)
    assert controller.t_draft == pytest.approx(0.2) and controller.draft_by_k == {4: 0.8}


def test_a_rounds_own_overhead_makes_fewer_longer_rounds_pay():
    # the demo pair on llama.cpp as measured: verify 0.43 + 0.2 ms a position, drafting 0.13 + 0.16
    # ms a token, 0.9 agreement; and 0.13 ms a round of delivering tokens and scheduling
    def settled(overhead_ms: float | None) -> int:
        controller = DraftLengthController(accepted=9.0, tried=10.0)
        for k in (2, 4):
            controller.record(
                k=k,
                n_matches=k,
                draft_ms=0.13 + 0.16 * k,
                verify_ms=0.63 + 0.2 * k,
                network_ms=0.0,
                overhead_ms=overhead_ms,
            )
        controller.accepted, controller.tried = 9.0, 10.0
        return controller.next_k((0.43, 0.2))

    assert settled(None) < settled(2.0)
    assert settled(0.13) > 0  # with this pair, drafting pays


def test_one_rejection_does_not_stop_a_session_drafting():
    # at an agreement of 0.9 a first-position rejection comes every few rounds; the estimate holds
    controller = DraftLengthController(accepted=0.9 * PRIOR_SEED_WEIGHT, tried=PRIOR_SEED_WEIGHT)
    controller.record(k=4, n_matches=2, draft_ms=0.77, verify_ms=1.43, network_ms=0.0)
    controller.record(k=4, n_matches=0, draft_ms=0.77, verify_ms=1.43, network_ms=0.0, overhead_ms=0.13)
    assert controller.acceptance > 0.75
    assert controller.next_k((0.43, 0.2)) > 0


def test_a_new_session_starts_from_what_the_engines_finished_sessions_measured():
    prior = ControllerPrior()
    assert DraftLengthController.starting_from(prior).next_k() == 4  # nothing measured anywhere: the first guess
    finished = DraftLengthController()
    for k, draft_ms in ((4, 2.9), (2, 2.3)) * 4:  # drafting costs almost a verify step, whatever k
        finished.record(k=k, n_matches=k - 1, draft_ms=draft_ms, verify_ms=0.9 + 0.7 * k, network_ms=0.0)
    prior.fold(finished)
    fresh = DraftLengthController.starting_from(prior)
    assert fresh.next_k() == 0  # its first round already knows drafting does not pay here
    # but it holds that as PRIOR_SEED_WEIGHT pseudo-counts: a few rounds of its own outweigh it
    assert fresh.tried <= PRIOR_SEED_WEIGHT + 1e-9
    finished._probe_every = 4 * PROBE_EVERY  # its probes kept failing
    prior.fold(finished)
    assert DraftLengthController.starting_from(prior)._probe_every == 4 * PROBE_EVERY  # so the next one probes rarely
    pinned = DraftLengthController(fixed_k=3)
    pinned.record(k=3, n_matches=3, draft_ms=0.1, verify_ms=1.0, network_ms=0.0)
    prior.fold(pinned)  # a pinned k's session teaches nothing
    assert DraftLengthController.starting_from(prior).next_k() == 0


def _measured_prior(t_draft: float, accepted: float = 0.9) -> ControllerPrior:
    finished = DraftLengthController(accepted=accepted * 10, tried=10.0)
    for _ in range(4):
        finished.record(k=4, n_matches=3, draft_ms=4 * t_draft, verify_ms=1.5, network_ms=0.0, overhead_ms=0.1)
    prior = ControllerPrior()
    prior.fold(finished)
    return prior


def test_priors_are_kept_per_concurrency_level():
    priors = ControllerPriors()
    assert priors.at(15) is priors.at(16) is priors.at(12)  # the governor's levels
    assert priors.at(1) is not priors.at(16) and priors.at(0) is priors.at(1)


def test_a_session_moving_to_another_load_takes_that_loads_costs_and_keeps_its_acceptance():
    # in a batch of 16 a lockstep draft round cost 0.66 ms a drafted token on the demo pair, alone 0.2:
    # a lone session that started from the batch's costs never drafted
    busy = _measured_prior(t_draft=0.66)
    controller = DraftLengthController.starting_from(busy)
    controller.record(k=4, n_matches=4, draft_ms=2.6, verify_ms=1.5, network_ms=0.0)
    acceptance = controller.acceptance
    controller.rebase(ControllerPrior())  # a level nothing was measured at yet: its costs are measured afresh
    assert controller.t_draft is None and controller.draft_by_k == {} and controller.verify_by_k == {}
    assert controller.acceptance == acceptance  # the draft's agreement is no property of the load
    assert controller.next_k() == 4  # the first guess, which measures this level's costs
    alone = _measured_prior(t_draft=0.2)
    controller.rebase(alone)
    assert controller.t_draft == pytest.approx(alone.t_draft) and controller.draft_by_k == alone.draft_by_k


def _feed(controller: DraftLengthController, accept_all: bool, rounds: int) -> list[int]:
    ks = []
    for _ in range(rounds):
        k = controller.next_k()
        ks.append(k)
        controller.record(
            k=k, n_matches=k if accept_all else 0, draft_ms=0.5 * k, verify_ms=10.0 + 0.2 * k, network_ms=0.0
        )
    return ks


def test_controller_drops_to_zero_when_drafts_are_always_rejected_and_keeps_probing():
    controller = DraftLengthController()
    ks = _feed(controller, accept_all=False, rounds=80)
    tail = ks[-3 * PROBE_EVERY :]
    assert tail.count(0) >= len(tail) - 4  # mostly plain decoding
    assert any(k > 0 for k in tail)  # but it still probes


def test_probes_that_keep_failing_come_less_often():
    # where drafting does not pay, each probe is a drafting round lost: the gap between probes doubles
    controller = DraftLengthController()
    ks = _feed(controller, accept_all=False, rounds=400)
    settled = next(i for i, k in enumerate(ks) if k == 0)
    probes = [i for i, k in enumerate(ks) if k > 0 and i > settled]
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert len(gaps) >= 2 and gaps == sorted(gaps) and gaps[-1] >= 4 * PROBE_EVERY


def test_controller_grows_k_when_drafts_are_always_accepted():
    controller = DraftLengthController()
    ks = _feed(controller, accept_all=True, rounds=40)
    assert ks[-1] >= 8


def test_a_fixed_k_is_kept():
    controller = DraftLengthController(fixed_k=3)
    assert _feed(controller, accept_all=False, rounds=5) == [3] * 5


def _drive_governor(governor: SpeculationGovernor, rate_of_cap, epochs: int, active: int = 4) -> list[int]:
    """Feed batches whose token counts follow ``rate_of_cap``; return the cap of each epoch."""
    now, caps = 0.0, []
    for _ in range(epochs * EPOCH_BATCHES + 1):
        cap = governor.cap
        caps.append(cap)
        now += 0.01
        governor.on_batch(emitted=int(rate_of_cap(cap) * 0.01), active=active, now=now)
    return caps


def test_governor_falls_back_to_plain_decoding_when_speculation_is_slower():
    governor = SpeculationGovernor()
    caps = _drive_governor(governor, lambda cap: 1000 if cap == 0 else 600, epochs=200)
    late = caps[len(caps) // 2 :]
    assert late.count(0) / len(late) > 0.8
    assert set(late) != {0}  # it keeps re-measuring the others


def test_governor_keeps_long_drafts_when_they_pay():
    governor = SpeculationGovernor()
    caps = _drive_governor(governor, lambda cap: 300 + 50 * cap, epochs=80, active=2)
    late = caps[len(caps) // 2 :]
    assert late.count(max(caps)) / len(late) > 0.8


def test_governor_measures_each_concurrency_level_apart():
    governor = SpeculationGovernor()
    _drive_governor(governor, lambda cap: 1000 if cap == 0 else 600, epochs=30, active=16)
    _drive_governor(governor, lambda cap: 300 + 50 * cap, epochs=30, active=2)
    best = {
        load: max((c for (b, c) in governor.rates if b == load), key=lambda c: governor.rates[(load, c)])
        for load in (2, 16)
    }
    assert best == {16: 0, 2: max(c for (_, c) in governor.rates)}


def test_a_lone_session_is_capped_as_measured_too():
    # its controller's model of its own costs is not the whole story: on an AMD EPYC host one session of the
    # demo pair on llama.cpp decoded plainly at 1,048 tokens/s and drafted, uncapped, at 879
    governor = SpeculationGovernor()
    caps = _drive_governor(governor, lambda cap: 1000 if cap == 0 else 600, epochs=200, active=1)
    late = caps[len(caps) // 2 :]
    assert late.count(0) / len(late) > 0.8
    governor = SpeculationGovernor()
    caps = _drive_governor(governor, lambda cap: 300 + 50 * cap, epochs=80, active=1)
    late = caps[len(caps) // 2 :]
    assert late.count(max(caps)) / len(late) > 0.8


def _batches(governor: SpeculationGovernor, actives: list[int], emitted: int = 40, now: float = 0.0) -> float:
    for active in actives:
        now += 0.05
        governor.on_batch(emitted=emitted, active=active, now=now)
    return now


def test_an_epoch_cut_short_by_a_session_ending_is_still_scored():
    """A good draft ends completions in few rounds: sessions that started together end before a full epoch."""
    governor = SpeculationGovernor()
    cap = governor.cap
    _batches(governor, [16] * (EPOCH_MIN_BATCHES + 1) + [15])
    assert governor.rates[(16, cap)] == pytest.approx(40 / 0.05)
    assert governor._choose(16) != cap  # at 16 sessions, the next cap gets its turn


def test_an_epoch_cut_short_by_a_session_starting_is_dropped():
    """A joining session's prefill runs beside the batches: that is no property of the cap."""
    governor = SpeculationGovernor()
    _batches(governor, [8] * (EPOCH_MIN_BATCHES + 4) + [9])
    assert governor.rates == {}


def test_too_short_an_epoch_is_not_scored():
    governor = SpeculationGovernor()
    _batches(governor, [16] * (EPOCH_MIN_BATCHES - 1) + [15])
    assert governor.rates == {}


def test_sessions_leaving_keep_the_cap_until_the_lower_level_has_an_epoch():
    """The tail of a burst is too short to learn from, and should not go uncapped meanwhile."""
    governor = SpeculationGovernor()
    governor.rates = {(16, cap): 1000.0 + (500 if cap == 2 else 0) for cap in GOVERNOR_CAPS}
    governor._epochs = 1  # as if measured; not an exploring turn
    now = _batches(governor, [16] * 3)
    assert governor.cap == 2  # the best measured at 16 sessions
    now = _batches(governor, [8] * 3, now=now)  # half the sessions ended: a lower level, not yet measured
    assert governor.cap == 2
    _batches(governor, [8] * (EPOCH_BATCHES + 1), now=now)
    assert (8, 2) in governor.rates and governor.cap == GOVERNOR_CAPS[0]  # now 8 sessions try their own caps


def test_the_idle_time_between_bursts_is_scored_for_no_cap():
    governor = SpeculationGovernor()
    cap = governor.cap
    now = _batches(governor, [16] * (EPOCH_MIN_BATCHES + 2))  # a burst, all ending together
    governor.on_idle()  # they ended: the epoch so far is scored
    assert governor.rates[(16, cap)] == pytest.approx(40 / 0.05)
    _batches(governor, [16] * (EPOCH_BATCHES + 2), now=now + 5.0)  # the next burst, seconds later
    assert min(governor.rates.values()) == pytest.approx(40 / 0.05)  # not 12 batches over 5.6 s


def test_a_lone_sessions_epoch_spans_its_requests_not_the_idle_time_between_them():
    """A lone session's request is 35 ms on the demo pair: scored alone, each cap was measured on one prompt."""
    governor = SpeculationGovernor()
    first = governor.cap
    now = 0.0
    for _ in range(2):  # requests of five batches (their first, the first token, not counted), seconds apart
        now = _batches(governor, [1] * 5, now=now)
        governor.on_idle()
        now += 5.0
        assert governor.rates == {} and governor.cap == first
    _batches(governor, [1] * 5, now=now)  # the third request's fourth counted batch is the epoch's twelfth
    assert governor.rates == {(1, first): pytest.approx(40 / 0.05)}  # 12 batches over 0.6 s, not over 10.6
    assert governor.cap != first  # the next untried cap's turn


@pytest.mark.parametrize("active", [1, 4])
def test_a_lone_sessions_epoch_lasts_long_enough_to_span_several_prompts(active):
    """How well the draft agrees moves with the prompt: a lone session's epoch of a few requests was one prompt mix."""
    governor = SpeculationGovernor()
    first, step = governor.cap, EPOCH_MIN_S / (EPOCH_BATCHES - 1)  # EPOCH_BATCHES batches: past EPOCH_MIN_S
    now = 0.0
    for _ in range(EPOCH_BATCHES + 1):  # the first opens the epoch
        now += step
        governor.on_batch(emitted=4, active=active, now=now)
    if active > 1:
        assert (active, first) in governor.rates  # scored at EPOCH_MIN_S
        return
    assert governor.rates == {(1, first): pytest.approx(4 / step)}  # a cap's first epoch: EPOCH_MIN_S
    governor.cap = first  # (its next epoch under the same cap, measured before)
    for _ in range(EPOCH_BATCHES):
        now += step
        governor.on_batch(emitted=8, active=1, now=now)
    assert governor.rates == {(1, first): pytest.approx(4 / step)} and LONE_EPOCH_MIN_S > EPOCH_MIN_S
    while now < 2 * EPOCH_MIN_S + LONE_EPOCH_MIN_S:
        now += step
        governor.on_batch(emitted=8, active=1, now=now)
    assert governor.rates[(1, first)] > 4 / step  # scored past LONE_EPOCH_MIN_S


def test_a_lone_sessions_paused_epoch_is_scored_if_long_enough_when_a_burst_comes_instead():
    governor = SpeculationGovernor()
    first = governor.cap
    now = _batches(governor, [1] * (EPOCH_MIN_BATCHES + 1))
    governor.on_idle()
    assert governor.rates == {}
    _batches(governor, [16] * 2, now=now + 5.0)
    assert governor.rates == {(1, first): pytest.approx(40 / 0.05)}


def _after_a_burst(lone_best: int) -> tuple[SpeculationGovernor, float]:
    """A governor that measured 16 sessions (cap 0 best) and one (``lone_best`` best), three batches into a burst."""
    governor = SpeculationGovernor()
    governor.rates = {(16, cap): 1000.0 + (500 if cap == 0 else 0) for cap in GOVERNOR_CAPS}
    governor.rates |= {(1, cap): 1000.0 + (500 if cap == lone_best else 0) for cap in GOVERNOR_CAPS}
    governor._epochs = 1  # as if measured; not an exploring turn
    return governor, _batches(governor, [16] * 3)


def test_a_lone_session_after_a_burst_takes_its_own_levels_cap():
    """A burst at 16 left cap 0 on, and the lone sessions that came after it ran plain."""
    governor, now = _after_a_burst(lone_best=4)
    assert governor.cap == 0
    now = _batches(governor, [1], now=now)  # the burst's tail: one session left, its level measured
    assert governor.cap == 4
    governor.on_idle()
    del governor.rates[(1, 2)]
    _batches(governor, [1], now=now + 5.0)  # one after it, where its level has a cap untried: that one
    assert governor.cap == 2


def test_sessions_leaving_to_a_measured_level_take_its_best_cap_at_once():
    governor = SpeculationGovernor()
    governor.rates = {(b, cap): 1000.0 + (500 if cap == b // 4 else 0) for cap in GOVERNOR_CAPS for b in (8, 16)}
    governor._epochs = 1
    now = _batches(governor, [16] * 3)
    assert governor.cap == 4
    _batches(governor, [8], now=now)
    assert governor.cap == 2


@pytest.mark.parametrize("active, bucket", [(0, 1), (1, 1), (3, 4), (11, 8), (12, 16), (15, 16), (16, 16), (40, 32)])
def test_a_load_is_measured_at_its_nearest_level_in_ratio(active, bucket):
    # 16 sessions where one just ended are 16's load: with "the largest level at most active" they
    # counted as 8's, and a closed loop of 16 flipped between the two levels at every completion
    assert load_bucket(active) == bucket


def test_a_short_lucky_epoch_weighs_what_its_seconds_do():
    governor = SpeculationGovernor()

    def epoch(tokens: int, seconds: float) -> None:
        governor._start, governor._tokens, governor._bucket = 0.0, tokens, 16
        governor._score(seconds)

    epoch(800, 1.0)  # 800 tokens/s over a second
    epoch(75, 0.025)  # then 25 ms at 3,000 tokens/s (an epoch cut short)
    assert governor.rates[(16, governor.cap)] == pytest.approx((0.85 * 800 + 75) / (0.85 + 0.025))  # ~863, not 1,460


def test_leaving_k_to_the_controllers_gets_no_preference_over_a_better_cap():
    governor = SpeculationGovernor()
    governor.rates = {(16, cap): 1000.0 if cap == 0 else 950.0 for cap in GOVERNOR_CAPS}
    governor._epochs = 1  # not an exploring turn
    assert governor._choose(16) == 0


def _costs(lone_ms: float, *steps: tuple[int, float]) -> BatchCostModel:
    """A cost model that saw a few lone steps of ``lone_ms`` (and a slow first one), then ``steps`` (size, ms)."""
    cost = BatchCostModel(window=16)
    for ms in (2.5 * lone_ms, lone_ms, lone_ms * 1.1, lone_ms, lone_ms * 1.2):  # the first after idle is slow
        cost.record(1, ms)
    for size, ms in steps:
        for _ in range(5):
            cost.record(size, ms)
    return cost


def test_the_cost_model_keeps_the_fastest_lone_step_and_the_median_step_near_a_size():
    cost = _costs(0.65, (15, 4.4), (16, 4.6), (17, 9.0), (32, 10.6))
    assert cost.lone_ms() == 0.65  # kept though the window (16 batches) moved past the lone ones
    assert cost.step_ms(16) == 4.6  # batches of 13 to 20 positions: 15, 16 and 17
    assert cost.step_ms(4) is None  # too few near it
    assert BatchCostModel().lone_ms() is None


def test_the_governor_measures_only_plain_decoding_where_no_draft_could_pay():
    # the demo pair on llama.cpp, two threads: a lone step 0.65 ms, 16 sessions' 4.6 ms, 4 sessions' 1.3 ms
    cpu = _costs(0.65, (4, 1.3), (16, 4.6))
    governor = SpeculationGovernor(cpu)
    caps = _drive_governor(governor, lambda cap: 1000, epochs=40, active=16)
    assert set(caps[EPOCH_BATCHES:]) == {0}  # no epoch on a drafting cap, so no session probes there
    assert {cap for (bucket, cap) in governor.rates if bucket == 16} == {0}
    caps = _drive_governor(governor, lambda cap: 1000 if cap == 0 else 1200, epochs=40, active=4)
    assert len(set(caps)) > 1  # at 4 sessions a draft might pay: measured
    # a GPU: a step costs nearly the same for 1 position or 16, and drafting is measured at every load
    gpu = SpeculationGovernor(_costs(20.0, (16, 21.0)))
    caps = _drive_governor(gpu, lambda cap: 1000, epochs=40, active=16)
    assert len(set(caps)) > 1
    # without a lone step measured, nothing is ruled out
    blind = SpeculationGovernor(_costs(0.65, (16, 4.6)))
    blind._cost._lone.clear()  # type: ignore[union-attr]
    assert len(set(_drive_governor(blind, lambda cap: 1000, epochs=40, active=16))) > 1


def test_a_lone_session_measures_only_plain_decoding_where_no_draft_could_pay():
    # the demo pair on llama.cpp, two threads: a lone step 0.5 ms, a drafted token ~0.57 ms more (its verify
    # position and its draft step), so even drafts agreeing 95% of the time gain nothing alone
    cpu = SpeculationGovernor(_costs(0.5))
    for k in (1, 2, 4) * 3:
        cpu.on_lone_round(k, 0.5 + 0.57 * k, now=0.0)
    caps = _drive_governor(cpu, lambda cap: 1000, epochs=40, active=1)
    assert set(caps[EPOCH_BATCHES:]) == {0}
    assert {cap for (bucket, cap) in cpu.rates if bucket == 1} == {0}
    assert not cpu._hopeless(16)  # another load is judged on its own steps (none measured here)
    # rounds that old are priced afresh: drafting is measured again until a request's rounds re-judge it
    _drive_governor(cpu, lambda cap: 1000, epochs=int(LONE_ROUNDS_TTL_S / 0.12) + 2, active=1)
    assert not cpu._hopeless(1) and not cpu._lone_rounds
    for k in (1, 2, 4) * 3:
        cpu.on_lone_round(k, 0.5 + 0.57 * k, now=cpu._last)
    assert cpu._hopeless(1)
    # a GPU: a lone step 20 ms, a drafted token 1 ms more: drafting is measured
    gpu = SpeculationGovernor(_costs(20.0))
    for k in (1, 2, 4) * 3:
        gpu.on_lone_round(k, 22.0 + 1.0 * k, now=0.0)
    assert len(set(_drive_governor(gpu, lambda cap: 1000, epochs=40, active=1))) > 1
    # too few rounds seen, or no lone step measured: nothing is ruled out
    few = SpeculationGovernor(_costs(0.5))
    for k in (1, 2, 4):
        few.on_lone_round(k, 0.5 + 0.57 * k, now=0.0)
    assert len(set(_drive_governor(few, lambda cap: 1000, epochs=40, active=1))) > 1
    blind = SpeculationGovernor(BatchCostModel())
    for k in (1, 2, 4) * 3:
        blind.on_lone_round(k, 0.5 + 0.57 * k, now=0.0)
    assert not blind._hopeless(1)


def test_the_cost_model_tells_a_lone_step_as_it_typically_runs():
    cost = _costs(0.65)  # 1.625, 0.65, 0.715, 0.65, 0.78
    assert cost.lone_typical_ms() == pytest.approx(0.715) and cost.lone_ms() == 0.65
    assert BatchCostModel().lone_typical_ms() is None


def test_a_load_between_measured_ones_is_judged_on_their_steps_and_the_drafts():
    # 16 clients: steps of 16 measured, the loads a wave's tail passes through (8, 4, 2) not
    steps = _costs(0.65, (16, 4.6))
    assert SpeculationGovernor(steps)._step_ms(8) == pytest.approx(0.65 + (4.6 - 0.65) / 15 * 7)
    # priced on positions alone, a draft agreeing 95% of the time might pay at 8 sessions: measured
    governor = SpeculationGovernor(steps, BatchCostModel())
    assert governor._hopeless(16) and not governor._hopeless(8)
    # with its lockstep draft steps measured (0.5 ms a drafted token for 8 sessions) it cannot
    drafts = BatchCostModel()
    for _ in range(5):
        drafts.record(8, 0.5)
    governor = SpeculationGovernor(steps, drafts)
    assert governor._hopeless(8)
    caps = _drive_governor(governor, lambda cap: 1000, epochs=40, active=8)
    assert set(caps[EPOCH_BATCHES:]) == {0}
    # nothing measured at any load but alone: nothing ruled out
    assert not SpeculationGovernor(_costs(0.65), drafts)._hopeless(8)


def test_a_lone_sessions_hopeless_verdict_holds_for_its_rounds_while_the_step_it_was_priced_on_moves():
    # SmolLM2 and its draft on 2 cores: one-token rounds 15.5 ms; beside a 7.3 ms step drafting is hopeless,
    # beside a 9.1 ms one (the host loaded) drafts agreeing 95% would gain 14%
    smol = SpeculationGovernor(_costs(7.3))
    for _ in range(LONE_ROUNDS_MIN):
        smol.on_lone_round(1, 15.5, now=0.0)
    assert smol._hopeless(1)
    for _ in range(16):  # the lone step as the cost model now typically sees it
        smol._cost.record(1, 9.1)  # type: ignore[union-attr]
    assert smol._hopeless(1)  # judged on these rounds: it holds
    caps = _drive_governor(smol, lambda cap: 12_000 if cap == 0 else 5_000, epochs=100, active=1)
    assert set(caps[EPOCH_BATCHES:]) == {0}
    # the same rounds, never judged hopeless before the step moved: priced afresh, drafting is measured
    fresh = SpeculationGovernor(_costs(9.1))
    for _ in range(LONE_ROUNDS_MIN):
        fresh.on_lone_round(1, 15.5, now=0.0)
    assert not fresh._hopeless(1)
    # past the rounds' time to live the verdict goes with them
    _drive_governor(smol, lambda cap: 12_000, epochs=int(LONE_ROUNDS_TTL_S / 0.12) + 2, active=1)
    assert not smol._hopeless(1) and not smol._lone_rounds
    # new rounds are judged afresh
    for _ in range(LONE_ROUNDS_MIN):
        smol.on_lone_round(1, 15.5, now=smol._last)
    assert not smol._hopeless(1)  # priced on the 9.1 ms step now


def test_a_lone_sessions_measured_drafting_rates_overrule_a_hopeless_verdict():
    """Rounds measured cold (after a burst, or another server on the cores) judged drafting hopeless for good."""
    governor = SpeculationGovernor(_costs(0.5))
    for k in (1, 2, 4) * 3:
        governor.on_lone_round(k, 0.5 + 0.57 * k, now=0.0)
    assert governor._hopeless(1)
    governor.rates = {(1, 0): 1500.0, (1, 1): 1500.0 * 1.04}  # within noise of plain decoding: the verdict holds
    assert governor._hopeless(1)
    governor.rates[(1, 1)] = 1500.0 * 1.2  # what a cap of 1 made, measured
    assert not governor._hopeless(1) and governor._arms(1) == GOVERNOR_CAPS
    governor.rates[(16, 2)] = 9000.0  # another load's rates say nothing of a lone session
    governor.rates[(1, 1)] = 1500.0
    assert governor._hopeless(1)


def test_a_session_opening_takes_the_cap_its_load_will_take():
    """A whole answer's first round is its only one: the cap left by another load ran it (a burst's 0, alone)."""
    governor, now = _after_a_burst(lone_best=1)
    assert governor.cap == 0 and governor.cap_for(16) == 0
    assert governor.cap_for(8) == 0  # sessions leaving keep the burst's cap
    governor.on_idle()
    assert governor.cap == 0 and governor.cap_for(1) == 1  # alone after the burst: the lone level's best
    assert governor.cap_for(16) == 0
    now = _batches(governor, [1] * (EPOCH_MIN_BATCHES + 1), now=now + 1.0)
    assert governor.cap == 1
    governor.cap = 4  # (an exploring epoch's cap) paused between two lone requests: the next goes on under it
    governor.on_idle()
    assert governor.cap_for(1) == 4
    assert governor.cap_for(16) == 0  # a burst instead: its own level's
