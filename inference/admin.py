from django.contrib import admin

from inference.models import SloSample


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
