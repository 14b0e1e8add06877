"""The admin's read-mostly views of objectives, alerts and webhooks (rollups are derived data: not listed)."""

from django.contrib import admin

from slo.models import Alert, AlertWebhook, SloObjective


@admin.register(SloObjective)
class SloObjectiveAdmin(admin.ModelAdmin):
    list_display = ("tenant", "latency_class", "kind", "threshold_ms", "target", "window_days", "updated_at")
    list_filter = ("latency_class", "kind")


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ("tenant", "kind", "key", "fired_at", "resolved_at", "fired_sent_at", "resolved_sent_at")
    list_filter = ("kind",)
    readonly_fields = ("fired_at", "resolved_at", "fired_sent_at", "resolved_sent_at", "details")


@admin.register(AlertWebhook)
class AlertWebhookAdmin(admin.ModelAdmin):
    list_display = ("tenant", "url", "updated_at")
