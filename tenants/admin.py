"""The Django admin for tenants: people and keys are managed here; money rows are only read.

Money never moves by hand: reservations, the ledger and published price books are
read-only, budget limits are saved through ``services.budget_set`` (which locks the row,
so an edit never overwrites counters a request moved meanwhile), and API keys are
created only through ``services.api_key_create`` (the console), since the admin must
never show or accept a raw key. Keys are revoked here through ``services.api_key_revoke``.
Invites and the audit log are read-only here: invites are made, revoked and accepted in
the console (the token is shown or mailed once), and audit events are never changed.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from tenants import errors, services
from tenants.models import (
    ApiKey,
    AuditEvent,
    Budget,
    BudgetLease,
    Invite,
    Membership,
    Price,
    PriceBook,
    Reservation,
    Tenant,
    UsageRecord,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Viewable, never added, changed or deleted by hand."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class MembershipInline(admin.TabularInline):
    """Shown, not edited: memberships change through their own admin page (or the console's team page), where
    the services keep the last owner and write the audit log."""

    model = Membership
    extra = 0
    fields = ["user", "role", "created_at"]
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["created_at"]
    inlines = [MembershipInline]

    def save_model(self, request, obj: Tenant, form, change: bool) -> None:
        super().save_model(request, obj, form, change)
        values = {name: getattr(obj, name) for name in services.RATE_LIMIT_FIELDS}
        services.rate_limits_set(target=obj, **values)  # checks them, and drops its keys from the caches


class MembershipForm(forms.ModelForm):
    class Meta:
        model = Membership
        fields = ["user", "tenant", "role"]

    def clean(self):
        cleaned = super().clean()
        # The instance still holds the stored role here (the form copies its values in after clean()).
        stored = self.instance
        if stored.pk and stored.role == Membership.Role.OWNER and cleaned.get("role") != Membership.Role.OWNER:
            others = Membership.objects.filter(tenant_id=stored.tenant_id, role=Membership.Role.OWNER)
            if not others.exclude(pk=stored.pk).exists():
                raise forms.ValidationError("A tenant keeps at least one owner: make someone else an owner first.")
        return cleaned


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    """Memberships are added, changed and removed through the services, which keep the last owner and audit it all
    (as the system: Django's own log entry says which staff user)."""

    form = MembershipForm
    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role"]
    search_fields = ["user__username", "user__email", "tenant__name", "tenant__slug"]
    raw_id_fields = ["user", "tenant"]
    list_select_related = ["user", "tenant"]

    def get_readonly_fields(self, request, obj=None):
        return ["user", "tenant", "created_at"] if obj is not None else ["created_at"]

    def save_model(self, request, obj: Membership, form, change: bool) -> None:
        try:
            if change:
                services.membership_role_set(membership=obj, role=obj.role, by=None)
            else:
                obj.pk = services.membership_create(tenant=obj.tenant, user=obj.user, role=obj.role).pk
        except errors.InvalidInput as exc:
            raise PermissionDenied(exc.message) from None

    def delete_model(self, request, obj: Membership) -> None:
        try:
            services.membership_remove(membership=obj, by=None)
        except errors.InvalidInput as exc:
            raise PermissionDenied(exc.message) from None

    def delete_queryset(self, request, queryset) -> None:
        with transaction.atomic():  # all or none: a batch that would remove a tenant's last owner removes nobody
            for membership in queryset:
                self.delete_model(request, membership)


@admin.register(ApiKey)
class ApiKeyAdmin(ReadOnlyAdmin):
    """Read-only but for revocation: a saved form would write back a stale ``revoked_at`` (un-revoking a key)."""

    list_display = ["prefix", "name", "tenant", "created_by", "scopes", "state", "last_used_at", "expires_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), ("expires_at", admin.EmptyFieldListFilter)]
    search_fields = ["prefix", "name", "tenant__name", "tenant__slug"]
    list_select_related = ["tenant", "created_by"]
    # key_hash is left out: it is no secret, but it is of no use to a person either.
    fields = [
        "prefix",
        "name",
        "tenant",
        "created_by",
        "scopes",
        "expires_at",
        "revoked_at",
        "last_used_at",
        *services.RATE_LIMIT_FIELDS,
    ]
    readonly_fields = fields[:8]  # only the rate limits are edited here, and saved alone (rate_limits_set)
    actions = ["revoke"]

    def has_change_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("tenants.change_apikey")

    def save_model(self, request, obj: ApiKey, form, change: bool) -> None:
        values = {name: form.cleaned_data.get(name) for name in services.RATE_LIMIT_FIELDS}
        services.rate_limits_set(target=obj, **values)  # writes the limits only: never a stale revoked_at

    @admin.display(description="state")
    def state(self, obj: ApiKey) -> str:
        if obj.revoked_at is not None:
            return "revoked"
        return "active" if obj.is_usable_at(timezone.now()) else "expired"

    def changelist_view(self, request, extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "subtitle": "Keys are created in the console (services.api_key_create), which shows the key once; "
            "the admin never shows or accepts one.",
        }
        return super().changelist_view(request, extra_context)

    def has_revoke_permission(self, request) -> bool:
        return request.user.has_perm("tenants.change_apikey")

    @admin.action(description="Revoke selected API keys", permissions=["revoke"])
    def revoke(self, request, queryset) -> None:
        count = 0
        for api_key in queryset:
            if api_key.revoked_at is None:
                # by=None: the admin is a system caller; the log entry records who did it.
                services.api_key_revoke(api_key=api_key, by=None)
                self.log_change(request, api_key, "Revoked")
                count += 1
        self.message_user(request, f"Revoked {count} API key(s).", messages.SUCCESS)


class BudgetForm(forms.ModelForm):
    class Meta:
        model = Budget
        fields = ["tenant", "api_key", "period", "hard_limit", "soft_limit"]

    def clean(self):
        cleaned = super().clean()
        tenant, api_key = cleaned.get("tenant"), cleaned.get("api_key")
        if tenant is not None and api_key is not None and api_key.tenant_id != tenant.pk:
            raise forms.ValidationError("That API key belongs to another tenant.")
        return cleaned


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    form = BudgetForm
    list_display = ["tenant", "api_key", "period", "hard_limit", "soft_limit", "spent", "reserved", "period_start"]
    list_filter = ["period"]
    search_fields = ["tenant__name", "tenant__slug", "api_key__prefix"]
    list_select_related = ["tenant", "api_key"]
    raw_id_fields = ["tenant", "api_key"]

    def get_readonly_fields(self, request, obj=None):
        counters = ["period_start", "spent", "reserved", "soft_alerted_at"]
        # A budget's identity is fixed once it may hold money: change its limits, or delete it.
        return counters + (["tenant", "api_key", "period"] if obj is not None else [])

    def save_model(self, request, obj, form, change) -> None:
        budget = services.budget_set(
            tenant=obj.tenant,
            api_key=obj.api_key,
            period=obj.period,
            hard_limit=obj.hard_limit,
            soft_limit=obj.soft_limit,
        )
        obj.pk = budget.pk
        obj.refresh_from_db()


class PriceInline(admin.TabularInline):
    model = Price
    extra = 0
    can_delete = False
    fields = ["model", "tier", *services.PRICE_RATES]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(PriceBook)
class PriceBookAdmin(ReadOnlyAdmin):
    """Published books are immutable (ledger rows point to them); publish a new one with services.price_book_publish."""

    list_display = ["version", "is_active", "note", "price_count", "created_at"]
    list_filter = ["is_active"]
    search_fields = ["note", "prices__model"]
    inlines = [PriceInline]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(price_count=Count("prices"))

    @admin.display(description="prices", ordering="price_count")
    def price_count(self, obj) -> int:
        return obj.price_count


@admin.register(Price)
class PriceAdmin(ReadOnlyAdmin):
    list_display = ["model", "tier", "book", *services.PRICE_RATES]
    list_filter = ["tier", "book__is_active", "book"]
    search_fields = ["model"]
    list_select_related = ["book"]


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdmin):
    list_display = ["request_id", "tenant", "api_key", "amount", "status", "created_at", "settled_at"]
    list_filter = ["status"]
    search_fields = ["request_id", "tenant__name", "tenant__slug", "api_key__prefix"]
    list_select_related = ["tenant", "api_key"]
    date_hierarchy = "created_at"


@admin.register(BudgetLease)
class BudgetLeaseAdmin(ReadOnlyAdmin):
    list_display = ["id", "tenant", "api_key", "amount", "charged", "status", "holder", "created_at", "closed_at"]
    list_filter = ["status"]
    search_fields = ["tenant__name", "tenant__slug", "api_key__prefix", "holder"]
    list_select_related = ["tenant", "api_key"]
    date_hierarchy = "created_at"


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = [
        "created_at",
        "request_id",
        "tenant",
        "model",
        "route_tier",
        "source",
        "outcome",
        "prompt_tokens",
        "completion_tokens",
        "cost_total",
        "saving",
    ]
    list_filter = ["route_tier", "source", "outcome", "finish_reason", "price_book"]
    search_fields = ["request_id", "tenant__name", "tenant__slug", "model", "api_key__prefix"]
    list_select_related = ["tenant"]
    date_hierarchy = "created_at"


@admin.register(Invite)
class InviteAdmin(ReadOnlyAdmin):
    # token_hash is left out: of no use to a person, and the token itself is never stored.
    list_display = ["email", "tenant", "role", "invited_by", "created_at", "expires_at", "accepted_at", "revoked_at"]
    list_filter = ["role", ("accepted_at", admin.EmptyFieldListFilter), ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["email", "tenant__name", "tenant__slug"]
    list_select_related = ["tenant", "invited_by"]
    fields = [
        "tenant",
        "email",
        "role",
        "invited_by",
        "created_at",
        "expires_at",
        "accepted_at",
        "accepted_by",
        "revoked_at",
    ]


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    """The audit log, read-only: events are append-only (the model refuses updates and deletes too)."""

    list_display = ["created_at", "tenant", "actor_label", "actor_kind", "action", "object_type", "object_id"]
    list_filter = ["action", "actor_kind", ("tenant", admin.EmptyFieldListFilter)]
    search_fields = ["actor_label", "action", "object_type", "object_id", "tenant__name", "tenant__slug"]
    list_select_related = ["tenant"]
    date_hierarchy = "created_at"
    fields = [
        "created_at",
        "tenant",
        "actor_kind",
        "actor_label",
        "actor_user",
        "actor_api_key",
        "action",
        "object_type",
        "object_id",
        "changes",
    ]
    readonly_fields = fields
