"""Fixtures for the tenants tests: users, two tenants, a published price book."""

from __future__ import annotations

import itertools

import pytest

from tenants import selectors, services
from tests.tenants.factories import MODEL, PRICES


@pytest.fixture(autouse=True)
def empty_caches():
    """Each test starts with this process's key and price caches empty (their rows may be another test's)."""
    services.api_key_cache.forget()
    selectors.price_cache.forget()


@pytest.fixture
def make_user(django_user_model):
    counter = itertools.count()

    def make(username: str | None = None):
        return django_user_model.objects.create_user(username=username or f"user{next(counter)}", password="pw")

    return make


@pytest.fixture
def owner(make_user):
    return make_user("acme-owner")


@pytest.fixture
def tenant(owner):
    return services.tenant_create(name="Acme", owner=owner)


@pytest.fixture
def other_tenant(make_user):
    return services.tenant_create(name="Globex", owner=make_user("globex-owner"))


@pytest.fixture
def price_book(db):
    return services.price_book_publish(version=1, prices=PRICES, note="test prices")


@pytest.fixture
def price(price_book):
    return selectors.price_active(model=MODEL, tier="speculative")
