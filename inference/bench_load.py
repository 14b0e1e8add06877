"""Load through the queue (``make load``, ``python -m inference.bench_load``): every stream answered, the ledger exact.

Starts a real server (``config.serve``, one process) on loopback and prints one JSON object:

- ``load``: ``--ws`` websocket streams (one connection each) and ``--sse`` SSE streams
  (the OpenAI API, ``stream: true``) started at once on the served model (the demo pair by
  default; ``--engines inference.bench.bench_engines`` for the trivial engine). Far more
  than the engines run at once, so most wait in the fair queue. Reported: errors by kind
  (an error frame, a non-200 status, a broken stream: all must be 0), time to first token
  p50/p99, aggregate tokens/s, and the ledger check: each stream's row (read back from
  the server's database) has the tokens the client received and, on the websocket, the
  cost its done frame said.
- ``burst``: three tenants send ``--burst-factor`` times the engines' capacity at once
  between them (one tenant a head start and twice the requests): each request answered,
  or refused past its deadline with ``Retry-After``; while all three wait, each tenant's
  share of the tokens delivered (equal is a third each; the aim is within 20% of it).

Client and server share this machine, so the client's own work is in the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import httpx
import websockets

from inference.bench import demo_key, emit, percentile, server_env, start_server

PROMPT = "Tell me about the sea."


async def ws_stream(base: str, key: str, model: str, max_tokens: int, started: float, tag: str) -> dict:
    """One stream on its own websocket connection: what the client saw."""
    url = base.replace("http://", "ws://") + "/ws/v1/completions"
    seen: dict = {"tag": tag, "tokens": 0, "error": None, "ttft_ms": None, "times": []}
    try:
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=60
        ) as ws:
            frame = {"type": "start", "id": "s", "model": model, "prompt": PROMPT, "max_tokens": max_tokens}
            await ws.send(json.dumps(frame))
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "started":
                    seen["request_id"] = message["request_id"]
                elif message["type"] == "delta":
                    now = time.perf_counter()
                    if seen["ttft_ms"] is None:
                        seen["ttft_ms"] = (now - started) * 1e3
                    seen["tokens"] += len(message["tokens"])
                    seen["times"] += [now] * len(message["tokens"])
                elif message["type"] == "done":
                    seen["usage"] = message["usage"]
                    seen["request_id"] = message["usage"]["request_id"]
                    return seen
                elif message["type"] == "error":
                    seen["error"] = f"error frame: {message['error']['code']}"
                    seen["retry_after"] = message.get("retry_after")
                    return seen
    except Exception as exc:  # noqa: BLE001 - counted and reported, not raised
        seen["error"] = f"broken: {type(exc).__name__}"
    return seen


async def sse_stream(
    client: httpx.AsyncClient, key: str, model: str, max_tokens: int, started: float, tag: str
) -> dict:
    """One streamed chat completion through the OpenAI API: what the client saw."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    seen: dict = {"tag": tag, "tokens": 0, "error": None, "ttft_ms": None, "times": []}
    try:
        headers = {"Authorization": f"Bearer {key}"}
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            seen["request_id"] = response.headers.get("x-request-id")
            if response.status_code != 200:
                seen["error"] = f"status {response.status_code}"
                seen["retry_after"] = response.headers.get("retry-after")
                await response.aread()
                return seen
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    seen["error"] = f"error event: {event['error']['code']}"
                    seen["retry_after"] = event.get("retry_after")
                    return seen
                if event.get("usage"):
                    seen["usage"] = event["usage"]
                for choice in event.get("choices", []):
                    if choice["delta"].get("content"):
                        now = time.perf_counter()
                        if seen["ttft_ms"] is None:
                            seen["ttft_ms"] = (now - started) * 1e3
                        seen["tokens"] += 1
                        seen["times"].append(now)
    except Exception as exc:  # noqa: BLE001 - counted and reported, not raised
        seen["error"] = f"broken: {type(exc).__name__}"
    return seen


