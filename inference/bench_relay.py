"""Benchmark: Tandem's cloud relay beside LiteLLM's proxy on the same instant upstream (``python -m inference.bench_relay``).

Prints one JSON object. Three paths to one upstream, an OpenAI-compatible server written
here (``upstream_app``: a bare ASGI app under uvicorn, in its own process, that answers
``POST /v1/chat/completions`` at once: 32 chunks when streamed, the same text whole
otherwise, with usage), so what is measured is each relay's own cost:

- ``direct``: the bench client calls the upstream itself (httpx), the floor;
- ``litellm``: through LiteLLM's proxy (its own virtualenv, ``--litellm-python``; a
  config file naming the upstream, no database, no key), one worker;
- ``tandem``: through the platform's server (``config.serve``, one process, SQLite,
  production's money settings as in ``inference.bench``) with the upstream registered as
  the cloud tier of ``tandem-test`` for every tenant, and a default routing policy that
  allows only the cloud, so every request is routed with all the router's checks (PII
  scan, difficulty classifier, decision); every request's ledger row is counted at the end.

For each path: requests one after another, non-streaming and streamed (time to the last
byte of the 32-chunk answer), reported as added to ``direct``'s median; then requests/s
and latency with ``--clients`` clients at once (non-streaming) for ``--seconds``. The
paths take turns within a round, in an order that rotates from round to round, and the
summary gives each figure's range over the rounds. Client, relays and upstream share this
machine's cores; the client is aiohttp's (``--client httpx`` for the earlier runs' client:
``CLIENTS`` says why it changed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import httpx

from inference.bench import MODEL, PROMPT, REPO, emit, manage, summary

CHUNKS = 32  # the upstream's answer: one chunk (one token) each
ANSWER = tuple(f" w{i}" for i in range(CHUNKS))
PROMPT_TOKENS = 9  # what the upstream reports of any prompt
UPSTREAM_MODEL = "bench-upstream"
UPSTREAM_NAME = "bench-upstream"
LITELLM_MODEL = "bench-upstream"
READY_TIMEOUT_S = 180.0  # LiteLLM's proxy takes a while to import
LEDGER_TIMEOUT_S = 20.0  # rows are written behind the reply, in batches
# The load generator must not be what is measured. Up to 2026-12-02 it was httpx, whose client
# costs 1.3 ms of CPU a request one at a time and 3-5 ms at 32 at once on this machine, against
# aiohttp's 0.15-0.35: with httpx every path topped out near 300 requests/s, the upstream alone
# included (aiohttp's client gets 6,000 from it), and the client took the cores from the relays.
CLIENTS = {
    "aiohttp": "the default since 2026-12-02: the client's own cost is a fraction of each path's",
    "httpx": "the runs before 2026-12-02 (compare with them); its own cost caps every path near 300 requests/s",
}


# --- the upstream: an instant OpenAI-compatible server ---------------------------------------------------


def _chunk(delta: dict, finish_reason: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": UPSTREAM_MODEL,
        "choices": [choice],
    }


def _usage() -> dict:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": CHUNKS, "total_tokens": PROMPT_TOKENS + CHUNKS}


def _sse(obj: dict | str) -> bytes:
    return b"data: " + (obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n\n"


def upstream_stream() -> list[bytes]:
    """The streamed answer's events: a role, 32 content chunks, the finish, usage, ``[DONE]``."""
    events = [_sse(_chunk({"role": "assistant", "content": ""}))]
    events += [_sse(_chunk({"content": piece})) for piece in ANSWER]
    events.append(_sse(_chunk({}, "stop")))
    events.append(_sse({**_chunk({}), "choices": [], "usage": _usage()}))
    events.append(_sse("[DONE]"))
    return events


def upstream_whole() -> bytes:
    message = {"role": "assistant", "content": "".join(ANSWER)}
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": UPSTREAM_MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": _usage(),
    }
    return json.dumps(body).encode()


STREAM_EVENTS = upstream_stream()
WHOLE_BODY = upstream_whole()


async def upstream_app(scope: dict, receive: Callable, send: Callable) -> None:
    """ASGI: ``POST /v1/chat/completions`` answered at once, each streamed chunk its own write."""
    if scope["type"] != "http":
        return
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] != "POST" or scope["path"].rstrip("/") != "/v1/chat/completions":
        await _respond(send, 404, b'{"error": {"message": "not found", "type": "invalid_request_error"}}')
        return
    try:
        stream = bool(json.loads(raw or b"{}").get("stream"))
    except ValueError:
        await _respond(send, 400, b'{"error": {"message": "the body is not JSON", "type": "invalid_request_error"}}')
        return
    if not stream:
        await _respond(send, 200, WHOLE_BODY)
        return
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for event in STREAM_EVENTS[:-1]:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": STREAM_EVENTS[-1], "more_body": False})


