"""Benchmark: what the platform adds on top of the engine (``python -m inference.bench``).

Prints one JSON object. A real server (``config.serve``, the whole ASGI stack, SQLite ledger) runs
in a subprocess on loopback with the trivial engine (``tandem-test``: deterministic text,
no model), so what is measured is Tandem's own work per request and per token: auth,
admission, reservation, routing, settlement, the SLO sample, the engine thread hand-off,
JSON framing and the socket. Reported against calling the same engine directly:

- per request (p50, p99): end-to-end time of a streamed request minus the engine's own;
- per token (p50, p99): the gap between streamed tokens minus the engine's own gap (the
  tokens of one websocket frame or one SSE write arrive together: a gap of 0);
- for the websocket (one connection, requests one after another) and SSE
  (``POST /v1/chat/completions`` with ``stream: true``), each with the instant engine
  (every token ready at once: what the platform costs per token shows in full) and with
  the paced one (``paced_*``: a round of three tokens every ``PACED_ROUND_MS``, so the
  figures are how much later than from the engine itself a client gets its tokens);
- requests/s and latency of the non-streaming API with several clients at once;
- floors: a websocket ping and a ``GET /v1/models`` round trip, which do no completion,
  so the part of a request's overhead that is the web stack and the client shows apart
  from the gateway's own work (auth, reservation, settlement, ledger);
- exact_cache: the same greedy request over and over from a tenant whose policy turns the
  result cache on: what a replayed answer costs beside ``GET /v1/models``;
- burst: three tenants send 4x the engines' capacity at once (``inference.bench_load.burst``):
  every request answered or refused with ``Retry-After``, and each tenant's share of the
  tokens while all three wait.

Client and server share this machine's cores, so the figures include the client's own
work; a second machine would show less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median

import httpx
import websockets

REPO = Path(__file__).resolve().parent.parent
MODEL = "tandem-test"
# The same engine with each round (three tokens) after the first taking PACED_ROUND_MS: about
# 1000 tokens/s, faster than the demo pair on this machine. The instant engine has every token
# ready at once, so its figures are the platform's whole per-token cost; the paced one shows
# what a client waits for beyond the engine when tokens come as a real engine makes them.
PACED_MODEL = "tandem-test-paced"
PACED_ROUND_MS = 3.0
PROMPT = "Measure the platform, not the model."


def bench_engines():
    """The benchmark server's models (``TANDEM_ENGINES``): the trivial engine, instant and paced."""
    from inference.engines import EngineSet, trivial_entry

    return EngineSet([trivial_entry(MODEL), trivial_entry(PACED_MODEL, round_s=PACED_ROUND_MS / 1e3)])


# per request: end-to-end ms; per token: the gap since the previous token, ms; delta frames (websocket)
Timings = tuple[list[float], list[float], list[int]]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict:
    return {"p50_ms": round(percentile(values, 50), 3), "p99_ms": round(percentile(values, 99), 3)}


def direct_engine(requests: int, tokens: int, model: str = MODEL) -> dict:
    """The engine alone, in this process: the floor every path is compared with."""
    engine = bench_engines().get(model).speculative
    assert engine is not None
    e2e, gaps = [], []
    for _ in range(requests):
        started = time.perf_counter()
        last = None
        for _event in engine.stream(PROMPT, max_tokens=tokens):
            now = time.perf_counter()
            if last is not None:
                gaps.append((now - last) * 1e3)
            last = now
        e2e.append((time.perf_counter() - started) * 1e3)
    return {"e2e_ms": median(e2e), "token_gap_ms": median(gaps), "token_gap_p99_ms": percentile(gaps, 99)}


