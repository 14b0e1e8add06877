"""Batch completions on Celery take the same gateway path, and are charged the same way."""

from __future__ import annotations

import pytest

from inference.tasks import complete
from tenants.models import UsageRecord
from tenants.services import api_key_revoke

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_batch_job_runs_through_the_gateway_and_lands_in_the_ledger(account):
    call = {"model": "tandem-test", "prompt": "Hi", "max_tokens": 6, "tags": {"job": "nightly"}}
    result = complete.delay(api_key_id=account.api_key.pk, tenant_id=account.tenant.pk, call=call).get()
    assert result["text"] == "Tandem" and result["usage"]["completion_tokens"] == 6
    row = UsageRecord.objects.get(request_id=result["usage"]["request_id"])
    assert row.tenant_id == account.tenant.pk and row.tags == {"job": "nightly"} and row.outcome == "completed"


def test_a_batch_job_whose_key_was_revoked_meanwhile_spends_nothing(account):
    api_key_revoke(api_key=account.api_key)
    call = {"model": "tandem-test", "prompt": "Hi", "max_tokens": 6}
    result = complete.delay(api_key_id=account.api_key.pk, tenant_id=account.tenant.pk, call=call).get()
    assert result["status"] == 401 and result["error"]["code"] == "invalid_api_key"
    assert not UsageRecord.objects.exists()
