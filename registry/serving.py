"""Which draft version serves each new session, and the draft engines loaded for it in this process.

The gateway asks :data:`draft_plans` (installed by ``RegistryConfig.ready`` as the
engines' draft chooser) once per session: a tenant's pin wins, else a canary's share of
sessions gets the candidate, else the current version. Every draft version a plan names is
loaded beside the entry's own as a second :class:`SpeculativeEngine` over the same verifier
and verify scheduler (so sessions of both versions share forwards) and its edge engine.
A session holds the entry it started with, so it finishes on that version whatever
happens to the plan meanwhile.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time

from django.conf import settings

from inference.engines import ModelEntry, loaded_engines
from registry.selectors import DraftPlan, draft_plans_read

log = logging.getLogger(__name__)


class DraftPlans:
    """The process's draft plans (a copy of the registry's rows, at most ``TANDEM_REGISTRY_PLAN_TTL_S`` old)."""

    def __init__(self) -> None:
        self._plans: dict[str, DraftPlan] = {}
        self._read_at = -math.inf
        self._lock = threading.Lock()
        self._random = random.Random()

    def stale(self) -> bool:
        return time.monotonic() - self._read_at > settings.TANDEM_REGISTRY_PLAN_TTL_S

    def refresh(self) -> None:
        """Read the plans (ORM work: call it off the event loop) and load the drafts they name into the engines."""
        plans = draft_plans_read()
        engines = loaded_engines()
        if engines is not None:
            for model, plan in plans.items():
                entry = engines.models.get(model)
                if entry is not None:
                    for version, source in plan.sources.items():
                        load_draft(entry, version, source)
        with self._lock:
            self._plans, self._read_at = plans, time.monotonic()

    def choose(self, entry: ModelEntry, tenant_id: int | None) -> str | None:
        plan = self._plans.get(entry.name)
        if plan is None:
            return None
        if tenant_id is not None and tenant_id in plan.pins:
            return plan.pins[tenant_id]
        if plan.candidate is not None and self._random.random() < plan.share:
            return plan.candidate
        return plan.current

    def plan(self, model: str) -> DraftPlan | None:
        return self._plans.get(model)

    def reset(self) -> None:
        """Forget the plans (tests): the next session reads them again."""
        with self._lock:
            self._plans, self._read_at = {}, -math.inf


draft_plans = DraftPlans()
_unfit: set[tuple[str, str]] = set()  # (model, draft version) that could not load here


def load_draft(entry: ModelEntry, version: str, source: str) -> bool:
    """Serve GGUF draft ``version`` from ``source`` beside ``entry``'s own (once); False where it cannot here.

    Only an entry whose speculative engine runs a verifier in this process can take
    another draft (the trivial test engines cannot: tests add theirs with ``add_draft``).
    A draft whose vocabulary differs from the verifier's is refused, as at start-up.
    """
    from speculative.edge import EdgeEngine
    from speculative.engine import SpeculativeEngine

    if version == entry.draft_version or version in entry.drafts:
        return True
    if (entry.name, version) in _unfit:
        return False
    base = entry.speculative
    if not isinstance(base, SpeculativeEngine) or base.draft is None:
        return False
    from speculative.draft_llama import LlamaCppDraft
    from speculative.errors import SpeculativeError
    from speculative.pair import check_vocabularies, tokenizer_tokens

    try:
        draft = LlamaCppDraft(source, max_sessions=getattr(base.draft, "max_sessions", 8))
        check_vocabularies(tokenizer_tokens(base.tokenizer), draft.tokens(), draft_name=source)
    except SpeculativeError as exc:  # (another pair's draft, say): said once, not tried again in this process
        _unfit.add((entry.name, version))
        log.warning("registry: draft %s (%s) cannot serve %s here: %s", version, source, entry.name, exc)
        return False
    engine = SpeculativeEngine(base.verifier, base.tokenizer, draft, scheduler=base.scheduler)
    edge = EdgeEngine(draft, base.tokenizer, base.eos_token_id) if entry.edge is not None else None  # (none: none)
    entry.add_draft(version, engine, edge)
    log.info("registry: %s now also serves draft %s", entry.name, version)
    return True
