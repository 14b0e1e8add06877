"""Tenants' data and the invariants the database keeps for it: memberships, invites, API keys, budgets, prices, the
ledger, the audit log.

Writes go through ``tenants.services``, reads through ``tenants.selectors``; models hold
data, constraints and small facts about one row. Money is ``Decimal`` in
``DecimalField(max_digits=20, decimal_places=9)`` everywhere (a nano-unit is fine enough
for a fraction of a token's price). On SQLite Django keeps about 15 significant digits
of a decimal; PostgreSQL keeps them exactly.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, date, datetime

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from tenants.tiers import TIER_CHOICES, TIER_VALUES


def _money(**kwargs) -> models.DecimalField:
    return models.DecimalField(max_digits=20, decimal_places=9, **kwargs)


def _choices_check(
    field: str, choices: type[models.TextChoices] | tuple[str, ...], name: str
) -> models.CheckConstraint:
    """Keep a choices field to its choices in the database too (forms are not the only writers).

    The choices classes live at module level (each also reachable as ``Model.Role`` etc.)
    because a model's ``Meta`` cannot see names defined in the model's body.
    """
    values = choices if isinstance(choices, tuple) else choices.values
    return models.CheckConstraint(condition=Q(**{f"{field}__in": values}), name=name)


class RateLimits(models.Model):
    """How much one tenant, or one of its keys, may ask for: empty fields take the level above's value.

    A key's empty field is its tenant's; a tenant's is the platform's default (settings
    ``TANDEM_DEFAULT_*``). Enforced by ``inference.limits`` (requests and tokens per minute:
    429 with ``Retry-After``) and ``inference.queueing`` (streams at once: more wait their turn).
    """

    max_streams = models.PositiveIntegerField(
        null=True, blank=True, help_text="streams running at once (more wait in the queue); empty = the default"
    )
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True, help_text="empty = the default")
    tokens_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="prompt + max_tokens of each request, corrected when it ends; empty = the default",
    )

    class Meta:
        abstract = True


class Tenant(RateLimits):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class MembershipRole(models.TextChoices):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


class Membership(models.Model):
    Role = MembershipRole

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "tenant"], name="membership_unique_user_tenant"),
            _choices_check("role", MembershipRole, "membership_role_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"

    # The one statement of what each role may do; services and adapters ask these.
    @property
    def can_manage(self) -> bool:
        """Owners and admins manage the tenant's keys (anyone's) and budgets."""
        return self.role in (self.Role.OWNER, self.Role.ADMIN)

    @property
    def can_complete(self) -> bool:
        """Everyone but viewers runs completions and creates keys of their own."""
        return self.role != self.Role.VIEWER

    def can_manage_key(self, api_key: ApiKey) -> bool:
        if api_key.tenant_id != self.tenant_id:
            return False
        return self.can_manage or (self.can_complete and api_key.created_by_id == self.user_id)


class ApiKey(RateLimits):
    """A tenant's API key. Only its sha256 is stored; the full key is shown once, at creation.

    Its rate limits (empty: its tenant's) bound it within its tenant's own.
    """

    class Scope(models.TextChoices):
        COMPLETIONS = "completions"
        MODELS_READ = "models:read"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    name = models.CharField(max_length=100)
    # "tdm_" + 8 hex: visible in lists and logs so a person can tell keys apart; not a secret.
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64, unique=True)
    scopes = models.JSONField(default=list, blank=True, help_text="empty = every scope")
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix} ({self.name})"

    def allows(self, scope: str) -> bool:
        return not self.scopes or scope in self.scopes

    def is_usable_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


class BudgetPeriod(models.TextChoices):
    DAY = "day"
    MONTH = "month"


class Budget(models.Model):
    """A spending cap for one period, over the whole tenant (``api_key`` empty) or one of its keys.

    ``spent`` and ``reserved`` count the current period (``period_start``): ``reserved``
    is money held by requests in flight (their worst case), ``spent`` what settled
    requests were charged. A request is admitted only while
    ``spent + reserved + its worst case <= hard_limit``.
    """

    Period = BudgetPeriod

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="budgets")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.CASCADE, related_name="budgets")
    period = models.CharField(max_length=8, choices=Period.choices)
    hard_limit = _money(null=True, blank=True, help_text="empty = no hard limit")
    soft_limit = _money(null=True, blank=True, help_text="empty = no alert")
    period_start = models.DateField()
    spent = _money(default=0)
    reserved = _money(default=0)
    soft_alerted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # NULLs are distinct in a plain unique constraint, so the tenant-wide budget
            # (api_key NULL) needs its own partial constraint to be unique per period.
            models.UniqueConstraint(
                fields=["tenant", "period"], condition=Q(api_key__isnull=True), name="budget_unique_tenant_period"
            ),
            models.UniqueConstraint(
                fields=["tenant", "api_key", "period"],
                condition=Q(api_key__isnull=False),
                name="budget_unique_tenant_key_period",
            ),
            models.CheckConstraint(condition=Q(spent__gte=0) & Q(reserved__gte=0), name="budget_counters_nonnegative"),
            models.CheckConstraint(
                condition=(Q(hard_limit__isnull=True) | Q(hard_limit__gte=0))
                & (Q(soft_limit__isnull=True) | Q(soft_limit__gte=0)),
                name="budget_limits_nonnegative",
            ),
            models.CheckConstraint(
                condition=Q(hard_limit__isnull=True) | Q(soft_limit__isnull=True) | Q(soft_limit__lte=F("hard_limit")),
                name="budget_soft_limit_within_hard_limit",
            ),
            _choices_check("period", BudgetPeriod, "budget_period_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.scope_label} {self.period} budget of {self.tenant}"

    @property
    def scope_label(self) -> str:
        return f"API key {self.api_key.prefix}" if self.api_key_id else "tenant"

    def current_period_start(self, now: datetime) -> date:
        """The first day of the period ``now`` (aware, UTC) falls in: periods turn over at UTC midnight."""
        today = now.astimezone(UTC).date()
        return today if self.period == self.Period.DAY else today.replace(day=1)

    def is_stale_at(self, now: datetime) -> bool:
        """Whether the counters still count an earlier period (nothing has touched them since it ended)."""
        return self.period_start < self.current_period_start(now)


class PriceBook(models.Model):
    """A published, immutable set of prices. Exactly one is active; ledger rows point to the one they used."""

    version = models.PositiveIntegerField(unique=True)
    note = models.CharField(max_length=500, blank=True)
    is_active = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-version"]
        constraints = [
            models.UniqueConstraint(fields=["is_active"], condition=Q(is_active=True), name="price_book_one_active"),
            models.CheckConstraint(condition=Q(version__gt=0), name="price_book_version_positive"),
        ]

    def __str__(self) -> str:
        return f"price book v{self.version}" + (" (active)" if self.is_active else "")


class Price(models.Model):
    """What one model costs on one tier. Rates are per million tokens, per GPU hour."""

    book = models.ForeignKey(PriceBook, on_delete=models.CASCADE, related_name="prices")
    model = models.CharField(max_length=200)
    tier = models.CharField(max_length=16, choices=TIER_CHOICES)
    prompt_per_mtok = _money()
    completion_per_mtok = _money()
    draft_per_mtok = _money(default=0)
    gpu_per_hour = _money(default=0)
    # The most verifier GPU time one token may be charged: bounds the worst case a
    # reservation holds, and caps what a settlement charges, so the two always agree.
    max_gpu_ms_per_token = _money(default=0)
    # An answer replayed from a cache (exact or semantic) instead of generated on this tier:
    # per million prompt and completion tokens, nothing for drafts or GPU time.
    cache_per_mtok = _money(default=0)
    # A batch job's request (latency class "batch") is charged this percentage less, every bucket
    # (tenants.services.batch_discounted): it waits its turn, so it may fill the engines' idle time.
    batch_discount = _money(default=0)

    class Meta:
        ordering = ["book", "model", "tier"]
        constraints = [
            models.UniqueConstraint(fields=["book", "model", "tier"], name="price_unique_book_model_tier"),
            models.CheckConstraint(
                condition=Q(prompt_per_mtok__gte=0)
                & Q(completion_per_mtok__gte=0)
                & Q(draft_per_mtok__gte=0)
                & Q(gpu_per_hour__gte=0)
                & Q(max_gpu_ms_per_token__gte=0)
                & Q(cache_per_mtok__gte=0),
                name="price_rates_nonnegative",
            ),
            models.CheckConstraint(
                condition=Q(batch_discount__gte=0) & Q(batch_discount__lte=100), name="price_batch_discount_percent"
            ),
            _choices_check("tier", TIER_VALUES, "price_tier_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.model} on {self.tier} (v{self.book.version})"


class ReservationStatus(models.TextChoices):
    HELD = "held"
    SETTLED = "settled"
    RELEASED = "released"


class Reservation(models.Model):
    """Money held on a tenant's budgets for one request's worst case, until it is settled or released."""

    Status = ReservationStatus

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="reservations")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="reservations")
    request_id = models.CharField(max_length=100, unique=True)
    amount = _money()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.HELD)
    budgets = models.ManyToManyField(Budget, blank=True, related_name="reservations")
    # The book the amount was estimated from: the settlement prices with the same book,
    # so a book published mid-request cannot make the charge exceed the reservation.
    price_book = models.ForeignKey(PriceBook, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    settled_at = models.DateTimeField(null=True, blank=True, help_text="when it stopped holding money")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gte=0), name="reservation_amount_nonnegative"),
            _choices_check("status", ReservationStatus, "reservation_status_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id}: {self.amount} {self.status}"


class LeaseStatus(models.TextChoices):
    ACTIVE = "active"
    CLOSED = "closed"


class BudgetLease(models.Model):
    """A slice of a tenant's (and a key's) budgets held by one process, which admits requests against it in memory.

    Opened like a reservation (``amount`` added to every applicable budget's ``reserved``,
    under the same row locks and hard-limit check), so the budgets' ``reserved`` always
    counts what a lease may still spend. Requests admitted against it settle in batches:
    each batch moves its exact cost from ``reserved`` to ``spent`` and adds it to
    ``charged``; closing gives back ``amount - charged``. ``charged`` never passes
    ``amount`` (a database constraint, and the in-memory admission's invariant).
    """

    Status = LeaseStatus

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="budget_leases")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="budget_leases")
    budgets = models.ManyToManyField(Budget, blank=True, related_name="leases")
    amount = _money()
    charged = _money(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    holder = models.CharField(max_length=200, blank=True, help_text="the process holding it (host:pid), for people")
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True, help_text="when its unused part was given back")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(amount__gte=0) & Q(charged__gte=0) & Q(charged__lte=F("amount")),
                name="budget_lease_charged_within_amount",
            ),
            _choices_check("status", LeaseStatus, "budget_lease_status_valid"),
        ]

    def __str__(self) -> str:
        return f"lease {self.pk}: {self.charged} of {self.amount} {self.status}"


class UsageSource(models.TextChoices):
    GENERATION = "generation"
    EXACT_CACHE = "exact_cache"
    SEMANTIC_CACHE = "semantic_cache"


class UsageOutcome(models.TextChoices):
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    ERROR = "error"


class FinishReason(models.TextChoices):
    STOP = "stop"
    LENGTH = "length"
    NONE = "", "none"


class UsageRecord(models.Model):
    """The ledger: one immutable row per request, with its route, its versions and its cost by bucket."""

    Outcome = UsageOutcome
    FinishReason = FinishReason

    request_id = models.CharField(max_length=100, unique=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="usage")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="usage")
    # One row per leg of a reservation: a second settlement of the same reservation cannot
    # insert its leg 0 again (reservation_leg_unique).
    reservation = models.ForeignKey(
        Reservation, null=True, blank=True, on_delete=models.PROTECT, related_name="usage_records"
    )
    # Or the budget lease the request was admitted against (settled in a batch with others).
    lease = models.ForeignKey(BudgetLease, null=True, blank=True, on_delete=models.PROTECT, related_name="usage")
    tags = models.JSONField(default=dict, blank=True)
    # A request served by several tiers in turn (a failover mid-stream, an escalation) has
    # one row per leg: each its own request_id, all with the request's id in leg_of.
    leg_of = models.CharField(max_length=100, db_index=True, blank=True, help_text="the request's id")
    leg = models.PositiveSmallIntegerField(default=0)
    escalation = models.BooleanField(
        default=False,
        help_text="this leg's answer was held back and replaced by a higher tier's (its cost is escalation cost)",
    )
    route_tier = models.CharField(max_length=16, choices=TIER_CHOICES)
    source = models.CharField(
        max_length=16,
        choices=UsageSource.choices,
        default=UsageSource.GENERATION,
        help_text="generated, or replayed from a cache (then route_tier is the tier whose answer it replays)",
    )
    saving = _money(default=0)  # a replay: what generating it again would have cost, less what it was charged
    route_reason = models.CharField(max_length=200, blank=True)
    policy_version = models.CharField(max_length=64, blank=True)
    route_signals = models.JSONField(default=dict, blank=True, help_text="what the routing policy decided from")
    upstream = models.CharField(max_length=64, blank=True, help_text="the cloud upstream that served it")
    model = models.CharField(max_length=200)
    verifier_version = models.CharField(max_length=200, blank=True)
    draft_version = models.CharField(max_length=200, blank=True)
    price_book = models.ForeignKey(PriceBook, on_delete=models.PROTECT, related_name="usage")
    prompt_tokens = models.PositiveIntegerField()
    completion_tokens = models.PositiveIntegerField()
    # The engine attributes a round's drafts to the tokens it emits: a cut-off stream has fractions.
    drafted_tokens = models.DecimalField(max_digits=20, decimal_places=3, default=0)
    accepted_tokens = models.PositiveIntegerField(default=0)
    # Rounds whose draft the verifier cut short: accepted / (accepted + draft_rejections) is the
    # draft's per-token acceptance, whatever lengths the controller chose (registry's canary).
    draft_rejections = models.PositiveIntegerField(default=0)
    # The verifier GPU time measured; the charge uses it capped at max_gpu_ms_per_token per token.
    gpu_ms = models.DecimalField(max_digits=20, decimal_places=3, default=0)
    cost_edge = _money()
    cost_verifier = _money()
    cost_cloud = _money()
    cost_total = _money()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    finish_reason = models.CharField(max_length=16, choices=FinishReason.choices, blank=True)
    error = models.TextField(blank=True)
    ttft_ms = models.FloatField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "created_at"], name="usage_tenant_created")]
        constraints = [
            # No sum check (total = buckets): SQLite would compare the sum as floats. The
            # service computes the total as the sum of the quantized buckets instead.
            models.CheckConstraint(
                condition=Q(cost_edge__gte=0)
                & Q(cost_verifier__gte=0)
                & Q(cost_cloud__gte=0)
                & Q(cost_total__gte=0)
                & Q(drafted_tokens__gte=0)
                & Q(gpu_ms__gte=0),
                name="usage_amounts_nonnegative",
            ),
            _choices_check("route_tier", TIER_VALUES, "usage_route_tier_valid"),
            models.UniqueConstraint(
                fields=["reservation", "leg"],
                condition=Q(reservation__isnull=False),
                name="usage_reservation_leg_unique",
            ),
            _choices_check("outcome", UsageOutcome, "usage_outcome_valid"),
            _choices_check("finish_reason", FinishReason, "usage_finish_reason_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id}: {self.cost_total}"


class Invite(models.Model):
    """An invitation to join a tenant with a role: a one-time link whose token only the invitee holds.

    Only the token's sha256 is stored (the link is shown or mailed once, at creation), so
    a copy of the database cannot be used to join anyone's tenant. An invite is pending
    until it is accepted, revoked or past ``expires_at``; accepting it is a one-time act
    (``services.invite_accept`` locks the row and checks ``accepted_at``).
    """

    Role = MembershipRole

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="invites")
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=Role.choices)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [_choices_check("role", MembershipRole, "invite_role_valid")]

    def __str__(self) -> str:
        return f"invite of {self.email} to {self.tenant} ({self.role})"

    @staticmethod
    def hash_token(raw_token: str) -> str:
        # sha256, not a password hash: the token is 256 random bits, so nothing can guess
        # it, and the hash must be a unique index to find the invite by.
        return hashlib.sha256(raw_token.encode()).hexdigest()

    def state_at(self, now: datetime) -> str:
        """``accepted``, ``revoked``, ``expired`` or ``pending``."""
        if self.accepted_at is not None:
            return "accepted"
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if now >= self.expires_at else "pending"


class AuditActorKind(models.TextChoices):
    USER = "user"
    API_KEY = "api_key"
    SYSTEM = "system"


class AuditAction(models.TextChoices):
    """What an audit event records: ``<entity>.<verb>``, one per service that changes configuration or people."""

    API_KEY_CREATE = "api_key.create"
    API_KEY_REVOKE = "api_key.revoke"
    BUDGET_SET = "budget.set"
    LIMITS_SET = "limits.set"
    PRICE_BOOK_PUBLISH = "price_book.publish"
    POLICY_PUBLISH = "policy.publish"
    UPSTREAM_REGISTER = "upstream.register"
    MEMBER_ADD = "member.add"
    MEMBER_INVITE = "member.invite"
    MEMBER_ROLE = "member.role"
    MEMBER_REMOVE = "member.remove"
    INVITE_REVOKE = "invite.revoke"
    INVITE_ACCEPT = "invite.accept"
    # the model registry (registry.services): versions, tenants' pins, rollouts and each of their steps
    MODEL_VERSION_REGISTER = "model_version.register"
    MODEL_PIN_SET = "model_pin.set"
    ROLLOUT_START = "rollout.start"
    ROLLOUT_STEP = "rollout.step"
    ROLLOUT_PROMOTE = "rollout.promote"
    ROLLOUT_ROLLBACK = "rollout.rollback"
    ROLLOUT_PAUSE = "rollout.pause"
    ROLLOUT_RESUME = "rollout.resume"
    ROLLOUT_FAIL = "rollout.fail"


class AuditLogImmutable(Exception):
    """Something tried to change or delete an audit event."""


class AuditEventQuerySet(models.QuerySet):
    """Events are only ever inserted: bulk updates and deletes are refused as ``save`` and ``delete`` are."""

    def update(self, **kwargs):
        raise AuditLogImmutable("audit events are append-only: they cannot be updated")

    def delete(self):
        raise AuditLogImmutable("audit events are append-only: they cannot be deleted")


class AuditEvent(models.Model):
    """One change to a tenant's (or the platform's) configuration: who, what, on which object, what changed, when.

    Append-only: written by the services inside the transaction of the change they
    record (``services.audit_event_record``), never updated, never deleted (``save`` of
    a stored row, ``delete`` and the queryset's ``update``/``delete`` raise). ``changes``
    holds ``{"field": {"before": ..., "after": ...}}`` for the fields changed and never a
    secret (no raw key, token or password; the services choose the fields). The actor is
    kept twice: a reference (which may be gone one day) and ``actor_label``, the name it
    had then. References are PROTECT so that history is never deleted along with them
    (users are deactivated, not deleted, once they have acted).
    """

    ActorKind = AuditActorKind
    Action = AuditAction

    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.PROTECT, related_name="+", help_text="empty: platform-wide"
    )
    actor_kind = models.CharField(max_length=16, choices=ActorKind.choices)
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    actor_api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    actor_label = models.CharField(max_length=200)
    action = models.CharField(max_length=64, choices=AuditAction.choices)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64, blank=True)
    changes = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["tenant", "created_at"], name="audit_tenant_created"),
            models.Index(fields=["action", "created_at"], name="audit_action_created"),
        ]
        constraints = [
            _choices_check("actor_kind", AuditActorKind, "audit_actor_kind_valid"),
            models.CheckConstraint(
                condition=(Q(actor_kind=AuditActorKind.USER) & Q(actor_user__isnull=False))
                | (Q(actor_kind=AuditActorKind.API_KEY) & Q(actor_api_key__isnull=False))
                | Q(actor_kind=AuditActorKind.SYSTEM),
                name="audit_actor_matches_kind",
            ),
        ]

    def __str__(self) -> str:
        return (
            f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.action} {self.object_type}:{self.object_id}"
        )

    def save(self, *args, **kwargs) -> None:
        if not self._state.adding:
            raise AuditLogImmutable("audit events are append-only: they cannot be updated")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AuditLogImmutable("audit events are append-only: they cannot be deleted")