async def sse_path(base: str, key: str, requests: int, tokens: int, model: str = MODEL) -> Timings:
    """Streamed chat completions one after another; each token's arrival as its event is read."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens, "stream": True}
    e2e, gaps = [], []
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for _ in range(requests):
            started = time.perf_counter()
            last = None
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"content"' in line:
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append((now - last) * 1e3)
                        last = now
            e2e.append((time.perf_counter() - started) * 1e3)
    return e2e, gaps, []


async def websocket_path(base: str, key: str, requests: int, tokens: int, model: str = MODEL) -> Timings:
    """Completions one after another on one connection; the tokens of a delta frame arrive with it."""
    url = base.replace("http://", "ws://") + "/ws/v1/completions"
    e2e, gaps, frames = [], [], []
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        for i in range(requests):
            started = time.perf_counter()
            last = None
            deltas = 0
            frame = {"type": "start", "id": str(i), "model": model, "prompt": PROMPT, "max_tokens": tokens}
            await ws.send(json.dumps(frame))
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "delta":
                    now = time.perf_counter()
                    deltas += 1
                    for _ in message["tokens"]:
                        if last is not None:
                            gaps.append((now - last) * 1e3)
                        last = now
                elif message["type"] in ("done", "error"):
                    assert message["type"] == "done", message
                    assert message["usage"]["completion_tokens"] == tokens, message
                    break
            e2e.append((time.perf_counter() - started) * 1e3)
            frames.append(deltas)
    return e2e, gaps, frames


async def floors(base: str, key: str, requests: int) -> dict:
    """Round trips that do no completion: what the web stack and client cost on their own.

    websocket: a ``ping`` frame answered by ``pong`` on an open connection;
    http: ``GET /v1/models`` (key check and a small JSON body).
    """
    url = base.replace("http://", "ws://") + "/ws/v1/completions"
    ws_times, http_times = [], []
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        for _ in range(requests):
            started = time.perf_counter()
            await ws.send('{"type": "ping"}')
            assert json.loads(await ws.recv())["type"] == "pong"
            ws_times.append((time.perf_counter() - started) * 1e3)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for _ in range(requests):
            started = time.perf_counter()
            assert (await client.get("/v1/models")).status_code == 200
            http_times.append((time.perf_counter() - started) * 1e3)
    return {"websocket_ping": summary(ws_times), "http_get_models": summary(http_times)}


async def non_streaming_load(base: str, key: str, clients: int, seconds: float, tokens: int) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens}
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            if response.status_code == 200:
                latencies.append((time.perf_counter() - started) * 1e3)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30, limits=limits
    ) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "completion_tokens": tokens,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency": summary(latencies),
    }


SERVERS = {
    # the platform's own server (make run, the image): uvicorn with httptools, uvloop, websockets
    "platform": ["-m", "config.serve", "--port", "{port}", "--log-level", "warning"],
    # Channels' reference server, for comparison
    "daphne": ["-m", "daphne", "-b", "127.0.0.1", "-p", "{port}", "config.asgi:application"],
}


def server_env(var: Path, database_url: str = "", engines: str = "inference.bench.bench_engines") -> dict[str, str]:
    """The environment of a benchmark's server process (and of the ``manage.py`` commands that set it up)."""
    return {
        # production's defaults where the test settings differ (the environment may override them)
        "TANDEM_SETTLE_AFTER_REPLY": "1",
        "TANDEM_API_KEY_CACHE_TTL_S": "5",
        "TANDEM_POLICY_CACHE_TTL_S": "5",  # production caches the routing policy too (tests read it fresh)
        "TANDEM_BUDGET_LEASES": "1",
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "TANDEM_VAR_DIR": str(var),
        "TANDEM_JOURNAL_DIR": str(var / "journal"),  # where make faults reads a killed server's journal
        "DATABASE_URL": database_url or f"sqlite:///{var / 'bench.sqlite3'}",
        "TANDEM_LOG_LEVEL": "WARNING",
        "TANDEM_ENGINES": engines,
    }


def manage(env: dict[str, str], *args: str) -> str:
    """``manage.py ARGS`` in the server's environment; its standard output."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=env, check=True, capture_output=True, text=True
    )
    return done.stdout


def demo_key(env: dict[str, str], models: str, username: str = "demo") -> str:
    """``manage.py tandem_demo``: the user's tenant (made on first use) priced for ``models``; a new API key of it."""
    out = manage(env, "tandem_demo", "--username", username, "--models", models)
    return next(line.split()[-1] for line in out.splitlines() if line.strip().startswith("API key"))


def prepare_database(
    env: dict[str, str],
    models: str,
    usernames: Sequence[str] = ("demo",),
    cache_users: Sequence[str] = (),
    password: str | None = None,
) -> dict[str, str]:
    """Migrate, make each user's tenant priced for ``models`` with an API key (and ``password``: default a
    random one), turn the result cache on for ``cache_users``: one Django process (each start-up costs
    seconds), not one a step. ``{username: key}``."""
    code = (
        "import json; from io import StringIO; from django.core.management import call_command\n"
        "from tenants.models import Membership; from inference.services import routing_policy_publish\n"
        "call_command('migrate', interactive=False, verbosity=0)\n"
        "keys = {}\n"
        f"for name in {list(usernames)!r}:\n"
        "    out = StringIO()\n"
        f"    call_command('tandem_demo', username=name, models={models!r}, password={password!r}, stdout=out)\n"
        "    keys[name] = next(l.split()[-1] for l in out.getvalue().splitlines() if l.strip().startswith('API key'))\n"
        f"for name in {list(cache_users)!r}:\n"
        "    m = Membership.objects.get(user__username=name)\n"
        "    routing_policy_publish(tenant=m.tenant, cache_ttl_s=3600, difficulty_routing=False, note='bench: cache on')\n"
        "print(json.dumps(keys))\n"
    )
    out = manage(env, "shell", "-c", code)
    return json.loads(out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emit(report: dict, out: Path | None) -> None:
    """Print a benchmark's JSON report (and write it to ``out``)."""
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text + "\n")
    print(text)