def ledger_check(results: list[dict], wait_s: float = 60.0) -> dict:
    """Each answered stream's ledger rows against what its client received (the server's database, read here).

    Rows are written behind the reply (``TANDEM_SETTLE_AFTER_REPLY``, budget leases in batches): wait for them.
    """
    from tenants.models import UsageRecord

    answered = [r for r in results if r["error"] is None]
    ids = [r["request_id"] for r in answered]
    deadline = time.monotonic() + wait_s
    while UsageRecord.objects.filter(leg_of__in=ids, leg=0).count() < len(ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    rows: dict[str, list] = {}
    for row in UsageRecord.objects.filter(leg_of__in=[r["request_id"] for r in answered]):
        rows.setdefault(row.leg_of, []).append(row)
    mismatched = []
    for r in answered:
        mine = rows.get(r["request_id"], [])
        tokens = sum(row.completion_tokens for row in mine)
        cost = sum((row.cost_total for row in mine), Decimal(0))
        usage = r.get("usage") or {}
        said = Decimal(usage["cost"]["total"]) if "cost" in usage else cost  # the websocket's done frame says
        told = usage.get("completion_tokens", r["tokens"])
        # charged what it was told; never sent more than it was charged for (a token whose text is empty
        # sends no SSE chunk, so a client may count fewer chunks than tokens, never more)
        if not mine or tokens != told or r["tokens"] > tokens or cost != said:
            mismatched.append(
                {"request_id": r["request_id"], "via": r["tag"], "client_tokens": r["tokens"], "ledger_tokens": tokens}
            )
    refused = [r for r in results if r["error"] is not None and r.get("request_id")]
    charged_refused = UsageRecord.objects.filter(leg_of__in=[r["request_id"] for r in refused]).count()
    return {
        "streams_checked": len(answered),
        "rows": sum(len(v) for v in rows.values()),
        "mismatched": len(mismatched),
        "examples": mismatched[:3],
        "refused_but_charged": charged_refused,
    }


def summarise(results: list[dict], wall_s: float) -> dict:
    errors = Counter(r["error"] for r in results if r["error"] is not None)
    ttft = [r["ttft_ms"] for r in results if r["ttft_ms"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {
        "streams": len(results),
        "answered": sum(r["error"] is None for r in results),
        "errors": dict(errors),
        "status_5xx": sum(1 for r in results if (r["error"] or "").startswith("status 5")),
        "ttft_ms": {"p50": round(percentile(ttft, 50), 1), "p99": round(percentile(ttft, 99), 1)} if ttft else None,
        "tokens": tokens,
        "wall_s": round(wall_s, 2),
        "tokens_per_s": round(tokens / wall_s, 1),
    }


async def load(base: str, key: str, model: str, n_ws: int, n_sse: int, max_tokens: int) -> tuple[dict, list[dict]]:
    limits = httpx.Limits(max_connections=n_sse + 8, max_keepalive_connections=n_sse + 8)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600, connect=60), limits=limits) as client:
        warm = [sse_stream(client, key, model, 4, time.perf_counter(), "warm") for _ in range(4)]
        for seen in await asyncio.gather(*warm):  # the engines loaded, the caches warm
            assert seen["error"] is None, seen
        started = time.perf_counter()
        jobs = [ws_stream(base, key, model, max_tokens, started, "ws") for _ in range(n_ws)]
        jobs += [sse_stream(client, key, model, max_tokens, started, "sse") for _ in range(n_sse)]
        results = await asyncio.gather(*jobs)
        wall = time.perf_counter() - started
    report = summarise(results, wall) | {
        "websocket": summarise([r for r in results if r["tag"] == "ws"], wall),
        "sse": summarise([r for r in results if r["tag"] == "sse"], wall),
    }
    return report, results


async def burst(base: str, keys: dict[str, str], model: str, capacity: int, factor: int, max_tokens: int) -> dict:
    """``factor`` x ``capacity`` streams from three tenants; each tenant's token share while all three wait."""
    total = factor * capacity
    counts = {"a": total // 2, "b": total // 4, "c": total - total // 2 - total // 4}  # a sends twice b's or c's
    limits = httpx.Limits(max_connections=total + 8, max_keepalive_connections=total + 8)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600, connect=60), limits=limits) as client:
        started = time.perf_counter()
        jobs = [sse_stream(client, keys["a"], model, max_tokens, started, "a") for _ in range(counts["a"])]
        first = asyncio.gather(*jobs)
        await asyncio.sleep(0.2)  # tenant a has a head start
        rest = [
            sse_stream(client, keys[t], model, max_tokens, started, t) for t in ("b", "c") for _ in range(counts[t])
        ]
        contended_from = time.perf_counter()
        second = asyncio.gather(*rest)  # running from now, beside a's
        results = [*(await first), *(await second)]
        wall = time.perf_counter() - started
    # While all three wait: from the first of b's or c's streams to start until the last stream of the tenant
    # served first starts. A stream's tokens count for its tenant when it started in that window (streams
    # already running when b and c arrived are not taken back: the queue shares what frees up).
    firsts = {t: [r["times"][0] for r in results if r["tag"] == t and r["times"]] for t in counts}
    contended_from = min([*firsts["b"], *firsts["c"]], default=contended_from)
    contended_to = min(max(f, default=0.0) for f in firsts.values())
    window = {
        t: sum(
            r["tokens"]
            for r in results
            if r["tag"] == t and r["times"] and contended_from <= r["times"][0] <= contended_to
        )
        for t in counts
    }
    in_window = sum(window.values()) or 1
    shares = {t: round(window[t] / in_window, 3) for t in counts}
    refused = [r for r in results if r["error"] is not None]
    return {
        "capacity": capacity,
        "streams": total,
        "per_tenant": counts,
        "answered": len(results) - len(refused),
        "refused": len(refused),
        "refused_without_retry_after": sum(1 for r in refused if not r.get("retry_after")),
        "errors": dict(Counter(r["error"] for r in refused)),
        "contended_window_s": round(contended_to - contended_from, 2),
        "token_shares_while_all_wait": shares,
        "worst_share_vs_equal": round(max(abs(s - 1 / 3) * 3 for s in shares.values()), 3),
        "wall_s": round(wall, 2),
    }


