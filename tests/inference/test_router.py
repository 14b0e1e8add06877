"""The router: requested tiers, the policy's preference, health, failover order and the degraded flag."""

from __future__ import annotations

import pytest

from inference.engines import ModelEntry, TrivialEngine
from inference.errors import InvalidRequest, Overloaded
from inference.router import Policy, Route, decide, fail_over
from inference.signals import Signals
from tenants.tiers import Tier


class FakeCloud:
    """A cloud engine as the router sees it: which tenants it serves, and whether one of its upstreams is up."""

    def __init__(self, tenants: set[int], up: bool = True):
        self.tenants, self.up = tenants, up

    def allows(self, tenant_id):
        return tenant_id in self.tenants

    def available(self, tenant_id):
        return self.allows(tenant_id) and self.up


def entry(cloud=None, speculative=True, edge=True) -> ModelEntry:
    engine = TrivialEngine()
    return ModelEntry(
        name="m",
        speculative=engine if speculative else None,
        edge=engine if edge else None,
        verifier_version="v",
        draft_version="d",
        context_length=4096,
        tokenizer=engine.tokenizer,
        cloud=cloud,
    )


def test_without_a_difficulty_signal_the_policy_prefers_speculative_and_says_why():
    route = decide(entry())
    assert route == Route(Tier.SPECULATIVE, "default") and not route.degraded
    assert route.as_dict() == {
        "tier": "speculative",
        "reason": "default",
        "degraded": False,
        "policy_version": "builtin-2",
    }


def test_a_requested_tier_is_served_when_allowed():
    assert decide(entry(), Signals(requested_tier="edge")).tier is Tier.EDGE
    route = decide(entry(cloud=FakeCloud({1})), Signals(requested_tier="cloud"), tenant_id=1)
    assert (route.tier, route.reason, route.degraded) == (Tier.CLOUD, "requested", False)


def test_an_edge_route_the_client_chose_is_not_degraded():
    assert not decide(entry(), Signals(requested_tier="edge")).degraded


def test_a_tier_the_policy_refuses_is_a_400_naming_it():
    policy = Policy(allowed=frozenset({Tier.EDGE, Tier.SPECULATIVE}))
    with pytest.raises(InvalidRequest) as info:
        decide(entry(cloud=FakeCloud({1})), Signals(requested_tier="cloud"), policy, tenant_id=1)
    assert info.value.param == "tier" and "does not allow" in info.value.message
    with pytest.raises(InvalidRequest):
        decide(entry(), Signals(requested_tier="warp-drive"))


def test_a_cloud_upstream_of_another_tenant_is_not_served_to_this_one():
    with pytest.raises(InvalidRequest):
        decide(entry(cloud=FakeCloud({2})), Signals(requested_tier="cloud"), tenant_id=1)


def test_a_verifier_that_is_down_routes_to_the_edge_marked_degraded():
    e = entry()
    e.breaker(Tier.SPECULATIVE).trip("refused")
    route = decide(e)
    assert (route.tier, route.reason, route.chosen, route.degraded) == (
        Tier.EDGE,
        "verifier_down",
        Tier.SPECULATIVE,
        True,
    )


def test_a_requested_cloud_that_is_down_goes_to_the_next_tier_of_the_failover_order():
    route = decide(entry(cloud=FakeCloud({1}, up=False)), Signals(requested_tier="cloud"), tenant_id=1)
    assert (route.tier, route.reason, route.degraded) == (Tier.SPECULATIVE, "cloud_down", True)


def test_failover_skips_tiers_already_tried_and_ends_when_none_is_left():
    e = entry(cloud=FakeCloud({1}))
    route = Route(Tier.CLOUD, "requested")
    first = fail_over(e, route, 1)
    assert first is not None and first.tier is Tier.SPECULATIVE and first.chosen is Tier.CLOUD
    second = fail_over(e, first, 1, tried=frozenset({Tier.CLOUD, Tier.SPECULATIVE}))
    assert second is not None and second.tier is Tier.EDGE and second.reason == "verifier_down"
    assert fail_over(e, second, 1, tried=frozenset(Tier)) is None


def test_no_tier_at_all_is_a_503():
    e = entry(edge=False)
    e.breaker(Tier.SPECULATIVE).trip("refused")
    with pytest.raises(Overloaded):
        decide(e)


# the policy's signals, in precedence order ---------------------------------------------------------------
BOTH = FakeCloud({1})


def signals(**kwargs) -> Signals:
    return Signals(**{"prompt_tokens": 10, "max_tokens": 64, **kwargs})


@pytest.mark.parametrize(
    ("difficulty", "tier"),
    [("routine", Tier.EDGE), ("hard_open", Tier.SPECULATIVE), ("hard_frontier", Tier.CLOUD)],
)
def test_difficulty_sends_each_prompt_to_the_cheapest_tier_that_handles_it(difficulty, tier):
    route = decide(entry(cloud=BOTH), signals(difficulty=difficulty), tenant_id=1)
    assert (route.tier, route.reason) == (tier, difficulty)
    assert route.signals["difficulty"] == difficulty


def test_pii_keeps_a_frontier_prompt_off_the_cloud_and_says_so():
    route = decide(entry(cloud=BOTH), signals(difficulty="hard_frontier", pii_kinds=("EMAIL",)), tenant_id=1)
    assert (route.tier, route.reason, route.redact) == (Tier.SPECULATIVE, "pii", False)
    assert route.signals["pii"] == ["EMAIL"]
    routine = decide(entry(cloud=BOTH), signals(difficulty="routine", pii_kinds=("EMAIL",)), tenant_id=1)
    assert routine.tier is Tier.EDGE


