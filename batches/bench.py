"""Batch throughput against the same requests sent one by one through the API, same process, same engines.

``python -m batches.bench`` prints JSON: requests/s and completion tokens/s of each path,
the speed-up, and whether every batch answer equals the answer to the same request sent
alone (greedy, so they must). Runs on the demo pair (``tandem-demo``) by default, as
``make run`` serves it; ``TANDEM_ENGINES`` names another engine factory.

The batch runs as a worker runs it (``batches.runner.run_batch``: its lines through the
gateway, ``TANDEM_BATCH_CONCURRENCY`` at once, so their speculative rounds share the
verifier's batched forwards); the one-by-one requests go through the OpenAI API
(``/v1/chat/completions`` in process, over ASGI), each waiting for the last.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _setup(var: Path) -> str:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    os.environ["TANDEM_VAR_DIR"] = str(var)
    os.environ["DATABASE_URL"] = f"sqlite:///{var / 'bench.sqlite3'}"
    os.environ["TANDEM_CACHE_TTL_S"] = "0"  # every answer generated: no path replays another's
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    out = io.StringIO()
    call_command("tandem_demo", models=os.environ.get("TANDEM_BENCH_MODEL", "tandem-demo"), stdout=out)
    return next(line.split()[-1] for line in out.getvalue().splitlines() if line.strip().startswith("API key"))


def bodies(count: int, max_tokens: int, model: str) -> list[dict]:
    topics = ["the sea", "a city at night", "bread", "trains", "winter", "a garden", "the moon", "music"]
    return [
        {
            "model": model,
            "messages": [{"role": "user", "content": f"Tell me about {topics[n % len(topics)]} ({n})."}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for n in range(count)
    ]


async def one_by_one(raw_key: str, requests: list[dict]) -> tuple[float, list[str], int]:
    import httpx
    import openai

    from config.asgi import application

    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
        client = openai.AsyncOpenAI(base_url="http://bench/v1", api_key=raw_key, http_client=http, max_retries=0)  # type: ignore[arg-type]
        texts, tokens = [], 0
        started = time.perf_counter()
        for body in requests:
            answer = await client.chat.completions.create(**body)
            texts.append(answer.choices[0].message.content or "")
            tokens += answer.usage.completion_tokens if answer.usage else 0
        return time.perf_counter() - started, texts, tokens


async def as_batch(requests: list[dict]) -> tuple[float, list[str], int, str]:
    from batches import services
    from batches.models import BatchLine
    from batches.runner import run_batch
    from inference.runtime import db
    from tenants.models import ApiKey

    key = await ApiKey.objects.aget()
    rows = [
        {"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions", "body": b}
        for n, b in enumerate(requests)
    ]
    content = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    uploaded = await db(services.file_upload)(
        tenant_id=key.tenant_id, filename="b.jsonl", content=content, purpose="batch"
    )
    batch = await db(services.batch_create)(
        tenant_id=key.tenant_id,
        api_key_id=key.pk,
        input_file_id=uploaded.public_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=None,
    )
    started = time.perf_counter()
    ended = await run_batch(batch.pk)
    elapsed = time.perf_counter() - started
    assert ended is not None
    lines = [line async for line in BatchLine.objects.filter(batch=batch).order_by("number")]
    texts = [(line.body or {}).get("choices", [{}])[0].get("message", {}).get("content", "") for line in lines]
    tokens = sum((line.body or {}).get("usage", {}).get("completion_tokens", 0) for line in lines)
    return elapsed, texts, tokens, ended.status


def rates(elapsed: float, count: int, tokens: int) -> dict:
    return {
        "seconds": round(elapsed, 3),
        "requests_per_s": round(count / elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "completion_tokens": tokens,
    }


async def bench(raw_key: str, count: int, max_tokens: int, model: str) -> dict:
    from django.conf import settings

    from inference.engines import aget_engines

    await aget_engines()  # loaded before either clock starts
    requests = bodies(count, max_tokens, model)
    await one_by_one(raw_key, requests[:2])  # warm-up: first-use costs out of both figures
    alone_s, alone_texts, alone_tokens = await one_by_one(raw_key, requests)
    batch_s, batch_texts, batch_tokens, status = await as_batch(requests)
    equal = sum(a == b for a, b in zip(alone_texts, batch_texts, strict=True))
    return {
        "model": model,
        "requests": count,
        "max_tokens": max_tokens,
        "batch_concurrency": settings.TANDEM_BATCH_CONCURRENCY,
        "one_by_one_api": rates(alone_s, count, alone_tokens),
        "batch": rates(batch_s, count, batch_tokens) | {"status": status},
        "speedup_requests": round(alone_s / batch_s, 2),
        "batch_equal_to_alone": equal,
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    var = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    raw_key = _setup(var)
    model = os.environ.get("TANDEM_BENCH_MODEL", "tandem-demo")
    figures = asyncio.run(bench(raw_key, args.requests, args.max_tokens, model))
    print(json.dumps(figures, indent=2))
    sys.exit(0 if figures["batch_equal_to_alone"] == args.requests else 1)


if __name__ == "__main__":
    main()
