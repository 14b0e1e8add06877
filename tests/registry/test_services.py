"""The registry's services: registering the served pair, refusing bad input, and deciding by hand."""

from __future__ import annotations

from decimal import Decimal

import pytest

from inference.engines import file_version
from registry import services
from registry.errors import InvalidInput, InvalidTransition
from registry.models import ModelVersion, Rollout
from registry.serving import draft_plans
from speculative.pair import DEMO_DRAFT_GGUF, DEMO_DRAFT_HF, default_verifier_path
from tenants.models import AuditEvent

pytestmark = pytest.mark.django_db

MODEL = "tandem-demo"


def test_registry_sync_registers_the_served_pair_under_the_versions_the_ledger_records():
    rows = services.registry_sync()
    verifier = ModelVersion.objects.get(role="verifier", status="current")
    draft = ModelVersion.objects.get(role="draft", status="current")
    # inference.engines.load_default_engines records file_version of the same paths in every ledger row
    assert verifier.version == file_version(default_verifier_path())
    assert draft.version == file_version(DEMO_DRAFT_GGUF)
    assert draft.format == "gguf" and draft.parent.version == file_version(DEMO_DRAFT_HF)
    assert draft.conversion["tool"] == "speculative.gguf_export" and "Django" in draft.training_data
    assert draft.tokenizer_hash == verifier.tokenizer_hash == draft.parent.tokenizer_hash  # one vocabulary
    assert draft.size_bytes == DEMO_DRAFT_GGUF.stat().st_size
    assert (
        AuditEvent.objects.filter(action="model_version.register").count() == len(rows) == ModelVersion.objects.count()
    )


def test_registry_sync_follows_the_pair_served_over_the_same_database(smollm2_verifier, settings, tmp_path):
    services.registry_sync()  # the demo pair, current
    settings.TANDEM_PAIR, settings.VAR_DIR = "smollm2", tmp_path  # (its draft assembled under the var dir)
    services.registry_sync()
    current = {row.role: row for row in ModelVersion.objects.filter(model=MODEL, status="current")}
    (draft_file,) = (tmp_path / "models").glob("smollm2-draft-*.gguf")
    assert current["verifier"].version == file_version(smollm2_verifier)
    assert current["draft"].version == file_version(draft_file)
    assert current["draft"].tokenizer_hash == current["verifier"].tokenizer_hash
    retired = set(ModelVersion.objects.filter(model=MODEL, status="retired").values_list("version", flat=True))
    assert retired == {file_version(default_verifier_path()), file_version(DEMO_DRAFT_GGUF)}  # another vocabulary
    settings.TANDEM_PAIR = "demo"
    services.registry_sync()  # and back
    current = {row.role: row.version for row in ModelVersion.objects.filter(model=MODEL, status="current")}
    assert current == {"verifier": file_version(default_verifier_path()), "draft": file_version(DEMO_DRAFT_GGUF)}


def test_registry_sync_keeps_a_promoted_draft_of_the_same_vocabulary_current():
    services.registry_sync()
    second = services.model_version_register(model=MODEL, role="draft", source=DEMO_DRAFT_HF)  # the same vocabulary
    ModelVersion.objects.filter(model=MODEL, role="draft", status="current").update(status="retired")
    ModelVersion.objects.filter(pk=second.pk).update(status="current")  # as a promotion leaves it
    services.registry_sync()
    assert ModelVersion.objects.get(model=MODEL, role="draft", status="current").pk == second.pk


def test_registry_sync_twice_registers_nothing_more():
    registered = len(services.registry_sync())
    services.registry_sync()
    assert ModelVersion.objects.count() == registered
    assert AuditEvent.objects.filter(action="model_version.register").count() == registered


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"source": "/no/such/draft"}, "does not exist"),
        ({"canary_share": Decimal("0")}, "share"),
        ({"canary_share": Decimal("1.5")}, "share"),
        ({"quantisation": "q3_weird"}, "unknown quantisation"),
        ({"canary_min_samples": 0}, "at least one"),
        ({"source": str(DEMO_DRAFT_GGUF)}, "current draft already"),
    ],
)
def test_a_rollout_with_bad_input_is_refused_and_records_nothing(options, message):
    _drafts()
    events = AuditEvent.objects.count()
    with pytest.raises(InvalidInput, match=message):
        services.rollout_start(model=MODEL, **{"source": DEMO_DRAFT_HF, **options})
    assert not Rollout.objects.exists()
    assert AuditEvent.objects.count() == events


