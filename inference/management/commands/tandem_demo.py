"""``manage.py tandem_demo``: the demo tenant, its owner and an API key, and prices for the served models.

Idempotent: a second run keeps the user, tenant and price book, sets a new password (or
the one given) and issues a new API key, both printed: raw keys are shown once and never
stored, so an old one cannot be shown again.
"""

from __future__ import annotations

import secrets
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils.text import slugify

from tenants import errors, selectors, services
from tenants.models import Membership, PriceBook

DEMO_TIERS = ("edge", "speculative", "cloud")
# demo prices, in dollars: per million tokens, per GPU hour; the GPU ceiling bounds a reservation
DEMO_RATES = {
    "edge": {
        "prompt_per_mtok": "0.02",
        "completion_per_mtok": "0.05",
        "draft_per_mtok": "0",
        "gpu_per_hour": "0",
        "cache_per_mtok": "0.005",
    },
    "speculative": {
        "prompt_per_mtok": "0.10",
        "completion_per_mtok": "0.40",
        "draft_per_mtok": "0.01",
        "gpu_per_hour": "2.50",
        "cache_per_mtok": "0.01",
    },
    "cloud": {
        "prompt_per_mtok": "0.50",
        "completion_per_mtok": "1.50",
        "draft_per_mtok": "0",
        "gpu_per_hour": "0",
        "cache_per_mtok": "0.05",
    },
}
MAX_GPU_MS_PER_TOKEN = "100"
DEMO_MONTHLY_LIMIT = Decimal("10.00")


class Command(BaseCommand):
    help = "Create the demo tenant, user and API key, and publish demo prices (prints the credentials)."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")
        parser.add_argument("--password", default=None, help="default: a new random one, printed")
        parser.add_argument("--models", default="tandem-demo", help="comma-separated model names to price")
        parser.add_argument(
            "--cloud-url",
            default="",
            help="register the local stand-in for a cloud provider (python -m inference.standin) at this base URL "
            "as the models' cloud upstream",
        )

    @transaction.atomic
    def handle(self, *args, username: str, password: str | None, models: str, cloud_url: str, **options):
        user_model = get_user_model()
        user = user_model.objects.filter(username=username).first()
        password = password or secrets.token_urlsafe(9)
        if user is None:
            user = user_model.objects.create_user(
                username=username, password=password, is_staff=True, is_superuser=True
            )
        else:
            user.set_password(password)
            user.save(update_fields=["password"])
        membership = Membership.objects.filter(user=user).select_related("tenant").first()
        if membership is None:
            tenant = services.tenant_create(name="Demo", owner=user)
            services.budget_set(tenant=tenant, period="month", hard_limit=DEMO_MONTHLY_LIMIT, soft_limit=None)
        else:
            tenant = membership.tenant
        names = [m.strip() for m in models.split(",") if m.strip()]
        self._ensure_prices(names)
        if cloud_url:
            self._register_standin(names, cloud_url)
        _, raw_key = services.api_key_create(tenant=tenant, created_by=user, name="demo key")
        self.stdout.write(
            "\n".join(
                [
                    "Tandem demo account (the key is shown once):",
                    f"  Tenant    {tenant.name} (id {tenant.pk})",
                    f"  Username  {username}",
                    f"  Password  {password}",
                    f"  API key   {raw_key}",
                ]
            )
        )

    def _ensure_prices(self, names: list[str]) -> None:
        """Publish a new price book only when a served model lacks an active price."""
        missing = []
        for name in names:
            for tier in DEMO_TIERS:
                try:
                    selectors.price_active(model=name, tier=tier)
                except errors.PriceNotFound:
                    missing.append(name)
                    break
        if not missing:
            return
        active = PriceBook.objects.filter(is_active=True).first()
        keep = (
            [] if active is None else [services.price_as_dict(p) for p in active.prices.all() if p.model not in missing]
        )
        prices = keep + [
            {"model": name, "tier": tier, "max_gpu_ms_per_token": Decimal(MAX_GPU_MS_PER_TOKEN), **_rates(tier)}
            for name in missing
            for tier in DEMO_TIERS
        ]
        version = (PriceBook.objects.order_by("-version").values_list("version", flat=True).first() or 0) + 1
        services.price_book_publish(version=version, prices=prices, note="demo prices (manage.py tandem_demo)")

    def _register_standin(self, names: list[str], base_url: str) -> None:
        """The local stand-in as every demo model's cloud upstream, for every tenant, at the demo's cloud prices."""
        from inference.services import cloud_upstream_register
        from inference.standin import MODEL_ALIAS, model_path

        for name in names:
            cloud_upstream_register(
                name=f"standin-{slugify(name)}",
                model=name,
                base_url=base_url,
                upstream_model=MODEL_ALIAS,
                prompt_per_mtok=Decimal(DEMO_RATES["cloud"]["prompt_per_mtok"]),
                completion_per_mtok=Decimal(DEMO_RATES["cloud"]["completion_per_mtok"]),
                all_tenants=True,
                tokenizer=str(model_path()),
                continues_final_message=True,
                note="a local stand-in for a cloud provider: llama.cpp's server with SmolLM2-135M-Instruct",
            )


def _rates(tier: str) -> dict[str, Decimal]:
    return {k: Decimal(v) for k, v in DEMO_RATES[tier].items()}
