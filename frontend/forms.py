"""The console's forms: they check a field's shape; the services decide what is allowed."""

from __future__ import annotations

from datetime import UTC, datetime, time

from django import forms
from django.utils import timezone

from inference.models import SEMANTIC_THRESHOLD_DEFAULT, PiiAction
from tenants.models import ApiKey
from tenants.tiers import TIER_CHOICES


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="So you can tell your keys apart, e.g. “batch jobs”.")
    scopes = forms.MultipleChoiceField(
        choices=ApiKey.Scope.choices,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every scope.",
    )
    expires_on = forms.DateField(
        required=False,
        label="Expires on (UTC)",
        widget=forms.DateInput(attrs={"type": "date"}),
        help_text="Optional. The key stops working at 00:00 UTC that day.",
    )

    def clean_expires_on(self):
        day = self.cleaned_data["expires_on"]
        if day is not None and day <= timezone.now().astimezone(UTC).date():
            raise forms.ValidationError("Pick a day after today.")
        return day

    @property
    def expires_at(self) -> datetime | None:
        day = self.cleaned_data.get("expires_on")
        return None if day is None else datetime.combine(day, time.min, tzinfo=UTC)


class RoutingPolicyForm(forms.Form):
    """The next version of a tenant's routing policy, as owners and admins edit it in the console."""

    allowed_tiers = forms.MultipleChoiceField(
        choices=TIER_CHOICES, widget=forms.CheckboxSelectMultiple, help_text="The tiers this tenant's requests may use."
    )
    allow_requested_tier = forms.BooleanField(
        required=False, label="Requests may ask for a tier", help_text="The `tier` field of a request."
    )
    pii_action = forms.ChoiceField(choices=PiiAction.choices, label="Personal data in a prompt")
    difficulty_routing = forms.BooleanField(
        required=False, label="Route by difficulty", help_text="Routine prompts to the edge, hard ones up."
    )
    cloud_threshold = forms.FloatField(
        required=False, min_value=0, max_value=1, help_text="Empty: the classifier's committed default."
    )
    hard_threshold = forms.FloatField(
        required=False, min_value=0, max_value=1, help_text="Empty: the classifier's committed default."
    )
    edge_max_output_tokens = forms.IntegerField(min_value=1, label="Edge: most output tokens")
    edge_max_prompt_tokens = forms.IntegerField(min_value=1, label="Edge: longest prompt (tokens)")
    edge_max_streams = forms.IntegerField(min_value=1, label="Edge: streams before interactive requests spill up")
    at_capacity = forms.ChoiceField(
        choices=[("wait", "wait for a slot"), ("spill", "spill to another allowed tier")],
        label="When the tier's engines are all busy",
    )
    cache_ttl_s = forms.IntegerField(
        min_value=0, label="Exact cache: keep answers (s)", help_text="0 turns the result cache off."
    )
    cache_sampled = forms.BooleanField(required=False, label="Cache sampled requests too")
    cache_pii = forms.BooleanField(required=False, label="Cache requests with personal data")
    semantic_cache = forms.BooleanField(
        required=False,
        label="Semantic cache",
        help_text="Replay the answer of a prompt close in meaning (same model, sampling and tenant).",
    )
    semantic_threshold = forms.FloatField(
        required=False,
        min_value=0.5,
        max_value=1,
        label="Semantic cache: similarity needed",
        help_text="Cosine, 0.5-1 (empty: the default). Prompts must also share their content words and numbers.",
    )

    def clean_semantic_threshold(self) -> float:
        value = self.cleaned_data.get("semantic_threshold")
        return SEMANTIC_THRESHOLD_DEFAULT if value is None else value

    escalation = forms.BooleanField(required=False, label="Escalate low-confidence edge answers")
    escalation_min_mean_logprob = forms.FloatField(max_value=0, label="Escalate below mean log-probability")
    escalation_max_low_share = forms.FloatField(
        min_value=0, max_value=1, label="Escalate above share of unlikely tokens"
    )
    escalation_hold_tokens = forms.IntegerField(min_value=1, max_value=256, label="Tokens held back to judge")
    note = forms.CharField(max_length=300, required=False, help_text="Why this version (shown in its history).")


class CloudUpstreamForm(forms.Form):
    """An operator registers (or, by name, updates) a cloud upstream and prices its model's cloud tier."""

    name = forms.SlugField(max_length=64, help_text="Shown in the console and the ledger.")
    model = forms.CharField(max_length=200, help_text="The Tandem model whose cloud tier it serves.")
    base_url = forms.URLField(max_length=500, assume_scheme="https", help_text="The OpenAI-compatible API root.")
    api_key_env = forms.CharField(
        max_length=128, required=False, label="Key's environment variable", help_text="Its NAME, never the key."
    )
    upstream_model = forms.CharField(max_length=200, help_text="The model name the upstream knows.")
    prompt_per_mtok = forms.DecimalField(min_value=0, decimal_places=9, max_digits=20, label="Prompt $ / 1M tokens")
    completion_per_mtok = forms.DecimalField(
        min_value=0, decimal_places=9, max_digits=20, label="Completion $ / 1M tokens"
    )
    all_tenants = forms.BooleanField(required=False, label="Every tenant may use it")
    priority = forms.IntegerField(min_value=0, max_value=32767, initial=100, help_text="Lower is tried first.")
    note = forms.CharField(max_length=300, required=False)


class RateLimitsForm(forms.Form):
    """A tenant's or one key's rate limits, as owners and admins set them (empty: the level above's)."""

    target = forms.CharField(widget=forms.HiddenInput)  # "tenant", or a key's id
    max_streams = forms.IntegerField(
        required=False, min_value=1, label="Streams at once", help_text="More wait their turn in the queue."
    )
    requests_per_minute = forms.IntegerField(
        required=False, min_value=1, label="Requests per minute", help_text="Past it: 429 with Retry-After."
    )
    tokens_per_minute = forms.IntegerField(
        required=False,
        min_value=1,
        label="Tokens per minute",
        help_text="Prompt + max_tokens of each request, the unused part given back when it ends.",
    )