def tenant_keys(
    var: Path, env_database_url: str, models: str, names: tuple[str, ...] = ("a", "b", "c")
) -> dict[str, str]:
    """More tenants (users ``tenant-<name>``) with a key each, through ``manage.py tandem_demo``."""
    env = server_env(var, env_database_url)
    return {name: demo_key(env, models, f"tenant-{name}") for name in names}


async def cache_hits(base: str, key: str, model: str, requests: int, floor_p50_ms: float) -> dict:
    """The same greedy non-streaming request again and again: the first generates, the rest replay it."""
    body = {"model": model, "messages": [{"role": "user", "content": "Cache me."}], "max_tokens": 32, "temperature": 0}
    times: list[float] = []
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for _ in range(requests + 1):
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            times.append((time.perf_counter() - started) * 1e3)
            assert response.status_code == 200, response.text
        route = response.json()["tandem"]["route"]
    assert route["reason"] == "exact_cache", route
    hits = times[1:]
    return {
        "requests": requests,
        "first_generated_ms": round(times[0], 3),
        "hit": {"p50_ms": round(percentile(hits, 50), 3), "p99_ms": round(percentile(hits, 99), 3)},
        # beside a request that does no completion at all (GET /v1/models): what serving a hit adds
        "hit_added_over_get_models_p50_ms": round(percentile(hits, 50) - floor_p50_ms, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load through the queue: every stream answered, the ledger exact.")
    parser.add_argument("--ws", type=int, default=200, help="websocket streams at once")
    parser.add_argument("--sse", type=int, default=200, help="SSE streams at once")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--engines", default="inference.engines.load_default_engines")
    parser.add_argument("--model", default="tandem-demo")
    parser.add_argument("--capacity", type=int, default=32, help="streams the engines run at once (the demo pair: 32)")
    parser.add_argument("--burst-factor", type=int, default=4)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-burst", action="store_true")
    parser.add_argument("--database-url", default="", help="the server's DATABASE_URL (default: a fresh SQLite file)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        var = Path(tmp)
        database_url = args.database_url or f"sqlite:///{var / 'bench.sqlite3'}"
        os.environ["DATABASE_URL"] = database_url  # this process reads the ledger back
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")
        import django

        django.setup()
        logging.getLogger("httpx").setLevel(logging.WARNING)
        server, base, keys = start_server(var, database_url=database_url, engines=args.engines, models=args.model)
        key = keys["demo"]
        report: dict = {
            "machine": {"cpu_count": os.cpu_count()},
            "server": f"config.serve, 1 process, {'PostgreSQL' if args.database_url else 'SQLite'}, {args.engines}",
            "model": args.model,
            "max_tokens": args.max_tokens,
        }
        try:
            if not args.skip_load:
                figures, results = asyncio.run(load(base, key, args.model, args.ws, args.sse, args.max_tokens))
                report["load"] = figures | {"ledger": ledger_check(results)}
            if not args.skip_burst:
                keys = tenant_keys(var, database_url, args.model)
                report["burst"] = asyncio.run(
                    burst(base, keys, args.model, args.capacity, args.burst_factor, args.max_tokens)
                )
        finally:
            server.terminate()
            server.wait(timeout=30)
            errors = [line for line in (var / "server.log").read_text().splitlines() if "ERROR" in line]
            report["server_errors"] = {"count": len(errors), "first": errors[:3]}
    emit(report, args.out)


if __name__ == "__main__":
    main()