def start_server(
    var: Path,
    kind: str = "platform",
    database_url: str = "",
    engines: str = "inference.bench.bench_engines",
    models: str = f"{MODEL},{PACED_MODEL}",
    usernames: Sequence[str] = ("demo",),
    cache_users: Sequence[str] = (),
) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """The server on a fresh port, its database migrated; each of ``usernames``' API keys (see ``prepare_database``)."""
    env = server_env(var, database_url, engines)
    keys = prepare_database(env, models, usernames, cache_users)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, *(arg.format(port=port) for arg in SERVERS[kind])],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(var / "server.log").open("wb"),  # its warnings and errors, for a run that goes wrong
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}", keys


def overhead(path: Timings, direct: dict) -> dict:
    e2e, gaps, frames = path
    report = {
        "requests": len(e2e),
        "per_request": summary([t - direct["e2e_ms"] for t in e2e]),
        "per_token": summary([g - direct["token_gap_ms"] for g in gaps]),
        # the gaps a client sees between tokens, to set beside the engine's own (engine_direct)
        "token_gap": summary(gaps),
        "e2e": summary(e2e),
    }
    if frames:
        report["delta_frames_per_request"] = {"p50": percentile(frames, 50), "max": max(frames)}
    return report


async def measure(base: str, key: str, args) -> dict:
    report: dict = {}
    for label, model, requests in (("", MODEL, args.requests), ("paced_", PACED_MODEL, args.paced_requests)):
        await sse_path(base, key, 20, args.tokens, model)  # warm up: connections, the ORM, caches
        await websocket_path(base, key, 20, args.tokens, model)
        direct = direct_engine(requests, args.tokens, model)
        report |= {
            f"{label}engine_direct": {k: round(v, 4) for k, v in direct.items()},
            f"{label}websocket": overhead(await websocket_path(base, key, requests, args.tokens, model), direct),
            f"{label}sse": overhead(await sse_path(base, key, requests, args.tokens, model), direct),
        }
    report |= {
        "floors": await floors(base, key, args.requests),
        "non_streaming": await non_streaming_load(base, key, args.clients, args.seconds, 16),
    }
    if args.cache_key:
        from inference.bench_load import cache_hits

        floor = report["floors"]["http_get_models"]["p50_ms"]
        report["exact_cache"] = await cache_hits(base, args.cache_key, MODEL, args.requests, floor)
    if args.burst_keys:
        from inference.bench_load import burst

        capacity = 64  # the trivial engine's slots (inference.engines.DEFAULT_LOCAL_SLOTS)
        report["burst"] = await burst(base, args.burst_keys, PACED_MODEL, capacity, 4, args.burst_tokens)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure the platform's overhead over the engine.")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--paced-requests", type=int, default=100, help="requests per path on the paced engine")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--server", choices=sorted(SERVERS), default="platform")
    parser.add_argument("--database-url", default="", help="the server's DATABASE_URL (default: a fresh SQLite file)")
    parser.add_argument("--no-burst", action="store_true", help="skip the 3-tenant burst of 4x capacity")
    parser.add_argument("--burst-tokens", type=int, default=300, help="tokens each of the burst's streams asks for")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")
    import django

    django.setup()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    with tempfile.TemporaryDirectory() as tmp:
        # the burst's three tenants; the cache is off in the builtin policy here (the other figures are of
        # generations): one more tenant turns it on
        burst = () if args.no_burst else ("tenant-a", "tenant-b", "tenant-c")
        users = ("demo", *burst, "tenant-cache")
        server, base, keys = start_server(
            Path(tmp), args.server, args.database_url, usernames=users, cache_users=users[-1:]
        )
        key, args.cache_key = keys["demo"], keys["tenant-cache"]
        args.burst_keys = {name[-1]: keys[name] for name in burst} or None
        try:
            report = {
                "machine": {"cpu_count": os.cpu_count()},
                "server": f"{args.server}, 1 process, {'PostgreSQL' if args.database_url else 'SQLite'}, trivial engine",
                "tokens_per_request": args.tokens,
                "paced_round_ms": PACED_ROUND_MS,
                **asyncio.run(measure(base, key, args)),
            }
        finally:
            server.terminate()
            server.wait(timeout=10)
    emit(report, args.out)


if __name__ == "__main__":
    main()
