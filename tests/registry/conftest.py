"""Fixtures for the registry: a served model with two draft versions (trivial engines), and a clean plan cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from inference.engines import EngineSet, ModelEntry, TrivialEngine, set_engines, trivial_entry
from registry.serving import draft_plans

CURRENT = "trivial@0"  # what trivial_entry() records as its draft
OTHER = "trivial@1"
OTHER_TEXT = "A second draft writes other words entirely. "


@pytest.fixture(autouse=True)
def fresh_plans() -> Iterator[None]:
    """No test sees another's draft plans (tenant ids repeat across tests' databases)."""
    draft_plans.reset()
    yield
    draft_plans.reset()


@pytest.fixture
def two_drafts() -> Iterator[ModelEntry]:
    """``tandem-test`` served by draft CURRENT and, loaded beside it, OTHER (which writes OTHER_TEXT)."""
    entry = trivial_entry()
    entry.add_draft(OTHER, TrivialEngine(text=OTHER_TEXT), TrivialEngine(text=OTHER_TEXT))
    previous = set_engines(EngineSet([entry, trivial_entry("tandem-test-broken", fail_after=6)]))
    try:
        yield entry
    finally:
        set_engines(previous)