async def _respond(send: Callable, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- the platform's side (these run in the server's environment) ------------------------------------------


def relay_engines():
    """The benchmark server's models (``TANDEM_ENGINES``): ``tandem-test``, with its cloud tier."""
    from inference.engines import EngineSet, trivial_entry

    return EngineSet([trivial_entry(MODEL)], cloud=True)


def prepare_platform(upstream: str) -> str:
    """A fresh database: migrated, the demo tenant, the upstream registered; the demo's API key.

    One process for the three (``manage.py shell``), as each Django start-up costs seconds.
    """
    from io import StringIO

    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)
    boot = StringIO()
    call_command("tandem_demo", models=MODEL, stdout=boot)
    register_upstream(upstream)
    route_everything_to_the_cloud()
    return next(line.split()[-1] for line in boot.getvalue().splitlines() if line.strip().startswith("API key"))


def route_everything_to_the_cloud() -> None:
    """A platform default policy that allows only the cloud, with every check on.

    So each request goes through what a routed request costs (the PII scan, the difficulty
    classifier, the decision), not past it as a request naming its tier would: the
    router's checks are part of the relay's figure.
    """
    from inference.services import routing_policy_publish

    routing_policy_publish(tenant=None, allowed_tiers=["cloud"], difficulty_routing=True, note="relay benchmark")


def register_upstream(base_url: str) -> None:
    """The fake upstream as ``tandem-test``'s cloud tier for every tenant, at the demo's cloud prices."""
    from decimal import Decimal

    from inference.management.commands.tandem_demo import DEMO_RATES
    from inference.services import cloud_upstream_register

    rates = DEMO_RATES["cloud"]
    cloud_upstream_register(
        name=UPSTREAM_NAME,
        model=MODEL,
        base_url=base_url,
        upstream_model=UPSTREAM_MODEL,
        prompt_per_mtok=Decimal(rates["prompt_per_mtok"]),
        completion_per_mtok=Decimal(rates["completion_per_mtok"]),
        all_tenants=True,
        note="the relay benchmark's instant upstream (inference.bench_relay)",
    )


def ledger_counts() -> dict:
    """The ledger's rows: how many, by tier and outcome, and the cloud tier's charge."""
    from django.db.models import Count, Sum

    from tenants.models import UsageRecord

    rows = UsageRecord.objects.values("route_tier", "outcome").annotate(n=Count("id"))
    cloud = UsageRecord.objects.filter(route_tier="cloud").aggregate(
        cost=Sum("cost_cloud"), tokens=Sum("completion_tokens")
    )
    return {
        "rows": sum(r["n"] for r in rows),
        "by_tier_outcome": {f"{r['route_tier']}/{r['outcome']}": r["n"] for r in rows},
        "cloud_completion_tokens": cloud["tokens"] or 0,
        "cloud_cost": str(cloud["cost"] or 0),
    }


