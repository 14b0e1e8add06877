"""Fixtures for the inference tests."""

from __future__ import annotations

import pytest

from tenants import selectors, services


@pytest.fixture(autouse=True)
def empty_caches():
    """Each test starts with this process's key and price caches empty (their rows may be another test's)."""
    services.api_key_cache.forget()
    selectors.price_cache.forget()
