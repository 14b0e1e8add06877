"""Alert rules: burn-rate alerts fire on a burst of errors and stay quiet on a healthy series; each alert fires
once and resolves once; the webhook gets exactly one POST per transition, and a failed one is retried."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.utils import timezone

from slo import selectors, services
from slo.errors import InvalidInput
from slo.models import Alert, AlertWebhook
from tenants.models import Budget
from tenants.services import budget_set
from tests.slo.conftest import insert, sample

pytestmark = pytest.mark.django_db
HOOK = "http://hooks.test/tandem"


def healthy_series(tenant_id: int, now, hours: int = 6) -> list[dict]:
    """One good request a minute for ``hours``, spread over the tiers."""
    tiers = ("edge", "speculative", "cloud")
    return [
        sample(tenant_id, now - timedelta(minutes=m, seconds=30), route_tier=tiers[m % 3]) for m in range(hours * 60)
    ]


def error_burst(tenant_id: int, now, minutes: int = 60) -> list[dict]:
    """Over the last ``minutes``, every other request on the cloud tier fails before its first token."""
    return [
        sample(
            tenant_id,
            now - timedelta(minutes=m, seconds=10),
            route_tier="cloud",
            outcome="error",
            ttft_ms=None,
            inter_token_ms=None,
            tokens=0,
        )
        for m in range(minutes)
    ]


class Hook:
    """A webhook receiver (httpx MockTransport) that records each POST, failing while ``down``."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.down = False

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            return httpx.Response(503)
        self.posts.append({"url": str(request.url), **json.loads(request.content)})
        return httpx.Response(204)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handle))

    def events(self) -> list[tuple[str, str, str]]:
        return [(p["event"], p["kind"], p["key"]) for p in self.posts]


def test_a_healthy_series_fires_nothing(account):
    now = timezone.now()
    insert(healthy_series(account.tenant.pk, now))
    services.rollups_compute(now=now)
    fired, resolved = services.alerts_evaluate(now=now)
    assert fired == [] and resolved == [] and not Alert.objects.exists()


def test_a_burst_of_errors_fires_the_fast_and_slow_burn_of_availability_and_the_tier_down(account):
    now = timezone.now()
    insert(healthy_series(account.tenant.pk, now) + error_burst(account.tenant.pk, now))
    services.rollups_compute(now=now)
    fired, _ = services.alerts_evaluate(now=now)
    kinds = {(a.kind, a.key) for a in fired}
    assert ("fast_burn", "interactive:availability") in kinds
    assert ("slow_burn", "interactive:availability") in kinds
    assert ("tier_down", "cloud") in kinds
    assert not any(key.startswith("batch:") or key.endswith(":ttft") for _, key in kinds)  # no batch traffic
    fast = next(a for a in fired if a.kind == "fast_burn")
    assert fast.details["burn_rates"]["1 h"] >= 14.4 and fast.details["burn_rates"]["5 min"] >= 14.4


def test_an_alert_fires_once_while_firing_and_resolves_once(account):
    now = timezone.now()
    insert(healthy_series(account.tenant.pk, now) + error_burst(account.tenant.pk, now))
    first, _ = services.alerts_evaluate(now=now)
    again, resolved = services.alerts_evaluate(now=now + timedelta(seconds=30))
    assert first and again == [] and resolved == []
    assert Alert.objects.filter(resolved_at__isnull=True).count() == len(first)
    later = now + timedelta(hours=7)  # the errors stopped (and so did the traffic): nothing burns
    _, resolved = services.alerts_evaluate(now=later)
    assert {a.pk for a in resolved} == {a.pk for a in first}
    fired, resolved = services.alerts_evaluate(now=later + timedelta(minutes=1))
    assert fired == [] and resolved == []
    assert Alert.objects.count() == len(first) and not Alert.objects.filter(resolved_at__isnull=True).exists()


