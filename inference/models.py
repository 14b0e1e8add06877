"""The inference side's data besides the ledger: SLO samples, cloud upstreams and routing policies."""

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
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
    latency_class = models.CharField(max_length=16, default="interactive", help_text="interactive or batch")
    source = models.CharField(
        max_length=16, default="generation", help_text="generation, exact_cache or semantic_cache"
    )
    fallback = models.BooleanField(default=False, help_text="a tier failed and another took over (or escalated)")
    queued_ms = models.FloatField(default=0, help_text="how long it waited in the fair queue for an engine slot")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "created_at"])]

    def __str__(self) -> str:
        return f"{self.request_id} {self.outcome} ttft={self.ttft_ms}"


ENV_VAR_NAME = r"^[A-Z_][A-Z0-9_]*$"
# The semantic cache's similarity a policy asks for unless it says otherwise: no near miss of
# inference/assets/semantic/pairs.jsonl reaches a match at any threshold from 0.7 with the word
# guard, and 0.8 leaves a margin (python -m inference.semantic_eval; README).
SEMANTIC_THRESHOLD_DEFAULT = 0.8


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


class PiiAction(models.TextChoices):
    KEEP_OFF_CLOUD = "keep_off_cloud", "keep it off the cloud (edge or speculative)"
    REDACT_THEN_CLOUD = "redact_then_cloud", "redact it, send to the cloud, restore the answer"
    REFUSE = "refuse", "refuse the request"


class RoutingPolicy(models.Model):
    """A published, immutable version of how a tenant's requests choose a tier (``tenant`` empty: the global default).

    Never edited: a change publishes the next version, which becomes the active one, so a
    ledger row's ``policy_version`` always names the rules that decided it. Signals are
    applied in precedence order: allowed tiers; PII (a hard constraint); a requested tier;
    task difficulty; output budget and prompt length; latency class; tier health and
    queue depth.
    """

    PiiAction = PiiAction

    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="routing_policies"
    )
    version = models.PositiveIntegerField()
    is_active = models.BooleanField(default=False)
    allowed_tiers = models.JSONField(default=list, help_text="the tiers this tenant may use (edge, speculative, cloud)")
    allow_requested_tier = models.BooleanField(default=True, help_text="a request may ask for a tier (`tier`)")
    pii_action = models.CharField(max_length=32, choices=PiiAction.choices, default=PiiAction.KEEP_OFF_CLOUD)
    difficulty_routing = models.BooleanField(
        default=True, help_text="route by the prompt's difficulty; off: the cheapest allowed tier above the edge"
    )
    cloud_threshold = models.FloatField(
        null=True,
        blank=True,
        help_text="p(needs a frontier model) from which to go to the cloud; empty: the classifier's committed default",
    )
    hard_threshold = models.FloatField(
        null=True,
        blank=True,
        help_text="p(hard) from which to skip the edge; empty: the classifier's committed default",
    )
    edge_max_output_tokens = models.PositiveIntegerField(
        default=1024, help_text="a request for more output tokens skips the edge (a small draft drifts on long answers)"
    )
    edge_max_prompt_tokens = models.PositiveIntegerField(default=4096, help_text="a longer prompt skips the edge")
    edge_max_streams = models.PositiveIntegerField(
        default=16, help_text="edge streams in flight from which interactive requests spill up (batch ones wait)"
    )
    at_capacity = models.CharField(
        max_length=8,
        choices=[("wait", "wait for a slot"), ("spill", "spill to another allowed tier")],
        default="wait",
        help_text="when the engines of the chosen tier are all busy: wait in the fair queue, or go to another "
        "allowed tier (never the cloud for personal data the policy keeps off it) that has a free slot",
    )
    cache_ttl_s = models.PositiveIntegerField(
        default=3600,
        help_text="exact result cache: identical greedy requests replay the stored answer at the cache price for this "
        "many seconds (the entries' retention); 0 turns it off",
    )
    cache_sampled = models.BooleanField(default=False, help_text="cache sampled requests too, not only greedy ones")
    cache_pii = models.BooleanField(
        default=False, help_text="cache requests in which the router found personal data (off: never stored)"
    )
    semantic_cache = models.BooleanField(
        default=False,
        help_text="semantic result cache: a request close enough in meaning to one answered before (same model, "
        "sampling and tenant) replays that answer at the cache price",
    )
    semantic_threshold = models.FloatField(
        default=SEMANTIC_THRESHOLD_DEFAULT,
        validators=[MinValueValidator(0.5), MaxValueValidator(1.0)],
        help_text="how close in meaning (cosine similarity of the prompts' embeddings, 0.5-1) a stored prompt must be",
    )
    escalation = models.BooleanField(
        default=False, help_text="send an edge answer up a tier when its own confidence is low (both legs are charged)"
    )
    escalation_min_mean_logprob = models.FloatField(default=-2.5)
    escalation_max_low_share = models.FloatField(
        default=0.3, help_text="the most tokens below p=0.1 an edge answer may have before it goes up a tier"
    )
    escalation_hold_tokens = models.PositiveSmallIntegerField(
        default=16, help_text="tokens held back (not sent) while the edge answer's confidence is judged"
    )
    note = models.CharField(max_length=300, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant_id", "-version"]
        verbose_name_plural = "routing policies"
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "version"], condition=models.Q(tenant__isnull=False), name="routing_policy_version"
            ),
            models.UniqueConstraint(
                fields=["version"], condition=models.Q(tenant__isnull=True), name="routing_policy_default_version"
            ),
            models.UniqueConstraint(
                fields=["tenant"],
                condition=models.Q(is_active=True, tenant__isnull=False),
                name="routing_policy_one_active",
            ),
            models.UniqueConstraint(
                fields=["is_active"],
                condition=models.Q(is_active=True, tenant__isnull=True),
                name="routing_policy_one_active_default",
            ),
            models.CheckConstraint(condition=models.Q(version__gt=0), name="routing_policy_version_positive"),
            models.CheckConstraint(
                condition=models.Q(pii_action__in=PiiAction.values), name="routing_policy_pii_action_valid"
            ),
        ]

    def __str__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        """What ledger rows record: ``t<tenant>-v<version>``, or ``default-v<version>``."""
        return f"t{self.tenant_id}-v{self.version}" if self.tenant_id else f"default-v{self.version}"
