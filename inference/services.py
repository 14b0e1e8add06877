"""Writes of the inference app: the cloud upstreams that serve models' cloud tier, and the routing policies."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import transaction

from inference.errors import InvalidRequest
from inference.models import SEMANTIC_THRESHOLD_DEFAULT, CloudUpstream, RoutingPolicy
from tenants import errors as tenant_errors
from tenants import services as tenant_services
from tenants.models import Tenant
from tenants.tiers import Tier


def _full_clean(row) -> None:
    """The row's own validation, its first error as an ``InvalidRequest`` naming the field."""
    try:
        row.full_clean()
    except ValidationError as exc:
        field, messages = next(iter(exc.message_dict.items()))
        raise InvalidRequest(f"{field}: {' '.join(messages)}", param=field) from None


@transaction.atomic
def cloud_upstream_register(
    *,
    name: str,
    model: str,
    base_url: str,
    upstream_model: str,
    prompt_per_mtok: Decimal | str,
    completion_per_mtok: Decimal | str,
    api_key_env: str = "",
    tenants: Iterable[Tenant] = (),
    all_tenants: bool = False,
    by=None,
    **options,
) -> CloudUpstream:
    """Register (or update, by ``name``) an upstream serving ``model``'s cloud tier, and price that tier.

    ``options`` are the row's other fields (timeouts, priority, tokenizer, note, ...). The
    prices go into a new price book version (``price_book_amend``) only when they differ
    from the active ones. Invalid values raise ``InvalidRequest`` naming the field. ``by``
    (the operator, None: the system) is recorded in the audit log.
    """
    upstream = CloudUpstream.objects.filter(name=name).first() or CloudUpstream(name=name)
    fields = dict(
        model=model,
        base_url=base_url,
        upstream_model=upstream_model,
        api_key_env=api_key_env,
        all_tenants=all_tenants,
        **options,
    )
    before = {f: getattr(upstream, f) for f in fields} if upstream.pk else {}
    if upstream.pk:
        before["tenants"] = sorted(upstream.tenants.values_list("pk", flat=True))
    for field, value in fields.items():
        setattr(upstream, field, value)
    _full_clean(upstream)
    upstream.save()
    tenants = list(tenants)
    upstream.tenants.set(tenants)
    after = fields | {"tenants": sorted(t.pk for t in tenants)}
    tenant_services.audit_event_record(
        action="upstream.register",
        by=by,
        tenant=None,  # platform-wide: operators register upstreams, for one tenant or many
        obj=upstream,
        changes=tenant_services.audit_changes(before=before, after=after),
    )
    cloud_price = {
        "model": model,
        "tier": Tier.CLOUD.value,
        "prompt_per_mtok": prompt_per_mtok,
        "completion_per_mtok": completion_per_mtok,
    }
    try:
        tenant_services.price_book_amend(prices=[cloud_price], note=f"cloud upstream {name}", by=by)
    except tenant_errors.InvalidInput as exc:
        raise InvalidRequest(f"the cloud tier's price: {exc}") from None
    return upstream


POLICY_FIELDS = (
    "allowed_tiers",
    "allow_requested_tier",
    "pii_action",
    "difficulty_routing",
    "cloud_threshold",
    "hard_threshold",
    "edge_max_output_tokens",
    "edge_max_prompt_tokens",
    "edge_max_streams",
    "at_capacity",
    "cache_ttl_s",
    "cache_sampled",
    "cache_pii",
    "semantic_cache",
    "semantic_threshold",
    "escalation",
    "escalation_min_mean_logprob",
    "escalation_max_low_share",
    "escalation_hold_tokens",
    "note",
)


@transaction.atomic
def routing_policy_publish(*, tenant: Tenant | None, created_by=None, **fields) -> RoutingPolicy:
    """Publish the next version of a tenant's routing policy (``tenant`` None: the platform's default) and make it active.

    Fields not given keep the values of the version in force (a tenant's first version
    starts from the platform's default). Published versions are never edited: ledger rows
    name the version that routed them. Invalid values raise ``InvalidRequest`` naming the field.
    """
    from inference.selectors import policy_cache

    unknown = set(fields) - set(POLICY_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown routing policy fields: {', '.join(sorted(unknown))}")
    scope = (
        RoutingPolicy.objects.filter(tenant=tenant)
        if tenant is not None
        else RoutingPolicy.objects.filter(tenant__isnull=True)
    )
    current = scope.select_for_update().filter(is_active=True).first()
    if current is None and tenant is not None:
        current = RoutingPolicy.objects.filter(tenant__isnull=True, is_active=True).first()
    base = {name: getattr(current, name) for name in POLICY_FIELDS} if current is not None else {}
    if "allowed_tiers" not in base:
        base["allowed_tiers"] = [t.value for t in Tier]
    values = base | fields
    policy_validate(values)
    latest = scope.order_by("-version").values_list("version", flat=True).first() or 0
    scope.filter(is_active=True).update(is_active=False)
    policy = RoutingPolicy(tenant=tenant, version=latest + 1, is_active=True, created_by=created_by, **values)
    _full_clean(policy)
    policy.save()
    tenant_services.audit_event_record(
        action="policy.publish",
        by=created_by,
        tenant=tenant,
        obj=policy,
        changes=tenant_services.audit_changes(
            before=base | {"version": latest}, after=values | {"version": policy.version}
        ),
    )
    policy_cache.forget()
    transaction.on_commit(policy_cache.forget)
    return policy


def policy_validate(values: dict) -> None:
    """Refuse (``InvalidRequest``, naming the field) values no policy may hold; normalises ``allowed_tiers``."""
    tiers = values.get("allowed_tiers")
    if not isinstance(tiers, list | tuple) or not tiers or any(t not in Tier._value2member_map_ for t in tiers):
        raise InvalidRequest("allowed_tiers must list one or more of edge, speculative, cloud", param="allowed_tiers")
    values["allowed_tiers"] = [t.value for t in Tier if t.value in tiers]  # one order, no repeats
    for name in ("cloud_threshold", "hard_threshold"):
        value = values.get(name)
        if value is not None and not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
            raise InvalidRequest(f"{name} must be a probability between 0 and 1, or empty", param=name)
    similarity = values.get("semantic_threshold", SEMANTIC_THRESHOLD_DEFAULT)
    if not (isinstance(similarity, int | float) and 0.5 <= similarity <= 1.0):
        raise InvalidRequest(
            "semantic_threshold must be a cosine similarity between 0.5 and 1", param="semantic_threshold"
        )
    share = values.get("escalation_max_low_share", 0.3)
    if not 0.0 <= share <= 1.0:
        raise InvalidRequest("escalation_max_low_share must be between 0 and 1", param="escalation_max_low_share")
    if values.get("escalation_min_mean_logprob", -2.5) > 0:
        raise InvalidRequest("a mean log-probability is at most 0", param="escalation_min_mean_logprob")
