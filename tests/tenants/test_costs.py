"""The one cost function, the worst case it bounds, and the settlement that stays within it."""

from __future__ import annotations

import logging
import uuid
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speculative.types import MAX_DRAFT_TOKENS as SPECULATIVE_MAX_DRAFT_TOKENS
from tenants import errors, services
from tenants.models import Budget, Price
from tenants.tiers import TIER_VALUES
from tests.tenants.factories import usage_for

SPECULATIVE = Price(
    model="m",
    tier="speculative",
    prompt_per_mtok=Decimal("0.50"),
    completion_per_mtok=Decimal("1.50"),
    draft_per_mtok=Decimal("0.02"),
    gpu_per_hour=Decimal("2.40"),
    max_gpu_ms_per_token=Decimal("5"),
)


def _price(tier: str, **rates: str) -> Price:
    defaults = {"prompt_per_mtok": "0", "completion_per_mtok": "0", "draft_per_mtok": "0", "gpu_per_hour": "0"}
    defaults.update(rates)
    return Price(
        model="m", tier=tier, max_gpu_ms_per_token=Decimal("5"), **{k: Decimal(v) for k, v in defaults.items()}
    )


def test_speculative_cost_splits_drafts_to_edge_and_tokens_and_gpu_to_verifier():
    cost = services.cost_compute(
        price=SPECULATIVE, prompt_tokens=1000, completion_tokens=200, drafted_tokens=Decimal(800), gpu_ms=Decimal(1500)
    )
    # tokens (1000 * 0.50 + 200 * 1.50) / 1e6 = 0.0008; GPU 1500 ms * 2.40 / 3.6e6 = 0.001; drafts 800 * 0.02 / 1e6
    assert cost == services.CostBreakdown(edge=Decimal("0.000016"), verifier=Decimal("0.0018"), cloud=Decimal(0))
    assert cost.total == Decimal("0.001816")


@pytest.mark.parametrize(("tier", "bucket"), [("edge", "edge"), ("speculative", "verifier"), ("cloud", "cloud")])
def test_token_charges_go_to_the_tiers_own_bucket(tier, bucket):
    price = _price(tier, prompt_per_mtok="3", completion_per_mtok="15")
    cost = services.cost_compute(
        price=price, prompt_tokens=1000, completion_tokens=100, drafted_tokens=Decimal(0), gpu_ms=Decimal(0)
    )
    assert getattr(cost, bucket) == Decimal("0.0045")  # (3000 + 1500) / 1e6
    assert cost.total == Decimal("0.0045")


def test_each_bucket_is_rounded_half_up_to_a_nano_unit():
    price = _price("cloud", prompt_per_mtok="0.0005", gpu_per_hour="2.40")
    # prompt: 1 * 0.0005 / 1e6 = 5e-10, exactly half a nano-unit: half-up gives 1e-9 (half-even would give 0)
    # GPU: 1 ms * 2.40 / 3.6e6 = 6.666...e-7 -> 0.000000667
    cost = services.cost_compute(
        price=price, prompt_tokens=1, completion_tokens=0, drafted_tokens=Decimal(0), gpu_ms=Decimal(1)
    )
    assert cost.cloud == Decimal("0.000000001")
    assert cost.verifier == Decimal("0.000000667")
    assert cost.total == Decimal("0.000000668")


def test_costs_are_decimals_with_nine_places():
    cost = services.cost_compute(
        price=SPECULATIVE, prompt_tokens=7, completion_tokens=3, drafted_tokens=Decimal("2.5"), gpu_ms=Decimal("0.3")
    )
    for amount in (cost.edge, cost.verifier, cost.cloud, cost.total):
        assert isinstance(amount, Decimal)
        assert amount == amount.quantize(services.MONEY_QUANTUM)


def test_float_counts_are_refused():
    with pytest.raises(errors.InvalidInput, match="drafted_tokens"):
        services.cost_compute(price=SPECULATIVE, prompt_tokens=1, completion_tokens=1, drafted_tokens=1.5, gpu_ms=0)


def test_estimate_max_is_the_cost_of_the_worst_case_counts():
    # completion 100, drafted 16 * 100 = 1600, GPU 5 ms * (1000 + 100) = 5500 ms
    # verifier: (500 + 150) / 1e6 + 5500 * 2.40 / 3.6e6 = 0.00065 + 0.0036666... = 0.004316667 (one rounding)
    # edge: 1600 * 0.02 / 1e6 = 0.000032
    amount = services.cost_estimate_max(price=SPECULATIVE, prompt_tokens=1000, max_tokens=100)
    assert amount == Decimal("0.004348667")


