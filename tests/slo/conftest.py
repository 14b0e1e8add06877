"""Fixtures for the SLO tests: samples inserted at chosen times (``created_at`` as a settlement would set it)."""

from __future__ import annotations

import itertools
from datetime import datetime

import pytest

from inference.models import SloSample
from tenants.services import rows_insert

_ids = itertools.count()


def sample(tenant_id: int, created_at: datetime, **fields) -> dict:
    """A completed interactive sample on the speculative tier, 200 ms to the first token, unless ``fields`` say."""
    return {
        "request_id": f"t_{next(_ids)}",
        "tenant_id": tenant_id,
        "model": "tandem-test",
        "route_tier": "speculative",
        "ttft_ms": 200.0,
        "inter_token_ms": 20.0,
        "e2e_ms": 900.0,
        "tokens": 40,
        "outcome": "completed",
        "latency_class": "interactive",
        "source": "generation",
        "fallback": False,
        "queued_ms": 0.0,
        "created_at": created_at,
        **fields,
    }


def insert(rows: list[dict]) -> None:
    rows_insert(model=SloSample, rows=rows)


@pytest.fixture
def samples():
    return insert
