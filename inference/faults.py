"""Faults with real processes (``make faults``, ``python -m inference.faults``): what the books say afterwards.

Each scenario runs a real server (``config.serve``, one process, the trivial engine paced
so that streams last a few seconds) on loopback and prints one JSON object:

- ``web_killed``: streams running, the web process is killed with SIGKILL mid-stream and
  started again on the same database. The money the dead process held (its budget
  lease, or reservations) is held until the stale-hold task gives it back
  (``inference.settle_dead_processes``, run here at once instead of on its schedule):
  first the dead process's settlement journal (``inference.journal``) is read, and each
  killed stream is charged for exactly the tokens its client had received; then the
  holds left are given back. Nothing is held, nothing was charged twice, every killed
  stream's ledger equals what its client received, and the restarted server answers
  with an exact ledger.
- ``redis_down``: ``REDIS_URL`` points at a port where nothing listens (the rate limits
  and the result cache then count in the process, and say so in the log): every request
  through the API and the websocket is answered and the ledger is exact.

The verifier killed mid-stream (SIGKILL of ``speculative.serve``) is a test:
``tests/inference/test_demo_pair_platform.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import httpx

from inference.bench import PACED_MODEL, REPO, emit, free_port, prepare_database, server_env
from inference.bench_load import ledger_check, sse_stream, ws_stream

STREAM_TOKENS = 2000  # a paced stream of this many tokens lasts a few seconds


def start(var: Path, database_url: str, port: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**server_env(var, database_url), **(extra_env or {})}
    server = subprocess.Popen(
        [sys.executable, "-m", "config.serve", "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(var / f"server-{port}-{int(time.time())}.log").open("wb"),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=0.5)
            return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start")


def prepare(var: Path, database_url: str) -> str:
    """The database, the demo tenant and its key (``manage.py migrate`` and ``tandem_demo``)."""
    return prepare_database(server_env(var, database_url), PACED_MODEL)["demo"]


def fresh(fn, *args):
    """``fn(*args)`` on a new database connection (the server's database may have restarted meanwhile)."""
    from django.db import connection

    connection.close()
    if hasattr(connection, "close_pool"):  # a pooled connection may be one the restart cut
        connection.close_pool()
    return fn(*args)


def books(tenant_slug: str = "demo") -> dict:
    from tenants.models import Budget, Reservation, UsageRecord

    budgets = list(Budget.objects.filter(tenant__slug=tenant_slug))
    return {
        "reserved": str(sum((b.reserved for b in budgets), Decimal(0))),
        "spent": str(sum((b.spent for b in budgets), Decimal(0))),
        "rows": UsageRecord.objects.filter(tenant__slug=tenant_slug).count(),
        "rows_cost": str(sum((r.cost_total for r in UsageRecord.objects.filter(tenant__slug=tenant_slug)), Decimal(0))),
        "reservations_held": Reservation.objects.filter(status="held").count(),
    }


async def web_killed(var: Path, database_url: str, key: str, streams: int) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start(var, database_url, port)
    received: list[dict] = []
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        started = time.perf_counter()
        tasks = [
            asyncio.ensure_future(sse_stream(client, key, PACED_MODEL, STREAM_TOKENS, started, "killed"))
            for _ in range(streams)
        ]
        await asyncio.sleep(1.0)  # every stream has tokens by now, none has finished
        server.send_signal(signal.SIGKILL)
        server.wait()
        received = list(await asyncio.gather(*tasks))
    held_after_kill = await asyncio.to_thread(books)
    # The stale-hold sweep (inference.settle_dead_processes, run here at once instead of on its schedule):
    # the dead process's journal first (what its clients received is charged), then the holds left go back.
    from django.utils import timezone

    from inference.journal import recover
    from tenants.services import reservations_release_stale

    recovered = await asyncio.to_thread(recover, var / "journal")
    released = await asyncio.to_thread(lambda: reservations_release_stale(older_than=timezone.now()))
    killed_ledger = await asyncio.to_thread(killed_check, received)
    restarted = start(var, database_url, port)  # the same database, a new process
    try:
        after_release = await asyncio.to_thread(books)
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            again = await asyncio.gather(
                *(sse_stream(client, key, PACED_MODEL, 32, time.perf_counter(), "after") for _ in range(8))
            )
        ledger = await asyncio.to_thread(ledger_check, list(again))
    finally:
        restarted.terminate()
        restarted.wait(timeout=30)
    final = await asyncio.to_thread(books)
    return {
        "streams_killed": streams,
        "tokens_delivered_before_the_kill": sum(r["tokens"] for r in received),
        "clients_saw": sorted({r["error"] or "ended" for r in received}),
        "held_after_the_kill": held_after_kill,
        "charged_from_the_journal": {k: v for k, v in recovered.as_dict().items() if k != "request_ids"},
        "killed_streams_ledger": killed_ledger,
        "holds_released_by_the_stale_task": released,
        "after_release": after_release,
        "after_restart": {
            "answered": sum(r["error"] is None for r in again),
            "ledger": ledger,
        },
        "final": final,
        "ok": (
            Decimal(after_release["reserved"]) == 0
            and Decimal(final["spent"]) == Decimal(final["rows_cost"])
            and Decimal(final["reserved"]) == 0  # the restarted server, stopped with SIGTERM, gave its lease back
            and ledger["mismatched"] == 0
            and killed_ledger["mismatched"] == 0
            and all(r["error"] is None for r in again)
        ),
    }


def killed_check(received: list[dict]) -> dict:
    """Each killed stream's ledger rows against what its client had received before the kill."""
    from tenants.models import UsageRecord

    ids = [r["request_id"] for r in received if r.get("request_id")]
    tokens: dict[str, int] = dict.fromkeys(ids, 0)
    for row in UsageRecord.objects.filter(leg_of__in=ids):
        tokens[row.leg_of] += row.completion_tokens
    mismatched = [
        {"request_id": r["request_id"], "client_tokens": r["tokens"], "ledger_tokens": tokens[r["request_id"]]}
        for r in received
        if r.get("request_id") and tokens[r["request_id"]] != r["tokens"]
    ]
    return {
        "streams": len(ids),
        "client_tokens": sum(r["tokens"] for r in received),
        "ledger_tokens": sum(tokens.values()),
        "mismatched": len(mismatched),
        "examples": mismatched[:5],
    }


async def redis_down(var: Path, database_url: str, key: str, requests: int) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    dead = f"redis://127.0.0.1:{free_port()}/0"
    server = start(var, database_url, port, {"TANDEM_RATE_LIMIT_REDIS_URL": dead, "TANDEM_CACHE_REDIS_URL": dead})
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            started = time.perf_counter()
            jobs = [sse_stream(client, key, PACED_MODEL, 32, started, "sse") for _ in range(requests)]
            jobs += [ws_stream(base, key, PACED_MODEL, 32, started, "ws") for _ in range(requests)]
            results = list(await asyncio.gather(*jobs))
            plain = await client.post(
                "/v1/chat/completions",
                json={"model": PACED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
                headers={"Authorization": f"Bearer {key}"},
            )
        ledger = await asyncio.to_thread(ledger_check, results)
    finally:
        server.terminate()
        server.wait(timeout=30)
    logs = "".join(p.read_text(errors="replace") for p in var.glob(f"server-{port}-*.log"))
    return {
        "redis": dead,
        "streams": len(results),
        "answered": sum(r["error"] is None for r in results),
        "errors": sorted({r["error"] for r in results if r["error"]}),
        "non_streaming_status": plain.status_code,
        "rate_limit_headers": "x-ratelimit-remaining-requests" in plain.headers,
        "ledger": ledger,
        "fell_back_and_said_so": "Redis unreachable" in logs,
        "ok": all(r["error"] is None for r in results) and plain.status_code == 200 and ledger["mismatched"] == 0,
    }


async def postgres_restarted(var: Path, database_url: str, key: str, streams: int, restart: str) -> dict:
    """PostgreSQL restarted (``restart``, a shell command) while streams run and new requests arrive."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start(var, database_url, port)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            started = time.perf_counter()
            running = [
                asyncio.ensure_future(sse_stream(client, key, PACED_MODEL, STREAM_TOKENS, started, "running"))
                for _ in range(streams)
            ]
            await asyncio.sleep(0.5)
            restarting = asyncio.ensure_future(asyncio.to_thread(subprocess.run, restart, shell=True, check=True))
            arriving = []
            for _ in range(10):  # new requests during and just after the restart
                arriving.append(
                    asyncio.ensure_future(sse_stream(client, key, PACED_MODEL, 16, time.perf_counter(), "arriving"))
                )
                await asyncio.sleep(0.3)
            await restarting
            results = list(await asyncio.gather(*running, *arriving))
            await asyncio.sleep(2.0)  # the lease batches behind the replies
            after = list(
                await asyncio.gather(
                    *(sse_stream(client, key, PACED_MODEL, 16, time.perf_counter(), "after") for _ in range(8))
                )
            )
        ledger = await asyncio.to_thread(fresh, ledger_check, [*results, *after])
    finally:
        server.terminate()
        server.wait(timeout=60)
    final = await asyncio.to_thread(fresh, books)
    logs = "".join(p.read_text(errors="replace") for p in var.glob(f"server-{port}-*.log"))
    return {
        "running_streams": {
            "answered": sum(r["error"] is None for r in results if r["tag"] == "running"),
            "errors": sorted({r["error"] for r in results if r["tag"] == "running" and r["error"]}),
        },
        "arriving_during_restart": {
            "answered": sum(r["error"] is None for r in results if r["tag"] == "arriving"),
            "errors": sorted({r["error"] for r in results if r["tag"] == "arriving" and r["error"]}),
        },
        "after_restart_answered": sum(r["error"] is None for r in after),
        "ledger": ledger,
        "final": final,
        "server_errors_logged": logs.count(" ERROR "),
        "ok": ledger["mismatched"] == 0 and Decimal(final["reserved"]) == 0 and all(r["error"] is None for r in after),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Faults with real processes; prints what the books say after each.")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--database-url", default="", help="the server's DATABASE_URL (default: a fresh SQLite file)")
    parser.add_argument(
        "--restart-postgres",
        default="",
        help="with a PostgreSQL --database-url: the shell command that restarts it (adds the postgres_restarted run)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        var = Path(tmp)
        database_url = args.database_url or f"sqlite:///{var / 'faults.sqlite3'}"
        os.environ["DATABASE_URL"] = database_url
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")
        import django

        django.setup()
        logging.getLogger("httpx").setLevel(logging.WARNING)
        key = prepare(var, database_url)
        report = {
            "web_killed": asyncio.run(web_killed(var, database_url, key, args.streams)),
            "redis_down": asyncio.run(redis_down(var, database_url, key, args.streams)),
        }
        if args.restart_postgres:
            report["postgres_restarted"] = asyncio.run(
                postgres_restarted(var, database_url, key, args.streams, args.restart_postgres)
            )
    emit(report, args.out)
    sys.exit(0 if all(r["ok"] for r in report.values()) else 1)


if __name__ == "__main__":
    main()
