"""Who sees whose numbers: the cost page, its CSV and the API are scoped to one tenant (operators: any, or all)."""

from __future__ import annotations

import csv
import io
import random
from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from dashboards import services
from tests.dashboards.ledger import insert, make_row

pytestmark = pytest.mark.django_db

API = "/api/dashboards/cost/"


@pytest.fixture
def two_ledgers(account, other_account, price_book):
    """Rows of both tenants over the last 3 days, some already rolled up; returns each tenant's exact total."""
    rng = random.Random(11)
    now = timezone.now()
    totals = {}
    for acc, n in ((account, 40), (other_account, 25)):
        rows = [
            make_row(
                rng,
                tenant=acc.tenant,
                at=now - timedelta(seconds=rng.uniform(60, 3 * 86400)),
                price_book=price_book,
                users=[acc.user],
                keys=[acc.api_key],
            )
            for _ in range(n)
        ]
        insert(rows)
        totals[acc.tenant.pk] = (sum((r["cost_total"] for r in rows), Decimal(0)), n)
    services.rollups_refresh()
    return totals


def _api_total(response) -> Decimal:
    assert response.status_code == 200, response.content
    return Decimal(response.json()["totals"]["cost_total"])


def test_a_member_sees_their_tenants_totals_only_even_when_asking_for_another(
    client, account, other_account, two_ledgers
):
    client.force_login(account.user)
    mine, _ = two_ledgers[account.tenant.pk]
    theirs, _ = two_ledgers[other_account.tenant.pk]
    page = client.get(reverse("frontend:costs") + f"?range=30d&tenant={other_account.tenant.pk}")
    assert page.status_code == 200
    assert page.context["scope"] == account.tenant.pk
    assert page.context["report"].totals["cost_total"] == mine
    html = page.content.decode()
    assert f'id="total-cost">{mine:.9f}<' in html
    assert f"{theirs:.9f}" not in html and other_account.tenant.name not in html


def test_the_csv_adds_up_to_the_tenants_total_and_holds_nothing_of_another(client, account, other_account, two_ledgers):
    client.force_login(account.user)
    response = client.get(reverse("frontend:costs-csv") + f"?range=30d&split=api_key&tenant={other_account.tenant.pk}")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert sum((Decimal(r["cost_total"]) for r in rows), Decimal(0)) == two_ledgers[account.tenant.pk][0]
    assert sum(int(r["requests"]) for r in rows) == two_ledgers[account.tenant.pk][1]
    assert {r["split_value"] for r in rows} <= {"", str(account.api_key.pk)}


def test_an_api_key_reads_its_own_tenant_and_is_refused_another(client, account, other_account, two_ledgers):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {account.raw_key}"}
    assert _api_total(client.get(API + "?range=30d", **auth)) == two_ledgers[account.tenant.pk][0]
    refused = client.get(API + f"?range=30d&tenant={other_account.tenant.pk}", **auth)
    assert refused.status_code == 403
    theirs = {"HTTP_AUTHORIZATION": f"Bearer {other_account.raw_key}"}
    assert _api_total(client.get(API + "?range=30d", **theirs)) == two_ledgers[other_account.tenant.pk][0]


def test_the_api_refuses_no_credentials_and_a_bad_key(client, two_ledgers):
    assert client.get(API).status_code in (401, 403)
    bad = client.get(API, HTTP_AUTHORIZATION="Bearer tdm_00000000_" + "x" * 43)
    assert bad.status_code == 401


def test_a_session_member_reads_the_api_for_their_tenant_only(client, account, other_account, two_ledgers):
    client.force_login(account.user)
    assert _api_total(client.get(API + "?range=30d")) == two_ledgers[account.tenant.pk][0]
    assert client.get(API + f"?range=30d&tenant={other_account.tenant.pk}").status_code == 403


def test_an_operator_sees_any_tenant_and_the_total_of_all(
    client, account, other_account, two_ledgers, django_user_model
):
    staff = django_user_model.objects.create_user(username="operator", password="pw-123456789", is_staff=True)
    client.force_login(staff)
    everyone = sum((t for t, _ in two_ledgers.values()), Decimal(0))
    assert _api_total(client.get(API + "?range=30d&tenant=all")) == everyone
    assert (
        _api_total(client.get(API + f"?range=30d&tenant={other_account.tenant.pk}"))
        == two_ledgers[other_account.tenant.pk][0]
    )
    page = client.get(reverse("frontend:costs") + "?range=30d&tenant=all")
    assert page.status_code == 200 and page.context["report"].totals["cost_total"] == everyone
    page = client.get(reverse("frontend:costs") + f"?range=30d&tenant={account.tenant.pk}&split=user")
    assert page.context["report"].totals["cost_total"] == two_ledgers[account.tenant.pk][0]


def test_a_user_without_a_tenant_sees_nothing(client, django_user_model, two_ledgers):
    loner = django_user_model.objects.create_user(username="loner", password="pw-123456789")
    client.force_login(loner)
    assert client.get(reverse("frontend:costs")).status_code == 403
    assert client.get(reverse("frontend:costs-csv")).status_code == 403
    assert client.get(API).status_code == 403


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("start=nope", "start"),
        ("start=2026-11-10&end=2026-11-01", "end"),
        ("granularity=fortnight", "granularity"),
        ("split=colour", "split"),
        ("range=1y", "range"),
    ],
)
def test_bad_api_parameters_are_a_400_with_a_clear_message(client, account, query, param):
    response = client.get(f"{API}?{query}", HTTP_AUTHORIZATION=f"Bearer {account.raw_key}")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and len(error["message"]) > 10


def test_the_api_answers_every_split_with_rows_that_add_up(client, account, two_ledgers):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {account.raw_key}"}
    total = two_ledgers[account.tenant.pk][0]
    for split in ("none", "model", "api_key", "user"):
        body = client.get(f"{API}?range=30d&granularity=hour&split={split}", **auth).json()
        assert sum((Decimal(r["cost_total"]) for r in body["rows"]), Decimal(0)) == total, split
        assert Decimal(body["totals"]["cost_total"]) == total
    body = client.get(f"{API}?range=7d&split=tag:team", **auth).json()
    assert all(r["value"].startswith("team=") for r in body["rows"])
    assert body["split"] == "tag:team"


def test_the_console_page_renders_every_split_and_a_bad_parameter_falls_back(client, account, two_ledgers):
    client.force_login(account.user)
    for split in ("none", "model", "api_key", "user", "tag"):
        page = client.get(reverse("frontend:costs") + f"?range=7d&split={split}")
        assert page.status_code == 200
        assert b'id="chart-spend"' in page.content and b'id="cost-data"' in page.content
    page = client.get(reverse("frontend:costs") + "?granularity=fortnight")
    assert page.status_code == 200 and b"granularity" in page.content and page.context["error"]
    assert client.get(reverse("frontend:costs-csv") + "?granularity=fortnight").status_code == 400