def test_pii_under_redact_then_cloud_goes_to_the_cloud_redacted():
    policy = Policy(pii_action="redact_then_cloud")
    route = decide(entry(cloud=BOTH), signals(difficulty="hard_frontier", pii_kinds=("PHONE",)), policy, tenant_id=1)
    assert (route.tier, route.redact) == (Tier.CLOUD, True)


def test_pii_under_refuse_is_a_400_naming_the_kinds():
    with pytest.raises(InvalidRequest) as info:
        decide(entry(cloud=BOTH), signals(pii_kinds=("CREDIT_CARD",)), Policy(pii_action="refuse"), tenant_id=1)
    assert info.value.code == "pii_detected" and "CREDIT_CARD" in info.value.message


def test_a_cloud_request_for_a_prompt_with_pii_is_refused_rather_than_sent():
    with pytest.raises(InvalidRequest) as info:
        decide(entry(cloud=BOTH), signals(requested_tier="cloud", pii_kinds=("IBAN",)), tenant_id=1)
    assert info.value.param == "tier" and info.value.code == "pii_detected"


def test_a_requested_tier_outranks_difficulty():
    route = decide(entry(cloud=BOTH), signals(requested_tier="edge", difficulty="hard_frontier"), tenant_id=1)
    assert (route.tier, route.reason) == (Tier.EDGE, "requested")


def test_a_long_answer_or_prompt_skips_the_edge():
    policy = Policy(edge_max_output_tokens=100, edge_max_prompt_tokens=200)
    long_out = decide(entry(), signals(difficulty="routine", max_tokens=101), policy)
    long_in = decide(entry(), signals(difficulty="routine", prompt_tokens=201), policy)
    assert (long_out.tier, long_out.reason) == (Tier.SPECULATIVE, "long_output")
    assert (long_in.tier, long_in.reason) == (Tier.SPECULATIVE, "long_prompt")


def test_a_saturated_edge_spills_interactive_requests_up_and_lets_batch_ones_wait():
    e = entry()
    for _ in range(2):
        e.enter(Tier.EDGE)
    policy = Policy(edge_max_streams=2)
    interactive = decide(e, signals(difficulty="routine"), policy)
    batch = decide(e, signals(difficulty="routine", latency_class="batch"), policy)
    assert (interactive.tier, interactive.reason) == (Tier.SPECULATIVE, "edge_saturated")
    assert batch.tier is Tier.EDGE


def test_allowed_tiers_come_first():
    policy = Policy(allowed=frozenset({Tier.EDGE, Tier.SPECULATIVE}))
    route = decide(entry(cloud=BOTH), signals(difficulty="hard_frontier"), policy, tenant_id=1)
    assert route.tier is Tier.SPECULATIVE


def test_failover_never_takes_pii_to_the_cloud():
    e = entry(cloud=BOTH)
    route = Route(Tier.SPECULATIVE, "pii", signals={"pii": ["EMAIL"]})
    first = fail_over(e, route, 1)
    assert first is not None and first.tier is Tier.EDGE
    assert fail_over(e, first, 1, tried=frozenset({Tier.SPECULATIVE, Tier.EDGE})) is None


def test_a_request_for_logprobs_goes_to_the_cloud_which_relays_its_upstreams():
    route = decide(entry(cloud=BOTH), signals(difficulty="hard_frontier", logprobs=True), tenant_id=1)
    assert route.tier is Tier.CLOUD
    route = decide(entry(cloud=BOTH), signals(requested_tier="cloud", logprobs=True), tenant_id=1)
    assert (route.tier, route.reason) == (Tier.CLOUD, "requested")


def test_a_redacted_prompts_logprobs_stay_off_the_cloud_which_would_name_placeholder_tokens():
    policy = Policy(pii_action="redact_then_cloud")
    hard = signals(difficulty="hard_frontier", pii_kinds=("EMAIL",), logprobs=True)
    route = decide(entry(cloud=BOTH), hard, policy, tenant_id=1)
    assert route.tier is Tier.SPECULATIVE and not route.redact
    with pytest.raises(InvalidRequest) as info:
        decide(entry(cloud=BOTH), signals(requested_tier="cloud", pii_kinds=("EMAIL",), logprobs=True), policy, 1)
    assert info.value.param == "logprobs"
    down = Route(Tier.SPECULATIVE, "hard_frontier", signals={"pii": ["EMAIL"], "logprobs": True})
    assert fail_over(entry(cloud=BOTH), down, 1, policy, tried=frozenset({Tier.SPECULATIVE, Tier.EDGE})) is None
    without_logprobs = Route(Tier.SPECULATIVE, "hard_frontier", signals={"pii": ["EMAIL"]})
    taken = fail_over(entry(cloud=BOTH), without_logprobs, 1, policy, tried=frozenset({Tier.SPECULATIVE, Tier.EDGE}))
    assert taken is not None and (taken.tier, taken.redact) == (Tier.CLOUD, True)


def test_a_prompt_never_scanned_for_pii_never_goes_to_the_cloud():
    unscanned = signals(difficulty="hard_frontier", pii_scanned=False)
    route = decide(entry(cloud=BOTH), unscanned, tenant_id=1)
    assert route.tier is Tier.SPECULATIVE and route.signals["pii_unscanned"]
    assert fail_over(entry(cloud=BOTH), route, 1, tried=frozenset({Tier.SPECULATIVE, Tier.EDGE})) is None
