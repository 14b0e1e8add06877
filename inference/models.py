"""The inference side's data besides the ledger: one SLO sample per finished request, and the cloud upstreams."""

from django.core.validators import MinValueValidator, RegexValidator
from django.db import models


class SloSample(models.Model):
    """Latency and outcome of one request (TTFT, mean inter-token, end to end), for SLO dashboards."""

    request_id = models.CharField(max_length=64, unique=True)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="slo_samples")
    model = models.CharField(max_length=128)
    route_tier = models.CharField(max_length=16)
    ttft_ms = models.FloatField(null=True)
    inter_token_ms = models.FloatField(null=True)
    e2e_ms = models.FloatField()
    tokens = models.PositiveIntegerField()
    outcome = models.CharField(max_length=16)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "created_at"])]

    def __str__(self) -> str:
        return f"{self.request_id} {self.outcome} ttft={self.ttft_ms}"


ENV_VAR_NAME = r"^[A-Z_][A-Z0-9_]*$"


class CloudUpstream(models.Model):
    """An OpenAI-compatible server that serves a model's cloud tier (a provider, or anything that speaks its API).

    The key is never stored: ``api_key_env`` names the environment variable of the
    platform's processes that holds it, so a database dump leaks no credential. Prices are
    the price book's (``model`` on the ``cloud`` tier). Upstreams of one model are tried in
    ``priority`` order, each behind its own circuit breaker.
    """

    name = models.SlugField(max_length=64, unique=True, help_text="a short name: shown in the console and the ledger")
    model = models.CharField(max_length=200, help_text="the public model id whose cloud tier this serves")
    base_url = models.URLField(max_length=500, help_text="the OpenAI-compatible API root, e.g. https://host/v1")
    api_key_env = models.CharField(
        max_length=128,
        blank=True,
        validators=[RegexValidator(ENV_VAR_NAME, "an environment variable name, like OPENAI_API_KEY")],
        help_text="the NAME of the environment variable holding the key (never the key); empty = no key",
    )
    upstream_model = models.CharField(max_length=200, help_text="the model name the upstream knows")
    connect_timeout_s = models.FloatField(default=3.0, validators=[MinValueValidator(0.1)])
    first_token_timeout_s = models.FloatField(
        default=30.0, validators=[MinValueValidator(0.1)], help_text="the longest wait for the first token"
    )
    idle_timeout_s = models.FloatField(
        default=30.0, validators=[MinValueValidator(0.1)], help_text="the longest wait between two chunks"
    )
    all_tenants = models.BooleanField(default=False, help_text="every tenant may use it")
    tenants = models.ManyToManyField(
        "tenants.Tenant", blank=True, related_name="cloud_upstreams", help_text="the tenants that may use it"
    )
    priority = models.PositiveSmallIntegerField(default=100, help_text="lower is tried first")
    enabled = models.BooleanField(default=True)
    continues_final_message = models.BooleanField(
        default=False,
        help_text="it can continue a partial assistant message (llama.cpp's server and vLLM can): used when a "
        "stream fails over to it mid-answer",
    )
    note = models.CharField(max_length=300, blank=True, help_text="shown in the console (e.g. 'local stand-in')")
    tokenizer = models.CharField(
        max_length=500,
        blank=True,
        help_text="path of a GGUF file of the upstream's model: counts tokens when the upstream reports no usage, "
        "and renders its chat template; empty = estimate with the local model's tokenizer",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model", "priority", "name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(connect_timeout_s__gt=0)
                & models.Q(first_token_timeout_s__gt=0)
                & models.Q(idle_timeout_s__gt=0),
                name="cloud_upstream_timeouts_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.model} -> {self.upstream_model})"
