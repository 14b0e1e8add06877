"""``python -m config.serve`` stopped with SIGTERM (docker stop, systemd) exits normally: what it holds goes back."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import httpx

from inference import faults


def test_sigterm_writes_the_pending_ledger_rows_and_returns_the_budget_lease(tmp_path: Path):
    database = tmp_path / "serve.sqlite3"
    url = f"sqlite:///{database}"
    key = faults.prepare(tmp_path, url)
    port = faults.free_port()
    server = faults.start(tmp_path, url, port)  # budget leases on, ledger rows written in batches behind the reply
    try:
        body = {"model": faults.PACED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
    finally:
        server.terminate()  # SIGTERM, at once: the row may still wait in its lease's batch
        code = server.wait(timeout=60)
    assert code in (0, 128 + 15), code  # a normal exit, not killed by the signal (-15)
    with sqlite3.connect(database) as db:
        reserved, spent = db.execute("SELECT SUM(reserved), SUM(spent) FROM tenants_budget").fetchone()
        (charged,) = db.execute(
            "SELECT cost_total FROM tenants_usagerecord WHERE request_id = ?", (request_id,)
        ).fetchone()
    assert Decimal(str(reserved)) == 0  # the lease's unused part went back
    assert Decimal(str(spent)) == Decimal(str(charged)) > 0  # and the answered request is in the ledger