def test_max_draft_tokens_mirrors_the_speculative_core():
    assert services.MAX_DRAFT_TOKENS == SPECULATIVE_MAX_DRAFT_TOKENS


def test_settlement_charges_gpu_time_capped_per_token():
    usage = usage_for(prompt_tokens=10, completion_tokens=10, drafted_tokens=Decimal(0), gpu_ms=Decimal(100_000))
    cost = services.usage_cost(price=SPECULATIVE, usage=usage)
    # capped at 5 ms * 20 tokens = 100 ms: 100 * 2.40 / 3.6e6 = 0.0000666... plus tokens (5 + 15) / 1e6
    assert cost.verifier == Decimal("0.000086667")


def test_capping_a_cost_keeps_its_buckets_adding_up():
    cost = services.CostBreakdown(edge=Decimal("0.000000007"), verifier=Decimal("0.000000011"), cloud=Decimal(0))
    capped = cost.capped_at(Decimal("0.000000010"))
    assert capped.total == Decimal("0.000000010")
    assert capped.edge + capped.verifier + capped.cloud == capped.total
    assert cost.capped_at(Decimal(1)) is cost


def _rate(max_units: int):
    return st.integers(min_value=0, max_value=max_units).map(lambda n: Decimal(n).scaleb(-9))


prices = st.builds(
    Price,
    model=st.just("m"),
    tier=st.sampled_from(TIER_VALUES),
    prompt_per_mtok=_rate(10**12),  # up to 1000 per million tokens
    completion_per_mtok=_rate(10**12),
    draft_per_mtok=_rate(10**11),
    gpu_per_hour=_rate(10**13),
    max_gpu_ms_per_token=_rate(10**12),
)


@st.composite
def requests_and_usage(draw):
    """A request's limits and a usage within them: any completion up to max_tokens, any drafts and GPU time."""
    prompt = draw(st.integers(min_value=0, max_value=200_000))
    max_tokens = draw(st.integers(min_value=1, max_value=50_000))
    completion = draw(st.integers(min_value=0, max_value=max_tokens))
    drafted = Decimal(draw(st.integers(min_value=0, max_value=MAX_DRAFTED * completion))).scaleb(-3)
    gpu_ms = Decimal(draw(st.integers(min_value=0, max_value=10**12))).scaleb(-3)
    return prompt, max_tokens, completion, drafted, gpu_ms


MAX_DRAFTED = services.MAX_DRAFT_TOKENS * 1000  # drafted tokens in thousandths, per completion token


@given(price=prices, request=requests_and_usage())
def test_settlement_never_exceeds_the_reservation(price, request):
    prompt, max_tokens, completion, drafted, gpu_ms = request
    reserved = services.cost_estimate_max(price=price, prompt_tokens=prompt, max_tokens=max_tokens)
    usage = usage_for(prompt_tokens=prompt, completion_tokens=completion, drafted_tokens=drafted, gpu_ms=gpu_ms)
    charged = services.usage_cost(price=price, usage=usage)
    assert isinstance(reserved, Decimal) and isinstance(charged.total, Decimal)
    assert charged.total <= reserved


@pytest.mark.django_db
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests_and_usage())
def test_settled_requests_never_charge_a_budget_more_than_they_reserved(request, tenant, price, caplog):
    prompt, max_tokens, completion, drafted, gpu_ms = request
    services.budget_set(tenant=tenant, period="month", hard_limit=None, soft_limit=None)
    before = Budget.objects.get(tenant=tenant)
    amount = services.cost_estimate_max(price=price, prompt_tokens=prompt, max_tokens=max_tokens)
    reservation = services.budget_reserve(
        tenant=tenant, api_key=None, amount=amount, request_id=str(uuid.uuid4()), price=price
    )
    usage = usage_for(
        reservation, prompt_tokens=prompt, completion_tokens=completion, drafted_tokens=drafted, gpu_ms=gpu_ms
    )
    with caplog.at_level(logging.ERROR, logger="tenants.services"):
        record = services.usage_settle(reservation=reservation, usage=usage)
    assert not caplog.records, "the settlement had to be clamped: the bound is broken"
    assert record.cost_total <= reservation.amount
    after = Budget.objects.get(tenant=tenant)
    assert after.reserved == before.reserved
    assert after.spent - before.spent == record.cost_total