def test_the_webhook_gets_one_post_per_transition_and_a_failed_post_is_retried_not_refired(account, settings):
    settings.TANDEM_ALERT_WEBHOOK_URL = HOOK
    hook = Hook()
    now = timezone.now()
    insert(healthy_series(account.tenant.pk, now, hours=1) + error_burst(account.tenant.pk, now, minutes=10))
    hook.down = True
    fired, _ = services.alerts_evaluate(now=now)
    assert fired and services.alerts_send(client=hook.client(), now=now) == 0
    assert all(a.send_error for a in Alert.objects.all())
    services.alerts_evaluate(now=now + timedelta(seconds=30))  # still firing: nothing new
    hook.down = False
    assert services.alerts_send(client=hook.client(), now=now) == len(fired)
    assert sorted(hook.events()) == sorted(("fired", a.kind, a.key) for a in fired)
    assert services.alerts_send(client=hook.client(), now=now) == 0  # each transition once
    services.alerts_evaluate(now=now + timedelta(hours=7))
    assert services.alerts_send(client=hook.client(), now=now) == len(fired)
    assert services.alerts_send(client=hook.client(), now=now) == 0
    events = hook.events()
    assert len(events) == 2 * len(fired) and len(set(events)) == len(events)
    assert {p["url"] for p in hook.posts} == {HOOK}
    resolved = [p for p in hook.posts if p["event"] == "resolved"]
    assert all(p["resolved_at"] and p["tenant"]["id"] == account.tenant.pk for p in resolved)


def test_a_tenants_own_webhook_wins_over_the_platforms(account, other_account, settings):
    settings.TANDEM_ALERT_WEBHOOK_URL = HOOK
    services.alert_webhook_set(tenant=account.tenant, url="https://acme.test/alerts")
    hook = Hook()
    now = timezone.now()
    for tenant in (account.tenant, other_account.tenant):
        insert(error_burst(tenant.pk, now, minutes=10))
    services.alerts_evaluate(now=now)
    services.alerts_send(client=hook.client(), now=now)
    by_url = {(p["url"], p["tenant"]["id"]) for p in hook.posts}
    assert by_url == {("https://acme.test/alerts", account.tenant.pk), (HOOK, other_account.tenant.pk)}


def test_no_webhook_anywhere_marks_transitions_sent_without_posting(account):
    hook = Hook()
    now = timezone.now()
    insert(error_burst(account.tenant.pk, now, minutes=10))
    services.alerts_evaluate(now=now)
    assert services.alerts_send(client=hook.client(), now=now) == 0 and hook.posts == []
    assert not Alert.objects.filter(fired_sent_at__isnull=True).exists()
    AlertWebhook.objects.create(tenant=account.tenant, url=HOOK)
    assert services.alerts_send(client=hook.client(), now=now) == 0  # the past is not replayed


def test_a_soft_budget_reached_fires_until_the_period_turns_over(account):
    budget_set(tenant=account.tenant, period="month", hard_limit=None, soft_limit=Decimal("1"))
    now = timezone.now()
    Budget.objects.filter(tenant=account.tenant).update(soft_alerted_at=now, spent=Decimal("1.5"))
    fired, _ = services.alerts_evaluate(now=now)
    assert [a.kind for a in fired] == ["soft_budget"] and Decimal(fired[0].details["spent"]) == Decimal("1.5")
    assert services.alerts_evaluate(now=now)[0] == []
    Budget.objects.filter(tenant=account.tenant).update(soft_alerted_at=None, spent=0)  # a new period
    _, resolved = services.alerts_evaluate(now=now)
    assert [a.kind for a in resolved] == ["soft_budget"]


def test_the_nav_badge_counts_only_the_tenants_own_firing_alerts(account, other_account):
    now = timezone.now()
    insert(error_burst(other_account.tenant.pk, now, minutes=10))
    services.alerts_evaluate(now=now)
    assert selectors.firing_count(tenant_id=account.tenant.pk) == 0
    assert selectors.firing_count(tenant_id=other_account.tenant.pk) > 0


def test_the_periodic_tasks_roll_up_evaluate_and_send(account, settings, monkeypatch):
    from slo import tasks

    hook = Hook()
    settings.TANDEM_ALERT_WEBHOOK_URL = HOOK
    monkeypatch.setattr(services, "webhook_client", hook.client)
    insert(error_burst(account.tenant.pk, timezone.now(), minutes=10))
    assert tasks.rollups_compute() >= 1
    result = tasks.alerts_evaluate()
    assert result["fired"] >= 1 and result["sent"] == result["fired"] == len(hook.posts)
    assert tasks.alerts_evaluate() == {"fired": 0, "resolved": 0, "sent": 0}


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/x", "http://localhost/x", "http://10.1.2.3/", "http://[::1]/", "ftp://a.test/"]
)
def test_a_tenant_webhook_may_not_point_at_the_platforms_own_network(account, url):
    with pytest.raises(InvalidInput):
        services.alert_webhook_set(tenant=account.tenant, url=url)
    assert not AlertWebhook.objects.exists()
    assert services.alert_webhook_set(tenant=account.tenant, url="https://hooks.example.com/a").url.startswith("https")