# --- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(
    command: list[str], *, env: dict[str, str], cwd: Path, ready: Callable[[], bool], log: Path
) -> Iterator[None]:
    """A server process, waited for until ``ready()``, terminated on exit (its output in ``log``)."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not ready():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} did not start: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


def upstream_server(var: Path, stack: ExitStack) -> str:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "inference.bench_relay:upstream_app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--loop", "uvloop", "--http", "httptools", "--lifespan", "off"]
    command += ["--log-level", "warning", "--no-access-log"]
    base = f"http://127.0.0.1:{port}/v1"
    stack.enter_context(
        running(command, env=dict(os.environ), cwd=REPO, ready=lambda: answers(base), log=var / "upstream.log")
    )
    return base


def platform_env(var: Path) -> dict[str, str]:
    return {
        # production's money settings, as inference.bench's server runs them
        "TANDEM_SETTLE_AFTER_REPLY": "1",
        "TANDEM_API_KEY_CACHE_TTL_S": "5",
        "TANDEM_BUDGET_LEASES": "1",
        # and production's routing-policy cache (the test settings read the policy for every request)
        "TANDEM_POLICY_CACHE_TTL_S": "5",
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "TANDEM_VAR_DIR": str(var),
        "DATABASE_URL": f"sqlite:///{var / 'bench.sqlite3'}",
        "TANDEM_LOG_LEVEL": "WARNING",
        "TANDEM_MAX_STREAMS_PER_TENANT": "64",
        "TANDEM_ENGINES": "inference.bench_relay.relay_engines",
        "TANDEM_CLOUD": "1",
    }


def platform_server(var: Path, upstream: str, stack: ExitStack) -> tuple[str, str, dict[str, str]]:
    """The platform's server with the upstream registered; its base URL, the demo key and its environment."""
    env = platform_env(var)
    code = f"from inference.bench_relay import prepare_platform; print(prepare_platform({upstream!r}))"
    key = manage(env, "shell", "-c", code).strip().splitlines()[-1]
    port = free_port()
    command = [sys.executable, "-m", "config.serve", "--port", str(port), "--log-level", "warning"]
    base = f"http://127.0.0.1:{port}/v1"
    stack.enter_context(
        running(command, env=env, cwd=REPO, ready=lambda: answers(base + "/models"), log=var / "platform.log")
    )
    return base, key, env


def read_ledger(env: dict[str, str]) -> dict:
    code = "import json; from inference.bench_relay import ledger_counts; print(json.dumps(ledger_counts()))"
    return json.loads(manage(env, "shell", "-c", code).strip().splitlines()[-1])


