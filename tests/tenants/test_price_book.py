"""Price books: published whole, exactly one active, versions only going up, rates checked on the way in."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction

from tenants import errors, selectors, services
from tenants.models import Price, PriceBook
from tests.tenants.factories import MODEL, PRICES


def _one(**overrides):
    return [{"model": "m", "tier": "cloud", "prompt_per_mtok": "1", "completion_per_mtok": "2", **overrides}]


@pytest.mark.django_db
def test_publishing_makes_the_new_book_the_only_active_one(price_book):
    second = services.price_book_publish(version=2, prices=PRICES, note="cheaper")
    assert list(PriceBook.objects.filter(is_active=True)) == [second]
    assert selectors.price_active(model=MODEL, tier="speculative").book == second


@pytest.mark.django_db
def test_the_database_refuses_a_second_active_book(price_book):
    with pytest.raises(IntegrityError), transaction.atomic():
        PriceBook.objects.create(version=2, is_active=True)


@pytest.mark.django_db
def test_versions_only_go_up(price_book):
    with pytest.raises(errors.InvalidInput, match="only go up"):
        services.price_book_publish(version=1, prices=_one())
    assert PriceBook.objects.get().is_active


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("prices", "message"),
    [
        ([], "at least one price"),
        (_one(prompt_per_mtok=0.5), "float"),
        (_one(prompt_per_mtok="-1"), ">= 0"),
        (_one(prompt_per_mtok="0.0000000001"), "9 decimal places"),
        (_one(prompt_per_mtk="1"), "unknown price fields"),
        (_one(tier="gpu"), "unknown tier"),
        (_one(gpu_per_hour="2"), "max_gpu_ms_per_token"),
        (_one() + _one(), "one price per model and tier"),
    ],
)
def test_a_bad_price_list_publishes_nothing(price_book, prices, message):
    with pytest.raises(errors.InvalidInput, match=message):
        services.price_book_publish(version=2, prices=prices)
    assert list(PriceBook.objects.all()) == [price_book]
    assert price_book.is_active


@pytest.mark.django_db
def test_rates_are_stored_as_decimals(price_book):
    price = selectors.price_active(model=MODEL, tier="speculative")
    assert price.prompt_per_mtok == Decimal("0.5") and isinstance(price.prompt_per_mtok, Decimal)
    assert price.max_gpu_ms_per_token == Decimal(5)


@pytest.mark.django_db
def test_price_active_refuses_an_unpriced_model(price_book):
    with pytest.raises(errors.PriceNotFound, match="no active price for 'gpt-9'"):
        selectors.price_active(model="gpt-9", tier="cloud")


@pytest.mark.django_db
def test_no_price_is_active_before_a_book_is_published():
    with pytest.raises(errors.PriceNotFound):
        selectors.price_active(model=MODEL, tier="speculative")


# the in-process price cache -----------------------------------------------------------------------
@pytest.mark.django_db
def test_active_prices_are_cached_and_a_publish_in_this_process_is_seen_at_once(price_book, django_assert_num_queries):
    first = selectors.price_active(model=MODEL, tier="speculative")
    with django_assert_num_queries(0):
        assert selectors.price_active(model=MODEL, tier="speculative") == first
        assert selectors.price_active_cached(model=MODEL, tier="speculative") == first
    services.price_book_publish(version=2, prices=[{**PRICES[0], "completion_per_mtok": Decimal("9")}])
    assert selectors.price_active_cached(model=MODEL, tier="speculative") is None
    second = selectors.price_active(model=MODEL, tier="speculative")
    assert second.book.version == 2 and second.completion_per_mtok == Decimal("9")


@pytest.mark.django_db
def test_a_book_published_by_another_process_is_seen_within_the_cache_ttl(price_book, settings, monkeypatch):
    settings.TANDEM_PRICE_CACHE_TTL_S = 5.0
    now = [1000.0]
    monkeypatch.setattr(selectors.price_cache, "clock", lambda: now[0])
    selectors.price_cache.forget()
    assert selectors.price_active(model=MODEL, tier="speculative").book.version == 1
    # another process publishes v2: rows change, this process's cache is not told
    PriceBook.objects.filter(is_active=True).update(is_active=False)
    book = PriceBook.objects.create(version=2, is_active=True)
    Price.objects.create(book=book, **{k: v for k, v in PRICES[0].items()})
    now[0] += 4.9
    assert selectors.price_active(model=MODEL, tier="speculative").book.version == 1  # the window
    now[0] += 0.2
    assert selectors.price_active(model=MODEL, tier="speculative").book.version == 2


@pytest.mark.django_db
def test_prices_of_a_book_are_cached_until_a_publish(price_book, django_assert_num_queries):
    price = selectors.price_in_book(book_id=price_book.pk, model=MODEL, tier="edge")
    with django_assert_num_queries(0):
        assert selectors.price_in_book(book_id=price_book.pk, model=MODEL, tier="edge") == price
    with pytest.raises(errors.PriceNotFound):
        selectors.price_in_book(book_id=price_book.pk, model="no-such-model", tier="edge")
