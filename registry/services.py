"""Writes of the registry: register versions, pin them, and run a rollout's steps.

A rollout (``rollout_start``) goes convert -> validate -> evaluate -> canary, one Celery
task per step (``registry.tasks``), each a function here that records a
:class:`RolloutStep` (status, timings, figures) and an audit event. A step that finds the
candidate unfit fails the rollout; nothing after it runs. The canary runs on live traffic:
``rollout_canary_check`` (beat, every ``registry-canaries`` period) compares the
candidate's completions in the ledger with the current draft's and promotes it, or rolls it
back when it is worse. Operators promote, pause, resume and roll back by hand too.

The heavy steps (conversion, loading models, generating) run outside any transaction: a
step's rows are written in short transactions before and after.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from inference.engines import file_version
from registry.errors import InvalidInput, InvalidTransition, StepFailed
from registry.models import (
    ModelFormat,
    ModelRole,
    ModelVersion,
    Rollout,
    RolloutStatus,
    RolloutStep,
    StepStatus,
    TenantModelPin,
    VersionStatus,
)
from registry.selectors import ACTIVE_ROLLOUT, ServingFigures, current_version, serving_figures
from tenants.models import AuditAction, Membership, MembershipRole, Tenant
from tenants.services import audit_event_record

log = logging.getLogger(__name__)

DEMO_MODEL = "tandem-demo"  # the model id inference.engines.load_default_engines serves the configured pair as
DEMO_TRAINING_DATA = "Django 5.2.8 documentation prose (BSD), every 20th document held out (speculative.corpus)"
QUANTISATIONS = ("q8_0", "q4_0", "f16")  # llama.cpp's quantiser (llama_model_quantize), after the f32 export
# validate: the largest |logit difference| between the GGUF and its transformers source on the fixed prompts,
# over the largest |logit| of the source (relative: a draft with larger logits has larger float error). Measured
# on the demo draft (README, "Models and rollouts"): f32 1.4e-4 (its shuffled variant 7.0e-4), f16 2.6e-4,
# q8_0 0.0117, q4_0 0.056; the bounds leave about 2-3x headroom.
LOGIT_TOLERANCE = {"f32": 2e-3, "f16": 5e-3, "q8_0": 0.03, "q4_0": 0.12}
VALIDATION_PROMPTS = (
    "To define a model in Django,",
    "The admin site reads your models",
    "Middleware is a framework of hooks",
)
# evaluate: prompts no test or canary sends, each decoded greedily with a fixed draft length so that the two
# versions' acceptance is measured on the same footing (the adaptive controller would stop drafting a bad draft)
EVAL_PROMPTS = (
    "A queryset can be filtered by",
    "Templates are rendered with a context",
    "To run the tests of an application,",
    "Signals let decoupled applications",
    "The cache framework stores",
    "Forms validate the data a user",
)
EVAL_MAX_TOKENS = 48
EVAL_K = 4
# canary: the candidate is worse when, over at least min_samples completions of each version,
CANARY_MAX_ERROR_RISE = 0.02  # its error rate exceeds the current's by more than this,
CANARY_MAX_TTFT_RATIO = 1.5  # or its mean time to first token exceeds the current's by this factor
CANARY_TTFT_SLACK_MS = 25.0  # plus this (a CPU's jitter on tiny figures), judged only over at least
# this many completions of each: a mean of a few first-token times is the machine's noise (two samples under
# CI's load read 99.0 ms for a good draft against the current's 34.4, and rolled it back)
CANARY_TTFT_MIN_SAMPLES = 20
# or its per-token acceptance (registry.selectors.ServingFigures) falls below the current's by more than the
# rollout's max_canary_drop (a fraction).


def artifacts_dir() -> Path:
    path = Path(settings.VAR_DIR) / "registry"
    path.mkdir(parents=True, exist_ok=True)
    return path


# versions ---------------------------------------------------------------------------------------
def tokenizer_hash(source: str | Path, fmt: str) -> str:
    """sha256 of the vocabulary by id ("\\n"-joined), padding ids left out: equal for a pair that may share drafts."""
    path = Path(source)
    if fmt == ModelFormat.GGUF:
        import gguf

        field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
        tokens = [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
    elif (path / "tokenizer.json").is_file():  # the fast tokenizer's own file: what transformers would load
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokens = [vocab.id_to_token(i) or f"[PAD{i}]" for i in range(vocab.get_vocab_size(with_added_tokens=True))]
    else:
        from speculative.pair import load_tokenizer, tokenizer_tokens

        tokens = tokenizer_tokens(load_tokenizer(path))
    while tokens and tokens[-1].startswith("[PAD"):
        tokens.pop()
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _format_of(source: str) -> str:
    return ModelFormat.GGUF if source.endswith(".gguf") else ModelFormat.TRANSFORMERS


def model_version_register(
    *,
    model: str,
    role: str,
    source: str | Path,
    fmt: str | None = None,
    parent: ModelVersion | None = None,
    training_data: str = "",
    conversion: dict | None = None,
    quantisation: str = "f32",
    by=None,
    status: str = VersionStatus.REGISTERED,
) -> ModelVersion:
    """Register the weights at ``source`` as a version of ``model`` (once: the same file is the same version).

    ``source`` is a local file or folder (hashed) or a hub id (recorded by name). An existing
    version is returned as it is, except that ``status`` candidate makes it one again.
    """
    source = str(source)
    if role not in ModelRole.values:
        raise InvalidInput(f"unknown role {role!r} (one of {', '.join(ModelRole.values)})")
    fmt = fmt or _format_of(source)
    if fmt not in ModelFormat.values:
        raise InvalidInput(f"unknown format {fmt!r} (one of {', '.join(ModelFormat.values)})")
    if not model.strip():
        raise InvalidInput("a model version needs the public model id it serves")
    path = Path(source)
    if fmt == ModelFormat.GGUF and not path.is_file():
        raise InvalidInput(f"{source!r} is not a GGUF file here")
    version = file_version(path)
    existing = ModelVersion.objects.filter(model=model, role=role, version=version).first()
    if existing is not None:
        if status == VersionStatus.CANDIDATE and existing.status != VersionStatus.CANDIDATE:
            if existing.status == VersionStatus.CURRENT:
                raise InvalidInput(f"{version} is the current {role} of {model} already")
            existing.status = VersionStatus.CANDIDATE
            existing.save(update_fields=["status"])
        return existing
    tok_hash = tokenizer_hash(path, fmt) if path.exists() else ""
    with transaction.atomic():
        row = ModelVersion.objects.create(
            model=model,
            role=role,
            version=version,
            source=source,
            format=fmt,
            content_hash=version.rsplit("@", 1)[-1] if path.exists() else "",
            tokenizer_hash=tok_hash,
            quantisation=quantisation,
            size_bytes=_size(path),
            training_data=training_data,
            parent=parent,
            conversion=conversion or {},
            created_by=by,
            status=status,
        )
        audit_event_record(
            action=AuditAction.MODEL_VERSION_REGISTER,
            by=by,
            tenant=None,
            obj=row,
            changes={
                name: {"before": None, "after": value}
                for name, value in {
                    "model": model,
                    "role": role,
                    "version": version,
                    "source": source,
                    "format": fmt,
                    "quantisation": quantisation,
                    "parent": parent.version if parent is not None else None,
                    "status": status,
                }.items()
            },
        )
    return row


def registry_sync(*, model: str = DEMO_MODEL) -> list[ModelVersion]:
    """Register the pair this platform serves (``TANDEM_PAIR``'s, or TANDEM_VERIFIER / TANDEM_DRAFT) and make each
    current where its role has none yet, or only one of another vocabulary: another pair was served over this
    database before (``TANDEM_PAIR=demo`` after SmolLM2's), and the registry follows what is served. Idempotent;
    ``make run`` calls it (``manage.py registry_sync``).

    The versions are exactly the ledger's (``file_version`` of the same paths), so the
    ledger's rows and the registry's name the same weights.
    """
    from inference.engines import pair_paths
    from speculative.pair import DEMO_DRAFT_GGUF, DEMO_DRAFT_GGUF_TYPE, DEMO_DRAFT_HF, DEMO_VERIFIER

    verifier_source, draft_source = pair_paths(settings.TANDEM_PAIR)  # (a version registered before is found by hash)
    demo = draft_source == str(DEMO_DRAFT_GGUF)
    demo_verifier = Path(verifier_source).parent == DEMO_VERIFIER.parent and verifier_source != str(DEMO_VERIFIER)
    verifier_parent = None
    if demo_verifier:  # the demo's GGUF verifier (a CPU's) was exported from the shipped checkpoint
        verifier_parent = model_version_register(
            model=model, role=ModelRole.VERIFIER, source=DEMO_VERIFIER, training_data=DEMO_TRAINING_DATA
        )
    verifier = model_version_register(
        model=model,
        role=ModelRole.VERIFIER,
        source=verifier_source,
        parent=verifier_parent,
        conversion={"tool": "speculative.gguf_export"} if verifier_parent is not None else None,
        training_data=DEMO_TRAINING_DATA if demo_verifier or verifier_source == str(DEMO_VERIFIER) else "",
    )
    parent = None
    conversion: dict = {}
    if demo:  # the shipped GGUF was exported from the shipped transformers draft
        parent = model_version_register(
            model=model, role=ModelRole.DRAFT, source=DEMO_DRAFT_HF, training_data=DEMO_TRAINING_DATA
        )
        conversion = {
            "tool": "speculative.gguf_export",
            "dtype": "f32",
            "quantised_with": "llama_model_quantize",
            "quantisation": DEMO_DRAFT_GGUF_TYPE,
            "distilled_from": verifier.version,
        }
    draft = model_version_register(
        model=model,
        role=ModelRole.DRAFT,
        source=draft_source,
        parent=parent,
        conversion=conversion,
        training_data=DEMO_TRAINING_DATA if demo else "",
        **({"quantisation": DEMO_DRAFT_GGUF_TYPE} if demo else {}),
    )
    for row in (verifier, draft):
        _current_if_none_fits(row, verifier.tokenizer_hash)
    _plans_changed()
    return [row for row in (verifier_parent, verifier, parent, draft) if row is not None]


# pins -------------------------------------------------------------------------------------------
def model_pin_set(*, tenant: Tenant, model: str, version: ModelVersion | None, by) -> TenantModelPin | None:
    """Pin ``tenant``'s new sessions of ``model`` to draft ``version`` (None: unpin). Owners only."""
    from tenants.errors import PermissionDenied

    if not Membership.objects.filter(tenant=tenant, user=by, role=MembershipRole.OWNER).exists():
        raise PermissionDenied("only the tenant's owners pin model versions")
    with transaction.atomic():
        pin = TenantModelPin.objects.select_for_update().filter(tenant=tenant, model=model).first()
        before = pin.version.version if pin is not None else None
        if version is None:
            if pin is None:
                return None
            audit_event_record(
                action=AuditAction.MODEL_PIN_SET,
                by=by,
                tenant=tenant,
                obj=pin,
                changes={"model": {"before": model, "after": model}, "version": {"before": before, "after": None}},
            )
            pin.delete()
            _plans_changed()
            return None
        if version.model != model or version.role != ModelRole.DRAFT or version.format != ModelFormat.GGUF:
            raise InvalidInput(f"{version.version} is not a GGUF draft of {model}")
        if version.status in (VersionStatus.REJECTED, VersionStatus.REGISTERED):
            raise InvalidInput(f"{version.version} is {version.status}: only drafts that served may be pinned")
        if pin is None:
            pin = TenantModelPin.objects.create(tenant=tenant, model=model, version=version, created_by=by)
        else:
            pin.version, pin.created_by, pin.created_at = version, by, timezone.now()
            pin.save()
        audit_event_record(
            action=AuditAction.MODEL_PIN_SET,
            by=by,
            tenant=tenant,
            obj=pin,
            changes={
                "model": {"before": None, "after": model},
                "version": {"before": before, "after": version.version},
            },
        )
    _plans_changed()
    return pin


# rollouts: start ---------------------------------------------------------------------------------
def rollout_start(
    *,
    model: str,
    source: str | Path,
    by=None,
    quantisation: str = "",
    canary_share: Decimal = Decimal("0.100"),
    canary_min_samples: int = 20,
    min_eval_ratio: Decimal = Decimal("0.900"),
    max_canary_drop: Decimal = Decimal("0.100"),
    auto_promote: bool = True,
    training_data: str = "",
) -> Rollout:
    """Register the draft at ``source`` and start its rollout (the chain runs after commit, on Celery)."""
    canary_share, min_eval_ratio, max_canary_drop = (
        Decimal(str(x)) for x in (canary_share, min_eval_ratio, max_canary_drop)
    )
    if not Decimal("0") < canary_share <= Decimal("1"):
        raise InvalidInput(f"the canary's share must be in (0, 1], got {canary_share}")
    if quantisation and quantisation not in QUANTISATIONS:
        raise InvalidInput(f"unknown quantisation {quantisation!r} (one of {', '.join(QUANTISATIONS)}, or none)")
    if canary_min_samples < 1:
        raise InvalidInput("the canary needs at least one completion of each version")
    if not Decimal("0") <= min_eval_ratio <= Decimal("2") or not Decimal("0") <= max_canary_drop <= Decimal("1"):
        raise InvalidInput("min_eval_ratio must be in [0, 2] and max_canary_drop in [0, 1]")
    if not Path(str(source)).exists():
        raise InvalidInput(f"{str(source)!r} does not exist here (a transformers folder or a GGUF file is needed)")
    baseline = current_version(model=model, role=ModelRole.DRAFT)
    if baseline is None:
        raise InvalidInput(f"{model} has no current draft to compare with (run manage.py registry_sync)")
    if Rollout.objects.filter(model=model, status__in=ACTIVE_ROLLOUT).exists():  # the constraint is the guarantee
        raise InvalidInput(f"{model} has a rollout in progress: finish or roll it back first")
    submitted = model_version_register(
        model=model, role=ModelRole.DRAFT, source=source, training_data=training_data, by=by
    )
    if submitted.pk == baseline.pk:
        raise InvalidInput(f"{submitted.version} is the current draft already")
    try:
        with transaction.atomic():
            rollout = Rollout.objects.create(
                model=model,
                source_version=submitted,
                baseline=baseline,
                quantisation=quantisation,
                canary_share=canary_share,
                canary_min_samples=canary_min_samples,
                min_eval_ratio=min_eval_ratio,
                max_canary_drop=max_canary_drop,
                auto_promote=auto_promote,
                created_by=by,
            )
            audit_event_record(
                action=AuditAction.ROLLOUT_START,
                by=by,
                tenant=None,
                obj=rollout,
                changes={
                    "model": {"before": None, "after": model},
                    "source": {"before": None, "after": submitted.version},
                    "baseline": {"before": None, "after": baseline.version},
                    "canary_share": {"before": None, "after": canary_share},
                    "quantisation": {"before": None, "after": quantisation or "f32"},
                },
            )
    except IntegrityError:
        raise InvalidInput(f"{model} has a rollout in progress: finish or roll it back first") from None

    def launch() -> None:
        from registry.tasks import rollout_chain

        rollout_chain(rollout.pk).apply_async()

    transaction.on_commit(launch)
    return rollout


# rollouts: the steps ------------------------------------------------------------------------------
def _audit_step(rollout: Rollout, step: RolloutStep) -> None:
    audit_event_record(
        action=AuditAction.ROLLOUT_STEP,
        by=None,
        tenant=None,
        obj=rollout,
        changes={
            "step": {"before": None, "after": step.name},
            "status": {"before": None, "after": step.status},
            "figures": {"before": None, "after": step.figures},
            "error": {"before": None, "after": step.error or None},
        },
    )


def _run_step(rollout_id: int, name: str, work: Callable[[Rollout], dict]) -> bool:
    """Run one step of a running rollout: record it, do ``work`` (no transaction held), record what came of it.

    ``work`` returns the step's figures (``skipped`` True for a step with nothing to do) or
    raises StepFailed; any other exception fails the step too, logged with its traceback.
    Returns whether the rollout may go on.
    """
    with transaction.atomic():
        rollout = Rollout.objects.select_for_update().filter(pk=rollout_id).first()
        if rollout is None or rollout.status != RolloutStatus.RUNNING:
            return False  # rolled back or failed meanwhile: the chain ends here
        rollout.step = name
        rollout.save(update_fields=["step"])
        step = RolloutStep.objects.create(rollout=rollout, name=name)
    started = time.perf_counter()
    try:
        figures = work(rollout)
    except StepFailed as exc:
        _step_failed(rollout, step, exc.message, started)
        return False
    except Exception as exc:  # noqa: BLE001 - recorded on the rollout (and logged): the candidate never serves
        log.exception("rollout %s: step %s failed", rollout_id, name)
        _step_failed(rollout, step, f"{type(exc).__name__}: {exc}", started)
        return False
    skipped = figures.pop("skipped", False)
    figures["seconds"] = round(time.perf_counter() - started, 3)
    with transaction.atomic():
        step.status = StepStatus.SKIPPED if skipped else StepStatus.PASSED
        step.figures, step.finished_at = figures, timezone.now()
        step.save()
        _audit_step(rollout, step)
    return True


def _step_failed(rollout: Rollout, step: RolloutStep, error: str, started: float) -> None:
    with transaction.atomic():
        step.status, step.error, step.finished_at = StepStatus.FAILED, error, timezone.now()
        step.figures = {**step.figures, "seconds": round(time.perf_counter() - started, 3)}
        step.save()
        _audit_step(rollout, step)
        fresh = Rollout.objects.select_for_update().get(pk=rollout.pk)
        fresh.status, fresh.decision, fresh.finished_at = RolloutStatus.FAILED, f"{step.name}: {error}", timezone.now()
        fresh.save(update_fields=["status", "decision", "finished_at"])
        if fresh.candidate_id is not None:
            ModelVersion.objects.filter(pk=fresh.candidate_id).exclude(status=VersionStatus.CURRENT).update(
                status=VersionStatus.REJECTED
            )
        audit_event_record(
            action=AuditAction.ROLLOUT_FAIL,
            by=None,
            tenant=None,
            obj=fresh,
            changes={
                "status": {"before": RolloutStatus.RUNNING, "after": fresh.status},
                "decision": {"before": None, "after": fresh.decision},
            },
        )


def rollout_convert(*, rollout_id: int) -> bool:
    """Step 1: a transformers draft becomes GGUF (speculative.gguf_export), quantised if the rollout asks."""
    return _run_step(rollout_id, "convert", _convert)


def _convert(rollout: Rollout) -> dict:
    source = rollout.source_version
    figures: dict = {"source": source.version}
    if source.format == ModelFormat.GGUF:
        gguf_path = Path(source.source)
        conversion: dict = {}
    else:
        from speculative.errors import ModelLoadError
        from speculative.gguf_export import export_gguf

        gguf_path = artifacts_dir() / f"draft-{source.content_hash}.gguf"
        try:
            export_gguf(Path(source.source), gguf_path)
        except ModelLoadError as exc:
            raise StepFailed(str(exc)) from None
        conversion = {"tool": "speculative.gguf_export", "dtype": "f32", "from": source.version}
    quantisation = rollout.quantisation or "f32"
    if rollout.quantisation:
        quantised = gguf_path.with_name(f"{gguf_path.stem}.{rollout.quantisation}.gguf")
        quantise_gguf(gguf_path, quantised, rollout.quantisation)
        conversion = {**conversion, "quantised_with": "llama_model_quantize", "quantisation": rollout.quantisation}
        gguf_path = quantised
    if not conversion:
        figures["skipped"] = True  # submitted as GGUF: nothing to convert
    candidate = model_version_register(
        model=rollout.model,
        role=ModelRole.DRAFT,
        source=gguf_path,
        fmt=ModelFormat.GGUF,
        parent=source if conversion else source.parent,
        training_data=source.training_data,
        conversion=conversion,
        quantisation=quantisation,
        by=rollout.created_by,
        status=VersionStatus.CANDIDATE,
    )
    if candidate.pk == rollout.baseline_id:
        raise StepFailed(f"{candidate.version} is the current draft already")
    Rollout.objects.filter(pk=rollout.pk).update(candidate=candidate)
    rollout.candidate = candidate
    return {**figures, "candidate": candidate.version, "quantisation": quantisation, "size_bytes": candidate.size_bytes}


def quantise_gguf(source: Path, out: Path, quantisation: str) -> Path:
    """llama.cpp's quantiser (``llama_model_quantize``, llama-cpp-python's low-level API) from an f32 GGUF."""
    import ctypes

    import llama_cpp

    ftype = {
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
        "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    }[quantisation]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    llama_cpp.llama_backend_init()
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0 or not out.is_file():
        raise StepFailed(f"llama.cpp's quantiser failed on {source.name} ({quantisation}): code {code}")
    return out


def rollout_validate(*, rollout_id: int) -> bool:
    """Step 2: the candidate reads ids through the verifier's tokenizer, and its logits agree with its source's."""
    return _run_step(rollout_id, "validate", _validate)


def _verifier_source(model: str) -> str:
    """The current verifier's weights, else what load_default_engines serves (the demo's GGUF on a CPU)."""
    from speculative.pair import default_verifier_path

    verifier = current_version(model=model, role=ModelRole.VERIFIER)
    return verifier.source if verifier is not None else (settings.TANDEM_VERIFIER or str(default_verifier_path()))


def _current_if_none_fits(row: ModelVersion, tokenizer_hash: str) -> None:
    """``row`` becomes its role's current version where there is none, or the current one reads another vocabulary
    than ``tokenizer_hash`` (another pair's: it steps down, retired)."""
    with transaction.atomic():
        current = current_version(model=row.model, role=row.role)
        if current is not None and (current.pk == row.pk or current.tokenizer_hash == tokenizer_hash):
            return
        if current is not None:
            log.info("registry: %s %s reads another vocabulary than the served pair: %s is current", row.model,
                     current.version, row.version)  # fmt: skip
            current.status = VersionStatus.RETIRED
            current.save(update_fields=["status"])
        row.status = VersionStatus.CURRENT
        row.save(update_fields=["status"])


def _validate(rollout: Rollout) -> dict:
    import numpy as np

    from speculative.draft_hf import TransformersDraft
    from speculative.draft_llama import LlamaCppDraft
    from speculative.pair import load_tokenizer

    candidate = rollout.candidate
    assert candidate is not None, "validate runs after convert"
    verifier = current_version(model=rollout.model, role=ModelRole.VERIFIER)
    verifier_source = _verifier_source(rollout.model)
    verifier_hash = (
        verifier.tokenizer_hash
        if verifier is not None
        else tokenizer_hash(verifier_source, _format_of(verifier_source))
    )
    if candidate.tokenizer_hash != verifier_hash:
        raise StepFailed(
            f"the candidate's tokenizer ({candidate.tokenizer_hash[:12]}) is not the verifier's ({verifier_hash[:12]}):"
            " its token ids would mean other tokens to the verifier"
        )
    figures: dict = {"tokenizer_hash": candidate.tokenizer_hash[:12], "same_tokenizer": True}
    source = candidate.parent
    if source is None or source.format != ModelFormat.TRANSFORMERS:
        return {**figures, "logits": "not compared: the candidate came as GGUF, with no transformers source"}
    tolerance = LOGIT_TOLERANCE[candidate.quantisation]
    tokenizer = load_tokenizer(source.source)  # the same vocabulary as the verifier's (checked above)
    gguf_draft = LlamaCppDraft(candidate.source, max_sessions=1)
    hf_draft = TransformersDraft(source.source, device="cpu")
    worst, worst_abs, top1_same, positions = 0.0, 0.0, 0, 0
    for prompt in VALIDATION_PROMPTS:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        for end in range(1, len(ids) + 1):
            got_ctx, want_ctx = gguf_draft.new_context(), hf_draft.new_context()
            try:
                got, want = got_ctx.evaluate(ids[:end]), want_ctx.evaluate(ids[:end])
            finally:
                got_ctx.close()
                want_ctx.close()
            diff = float(np.abs(got - want).max())
            worst, worst_abs = max(worst, diff / max(float(np.abs(want).max()), 1e-6)), max(worst_abs, diff)
            top1_same += int(np.argmax(got) == np.argmax(want))
            positions += 1
    figures.update(
        max_logit_diff=round(worst, 6),
        max_logit_diff_abs=round(worst_abs, 6),
        tolerance=tolerance,
        top1_agreement=round(top1_same / positions, 4),
        positions=positions,
    )
    if worst > tolerance:
        raise StepFailed(
            f"logits differ from the transformers source by {worst:.3g} of their scale (tolerance {tolerance:g})"
        )
    return figures


def rollout_evaluate(*, rollout_id: int) -> bool:
    """Step 3: acceptance and tokens/s of the candidate against the current draft on held-out prompts."""
    return _run_step(rollout_id, "evaluate", _evaluate)


def evaluate_drafts(verifier_source: str, drafts: dict[str, str]) -> dict[str, dict]:
    """Each draft (label -> GGUF path) decoding EVAL_PROMPTS greedily with the verifier: acceptance, tokens/s, texts.

    The speculative engine directly, one completion at a time, a warm-up first; the verifier
    loads once and serves every draft in turn.
    """
    from speculative.draft_llama import LlamaCppDraft
    from speculative.engine import SpeculativeEngine
    from speculative.pair import load_pair
    from speculative.scheduler import VerifyScheduler

    verifier, _, tokenizer = load_pair(verifier_source, None)  # its backend follows the file, as at start-up
    results: dict[str, dict] = {}
    scheduler = VerifyScheduler(verifier)  # every draft's engine on one: one thread calls the model (SpeculativeEngine)
    try:
        for label, path in drafts.items():
            engine = SpeculativeEngine(verifier, tokenizer, LlamaCppDraft(path, max_sessions=1), scheduler=scheduler)
            engine.generate(EVAL_PROMPTS[0], max_tokens=8, k=EVAL_K)  # warm-up: first-call costs out of the figures
            proposed = accepted = tokens = 0
            seconds = 0.0
            texts = []
            for prompt in EVAL_PROMPTS:
                started = time.perf_counter()
                done = engine.generate(prompt, max_tokens=EVAL_MAX_TOKENS, k=EVAL_K)
                seconds += time.perf_counter() - started
                proposed += done.stats.proposed
                accepted += done.stats.accepted
                tokens += done.stats.completion_tokens
                texts.append(done.text)
            results[label] = {
                "acceptance": round(accepted / proposed, 4) if proposed else 0.0,
                "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
                "tokens": tokens,
                "texts": texts,
            }
    finally:
        scheduler.close()
    return results


def _evaluate(rollout: Rollout) -> dict:
    candidate, baseline = rollout.candidate, rollout.baseline
    assert candidate is not None, "evaluate runs after convert"
    results = evaluate_drafts(
        _verifier_source(rollout.model), {"current": baseline.source, "candidate": candidate.source}
    )
    current, new = results["current"], results["candidate"]
    # greedy decoding is lossless whatever the draft: both must have written the verifier's own text
    lossless = current.pop("texts") == new.pop("texts")
    ratio = new["acceptance"] / current["acceptance"] if current["acceptance"] else 1.0
    figures = {
        "prompts": len(EVAL_PROMPTS),
        "k": EVAL_K,
        "current": current,
        "candidate": new,
        "acceptance_ratio": round(ratio, 4),
        "min_ratio": float(rollout.min_eval_ratio),
        "same_greedy_text": lossless,
    }
    if ratio < float(rollout.min_eval_ratio):
        raise StepFailed(
            f"acceptance {new['acceptance']:.3f} against the current draft's {current['acceptance']:.3f}"
            f" (ratio {ratio:.3f} < {rollout.min_eval_ratio})"
        )
    return figures


def rollout_canary_start(*, rollout_id: int) -> bool:
    """Step 4: a share of live sessions gets the candidate; ``rollout_canary_check`` decides from the ledger."""
    with transaction.atomic():
        rollout = Rollout.objects.select_for_update().filter(pk=rollout_id).first()
        if rollout is None or rollout.status != RolloutStatus.RUNNING:
            return False
        rollout.status, rollout.step, rollout.canary_started_at = RolloutStatus.CANARY, "canary", timezone.now()
        rollout.save(update_fields=["status", "step", "canary_started_at"])
        step = RolloutStep.objects.create(
            rollout=rollout,
            name="canary",
            status=StepStatus.WAITING,
            figures={"share": float(rollout.canary_share), "min_samples": rollout.canary_min_samples},
        )
        _audit_step(rollout, step)
    _plans_changed()
    return True


def _canary_figures(rollout: Rollout) -> tuple[ServingFigures, ServingFigures, str]:
    """(candidate, current, where the current's figures come from): the same window, else the current's recent past."""
    assert rollout.candidate is not None and rollout.canary_started_at is not None
    since = rollout.canary_started_at
    candidate = serving_figures(model=rollout.model, version=rollout.candidate.version, since=since)
    current = serving_figures(model=rollout.model, version=rollout.baseline.version, since=since)
    basis = "same window"
    if current.completions < rollout.canary_min_samples:  # a share of 1 leaves it no traffic: its recent past
        current = serving_figures(
            model=rollout.model, version=rollout.baseline.version, before=since, last=rollout.canary_min_samples
        )
        basis = "before the canary"
    return candidate, current, basis


def canary_verdict(rollout: Rollout, candidate: ServingFigures, current: ServingFigures) -> list[str]:
    """Why the candidate is worse than the current draft (empty: it is not)."""
    reasons = []
    # a draft the controller stopped using drafted nothing: as good as no acceptance at all
    new_acc = candidate.acceptance if candidate.acceptance is not None else 0.0
    if current.acceptance is not None and new_acc < current.acceptance * (1 - float(rollout.max_canary_drop)):
        reasons.append(
            f"acceptance {new_acc:.3f} < current {current.acceptance:.3f} - {float(rollout.max_canary_drop):.0%}"
        )
    if (candidate.error_rate or 0.0) > (current.error_rate or 0.0) + CANARY_MAX_ERROR_RISE:
        reasons.append(f"error rate {candidate.error_rate:.3f} > current {current.error_rate or 0.0:.3f}")
    timed = min(candidate.completions, current.completions) >= CANARY_TTFT_MIN_SAMPLES
    if timed and candidate.ttft_ms is not None and current.ttft_ms is not None:
        if candidate.ttft_ms > current.ttft_ms * CANARY_MAX_TTFT_RATIO + CANARY_TTFT_SLACK_MS:
            reasons.append(f"mean TTFT {candidate.ttft_ms:.1f} ms > current {current.ttft_ms:.1f} ms")
    return reasons


def rollout_canary_check(*, rollout_id: int) -> str:
    """Compare the canary's candidate with the current draft on the ledger; promote, roll back, or keep waiting.

    Returns the rollout's status afterwards (``canary`` while it waits for samples).
    """
    rollout = Rollout.objects.select_related("candidate", "baseline").filter(pk=rollout_id).first()
    if rollout is None or rollout.status != RolloutStatus.CANARY:
        return rollout.status if rollout is not None else "missing"
    candidate, current, basis = _canary_figures(rollout)
    figures = {
        "share": float(rollout.canary_share),
        "min_samples": rollout.canary_min_samples,
        "candidate": candidate.as_dict(),
        "current": current.as_dict(),
        "current_basis": basis,
        "checked_at": timezone.now().isoformat(),
    }
    step = rollout.steps.filter(name="canary").last()
    enough = min(candidate.completions, current.completions) >= rollout.canary_min_samples
    reasons = canary_verdict(rollout, candidate, current) if enough else []
    if step is not None:
        step.figures = {**figures, "verdict": "worse" if reasons else ("not worse" if enough else "waiting")}
        if enough:
            step.status = StepStatus.FAILED if reasons else StepStatus.PASSED
            step.finished_at = timezone.now()
            step.error = "; ".join(reasons)
        step.save()
        if enough:
            with transaction.atomic():
                _audit_step(rollout, step)
    if not enough:
        return rollout.status
    if reasons:
        rollout_rollback(rollout=rollout, by=None, reason="canary worse than the current draft: " + "; ".join(reasons))
    elif rollout.auto_promote:
        rollout_promote(rollout=rollout, by=None, reason="canary no worse than the current draft")
    rollout.refresh_from_db()
    return rollout.status


def canaries_check() -> dict[int, str]:
    """Every canary's check (beat runs it): rollout id -> status afterwards."""
    ids = list(Rollout.objects.filter(status=RolloutStatus.CANARY).values_list("id", flat=True))
    return {rollout_id: rollout_canary_check(rollout_id=rollout_id) for rollout_id in ids}


# rollouts: decisions ------------------------------------------------------------------------------
def _decide(rollout: Rollout, *, by, allowed: tuple[str, ...], status: str, action: str, reason: str) -> Rollout:
    with transaction.atomic():
        fresh = Rollout.objects.select_for_update().select_related("candidate").get(pk=rollout.pk)
        if fresh.status not in allowed:
            raise InvalidTransition(f"rollout {fresh.pk} is {fresh.status}: it cannot be {status.replace('_', ' ')}")
        before = fresh.status
        fresh.status, fresh.decision = status, reason or fresh.decision
        if status in (RolloutStatus.PROMOTED, RolloutStatus.ROLLED_BACK):
            fresh.finished_at = timezone.now()
            fresh.step = "promote" if status == RolloutStatus.PROMOTED else "rollback"
            RolloutStep.objects.create(
                rollout=fresh,
                name=fresh.step,
                status=StepStatus.PASSED,
                started_at=fresh.finished_at,
                finished_at=fresh.finished_at,
                figures={"by": by.get_username() if by is not None else "automatic", "reason": reason},
            )
        fresh.save()
        candidate = fresh.candidate
        if status == RolloutStatus.PROMOTED:
            assert candidate is not None
            # the old current steps down first: one current draft per model, by constraint
            ModelVersion.objects.filter(model=fresh.model, role=ModelRole.DRAFT, status=VersionStatus.CURRENT).update(
                status=VersionStatus.RETIRED
            )
            candidate.status = VersionStatus.CURRENT
            candidate.save(update_fields=["status"])
        elif (
            status == RolloutStatus.ROLLED_BACK and candidate is not None and candidate.status != VersionStatus.CURRENT
        ):
            candidate.status = VersionStatus.REJECTED
            candidate.save(update_fields=["status"])
        audit_event_record(
            action=action,
            by=by,
            tenant=None,
            obj=fresh,
            changes={
                "status": {"before": before, "after": status},
                "candidate": {"before": None, "after": candidate.version if candidate is not None else None},
                "reason": {"before": None, "after": reason or None},
            },
        )
    _plans_changed()
    return fresh


def rollout_promote(*, rollout: Rollout, by, reason: str = "") -> Rollout:
    """The candidate becomes the current draft: new sessions get it; sessions in flight finish on theirs."""
    return _decide(
        rollout,
        by=by,
        allowed=(RolloutStatus.CANARY, RolloutStatus.PAUSED),
        status=RolloutStatus.PROMOTED,
        action=AuditAction.ROLLOUT_PROMOTE,
        reason=reason or "promoted by hand",
    )


def rollout_rollback(*, rollout: Rollout, by, reason: str = "") -> Rollout:
    """Stop the rollout; the candidate never serves a new session again (pins aside, which owners chose)."""
    return _decide(
        rollout,
        by=by,
        allowed=(RolloutStatus.RUNNING, RolloutStatus.CANARY, RolloutStatus.PAUSED),
        status=RolloutStatus.ROLLED_BACK,
        action=AuditAction.ROLLOUT_ROLLBACK,
        reason=reason or "rolled back by hand",
    )


def rollout_pause(*, rollout: Rollout, by) -> Rollout:
    """The canary stops sending sessions to the candidate until resumed, promoted or rolled back."""
    return _decide(
        rollout,
        by=by,
        allowed=(RolloutStatus.CANARY,),
        status=RolloutStatus.PAUSED,
        action=AuditAction.ROLLOUT_PAUSE,
        reason="",
    )


def rollout_resume(*, rollout: Rollout, by) -> Rollout:
    return _decide(
        rollout,
        by=by,
        allowed=(RolloutStatus.PAUSED,),
        status=RolloutStatus.CANARY,
        action=AuditAction.ROLLOUT_RESUME,
        reason="",
    )


def _plans_changed() -> None:
    """This process's draft plans are read again once the change commits (others' within their TTL)."""
    from registry.serving import draft_plans

    transaction.on_commit(draft_plans.refresh)