def test_a_second_rollout_of_a_model_waits_for_the_first_to_finish():
    _canary()
    events = AuditEvent.objects.count()
    with pytest.raises(InvalidInput, match="in progress"):
        services.rollout_start(model=MODEL, source=DEMO_DRAFT_HF)
    assert Rollout.objects.count() == 1 and AuditEvent.objects.count() == events


def test_a_rollout_needs_a_current_draft_to_compare_with():
    with pytest.raises(InvalidInput, match="no current draft"):
        services.rollout_start(model=MODEL, source=DEMO_DRAFT_HF)


def _drafts() -> tuple[ModelVersion, ModelVersion]:
    """The demo's current GGUF draft and a second one, as rows (what registry_sync writes, without hashing vocabularies)."""
    current = ModelVersion.objects.create(
        model=MODEL, role="draft", version=file_version(DEMO_DRAFT_GGUF), source=DEMO_DRAFT_GGUF, format="gguf"
    )
    current.status = "current"
    current.save()
    other = ModelVersion.objects.create(model=MODEL, role="draft", version="other.gguf@0", source="x", format="gguf")
    return current, other


def _canary() -> Rollout:
    current, other = _drafts()
    return Rollout.objects.create(model=MODEL, source_version=other, candidate=other, baseline=current, status="canary")


def test_pause_takes_the_candidate_out_of_the_plan_and_resume_puts_it_back(django_capture_on_commit_callbacks):
    rollout = _canary()
    with django_capture_on_commit_callbacks(execute=True):
        services.rollout_pause(rollout=rollout, by=None)
    assert draft_plans.plan(MODEL).candidate is None
    with django_capture_on_commit_callbacks(execute=True):
        services.rollout_resume(rollout=rollout, by=None)
    assert draft_plans.plan(MODEL).candidate == rollout.candidate.version
    events = AuditEvent.objects.filter(object_id=str(rollout.pk), action__startswith="rollout.").order_by("id")
    assert list(events.values_list("action", flat=True)) == [
        "rollout.pause",
        "rollout.resume",
    ]


def test_a_finished_rollout_cannot_be_promoted_or_paused():
    rollout = _canary()
    services.rollout_rollback(rollout=rollout, by=None, reason="by hand")
    for decide in (services.rollout_promote, services.rollout_pause):
        with pytest.raises(InvalidTransition):
            decide(rollout=rollout, by=None)
    assert Rollout.objects.get(pk=rollout.pk).status == "rolled_back"
    assert ModelVersion.objects.get(pk=rollout.candidate_id).status == "rejected"


def test_a_draft_that_cannot_serve_the_model_here_is_said_once_and_not_tried_again(monkeypatch, caplog):
    import logging
    from unittest import mock

    import speculative.draft_llama
    from inference.engines import ModelEntry
    from registry.serving import _unfit, load_draft
    from speculative.engine import SpeculativeEngine
    from speculative.errors import ModelLoadError

    tried: list[str] = []

    def unfit(source, **kwargs):  # another pair's draft, say
        tried.append(source)
        raise ModelLoadError("the draft's vocabulary differs from the verifier's")

    monkeypatch.setattr(speculative.draft_llama, "LlamaCppDraft", unfit)
    engine = mock.Mock(spec=SpeculativeEngine)  # a speculative engine with a llama.cpp draft, as far as load_draft asks
    engine.draft = mock.Mock(max_sessions=4)
    entry = ModelEntry(name=MODEL, speculative=engine, edge=None,
                       verifier_version="v@1", draft_version="d@1", context_length=64, tokenizer=None)  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING, logger="registry.serving"):
            assert load_draft(entry, "other@2", "/elsewhere/other.gguf") is False
            assert load_draft(entry, "other@2", "/elsewhere/other.gguf") is False
    finally:
        _unfit.discard((MODEL, "other@2"))
    assert tried == ["/elsewhere/other.gguf"] and "other@2" not in entry.drafts
    (record,) = [r for r in caplog.records if "cannot serve" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.exc_info is None and "vocabulary differs" in record.getMessage()
