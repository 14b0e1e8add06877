from django import forms
from django.contrib import admin
from django.db import models

from inference.models import CloudUpstream, SloSample
from tenants import services as tenant_services
from tenants.models import Price
from tenants.tiers import Tier


@admin.register(SloSample)
class SloSampleAdmin(admin.ModelAdmin):
    """Read-only: samples are measurements, written once by the gateway."""

    list_display = ("request_id", "tenant", "model", "route_tier", "outcome", "ttft_ms", "inter_token_ms", "e2e_ms")
    list_filter = ("outcome", "route_tier", "model")
    search_fields = ("request_id",)
    date_hierarchy = "created_at"

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


def _formfield(field, **kwargs):
    if isinstance(field, models.URLField):
        kwargs["assume_scheme"] = "https"
    return field.formfield(**kwargs)


class CloudUpstreamForm(forms.ModelForm):
    """The upstream's row, and the price of its model's cloud tier (published as a new price book when it changes)."""

    prompt_per_mtok = forms.DecimalField(
        min_value=0, decimal_places=9, max_digits=20, label="Prompt price per 1M tokens"
    )
    completion_per_mtok = forms.DecimalField(
        min_value=0, decimal_places=9, max_digits=20, label="Completion price per 1M tokens"
    )

    class Meta:
        model = CloudUpstream
        fields = "__all__"
        formfield_callback = _formfield  # a URL typed without a scheme means https

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.instance.model if self.instance.pk else None
        if model:
            price = Price.objects.filter(book__is_active=True, model=model, tier=Tier.CLOUD.value).first()
            if price is not None:
                self.fields["prompt_per_mtok"].initial = price.prompt_per_mtok
                self.fields["completion_per_mtok"].initial = price.completion_per_mtok


@admin.register(CloudUpstream)
class CloudUpstreamAdmin(admin.ModelAdmin):
    """Operators register the OpenAI-compatible servers that serve models' cloud tier; keys stay in the environment."""

    form = CloudUpstreamForm
    list_display = ("name", "model", "upstream_model", "base_url", "priority", "enabled", "all_tenants", "note")
    list_filter = ("enabled", "model")
    search_fields = ("name", "model", "upstream_model", "base_url")
    filter_horizontal = ("tenants",)

    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        price = {
            "model": obj.model,
            "tier": Tier.CLOUD.value,
            "prompt_per_mtok": form.cleaned_data["prompt_per_mtok"],
            "completion_per_mtok": form.cleaned_data["completion_per_mtok"],
        }
        tenant_services.price_book_amend(prices=[price], note=f"cloud upstream {obj.name} (admin)")
