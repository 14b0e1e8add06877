from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db import models, transaction

from inference.errors import InvalidRequest
from inference.models import CloudUpstream, RoutingPolicy, SloSample
from inference.services import POLICY_FIELDS, policy_validate, routing_policy_publish
from tenants import services as tenant_services
from tenants.models import Price
from tenants.tiers import TIER_CHOICES, Tier


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
        # the admin's own save, then the same audit event and price as cloud_upstream_register, by this operator
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            changed = [name for name in form.changed_data if name in form.cleaned_data and name != "tenants"]
            after = {name: form.cleaned_data[name] for name in changed}
            before = {name: form.initial.get(name) for name in after} if change else {}
            tenant_services.audit_event_record(
                action="upstream.register",
                by=request.user,
                tenant=None,
                obj=obj,
                changes=tenant_services.audit_changes(before=before, after=after),
            )
            price = {
                "model": obj.model,
                "tier": Tier.CLOUD.value,
                "prompt_per_mtok": form.cleaned_data["prompt_per_mtok"],
                "completion_per_mtok": form.cleaned_data["completion_per_mtok"],
            }
            tenant_services.price_book_amend(prices=[price], note=f"cloud upstream {obj.name} (admin)", by=request.user)


class RoutingPolicyForm(forms.ModelForm):
    """The next version's values, checked as ``routing_policy_publish`` checks them (errors on the form, not a 500)."""

    allowed_tiers = forms.MultipleChoiceField(choices=TIER_CHOICES, widget=forms.CheckboxSelectMultiple)

    class Meta:
        model = RoutingPolicy
        fields = ("tenant", *POLICY_FIELDS)

    def clean(self):
        cleaned = super().clean()
        values = {name: cleaned.get(name) for name in POLICY_FIELDS if name in cleaned}
        try:
            policy_validate(values)
        except InvalidRequest as exc:
            self.add_error(exc.param if exc.param in self.fields else None, exc.message)
        return cleaned


@admin.register(RoutingPolicy)
class RoutingPolicyAdmin(admin.ModelAdmin):
    """Published versions are read-only; "add" publishes the next version for its tenant (or the platform's default)."""

    list_display = ("label", "tenant", "is_active", "allowed_tiers", "pii_action", "difficulty_routing", "created_at")
    list_filter = ("is_active", "pii_action", "tenant")
    form = RoutingPolicyForm

    def has_change_permission(self, request, obj=None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # ledger rows name these versions

    def save_model(self, request, obj, form, change) -> None:
        fields = {name: form.cleaned_data[name] for name in POLICY_FIELDS if name in form.cleaned_data}
        try:
            published = routing_policy_publish(
                tenant=form.cleaned_data.get("tenant"), created_by=request.user, **fields
            )
        except InvalidRequest as exc:
            raise ValidationError(exc.message) from None
        obj.pk, obj.version, obj.is_active = published.pk, published.version, True
