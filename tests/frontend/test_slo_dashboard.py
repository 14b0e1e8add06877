"""The console's SLO page: figures equal to the raw samples', tenant scoping, operators, and who may edit."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from inference.models import SloSample
from slo import services
from slo.models import Alert, SloObjective
from tenants.services import membership_create
from tests.slo.conftest import insert, sample

pytestmark = pytest.mark.django_db


def seed(tenant_id: int, now, slow: int, fast: int, errors: int = 0) -> None:
    rows = [sample(tenant_id, now - timedelta(hours=3, minutes=i), ttft_ms=900.0) for i in range(slow)]
    rows += [sample(tenant_id, now - timedelta(minutes=5 + i)) for i in range(fast)]
    rows += [
        sample(tenant_id, now - timedelta(days=2, minutes=i), outcome="error", ttft_ms=None, tokens=0)
        for i in range(errors)
    ]
    insert(rows)


def objective_row(page: str, cls: str, kind: str) -> tuple[int, int]:
    match = re.search(rf'data-class="{cls}" data-kind="{kind}" data-good="(\d+)" data-total="(\d+)"', page)
    assert match, f"no row for {cls} {kind}"
    return int(match.group(1)), int(match.group(2))


def test_the_page_shows_attainment_equal_to_the_raw_samples(client, account):
    now = timezone.now()
    seed(account.tenant.pk, now, slow=7, fast=33, errors=2)
    services.rollups_compute(now=now - timedelta(hours=1))  # part rolled up, part read raw
    client.force_login(account.user)
    page = client.get(reverse("frontend:slo")).content.decode()
    raw = SloSample.objects.filter(tenant=account.tenant, latency_class="interactive")
    good_ttft = raw.filter(ttft_ms__lte=500).count()
    assert objective_row(page, "interactive", "ttft") == (good_ttft, raw.filter(ttft_ms__isnull=False).count())
    assert objective_row(page, "interactive", "ttft") == (33, 40)
    assert objective_row(page, "interactive", "availability") == (40, 42)
    assert f"{33 / 40:.6f}" in page
    series = json.loads(re.search(r'<script id="slo-series" type="application/json">(.*?)</script>', page).group(1))
    assert sum(series["route_mix"]["speculative"]) == 42 and "ttft p95" in series["latency"]
    assert "chart.umd.min.js" in page and "Save objective" in page


def test_a_member_sees_only_their_tenants_objectives_alerts_and_numbers(client, account, other_account):
    now = timezone.now()
    insert([sample(other_account.tenant.pk, now - timedelta(minutes=m), outcome="error") for m in range(12)])
    services.objective_set(
        tenant=other_account.tenant,
        latency_class="interactive",
        kind="ttft",
        threshold_ms=800,
        target=0.9123,
        window_days=7,
    )
    services.alerts_evaluate(now=now)
    assert Alert.objects.filter(tenant=other_account.tenant).exists()
    client.force_login(account.user)
    page = client.get(reverse("frontend:slo")).content.decode()
    assert "0.9123" not in page and 'badge-error">firing' not in page and "No alert has fired" in page
    assert objective_row(page, "interactive", "availability") == (0, 0)
    # the operator switch is for staff only: a member asking for another tenant still sees their own
    page = client.get(reverse("frontend:slo"), {"tenant": other_account.tenant.pk}).content.decode()
    assert "0.9123" not in page and objective_row(page, "interactive", "availability") == (0, 0)
    assert "Globex" not in page


def test_an_operator_opens_any_tenants_page_read_only(client, account, other_account, django_user_model):
    staff = django_user_model.objects.create_user(username="operator", password="pw-123456789", is_staff=True)
    insert([sample(other_account.tenant.pk, timezone.now() - timedelta(minutes=m)) for m in range(3)])
    client.force_login(staff)
    page = client.get(reverse("frontend:slo"), {"tenant": other_account.tenant.pk}).content.decode()
    assert "Globex" in page and objective_row(page, "interactive", "availability") == (3, 3)
    assert "Save objective" not in page
    assert client.get(reverse("frontend:slo"), {"tenant": 999999}).status_code == 404
    assert "Acme" in client.get(reverse("frontend:slo")).content.decode()  # in no tenant: the first one


def test_an_owner_sets_an_objective_and_a_webhook_and_resets_it(client, account):
    client.force_login(account.user)
    url = reverse("frontend:slo-objective")
    data = {"latency_class": "interactive", "kind": "ttft", "threshold_ms": "800", "target": "0.9", "window_days": "7"}
    assert client.post(url, data).status_code == 302
    objective = SloObjective.objects.get(tenant=account.tenant)
    assert (objective.threshold_ms, objective.target, objective.window_days) == (800, 0.9, 7)
    client.post(url, {**data, "threshold_ms": "777"})  # not a histogram edge: refused
    assert SloObjective.objects.get(tenant=account.tenant).threshold_ms == 800
    page = client.get(reverse("frontend:slo")).content.decode()
    assert "TTFT &lt;= 800 ms" in page and "must be one of" in page
    client.post(reverse("frontend:slo-webhook"), {"url": "https://acme.test/hook"})
    assert account.tenant.alert_webhook.url == "https://acme.test/hook"
    client.post(reverse("frontend:slo-objective-reset"), {"latency_class": "interactive", "kind": "ttft"})
    assert not SloObjective.objects.filter(tenant=account.tenant).exists()


@pytest.mark.parametrize("role", ["member", "viewer"])
def test_members_and_viewers_see_the_page_but_cannot_edit(client, account, django_user_model, role):
    user = django_user_model.objects.create_user(username=f"{role}-user", password="pw-123456789")
    membership_create(tenant=account.tenant, user=user, role=role)
    client.force_login(user)
    page = client.get(reverse("frontend:slo")).content.decode()
    assert "Objectives" in page and "Save objective" not in page
    data = {"latency_class": "interactive", "kind": "ttft", "threshold_ms": "800", "target": "0.9", "window_days": "7"}
    assert client.post(reverse("frontend:slo-objective"), data).status_code == 403
    assert client.post(reverse("frontend:slo-webhook"), {"url": "https://x.test/"}).status_code == 403
    assert not SloObjective.objects.exists()


def test_the_nav_shows_a_badge_of_firing_alerts(client, account):
    now = timezone.now()
    insert([sample(account.tenant.pk, now - timedelta(minutes=m), outcome="error") for m in range(12)])
    services.alerts_evaluate(now=now)
    client.force_login(account.user)
    page = client.get(reverse("frontend:usage")).content.decode()
    firing = Alert.objects.filter(tenant=account.tenant, resolved_at__isnull=True).count()
    assert firing and f'title="alerts firing">{firing}</span>' in page


def test_the_page_reads_a_bounded_number_of_queries_whatever_the_traffic(
    client, account, django_assert_max_num_queries
):
    from slo.management.commands.slo_seed import seed_samples

    now = timezone.now()
    seed_samples(tenant_id=account.tenant.pk, count=1500, days=10, now=now)
    services.rollups_compute(now=now, rebuild=True)
    client.force_login(account.user)
    # sums in the database: a few queries per source of each window, never one per sample or per bucket
    # (the acceptance chart reads the ledger's rollups and open hours too: a few more, as constant)
    with django_assert_max_num_queries(48):
        response = client.get(reverse("frontend:slo"), {"days": "28"})
    assert response.status_code == 200
