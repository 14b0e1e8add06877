"""``{% firing_alert_count tenant as n %}``: the nav's badge of a tenant's firing alerts (one indexed count)."""

from __future__ import annotations

from django import template

from slo import selectors

register = template.Library()


@register.simple_tag
def firing_alert_count(tenant) -> int:
    return selectors.firing_count(tenant_id=tenant.pk) if tenant else 0