def litellm_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def litellm_server(python: str, upstream: str, var: Path, stack: ExitStack) -> tuple[str, str]:
    """LiteLLM's proxy, one worker, no database, with the upstream as its one model; its base URL and master key.

    A master key because the proxy refuses to start without one (1.108); with no
    database it is the only key, checked in memory, as Tandem's cached key is.
    """
    config, master_key = var / "litellm.yaml", f"sk-{secrets.token_hex(32)}"
    # JSON is YAML: the proxy's config, its model an OpenAI-compatible endpoint at the upstream
    model = {
        "model_name": LITELLM_MODEL,
        "litellm_params": {"model": f"openai/{UPSTREAM_MODEL}", "api_base": upstream, "api_key": "none"},
    }
    settings = {
        "model_list": [model],
        "general_settings": {"master_key": master_key},
        "litellm_settings": {"set_verbose": False},
    }
    config.write_text(json.dumps(settings))
    port = free_port()
    cli = str(Path(python).with_name("litellm"))
    command = [cli, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    env.pop("DATABASE_URL", None)
    base = f"http://127.0.0.1:{port}"
    ready = lambda: answers(base + "/health/liveliness")  # noqa: E731
    stack.enter_context(running(command, env=env, cwd=var, ready=ready, log=var / "litellm.log"))
    return base + "/v1", master_key


# --- the client ----------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One path to the upstream: where to post a chat completion and what to add to its body."""

    name: str
    base: str
    model: str
    key: str = ""
    extra: dict = field(default_factory=dict)
    sent: int = 0  # requests sent (the ledger is checked against tandem's)

    def body(self, stream: bool) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": CHUNKS,
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body | self.extra

    def client(self, kind: str, connections: int = 1) -> BenchClient:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return (AiohttpClient if kind == "aiohttp" else HttpxClient)(self.base, headers, connections)


class BenchClient:
    """The load generator's client: ``post(path, body) -> (status, body)``; one per path and phase."""

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> BenchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class HttpxClient(BenchClient):
    """httpx, the client of the runs up to 2026-12-02: its own cost caps every path (see ``CLIENTS``)."""

    def __init__(self, base: str, headers: dict[str, str], connections: int) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._client = httpx.AsyncClient(base_url=base, headers=headers, timeout=30, limits=limits)

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        response = await self._client.post(path, json=body)
        return response.status_code, response.content

    async def aclose(self) -> None:
        await self._client.aclose()


class AiohttpClient(BenchClient):
    """aiohttp's client (a dev dependency): a fifth of httpx's CPU a request, so the paths are what is measured."""

    def __init__(self, base: str, headers: dict[str, str], connections: int) -> None:
        import aiohttp  # the dev extras' (make install); --client httpx runs without it

        self._base = base
        self._headers = headers | {"Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        async with self._session.post(self._base + path, data=data, headers=self._headers) as response:
            return response.status, await response.read()

    async def aclose(self) -> None:
        await self._session.close()


def streamed_text(raw: str) -> str:
    pieces = []
    for line in raw.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices") or ():
                pieces.append((choice.get("delta") or {}).get("content") or "")
    return "".join(pieces)


async def one_at_a_time(target: Target, kind: str, requests: int, stream: bool) -> list[float]:
    """Requests one after another; each one's time to its last byte, ms. The first answer's text is checked."""
    body, times = target.body(stream), []
    async with target.client(kind) as client:
        for i in range(requests):
            started = time.perf_counter()
            status, raw = await client.post("/chat/completions", body)
            times.append((time.perf_counter() - started) * 1e3)
            target.sent += 1
            if status != 200:
                raise RuntimeError(f"{target.name} answered {status}: {raw[:500].decode(errors='replace')}")
            if i == 0:
                answer = raw.decode()
                text = streamed_text(answer) if stream else json.loads(answer)["choices"][0]["message"]["content"]
                if text != "".join(ANSWER):
                    raise RuntimeError(f"{target.name} relayed {text!r}, not the upstream's answer")
    return times


async def under_load(target: Target, kind: str, clients: int, seconds: float) -> dict:
    """``clients`` clients posting non-streaming requests back to back for ``seconds``."""
    body, latencies, errors = target.body(False), [], 0
    deadline = time.perf_counter() + seconds

    async def client_loop(client: BenchClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status, _ = await client.post("/chat/completions", body)
            target.sent += 1
            if status == 200:
                latencies.append((time.perf_counter() - started) * 1e3)
            else:
                errors += 1

    async with target.client(kind, clients) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency": summary(latencies) if latencies else None,
    }


async def measure_round(targets: list[Target], args: argparse.Namespace) -> dict:
    times: dict[str, dict] = {}
    for target in targets:
        times[target.name] = {
            "non_streaming": await one_at_a_time(target, args.client, args.requests, stream=False),
            "stream": await one_at_a_time(target, args.client, args.stream_requests, stream=True),
            "load": await under_load(target, args.client, args.clients, args.seconds),
        }
    floor = {kind: median(times["direct"][kind]) for kind in ("non_streaming", "stream")}
    report: dict[str, Any] = {"order": [t.name for t in targets]}
    for name, path in times.items():
        report[name] = {
            "non_streaming": summary(path["non_streaming"]),
            "stream_last_byte": summary(path["stream"]),
            f"load_{args.clients}_clients": path["load"],
        }
        if name != "direct":
            report[name] |= {
                "added_non_streaming": summary([t - floor["non_streaming"] for t in path["non_streaming"]]),
                "added_stream_last_byte": summary([t - floor["stream"] for t in path["stream"]]),
            }
    return report


def span(rounds: list[dict], name: str, *keys: str) -> list[float] | None:
    values = []
    for report in rounds:
        value: Any = report.get(name)
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return [round(min(values), 3), round(max(values), 3)] if values else None


def summarize(rounds: list[dict], names: list[str], clients: int) -> dict:
    load = f"load_{clients}_clients"
    result: dict[str, dict] = {}
    for name in names:
        result[name] = {
            "non_streaming_p50_ms": span(rounds, name, "non_streaming", "p50_ms"),
            "stream_last_byte_p50_ms": span(rounds, name, "stream_last_byte", "p50_ms"),
            "requests_per_s": span(rounds, name, load, "requests_per_s"),
            "load_p99_ms": span(rounds, name, load, "latency", "p99_ms"),
        }
        if name != "direct":
            result[name] |= {
                f"added_{kind}_{q}_ms": span(rounds, name, f"added_{kind}", f"{q}_ms")
                for kind in ("non_streaming", "stream_last_byte")
                for q in ("p50", "p99")
            }
    return result


def aims(rounds: list[dict], clients: int, ledger_matched: bool) -> dict:
    """The issue's aims, judged in every round (the paths measured side by side): null without LiteLLM."""
    load = f"load_{clients}_clients"
    if not all("litellm" in r for r in rounds):
        return {"ledger_written": ledger_matched, "litellm": "not measured: the comparisons are null"}

    def ratio(numerator: float, denominator: float) -> float | None:
        return round(numerator / denominator, 2) if denominator > 0 else None

    added_ratios = {
        kind: [ratio(r["litellm"][f"added_{kind}"]["p50_ms"], r["tandem"][f"added_{kind}"]["p50_ms"]) for r in rounds]
        for kind in ("non_streaming", "stream_last_byte")
    }
    rps_ratios = [ratio(r["tandem"][load]["requests_per_s"], r["litellm"][load]["requests_per_s"]) for r in rounds]

    def at_most_a_fifth(kind: str) -> bool:
        # a relay that adds nothing measurable (<= 0 ms) meets it too
        return all(
            r["tandem"][f"added_{kind}"]["p50_ms"] * 5 <= r["litellm"][f"added_{kind}"]["p50_ms"] for r in rounds
        )

    return {
        "litellm_over_tandem_added_p50": added_ratios,
        "tandem_over_litellm_requests_per_s": rps_ratios,
        "added_p50_at_most_a_fifth_of_litellms": {kind: at_most_a_fifth(kind) for kind in added_ratios},
        "requests_per_s_at_least_3x_litellms": all(x is not None and x >= 3 for x in rps_ratios),
        "ledger_written": ledger_matched,
    }


def wait_for_ledger(env: dict[str, str], expected: int) -> dict:
    """The ledger once it holds ``expected`` rows (written behind the replies), or as it is after a while."""
    deadline = time.monotonic() + LEDGER_TIMEOUT_S
    while True:
        ledger = read_ledger(env)
        if ledger["rows"] >= expected or time.monotonic() > deadline:
            return ledger
        time.sleep(0.5)


async def run_rounds(targets: list[Target], args: argparse.Namespace) -> list[dict]:
    for target in targets:  # warm up: connections, the ORM, caches, LiteLLM's router
        await one_at_a_time(target, args.client, args.warmup, stream=False)
        await one_at_a_time(target, args.client, args.warmup, stream=True)
    rounds = []
    for i in range(args.rounds):
        shift = i % len(targets)
        rounds.append(await measure_round(targets[shift:] + targets[:shift], args))
    return rounds


def run_async(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the client as light as the servers
        return runner.run(coroutine)


def benchmark(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        var = Path(tmp)
        upstream = upstream_server(var, stack)
        base, key, env = platform_server(var, upstream, stack)
        targets = [
            Target("direct", upstream, UPSTREAM_MODEL),
            Target("tandem", base, MODEL, key=key),
        ]
        litellm: dict[str, Any]
        if args.litellm_python:
            litellm = {"version": litellm_version(args.litellm_python), "python": args.litellm_python, "workers": 1}
            litellm_base, master_key = litellm_server(args.litellm_python, upstream, var, stack)
            targets.append(Target("litellm", litellm_base, LITELLM_MODEL, key=master_key))
        else:
            litellm = {"skipped": "no --litellm-python given: LiteLLM's proxy was not measured"}
        rounds = run_async(run_rounds(targets, args))
        tandem = next(t for t in targets if t.name == "tandem")
        ledger = wait_for_ledger(env, tandem.sent)
        cloud_rows = ledger["by_tier_outcome"].get("cloud/completed", 0)
        ledger |= {"requests_sent": tandem.sent, "matched": ledger["rows"] == cloud_rows == tandem.sent}
        names = [t.name for t in targets]
        return {
            "machine": {"cpu_count": os.cpu_count()},
            "upstream": f"instant OpenAI-compatible ASGI app under uvicorn, {CHUNKS} chunks, usage reported",
            "tandem": "config.serve, 1 process, SQLite, production money settings, tier=cloud",
            "litellm": litellm,
            "rounds": args.rounds,
            "requests_one_at_a_time": {"non_streaming": args.requests, "stream": args.stream_requests},
            "clients": args.clients,
            "client": {"library": args.client, "why": CLIENTS[args.client]},
            "seconds": args.seconds,
            "summary": summarize(rounds, names, args.clients),
            "aims": aims(rounds, args.clients, ledger["matched"]),
            "ledger": ledger,
            "per_round": rounds,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tandem's cloud relay beside LiteLLM's proxy and the upstream alone.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--requests", type=int, default=200, help="non-streaming requests one at a time, per path and round"
    )
    parser.add_argument(
        "--stream-requests", type=int, default=200, help="streamed requests one at a time, per path and round"
    )
    parser.add_argument("--warmup", type=int, default=20, help="requests of each kind per path before the rounds")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--client", choices=sorted(CLIENTS), default="aiohttp", help="the load generator's HTTP client (see CLIENTS)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="of the concurrent load, per path and round")
    parser.add_argument("--litellm-python", default="", help="the python of a virtualenv with litellm[proxy]")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    emit(benchmark(args), args.out)


if __name__ == "__main__":
    main()
