"""Writes of the inference app: registering the cloud upstreams that serve models' cloud tier."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import transaction

from inference.errors import InvalidRequest
from inference.models import CloudUpstream
from tenants import errors as tenant_errors
from tenants import services as tenant_services
from tenants.models import Tenant
from tenants.tiers import Tier


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
    **options,
) -> CloudUpstream:
    """Register (or update, by ``name``) an upstream serving ``model``'s cloud tier, and price that tier.

    ``options`` are the row's other fields (timeouts, priority, tokenizer, note, ...). The
    prices go into a new price book version (``price_book_amend``) only when they differ
    from the active ones. Invalid values raise ``InvalidRequest`` naming the field.
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
    for field, value in fields.items():
        setattr(upstream, field, value)
    try:
        upstream.full_clean()
    except ValidationError as exc:
        field, messages = next(iter(exc.message_dict.items()))
        raise InvalidRequest(f"{field}: {' '.join(messages)}", param=field) from None
    upstream.save()
    upstream.tenants.set(list(tenants))
    cloud_price = {
        "model": model,
        "tier": Tier.CLOUD.value,
        "prompt_per_mtok": prompt_per_mtok,
        "completion_per_mtok": completion_per_mtok,
    }
    try:
        tenant_services.price_book_amend(prices=[cloud_price], note=f"cloud upstream {name}")
    except tenant_errors.InvalidInput as exc:
        raise InvalidRequest(f"the cloud tier's price: {exc}") from None
    return upstream
