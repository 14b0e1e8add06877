"""The router: requested tiers, the policy's preference, health, failover order and the degraded flag."""

from __future__ import annotations

import pytest

from inference.engines import ModelEntry, TrivialEngine
from inference.errors import InvalidRequest, Overloaded
from inference.router import Route, RoutingPolicy, decide, fail_over
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


def test_the_builtin_policy_prefers_speculative_and_says_why():
    route = decide(entry())
    assert route == Route(Tier.SPECULATIVE, "default") and not route.degraded
    assert route.as_dict() == {
        "tier": "speculative",
        "reason": "default",
        "degraded": False,
        "policy_version": "builtin-2",
    }


def test_a_requested_tier_is_served_when_allowed():
    assert decide(entry(), "edge").tier is Tier.EDGE
    route = decide(entry(cloud=FakeCloud({1})), "cloud", tenant_id=1)
    assert (route.tier, route.reason, route.degraded) == (Tier.CLOUD, "requested", False)


def test_an_edge_route_the_client_chose_is_not_degraded():
    assert not decide(entry(), "edge").degraded


def test_a_tier_the_policy_refuses_is_a_400_naming_it():
    policy = RoutingPolicy(allowed=frozenset({Tier.EDGE, Tier.SPECULATIVE}))
    with pytest.raises(InvalidRequest) as info:
        decide(entry(cloud=FakeCloud({1})), "cloud", tenant_id=1, policy=policy)
    assert info.value.param == "tier" and "does not allow" in info.value.message
    with pytest.raises(InvalidRequest):
        decide(entry(), "warp-drive")


def test_a_cloud_upstream_of_another_tenant_is_not_served_to_this_one():
    with pytest.raises(InvalidRequest):
        decide(entry(cloud=FakeCloud({2})), "cloud", tenant_id=1)


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
    route = decide(entry(cloud=FakeCloud({1}, up=False)), "cloud", tenant_id=1)
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
